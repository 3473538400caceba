#!/usr/bin/env bash
# Development machine: builds everything a CUDA machine with PyTorch 2.11 but no Rust toolchain
# needs (../shared/GPU.md) into target/gpu-bundle/ (git-ignored, ≈ 40 MB): the rso-tch test
# binaries and the GPU check (benches/gpu_check.rs) built with the `cuda` feature, the `rso`
# binary (release, `--features cuda`), the MNIST files and run.sh. Carry target/gpu-bundle to the
# GPU machine and run `bash target/gpu-bundle/run.sh` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup-libtorch.sh >/dev/null
bash scripts/fetch-mnist.sh >/dev/null
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out/data/mnist"
cargo build --release --features cuda --bin rso
cp target/release/rso "$out/"
# `cargo … --no-run` names each executable: "Executable tests/x.rs (target/...)" /
# "Executable benches/x.rs (target/...)".
executables() {
    sed -n 's/^ *Executable \(tests\|benches\)\/\([a-z_]*\)\.rs (\(.*\))$/\2 \3/p'
}
cargo test --release -p rso-tch --features cuda --no-run 2>&1 | executables |
    while read -r name path; do
        case "$name" in engine | cross_backend | incremental) cp "$path" "$out/$name" ;; esac
    done
cargo bench --features cuda --bench gpu_check --no-run 2>&1 | executables |
    while read -r name path; do cp "$path" "$out/$name"; done
strip "$out"/rso "$out"/gpu_check "$out"/engine "$out"/cross_backend "$out"/incremental
cp data/mnist/*.gz "$out/data/mnist/"
cp scripts/gpu/run.sh "$out/"
git describe --always --dirty >"$out/REVISION"
ls -la "$out"
du -sh "$out"
