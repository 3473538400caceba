#!/usr/bin/env bash
# CUDA machine: runs the bundle that scripts/gpu/bundle.sh built, against this machine's PyTorch
# libraries (../shared/GPU.md). Correctness first, timings next, the paper's run last:
#   1. the `*_cuda` tests of rso-tch (engine, cross-backend against the pure-Rust engine,
#      incremental against reference) with RSO_REQUIRE_CUDA=1, so a missing GPU fails them;
#   2. the GPU check: a checkpoint's loss on CUDA vs CPU, then reference and incremental
#      seconds per RSO round (one-conv B=1024, paper B=1000 and 5000, two-conv B=1000), a table;
#   3. `rso reproduce paper --backend tch --device cuda` for at most PAPER_SECONDS (default 300;
#      0 skips it), checkpointing every round into $OUT/paper-checkpoint, so a later session can
#      go on with `rso reproduce paper --resume DIR`; the CSV of the completed rounds goes to
#      $OUT/results/paper_mnist.csv.
# Usage: bash target/gpu-bundle/run.sh [stages]   (stages: any of 1 2 3; default "1 2 3")
# Environment: OUT (default ./gpu-out), PAPER_SECONDS, PAPER_RESUME (a checkpoint directory to
# resume instead of starting), CHECK_SCALE (the GPU check's fraction multiplier, default 1).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
stages="${*:-1 2 3}"
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
TL="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib"
if [ ! -f "$TL/libtorch_cpu.so" ]; then
    echo "run.sh: no PyTorch libraries found through $py (got '$TL')" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RSO_REQUIRE_CUDA=1
export RSO_DATA_DIR="$here/data/mnist"
echo "bundle revision: $(cat "$here/REVISION" 2>/dev/null || echo unknown)"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null
status=0
summary=()
if [[ " $stages " == *" 1 "* ]]; then
    for t in engine cross_backend incremental; do
        echo "== $t (cuda)"
        if "$here/$t" cuda --test-threads=4; then
            summary+=("tests $t cuda: ok")
        else
            summary+=("tests $t cuda: FAILED")
            status=1
        fi
    done
fi
if [[ " $stages " == *" 2 "* ]]; then
    echo "== gpu_check"
    "$here/gpu_check" cuda "${CHECK_SCALE:-1}" | tee "$out/gpu_check.txt" || status=1
fi
if [[ " $stages " == *" 3 "* ]] && [ "${PAPER_SECONDS:-300}" != 0 ]; then
    echo "== rso reproduce paper (at most ${PAPER_SECONDS:-300} s)"
    mkdir -p "$out/results"
    if [ -n "${PAPER_RESUME:-}" ]; then
        # Resume a copy under $OUT, so the further checkpoints come back with the results.
        rm -rf "$out/paper-checkpoint"
        cp -r "$PAPER_RESUME" "$out/paper-checkpoint"
        args=(--resume "$out/paper-checkpoint")
    else
        args=(--backend tch --device cuda --checkpoint-dir "$out/paper-checkpoint")
    fi
    timeout --signal=KILL "${PAPER_SECONDS:-300}" "$here/rso" reproduce paper "${args[@]}" \
        --data-dir "$here/data/mnist" --out-dir "$out/results"
    rc=$?
    summary+=("reproduce paper: exit $rc (137 = stopped at the time limit; rounds so far are in $out/results/paper_mnist.csv)")
    # round, seconds, test_acc (the CSV's header is line 1; provenance in paper_mnist.meta.json)
    cut -d, -f1,8,14 "$out/results/paper_mnist.csv" 2>/dev/null | column -t -s, || true
fi
echo
printf '%s\n' "${summary[@]}"
[ -f "$out/gpu_check.txt" ] && sed -n '/^| model/,$p' "$out/gpu_check.txt"
exit $status
