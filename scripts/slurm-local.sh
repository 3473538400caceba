#!/usr/bin/env bash
# Runs a command against a one-node Slurm cluster started on this machine, then stops it.
#
#   scripts/slurm-local.sh COMMAND [ARG...]
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge with apt when they are missing
# (root needed), writes a minimal slurm.conf into a temporary directory (SlurmUser=root, this
# node with its real CPU count and memory, one partition `debug`), starts munged, slurmctld and
# slurmd in the foreground of background jobs, waits until the node is idle, runs COMMAND with
# SLURM_CONF pointing at the config, and stops the daemons by their pids (in a trap, however the
# command ends). Exit status: COMMAND's.
#
# Where Slurm cannot be installed or started, it says so and exits 0 without running COMMAND
# (a skip), unless RSO_REQUIRE_SLURM=1 (as .ci/run sets), which turns the skip into a failure.
set -uo pipefail

skip() {
    echo "slurm-local: SKIPPED: $*" >&2
    if [[ "${RSO_REQUIRE_SLURM:-}" == 1 ]]; then
        echo "slurm-local: RSO_REQUIRE_SLURM=1: failing instead of skipping" >&2
        exit 1
    fi
    exit 0
}

[[ $# -ge 1 ]] || { echo "usage: scripts/slurm-local.sh COMMAND [ARG...]" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    [[ "$(id -u)" == 0 ]] || skip "Slurm is not installed and installing it needs root"
    echo "slurm-local: installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || skip "apt-get install of Slurm failed"
fi
[[ "$(id -u)" == 0 ]] || skip "the daemons run as root (SlurmUser=root); run as root"

dir="$(mktemp -d /tmp/rso-slurm.XXXXXX)"
pids=()
stop() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    [[ -n "${RSO_SLURM_KEEP:-}" ]] || rm -rf "$dir"
}
trap stop EXIT

node="$(hostname -s)"
cpus="$(nproc)"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
# Ports of our own, so that a Slurm already running elsewhere on the machine is not disturbed.
port=$((20000 + RANDOM % 20000))
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"

# munge: a key of our own, a socket in the temporary directory.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$dir/munge/munge.key"
munged -F --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed" >"$dir/munge/munged.out" 2>&1 &
pids+=($!)

cat > "$dir/slurm.conf" <<EOF
ClusterName=rsolocal
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"

for _ in $(seq 50); do [[ -S "$dir/munge/munge.socket" ]] && break; sleep 0.1; done
[[ -S "$dir/munge/munge.socket" ]] || { cat "$dir/munge/munged.log" >&2; skip "munged did not start"; }

slurmctld -D -i -f "$SLURM_CONF" >"$dir/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" >"$dir/slurmd.out" 2>&1 &
pids+=($!)

up=""
for _ in $(seq 150); do
    state="$(sinfo -h -N -o '%T' 2>/dev/null | head -1)"
    if [[ "$state" == idle* ]]; then up=1; break; fi
    sleep 0.2
done
if [[ -z "$up" ]]; then
    tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" "$dir/slurmctld.out" "$dir/slurmd.out" >&2 2>/dev/null
    skip "the Slurm node did not come up (state: ${state:-none})"
fi
echo "slurm-local: cluster up (node $node, $cpus CPUs, config $SLURM_CONF)"

"$@"
