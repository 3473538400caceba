#!/usr/bin/env bash
# The main job: fetch MNIST, build rso, and regenerate results/seed_table.{csv,md} (the reference
# notebook's ten RSO configurations, 5 seeds per one-conv/two-conv row and 1 per paper row, run as
# the study results/seed_table.plan.toml) and results/comparison*.{csv,svg} (RSO against SGD).
# Each round prints a line (and a progress bar with ETA on a terminal).
#
# Usage: scripts/reproduce.sh [--quick]
#   --quick  a three-row seed table with 2 seeds (results/seed_table_quick.*) and a 3-round
#            comparison into results/quick/, about ten minutes in all.
# The full run takes about an hour on a 2-core machine. Interrupted, run it again: the seed
# table's study runs only what is missing (an interrupted run resumes from its checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=""
if [[ "${1:-}" == "--quick" ]]; then
    quick=1
elif [[ $# -gt 0 ]]; then
    echo "usage: scripts/reproduce.sh [--quick]" >&2
    exit 2
fi

bash scripts/fetch-mnist.sh
cargo build --release -p rso-cli
rso=target/release/rso

if [[ -n "$quick" ]]; then
    $rso reproduce seed-table --quick --seeds 2
    $rso reproduce comparison --models one-conv --rounds 3 --out-dir results/quick
else
    $rso reproduce seed-table
    $rso reproduce comparison
fi
