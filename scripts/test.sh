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

echo "== results files: header on line 1, plain CSV, a .meta.json beside each"
python3 scripts/check-results.py results

echo "== Slurm: a study as a job array on a one-node cluster (skips without root/apt unless RSO_REQUIRE_SLURM=1)"
bash scripts/slurm-local.sh cargo test -p rso-cli --test slurm -- --ignored

echo "== libtorch engine (rso-tch: libtorch 2.11 from the torch wheel in .venv/)"
bash scripts/setup-libtorch.sh
cargo clippy -p rso-tch --all-targets -- -D warnings
cargo clippy -p rso-tch --all-targets --features cuda -- -D warnings
# Cross-backend property tests against the pure-Rust engine; the *_cuda variants skip without a
# GPU (RSO_REQUIRE_CUDA=1 makes them fail instead).
cargo test -p rso-tch
# The CUDA build: libtorch_cuda.so must load (TF32 off for cuDNN) even where no GPU is present.
cargo test -p rso-tch --features cuda --test engine
# The rso binary with the libtorch engine (rpath, feature wiring, --backend tch end to end).
cargo clippy -p rso-cli --features tch --all-targets -- -D warnings
cargo test -p rso-cli --features tch --test cli
