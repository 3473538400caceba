#!/usr/bin/env bash
# Exports criterion's estimates of the RSO-round benches to a CSV.
#
#   scripts/bench-to-csv.sh [CRITERION_DIR] [OUT] [GROUP_PREFIX]
#
# CRITERION_DIR: criterion's output (default: $CARGO_TARGET_DIR/criterion, else target/criterion);
# OUT: the CSV (default results/bench_rso_round.csv); GROUP_PREFIX: groups to export (default
# rso_round/). Reads every <group>/<bench>/new/{benchmark,estimates}.json and writes
#   group,id,mean_s,median_s,stddev_s,weights_per_s
# (weights_per_s = the bench's element throughput / mean; header on line 1, nothing but CSV), and
# beside it OUT's .meta.json (X.csv -> X.meta.json): the bench command, the revision (git
# describe, dirty or not), the machine (CPU model, cores, SIMD class, load average at export
# time) and the date. Both written atomically. Run it after `cargo bench --bench rso_round` (it
# does not run the benches).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
crit="${1:-${CARGO_TARGET_DIR:-$root/target}/criterion}"
out="${2:-$root/results/bench_rso_round.csv}"
prefix="${3:-rso_round/}"

if [[ ! -d "$crit" ]]; then
    echo "bench-to-csv: no criterion output at $crit (run: cargo bench --bench rso_round)" >&2
    exit 1
fi
revision="$(git -C "$root" describe --always --abbrev=12 2>/dev/null || echo unknown)"
dirty=unknown
if status="$(git -C "$root" --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null)"; then
    if [[ -n "$status" ]]; then dirty=true; else dirty=false; fi
fi
cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)"
cores="$(nproc 2>/dev/null || echo '?')"
load="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
mkdir -p "$(dirname "$out")"

python3 - "$crit" "$out" "$prefix" "$revision" "$dirty" "${cpu:-unknown}" "$cores" "$load" <<'EOF'
import csv, datetime, io, json, os, platform, sys

crit, out, prefix, revision, dirty, cpu, cores, load = sys.argv[1:9]
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
flags = ""
try:
    with open("/proc/cpuinfo") as f:
        flags = next((l for l in f if l.startswith("flags")), "")
except OSError:
    pass
flags = set(flags.split())
simd = "avx512" if {"avx512f", "avx2", "fma"} <= flags else "avx2" if {"avx2", "fma"} <= flags else "portable"
meta = {
    "format": "rso-results-meta",
    "version": 1,
    "command": ["cargo", "bench", "--bench", "rso_round"],
    "exported_by": "scripts/bench-to-csv.sh",
    "revision": revision,
    "dirty": {"true": True, "false": False}.get(dirty),
    "machine": {"cpu": cpu, "cores": int(cores) if cores.isdigit() else None,
                "os": f"{platform.system().lower()} {platform.machine()}", "simd_class": simd,
                "load_average_at_export": load},
    "engine": {"backend": "cpu (and tch where the bench ids say so)", "device": "cpu",
               "kernels": "the widest level the CPU has, unless RSO_SIMD lowered it"},
    "versions": {"rso": None, "libtorch": None},
    "seed": None,
    "settings": {"criterion_dir": crit, "group_prefix": prefix},
    "started": None,
    "ended": date,
    "notes": ["ids ending in -est: a round scaled down by a fraction (training set and every "
              "array's scalars), scaled back up (benches/rso_round.rs)"],
}
text = io.StringIO()
w = csv.writer(text, lineterminator="\n")
w.writerow(["group", "id", "mean_s", "median_s", "stddev_s", "weights_per_s"])
w.writerows(rows)
meta_path = out[:-4] + ".meta.json" if out.endswith(".csv") else out + ".meta.json"

def write_atomic(path, content):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
write_atomic(out, text.getvalue())
print(f"bench-to-csv: {len(rows)} rows -> {out} (provenance: {meta_path})")
EOF
