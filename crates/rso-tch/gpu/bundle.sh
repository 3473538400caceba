#!/usr/bin/env bash
# Development machine: builds the CUDA-enabled test binaries of rso-tch and the GPU check
# (examples/gpu_check.rs) in release mode, stripped, into target/gpu-bundle/ (git-ignored), for
# run.sh on a CUDA machine that has PyTorch 2.11 but no Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/../../.."
bash scripts/setup-libtorch.sh >/dev/null
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out"
cargo build --release -p rso-tch --features cuda --example gpu_check
cp target/release/examples/gpu_check "$out/"
# `cargo test --no-run` names each test executable: "Executable tests/x.rs (target/...)".
cargo test --release -p rso-tch --features cuda --no-run 2>&1 |
    sed -n 's/^ *Executable tests\/\([a-z_]*\)\.rs (\(.*\))$/\1 \2/p' |
    while read -r name path; do cp "$path" "$out/$name"; done
strip "$out"/*
cp crates/rso-tch/gpu/run.sh "$out/"
ls -la "$out"
du -sh "$out"
