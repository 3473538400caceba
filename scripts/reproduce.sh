#!/usr/bin/env bash
# The main job: fetch MNIST, build, and compare RSO (preset seed) with SGD on one-conv.
# Usage: scripts/reproduce.sh [ROUNDS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}

bash scripts/fetch-mnist.sh
cargo build --release -p rso-cli
rso=target/release/rso

echo "== RSO (preset seed), one-conv, batch 32, $rounds rounds"
$rso train --model one-conv --optimizer rso --preset seed --rounds "$rounds" --batch-size 32
echo "== SGD (lr 0.01), one-conv, batch 32, $rounds epochs"
$rso train --model one-conv --optimizer sgd --epochs "$rounds" --batch-size 32 --lr 0.01
