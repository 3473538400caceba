#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run calls it). Idempotent: fetches MNIST and
# sets libtorch up when missing, then runs format, lint and every test, libtorch engine included.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== data"
bash scripts/fetch-mnist.sh

echo "== format and lint (pure-Rust workspace)"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

echo "== tests (pure-Rust workspace)"
cargo test --workspace --exclude rso-tch
