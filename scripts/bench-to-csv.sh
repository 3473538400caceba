#!/usr/bin/env bash
# Exports criterion's estimates of the RSO-round benches to a CSV.
#
#   scripts/bench-to-csv.sh [CRITERION_DIR] [OUT] [GROUP_PREFIX]
#
# CRITERION_DIR: criterion's output (default: $CARGO_TARGET_DIR/criterion, else target/criterion);
# OUT: the CSV (default results/bench_rso_round.csv); GROUP_PREFIX: groups to export (default
# rso_round/). Reads every <group>/<bench>/new/{benchmark,estimates}.json and writes
#   group,id,mean_s,median_s,stddev_s,weights_per_s
# (weights_per_s = the bench's element throughput / mean), after a provenance header of `#`
# lines: the bench command, the revision (git describe), the machine (CPU model, cores, load
# average at export time) and the date. Run it after `cargo bench --bench rso_round` (it does not run the benches).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
crit="${1:-${CARGO_TARGET_DIR:-$root/target}/criterion}"
out="${2:-$root/results/bench_rso_round.csv}"
prefix="${3:-rso_round/}"

if [[ ! -d "$crit" ]]; then
    echo "bench-to-csv: no criterion output at $crit (run: cargo bench --bench rso_round)" >&2
    exit 1
fi
revision="$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)"
cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)"
cores="$(nproc 2>/dev/null || echo '?')"
load="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
mkdir -p "$(dirname "$out")"

python3 - "$crit" "$out" "$prefix" "$revision" "${cpu:-unknown}" "$cores" "$load" <<'EOF'
import csv, datetime, json, os, sys

crit, out, prefix, revision, cpu, cores, load = sys.argv[1:8]
rows = []
for dirpath, _, files in os.walk(crit):
    if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
        continue
    try:
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"bench-to-csv: cannot read {dirpath}: {e}")
    group = bench.get("group_id", "")
    if not group.startswith(prefix):
        continue
    parts = [p for p in (bench.get("function_id"), bench.get("value_str")) if p]
    ident = "/".join(parts)
    mean = est["mean"]["point_estimate"] / 1e9
    median = est["median"]["point_estimate"] / 1e9
    stddev = est["std_dev"]["point_estimate"] / 1e9
    throughput = bench.get("throughput") or {}
    elements = throughput.get("Elements")
    rate = f"{elements / mean:.1f}" if elements and mean > 0 else ""
    rows.append((group, ident, f"{mean:.6g}", f"{median:.6g}", f"{stddev:.6g}", rate))
if not rows:
    sys.exit(f"bench-to-csv: no estimates for groups {prefix!r} under {crit}")
rows.sort()
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
with open(out, "w", newline="") as f:
    f.write("# command: cargo bench --bench rso_round (criterion; exported by scripts/bench-to-csv.sh)\n")
    f.write(f"# revision: {revision}\n")
    f.write(f"# machine: {cpu}, {cores} cores (load average when exported: {load})\n")
    f.write(f"# date: {date}\n")
    f.write("# ids ending in -est: a round scaled down by a fraction (training set and every array's scalars), scaled back up (benches/rso_round.rs)\n")
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["group", "id", "mean_s", "median_s", "stddev_s", "weights_per_s"])
    w.writerows(rows)
print(f"bench-to-csv: {len(rows)} rows -> {out}")
EOF
