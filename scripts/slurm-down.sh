#!/usr/bin/env bash
# slurm-down.sh: cancel every job, then stop the daemons scripts/slurm-up.sh started (by PID file).
# Idempotent; never fails (CI calls it in a trap).
S=${SLURM_DIR:-/tmp/slurm}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() { alive "$1" || return 0; local p; p=$(cat "$1"); kill "$p" 2>/dev/null
  for _ in $(seq 75); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done; kill -9 "$p" 2>/dev/null; }
if alive "$S/slurmctld.pid"; then
  scancel --full -p debug 2>/dev/null; for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  scontrol shutdown 2>/dev/null   # slurmctld forwards it to slurmd; both save state and exit
fi
stop "$S/slurmd.pid"; stop "$S/slurmctld.pid"; stop "$S/slurmdbd.pid"
mysqladmin ping >/dev/null 2>&1 && /etc/init.d/mariadb stop >/dev/null 2>&1
stop /run/munge/munged.pid; echo "slurm down"
exit 0
