"""Starts the sandbox binary for the cozepy contract tests.

The binary is `$SANDBOX_BIN`, default `<repo>/target/debug/sandbox`. It is started with
`--bind 127.0.0.1:0` and a test-only OAuth app key; the first stdout line is the JSON
`{"base_url": ..., "ws_url": ...}`.
"""

import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
KEYS = REPO / "sandbox" / "tests" / "keys"
KID = "kid_sdk_test"
APP_ID = "1100000001"
PAT = "pat_sandbox"


@pytest.fixture(scope="session")
def sandbox():
    binary = os.environ.get("SANDBOX_BIN", str(REPO / "target" / "debug" / "sandbox"))
    if not os.path.exists(binary):
        pytest.fail(f"sandbox binary not found at {binary}; build it or set SANDBOX_BIN")
    proc = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1:0",
            "--app-key",
            f"{KID}:{APP_ID}:{KEYS / 'test_only_rsa_public.pem'}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"sandbox exited early with {proc.wait(5)}")
        info = json.loads(line)
        info["kid"] = KID
        info["app_id"] = APP_ID
        info["private_key"] = (KEYS / "test_only_rsa_private.pem").read_text()
        yield info
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def coze(sandbox):
    """A Coze client authenticated with an OAuth token minted through the JWT flow."""
    from cozepy import Coze, JWTOAuthApp, TokenAuth

    app = JWTOAuthApp(
        client_id=sandbox["app_id"],
        private_key=sandbox["private_key"],
        public_key_id=sandbox["kid"],
        base_url=sandbox["base_url"],
    )
    token = app.get_access_token(ttl=900)
    return Coze(auth=TokenAuth(token.access_token), base_url=sandbox["base_url"])


FIXTURES = REPO / "tests" / "fixtures" / "tls"


def start_fleetgate(*extra):
    """Runs `fleetgate sandbox --json --port 0 --admin-port 0 *extra`; yields its JSON line plus
    `ws_url` (the device URL with a ws/wss scheme); stops it afterwards.

    The binary is `$FLEETGATE_BIN`, default `<repo>/target/debug/fleetgate`.
    """
    binary = os.environ.get("FLEETGATE_BIN", str(REPO / "target" / "debug" / "fleetgate"))
    if not os.path.exists(binary):
        pytest.fail(f"fleetgate binary not found at {binary}; build it or set FLEETGATE_BIN")
    proc = subprocess.Popen(
        [binary, "sandbox", "--json", "--port", "0", "--admin-port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"fleetgate sandbox exited early with {proc.wait(5)}")
        info = json.loads(line)
        scheme, rest = info["gateway_url"].split("://", 1)
        info["ws_url"] = ("wss://" if scheme == "https" else "ws://") + rest
        yield info
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def fleetgate():
    """`fleetgate sandbox --json`: the sandbox upstream plus a gateway wired to it. Yields the
    JSON line it prints (`gateway_url`, `admin_url`, `admin_token`, `upstream_url`,
    `device_id`, `device_token`) plus `ws_url`, the gateway's device URL with a `ws://` scheme.
    """
    yield from start_fleetgate()
