#!/usr/bin/env bash
# slurm-up.sh: a one-node Slurm (22.05, Debian 12) on this machine for effrun's tests and CI.
# Starts munged, slurmdbd + MariaDB (accounting), slurmctld and slurmd directly (no systemd).
# Idempotent: a second call only checks that the node is idle. Must run as root.
#   SLURM_ACCT=0      skip accounting (submitit then cannot see cancelled jobs: sweeps may hang)
#   SLURM_DIR=/path   state, spool, logs, pid files (default /tmp/slurm)
#   SLURM_NO_INSTALL=1  never apt-get install (fail instead)
# Exit 0 when the node is idle; non-zero with a one-line reason otherwise.
set -euo pipefail
ACCT=${SLURM_ACCT:-1}; S=${SLURM_DIR:-/tmp/slurm}; H=$(hostname -s)
die() { echo "slurm-up: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (starts munged/slurmctld/slurmd)"
PKGS="slurmctld slurmd slurm-client munge"; [ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  [ "${SLURM_NO_INSTALL:-0}" = 1 ] && die "packages missing ($PKGS) and SLURM_NO_INSTALL=1"
  command -v apt-get >/dev/null || die "packages missing ($PKGS) and no apt-get"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS >/dev/null \
    || die "apt-get install $PKGS failed"
fi
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
mkdir -p "$S/state" "$S/spool" "$S/log" /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null || die "munge does not work"
MEM=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') * 9 / 10 ))
if [ "$ACCT" = 1 ]; then AS=$'accounting_storage/slurmdbd\nAccountingStorageHost=localhost'
else AS=accounting_storage/none; fi
# cred_expire=5: a requeued job may start again after 5 s instead of the default 121 s.
# OverSubscribe=FORCE:2: two jobs may share a CPU (tiny test jobs mostly wait on imports).
cat > "$S/slurm.conf" <<CONF
ClusterName=localci
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
EnforcePartLimits=ALL
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1
KillWait=5
MinJobAge=300
ReturnToService=2
AccountingStorageType=$AS
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$H NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
CONF
CHANGED=0; cmp -s "$S/slurm.conf" /etc/slurm/slurm.conf || { cp "$S/slurm.conf" /etc/slurm/slurm.conf; CHANGED=1; }
if [ "$ACCT" = 1 ]; then
  mysqladmin ping >/dev/null 2>&1 || /etc/init.d/mariadb start >/dev/null || die "MariaDB did not start"
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  printf '%s\n' AuthType=auth/munge DbdHost=localhost DbdAddr=127.0.0.1 SlurmUser=root \
    StorageType=accounting_storage/mysql StorageHost=localhost StorageUser=slurm StoragePass=slurm \
    StorageLoc=slurm_acct_db "LogFile=$S/log/slurmdbd.log" "PidFile=$S/slurmdbd.pid" > "$S/slurmdbd.conf"
  cmp -s "$S/slurmdbd.conf" /etc/slurm/slurmdbd.conf || cp "$S/slurmdbd.conf" /etc/slurm/slurmdbd.conf
  chmod 600 /etc/slurm/slurmdbd.conf
  alive "$S/slurmdbd.pid" || slurmdbd
  for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
fi
if alive "$S/slurmctld.pid"; then
  # slurm.conf changed under a running controller: restart both daemons (reconfigure does not
  # pick up every option, e.g. AuthInfo)
  if [ "$CHANGED" = 1 ]; then
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 40); do alive "$S/slurmctld.pid" || alive "$S/slurmd.pid" || break; sleep 0.25; done
    slurmctld
  fi
else slurmctld; fi
alive "$S/slurmd.pid" || slurmd -N "$H"
for _ in $(seq 120); do
  case "$(sinfo -h -n "$H" -o %T 2>/dev/null || true)" in
    idle|mixed|allocated) echo "slurm up: node $H $(sinfo -h -n "$H" -o %T), $(nproc) CPUs, ${MEM} MB"; exit 0 ;;
    down*|drain*) scontrol update nodename="$H" state=resume 2>/dev/null || true ;;
  esac; sleep 0.5
done
die "node $H not idle after 60 s; see $S/log/"
