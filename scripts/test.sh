#!/usr/bin/env bash
# Runs every test fleetgate has: lints, the policy purity check, unit/property/integration
# tests (cargo nextest), and the official Coze SDKs (Python cozepy, Node @coze/api) against
# the sandbox and through the gateway. This is the README's test command; CI calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-1}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "policy stays pure (no tokio/pingora/hyper/reqwest/prometheus)"
if cargo tree -p policy -e normal --prefix none | grep -E '^(tokio|pingora|hyper|reqwest|prometheus)[ -]'; then
  echo "policy must not depend on I/O crates" >&2
  exit 1
fi

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --bins"
cargo build --workspace --bins

step "cargo nextest run"
cargo nextest run --workspace --no-fail-fast

FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
if [ "$FUZZ_SECONDS" -gt 0 ]; then
  step "fuzz targets (cargo fuzz, ${FUZZ_SECONDS}s each; FUZZ_SECONDS=0 skips)"
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked -q
  (
    cd fuzz
    export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
    for t in sse_meter ws_meter credentials quota_rules; do
      cargo fuzz run "$t" -s none -- -max_total_time="$FUZZ_SECONDS" 2>&1 | grep -E "Done [0-9]+ runs|panicked|SUMMARY|ERROR" || true
      if [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
        echo "fuzz target $t found a crash: fuzz/artifacts/$t" >&2
        exit 1
      fi
    done
  )
fi

step "official SDKs (cozepy, @coze/api)"
FLEETGATE_BIN="$TARGET/debug/fleetgate" SANDBOX_BIN="$TARGET/debug/sandbox" bash tests/sdk/run.sh
