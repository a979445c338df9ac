#!/usr/bin/env bash
# Real-SDK contract tests: unmodified cozepy (Python) and @coze/api (Node) against the sandbox and
# through the gateway (`fleetgate sandbox`). Also runs tests/deploy in the same venv: structural
# checks of deploy/, `fleetgate check-config` on the Kubernetes ConfigMap, and the admin API
# contract (docs/openapi.yaml kept in sync with the code and a live gateway, schemathesis fuzzing).
#
# Prerequisite: `cargo build --bins` (debug binaries `sandbox` and `fleetgate` under
# ${CARGO_TARGET_DIR:-<repo>/target}/debug). Needs python3 and node/npm; network access only to
# the package registries (PyPI, npm).
#
# Env:
#   SDK_VENV          Python venv to create/reuse (default <repo>/.venv-sdk)
#   CARGO_TARGET_DIR  where the binaries were built (default <repo>/target)
#   SANDBOX_BIN, FLEETGATE_BIN  override the binary paths
#
# Idempotent; quiet apart from the test output; exits non-zero if setup or any test fails.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SDK="$REPO/tests/sdk"
VENV="${SDK_VENV:-$REPO/.venv-sdk}"
BIN_DIR="${CARGO_TARGET_DIR:-$REPO/target}/debug"
export SANDBOX_BIN="${SANDBOX_BIN:-$BIN_DIR/sandbox}"
export FLEETGATE_BIN="${FLEETGATE_BIN:-$BIN_DIR/fleetgate}"
PY="${PYTHON:-python3}"

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

die() {
  echo "tests/sdk/run.sh: $*" >&2
  exit 2
}

# Runs a setup step with its output captured; shows the output only if the step fails.
quiet() {
  local rc=0
  "$@" >"$LOG" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    cat "$LOG" >&2
    die "setup step failed (exit $rc): $*"
  fi
}

# Like quiet, for a step that downloads from a package registry: up to 4 tries, 5, 15 and 45 s
# apart, because one registry hiccup must not fail a whole CI run (one did: an `npm ci` that
# failed once and printed nothing). Each failed try's output and exit code are shown.
quiet_net() {
  local try rc
  for try in 1 2 3 4; do
    rc=0
    "$@" >"$LOG" 2>&1 || rc=$?
    [ "$rc" -eq 0 ] && return 0
    echo "tests/sdk/run.sh: try $try of 4 failed (exit $rc): $*" >&2
    cat "$LOG" >&2
    [ "$try" -lt 4 ] && sleep $((5 * 3 ** (try - 1)))
  done
  die "setup step failed after 4 tries: $*"
}

for b in "$SANDBOX_BIN" "$FLEETGATE_BIN"; do
  [ -x "$b" ] || die "binary not found: $b (run 'cargo build --bins' first, or set CARGO_TARGET_DIR)"
done
command -v "$PY" >/dev/null || die "python3 not found"
command -v node >/dev/null || die "node not found"
command -v npm >/dev/null || die "npm not found"

# --- Python venv --------------------------------------------------------------------------------

venv_has_pip() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

# Puts pip into a venv made with --without-pip (Debian's python3 without python3-venv/ensurepip):
# with the system pip if there is one, else from the pip wheel on PyPI (pip runs from its wheel).
bootstrap_pip() {
  if "$PY" -m pip --version >/dev/null 2>&1 && "$PY" -m pip --python "$VENV/bin/python" --version >/dev/null 2>&1; then
    "$PY" -m pip --python "$VENV/bin/python" install -q --disable-pip-version-check pip
  else
    "$VENV/bin/python" - "$VENV" <<'PY'
import json, os, subprocess, sys, tempfile, urllib.parse, urllib.request
api = "https://pypi.org/pypi/pip/json"
meta = json.load(urllib.request.urlopen(api, timeout=60))
wheel = next(u for u in meta["urls"] if u["filename"].endswith(".whl"))
path = os.path.join(tempfile.mkdtemp(), wheel["filename"])
urllib.request.urlretrieve(urllib.parse.urljoin(api, wheel["url"]), path)
subprocess.check_call([sys.executable, path + "/pip", "install", "-q", "--disable-pip-version-check", path])
PY
  fi
}

if ! venv_has_pip; then
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" >"$LOG" 2>&1; then
    rm -rf "$VENV"
    quiet "$PY" -m venv --without-pip "$VENV"
    quiet_net bootstrap_pip
  fi
  venv_has_pip || die "could not create a Python venv with pip at $VENV"
fi

REQ="$SDK/python/requirements.txt"
STAMP="$VENV/.fleetgate-sdk-requirements"
if ! cmp -s "$REQ" "$STAMP"; then
  quiet_net "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
  cp "$REQ" "$STAMP"
fi

# --- Node deps ----------------------------------------------------------------------------------

(cd "$SDK/node" && quiet_net npm ci --no-audit --no-fund --loglevel=warn) || exit 2

# --- Tests --------------------------------------------------------------------------------------

status=0

echo "== Python SDK (cozepy) =="
(
  cd "$SDK/python" &&
    PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider .
) || status=1

echo "== Node SDK (@coze/api) =="
# The test CA, for the device-TLS tests (Node reads it once, at start-up).
(
  cd "$SDK/node" &&
    NODE_EXTRA_CA_CERTS="$REPO/tests/fixtures/tls/ca.pem" node --test --test-concurrency=1 --test-reporter=spec
) || status=1

echo "== Deployment artifacts (deploy/) and admin API contract (docs/openapi.yaml) =="
(
  cd "$REPO/tests/deploy" &&
    PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider .
) || status=1

if [ "$status" -ne 0 ]; then
  echo "tests/sdk/run.sh: SDK or deploy tests FAILED" >&2
fi
exit "$status"
