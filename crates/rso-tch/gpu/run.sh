#!/usr/bin/env bash
# CUDA machine: runs the bundle that bundle.sh built, against this machine's PyTorch libraries
# (GPU.md): the engine tests and the cross-backend tests with RSO_REQUIRE_CUDA=1 (a missing GPU
# fails them), then the GPU check (checkpoint loss CUDA vs CPU, reference RSO seconds per round),
# whose table comes last.
#
# Usage: bash target/gpu-bundle/run.sh [model] [batch] [visits]   (defaults: paper 1000 600)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
TL="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)/lib"
if [ ! -f "$TL/libtorch_cpu.so" ]; then
    echo "run.sh: no PyTorch libraries found through $py (got '$TL')" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RSO_REQUIRE_CUDA=1
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null
status=0
for t in engine cross_backend; do
    echo "== $t"
    "$here/$t" --test-threads=4 || status=1
done
echo "== gpu_check"
"$here/gpu_check" cuda "${1:-paper}" "${2:-1000}" "${3:-600}" || status=1
exit $status
