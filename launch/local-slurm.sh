#!/usr/bin/env bash
# A throw-away Slurm cluster on this host, from Debian's packages, for trying arpipe's Slurm
# path on a laptop and for the tests. Needs root; no systemd or cgroups (daemons are started
# by hand, processes tracked with proctrack/linuxproc).
#
#   launch/local-slurm.sh start [--nodes N] [--cpus C]   install if needed, configure, start, wait for idle
#   launch/local-slurm.sh stop                           cancel jobs, stop slurmd(s), slurmctld, munged
#   launch/local-slurm.sh status
#
# With --nodes N > 1, N slurmd daemons act as nodes n1..nN on this host (Debian builds slurmd
# with MULTIPLE_SLURMD); their names do not resolve, so every node has NodeAddr=127.0.0.1 and
# job scripts take the master address from `scontrol show node`, never from the node name.
set -euo pipefail

action=${1:-status}; shift || true
nodes=1
cpus=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    *) echo "usage: $0 start|stop|status [--nodes N] [--cpus C]" >&2; exit 2 ;;
  esac
done
host=$(hostname -s)
conf=/etc/slurm/slurm.conf
logs=/var/log/slurm

node_names() { if [ "$nodes" -eq 1 ]; then echo "$host"; else seq -f "n%g" 1 "$nodes"; fi; }

install() {
  command -v slurmctld >/dev/null && return
  echo "installing slurmctld, slurmd, slurm-client and munge from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  # --no-install-recommends: 8 packages instead of ~40 (no hdf5/rrd/ipmi plugins)
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey -c
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null
}

write_config() {
  local memory=$(( $(free -m | awk '/^Mem:/{print $2}') * 8 / 10 / nodes ))
  rm -rf /var/spool/slurmctld /var/spool/slurmd  # fresh state: job ids from 1, no stale jobs
  mkdir -p /etc/slurm "$logs" /var/spool/slurmctld /var/spool/slurmd
  {
    echo "ClusterName=arpipe-local"
    echo "SlurmctldHost=${host}(127.0.0.1)"   # must be this host's short name
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "StateSaveLocation=/var/spool/slurmctld"
    echo "SlurmctldPidFile=/run/slurmctld.pid"
    echo "SlurmctldLogFile=$logs/slurmctld.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$logs/jobcomp.log"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "EnforcePartLimits=ALL"    # impossible requests fail at submit instead of pending forever
    echo "ReturnToService=2"
    echo "MinJobAge=300"            # finished jobs stay visible to scontrol for 5 minutes
    echo "KillWait=10"
    [ "$cpus" -gt "$(nproc)" ] && echo "SlurmdParameters=config_overrides"
    if [ "$nodes" -eq 1 ]; then
      echo "SlurmdSpoolDir=/var/spool/slurmd"
      echo "SlurmdPidFile=/run/slurmd.pid"
      echo "SlurmdLogFile=$logs/slurmd.log"
      echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN"
    else
      echo "SlurmdSpoolDir=/var/spool/slurmd/%n"
      echo "SlurmdPidFile=/run/slurmd-%n.pid"
      echo "SlurmdLogFile=$logs/slurmd-%n.log"
      for i in $(seq 1 "$nodes"); do
        echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$cpus RealMemory=$memory State=UNKNOWN"
        mkdir -p "/var/spool/slurmd/n$i"
      done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$conf"
}

start() {
  if [ -f /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
    echo "slurm is already running; '$0 stop' first to change it"; sinfo; return 0
  fi
  install
  start_munge
  write_config
  /usr/sbin/slurmctld
  if [ "$nodes" -eq 1 ]; then /usr/sbin/slurmd; else for n in $(node_names); do /usr/sbin/slurmd -N "$n"; done; fi
  for _ in $(seq 150); do  # up to 30 s
    if [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" = idle ]; then sinfo; return 0; fi
    sleep 0.2
  done
  echo "the cluster did not become idle:" >&2
  sinfo -N -l >&2 || true
  tail -n 20 "$logs"/*.log >&2 || true
  exit 1
}

stop_pid() {  # SIGTERM, wait up to 10 s, then SIGKILL
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

stop() {
  if command -v squeue >/dev/null && squeue -h >/dev/null 2>&1; then
    squeue -h -o %i | xargs -r scancel || true  # else job processes outlive slurmd
    for _ in $(seq 50); do [ -z "$(squeue -h -o %i)" ] && break; sleep 0.2; done
  fi
  for pidfile in /run/slurmd.pid /run/slurmd-*.pid /run/slurmctld.pid /run/munge/munged.pid; do
    [ -f "$pidfile" ] && stop_pid "$pidfile"
  done
  echo "slurm stopped"
}

case "$action" in
  start) start ;;
  stop) stop ;;
  status) sinfo -N -l && squeue -t all ;;
  *) echo "usage: $0 start|stop|status [--nodes N] [--cpus C]" >&2; exit 2 ;;
esac
