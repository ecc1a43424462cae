#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `utils.benchmark --launcher slurm` (and for its tests):
#
#     sudo bash utils/slurm_one_node.sh start    # as root, on Debian (its packages slurmctld slurmd slurm-client munge)
#     python -m utils.benchmark --launcher slurm --algos trefree ppo --env-ids Hopper-v5 --seeds 1 2 --workers 2
#     sudo bash utils/slurm_one_node.sh stop     # cancels the jobs, stops the daemons by their process ids
#
# One node (this machine's CPUs and memory), one partition, no accounting (job states come from squeue), no cgroups.
# It writes /etc/slurm/slurm.conf and cgroup.conf (never over a configuration it did not write), its state and logs to
# $SLURM_ONE_NODE_DIR (/var/tmp/slurm-one-node). A start that cannot be done says why in one line, which it also leaves in
# $SLURM_ONE_NODE_DIR/unavailable for the tests to skip with; exit 1.
set -uo pipefail
dir="${SLURM_ONE_NODE_DIR:-/var/tmp/slurm-one-node}"
conf=/etc/slurm/slurm.conf
mark="# written by utils/slurm_one_node.sh"

fail() {
    { mkdir -p "$dir" && echo "$*" >"$dir/unavailable"; } 2>/dev/null
    echo "error: $*" >&2
    exit 1
}

alive() { [ -s "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

ready() { [[ "$(sinfo --noheader --format=%t 2>/dev/null)" =~ ^(idle|mix)$ ]]; }

stop() {
    if alive slurmctld; then
        scancel --user="$(id -un)" 2>/dev/null
    fi
    for daemon in slurmd slurmctld munged; do
        if alive "$daemon"; then
            pid="$(cat "$dir/$daemon.pid")"
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null
        fi
        rm -f "$dir/$daemon.pid"
    done
}

start() {
    [ "$(id -u)" = 0 ] || fail "not root: a one-node SLURM needs root to start its daemons (sudo bash utils/slurm_one_node.sh start)"
    if alive slurmctld && alive slurmd && ready; then
        rm -f "$dir/unavailable"
        echo "a one-node SLURM is already running (sinfo: $(sinfo --noheader --format='%P %D %t'))"
        return 0
    fi
    stop
    mkdir -p "$dir" && rm -f "$dir/unavailable"
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
        command -v apt-get >/dev/null || fail "no apt-get: this script installs Debian's packages slurmctld slurmd slurm-client munge"
        packages=(slurmctld slurmd slurm-client munge)
        install() { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y --no-install-recommends "${packages[@]}"; }
        { install || { timeout 300 apt-get update && install; }; } >"$dir/apt.log" 2>&1 \
            || fail "cannot install Debian's packages ${packages[*]} (no network to the package mirror?): $(tail -1 "$dir/apt.log")"
    fi
    [ -e "$conf" ] && ! grep -qxF "$mark" "$conf" && fail "$conf exists and was not written by this script: a cluster is configured here"

    # The node as slurmd sees it (NodeName, CPUs, sockets, cores, threads, RealMemory), the controller on it too.
    node="$(slurmd -C | head -1)"
    host="$(hostname -s)"
    mkdir -p /etc/slurm "$dir/slurmctld" "$dir/slurmd"
    cat >"$conf" <<EOF
$mark
ClusterName=onenode
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/slurmctld
SlurmdSpoolDir=$dir/slurmd
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
$node State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    printf '%s\nCgroupPlugin=cgroup/v1\n' "$mark" >/etc/slurm/cgroup.conf # 22.05 has no "disabled"; TaskPlugin=task/none uses none

    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create && chown munge:munge /etc/munge/munge.key; } \
        || fail "cannot create the munge key /etc/munge/munge.key"
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid || fail "munged did not start: see journal or /var/log/munge/munged.log"
    cp /run/munge/munged.pid "$dir/munged.pid"
    slurmctld -c || fail "slurmctld did not start: $(tail -1 "$dir/slurmctld.log" 2>/dev/null)"
    slurmd || fail "slurmd did not start: $(tail -1 "$dir/slurmd.log" 2>/dev/null)"
    for _ in $(seq 150); do
        if ready; then
            echo "a one-node SLURM is running (sinfo: $(sinfo --noheader --format='%P %D %t %c CPUs')); stop it with: bash $0 stop"
            return 0
        fi
        sleep 0.2
    done
    reason="$(tail -1 "$dir/slurmd.log" 2>/dev/null)"
    stop
    fail "the node did not become idle in 30 s: $reason"
}

case "${1:-}" in
    start) start ;;
    stop) stop && echo "the one-node SLURM is stopped" ;;
    *)
        echo "usage: bash $0 start|stop" >&2
        exit 2
        ;;
esac
