#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py.
#
#   slurm/local_cluster/start.sh            # prints `export SLURM_CONF=...` when the node is idle
#
# Installs Debian's slurm-wlm daemons and munge with apt if they are missing, writes slurm.conf
# for one node named after `hostname -s` with this machine's CPUs and memory, and starts munged,
# slurmctld and slurmd directly (no systemd). Everything it writes lives under
# $TESSERA_SLURM_DIR (/var/tmp/tessera-slurm): /etc/slurm is left alone, so clients find the
# cluster through SLURM_CONF. A second call with the cluster up returns at once.
#
# Exit status 77: this machine cannot host the cluster (not root, or no apt and no SLURM); the
# tests skip with the reason printed. Any other failure is an error.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
state="${TESSERA_SLURM_DIR:-/var/tmp/tessera-slurm}"
export SLURM_CONF="$state/slurm.conf"
# not SLURM's default ports, so a real SLURM on the same machine is not disturbed
ctld_port=16817
slurmd_port=16818

cannot_host() { echo "cannot host a test SLURM cluster: $*" >&2; exit 77; }
fail() { echo "start.sh: $*" >&2; exit 1; }

node_state() { sinfo --noheader --Node --format=%t 2>/dev/null | head -n1; }

cluster_up() {
    [[ -f "$SLURM_CONF" ]] && command -v sinfo >/dev/null && scontrol ping 2>/dev/null | grep -q UP \
        && [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]
}

if cluster_up; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
fi

[[ "$(uname -s)" == Linux ]] || cannot_host "not Linux"
[[ "$(id -u)" == 0 ]] || cannot_host "not root (slurmd must run as root)"

mkdir -p "$state"
# two test sessions starting at once: the second waits for the first, then finds the cluster up
exec 9>"$state/start.lock"
flock --timeout 600 9 || fail "timed out waiting for $state/start.lock"
if cluster_up; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
fi

started=$SECONDS
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || cannot_host "SLURM is not installed and there is no apt-get"
    echo "installing slurmctld slurmd slurm-client munge with apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >&2 \
        || { apt-get update >&2 && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >&2; } \
        || fail "apt-get install failed"
    echo "installed in $((SECONDS - started))s" >&2
fi

# munge: the key the package made, else a new one; munged runs as its own user, as under systemd
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge --no-input >/dev/null 2>&1; then
    runuser -u munge -- munged --force
fi
for _ in $(seq 50); do munge --no-input >/dev/null 2>&1 && break; sleep 0.1; done
munge --no-input >/dev/null 2>&1 || fail "munged did not start (see /var/log/munge/munged.log)"

# daemons of an earlier start that are no longer answering: stop them by their pid files
for daemon in slurmctld slurmd; do
    if [[ -f "$state/$daemon.pid" ]]; then
        kill "$(cat "$state/$daemon.pid")" 2>/dev/null || true
    fi
done
sleep 1

mkdir -p "$state/slurmctld" "$state/slurmd" "$state/log"
host="$(hostname -s)"
cpus="$(nproc --all)"
# a little under what the kernel reports: slurmd drains a node that has less than configured
memory_mb=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY_MB@|$memory_mb|g" \
    -e "s|@STATE@|$state|g" -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
    "$here/slurm.conf.in" >"$SLURM_CONF"

# -i: ignore state saved by an earlier cluster in $state (jobs of a run long gone)
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF"

for _ in $(seq 60); do
    state_now="$(node_state)"
    [[ "$state_now" == idle ]] && break
    # a node slurmctld remembers as down from an earlier cluster: bring it back
    if [[ "$state_now" =~ ^(down|drain|drng) ]]; then
        scontrol update NodeName="$host" State=RESUME 2>/dev/null || true
    fi
    sleep 1
done
[[ "$(node_state)" == idle ]] || fail "node $host is '$(node_state)', not idle; see $state/log/"
echo "cluster up in $((SECONDS - started))s" >&2
echo "export SLURM_CONF=$SLURM_CONF"
