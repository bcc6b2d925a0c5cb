#!/usr/bin/env bash
# The one command that installs what the tests need and runs every test.
# Safe to re-run; CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0

step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

step "toolchain"
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust with rustup first (https://rustup.rs)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo --version

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets -- -D warnings

step "unit, property and integration tests"
FAULT_TABLE=${CARGO_TARGET_DIR:-target}/tmp/fault-table.md # tests/faults.rs appends a row per fault
rm -f "$FAULT_TABLE"
cargo test --workspace
if [ -s "$FAULT_TABLE" ]; then
  printf '\nFault scenarios (tests/faults.rs), each under continuous payments:\n'
  printf '| %-44s | %8s | %12s | %4s | %5s |\n' fault "failed" "paid again" lost twice
  printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..46})" "----------" "--------------" "------" "-------"
  sort "$FAULT_TABLE"
fi

if [ -x e2e/run.sh ]; then
  step "end-to-end suite (real Kubernetes control plane)"
  e2e/run.sh
fi
step "all tests passed"
