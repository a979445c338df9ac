"""Fuzzes the admin API of a live `fleetgate sandbox` with schemathesis, driven by docs/openapi.yaml.

Every operation gets bounded example-, coverage-, fuzzing- and stateful-phase requests
(`--max-examples 25`, one worker, a fixed seed so CI is reproducible; set SCHEMATHESIS_SEED to
explore other seeds). The run fails on any of CHECKS:

- `not_a_server_error`: bad input must get a 4xx with the error envelope, never a 5xx, a
  dropped connection or a crash;
- `status_code_conformance`, `content_type_conformance`, `response_headers_conformance`,
  `response_schema_conformance`: every answer is documented in the spec as it is sent;
- `ignored_auth`: authenticated operations refuse requests without the admin token;
- `negative_data_rejection`: schema-violating requests (wrong types, arrays for objects,
  bad ids) are refused with a 4xx;
- `unsupported_method`: other methods on a documented path get 405 with an `Allow` header.
`positive_data_acceptance` is not used: the spec cannot express cross-field and stateful
rules (rule overlaps, disabled devices, ...) that legitimately turn valid-shaped input into 400.

DELETE operations delete sandbox devices; the sandbox is private to this module. Takes ~10 s.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
    "negative_data_rejection",
    "unsupported_method",
]
SEED = os.environ.get("SCHEMATHESIS_SEED", "20251121")
TIMEOUT_S = 150


def schemathesis(workdir: Path, url: str, token: str, *extra: str) -> subprocess.CompletedProcess:
    """Runs the CLI in `workdir`, where it keeps its caches (.schemathesis/, .hypothesis/)."""
    checks = CHECKS + [c for c in os.environ.get("SCHEMATHESIS_EXTRA_CHECKS", "").split(",") if c]
    cmd = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "--no-color", "run", str(OPENAPI),
        "--url", url,
        "--header", f"Authorization: Bearer {token}",
        "--checks", ",".join(checks),
        "--max-examples", "25",
        "--seed", SEED,
        # One worker: Python 3.11's ast module is not thread-safe in the way hypothesis uses it
        # ("AST constructor recursion depth mismatch" with several workers).
        "--workers", "1",
        "--request-timeout", "10",
        *extra,
    ]
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=workdir)


def summary(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    # Failures are listed after "FAILURES"/"ERRORS"; keep the report readable in pytest's output.
    for marker in ("= FAILURES =", "= ERRORS =", "ERRORS", "FAILURES"):
        i = out.find(marker)
        if i >= 0:
            return out[max(0, i - 200) :][-12000:]
    return out[-6000:]


def test_admin_api_survives_fuzzing_and_conforms(admin_sandbox, tmp_path):
    proc = schemathesis(tmp_path, admin_sandbox["admin_url"], admin_sandbox["admin_token"])
    assert proc.returncode == 0, f"schemathesis exit {proc.returncode}:\n{summary(proc)}"
    # The gateway must still be up and answering after the run.
    with urllib.request.urlopen(admin_sandbox["admin_url"] + "/healthz", timeout=5) as r:
        assert r.status == 200


class _Failing(http.server.BaseHTTPRequestHandler):
    """GET /healthz answers 500: what a gateway bug would look like to schemathesis."""

    def do_GET(self):  # noqa: N802
        body = b'{"code":5000,"msg":"boom","detail":{"logid":"x"}}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_error_fails_the_run(tmp_path):
    """The exit-code handling above is real: a 5xx makes schemathesis (and so the test) fail."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = schemathesis(tmp_path, url, "unused", "--include-path", "/healthz", "--phases", "examples,fuzzing",
                            "--max-examples", "1")
    finally:
        server.shutdown()
        server.server_close()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Server error" in out, out[-3000:]
