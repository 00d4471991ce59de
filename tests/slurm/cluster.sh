#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/slurm/test_sbatch.py (CI runs as root):
#   bash tests/slurm/cluster.sh start DIR   # installs slurm-wlm + munge if missing, starts munged,
#                                           # slurmctld and slurmd with DIR/slurm.conf; prints SLURM_CONF
#   bash tests/slurm/cluster.sh stop DIR
# Everything the cluster writes (state, spool, logs, pid files) stays under DIR.
set -euo pipefail
action=${1:?start or stop}
dir=$(realpath -m "${2:?state folder}")
conf="$dir/slurm.conf"

stop() {  # this cluster's daemons (their command lines name its slurm.conf), then wait for them to go
  pkill -f -- "-f $conf" 2>/dev/null || true
  for _ in $(seq 50); do pgrep -f -- "-f $conf" >/dev/null || break; sleep 0.1; done
  pkill -9 -f -- "-f $conf" 2>/dev/null || true
  rm -f "$dir"/slurmd.pid "$dir"/slurmctld.pid
}

if [ "$action" = stop ]; then stop; exit 0; fi
[ "$action" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "cluster.sh: the Slurm daemons need root (this machine's CI runs as root)" >&2; exit 3; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "[slurm] installing Debian's slurm-wlm and munge" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$dir.apt.log" 2>&1 \
    || { echo "cluster.sh: apt-get install slurm-wlm munge failed (log: $dir.apt.log)" >&2; exit 4; }
fi
mkdir -p "$dir/state" "$dir/spool" /run/munge
[ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || /usr/sbin/create-munge-key -f; }
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force

host=$(hostname -s)
cpus=$(nproc --all)  # not nproc: it follows OMP_NUM_THREADS
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
cat >"$conf" <<CONF
ClusterName=megatronrpgci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
stop
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
  echo "cluster.sh: another Slurm daemon runs on this machine (its ports would clash): stop it first" >&2
  pgrep -a slurm >&2 || true
  exit 6
fi
SLURM_CONF=$conf slurmctld -f "$conf"
SLURM_CONF=$conf slurmd -f "$conf"
for _ in $(seq 60); do
  if SLURM_CONF=$conf sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "$conf"; exit 0
  fi
  sleep 0.5
done
echo "cluster.sh: the node did not become idle in 30 s; logs: $dir/slurmctld.log $dir/slurmd.log" >&2
SLURM_CONF=$conf sinfo >&2 || true
exit 5
