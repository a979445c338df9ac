"""Shared fixtures for the admin API contract tests (test_openapi.py, test_schemathesis.py).

`admin_sandbox` starts `fleetgate sandbox --json --port 0 --admin-port 0` (the sandbox upstream
plus a gateway wired to it, on free ports) once per test module and yields the JSON line it
prints (`admin_url`, `admin_token`, `gateway_url`, `device_id`, ...). Each module gets its own
process, so one module's deletions never affect another's.

Env: FLEETGATE_BIN (default ${CARGO_TARGET_DIR:-<repo>/target}/debug/fleetgate).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OPENAPI = REPO / "docs" / "openapi.yaml"


def fleetgate_binary() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    path = Path(os.environ.get("FLEETGATE_BIN") or target / "debug" / "fleetgate")
    if not path.exists():
        pytest.fail(f"fleetgate binary not found at {path}; run `cargo build --bins` or set FLEETGATE_BIN")
    return path


@pytest.fixture(scope="module")
def admin_sandbox():
    proc = subprocess.Popen(
        [str(fleetgate_binary()), "sandbox", "--json", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"fleetgate sandbox exited early with {proc.wait(5)}")
        info = json.loads(line)
        yield info
    finally:
        # The sandbox keeps everything in memory and a graceful stop waits out its 5 s grace
        # period: ask once, then stop it hard so each module costs no idle seconds.
        proc.terminate()
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def openapi_spec() -> dict:
    with OPENAPI.open() as f:
        return yaml.safe_load(f)
