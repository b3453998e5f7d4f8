#!/usr/bin/env bash
# A real single-node Slurm cluster for the tests: Debian slurm-wlm + munge, daemons started
# directly (no systemd), node sized by `slurmd -C`, one partition "debug".
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
# openssh-server: the tests drive Slurm over SSH too (backend.slurm.ssh), against a private sshd
apt_install slurm-wlm munge openssh-server openssh-client sudo
# auth/jwt for slurmctld: slurmrestd's rest_auth/jwt (backend.slurm.rest.url) passes the
# caller's token through it (tests/backends/test_slurm_rest.py, 35-slurmrestd.sh)
apt_install slurm-wlm-jwt-plugin
# an unprivileged account for the per-user submission test
id funneltest >/dev/null 2>&1 || useradd --create-home --shell /bin/bash funneltest

host=$(hostname)
grep -qE "[[:space:]]$host([[:space:]]|\$)" /etc/hosts || echo "127.0.1.1 $host" >>/etc/hosts

# node usable: idle/mixed/allocated, and responding (no trailing * or other flag)
healthy() { sinfo -h -o '%T' 2>/dev/null | grep -qxE '(idle|mixed|allocated|completing)'; }

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
chmod 700 /etc/munge
if ! pgrep -x munged >/dev/null; then
  su -s /bin/sh munge -c /usr/sbin/munged
fi
for _ in $(seq 1 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done

# the key slurmctld signs and checks `scontrol token`'s tokens with (SlurmUser's, 0600)
jwt_key=/var/spool/slurmctld/jwt_hs256.key
if [ ! -s "$jwt_key" ]; then
  (umask 077 && dd if=/dev/urandom of="$jwt_key" bs=32 count=1 status=none)
fi
chmod 600 "$jwt_key"

node=$(slurmd -C | head -n 1 | sed 's/ UpTime=.*//')
node_name=$(printf '%s\n' "$node" | sed -n 's/^NodeName=\([^ ]*\).*/\1/p')
conf_before=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
cat >/etc/slurm/slurm.conf <<CONF
# written by funnel-hpc scripts/setup/30-slurm.sh for the test suite
ClusterName=funnel-test
SlurmctldHost=$host
AuthType=auth/munge
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$jwt_key
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmUser=root
ReturnToService=2
# finished jobs stay visible to squeue for 2 minutes (there is no accounting database);
# longer keeps tens of thousands of benchmark jobs in slurmctld and slows every sbatch
MinJobAge=120
# benchmarks/run keeps 10,000+ trivial jobs in flight (the default limit is 10,000)
MaxJobCount=100000
# job arrays (backend.slurm.array_max, default 1000) and their 10,000-task benchmark
MaxArraySize=10001
SchedulerParameters=sched_interval=2,default_queue_depth=1000
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# benchmarks only: up to 64 trivial jobs share each core, as they would spread over a wider cluster
PartitionName=bench Nodes=ALL Default=NO MaxTime=INFINITE State=UP OverSubscribe=FORCE:64
CONF

if [ "$conf_before" != "$(cat /etc/slurm/slurm.conf)" ] && pgrep -x slurmctld >/dev/null; then
  # running daemons restart on the new file (MaxJobCount is only read at start-up);
  # jobs survive in StateSaveLocation
  pkill -x slurmctld || true
  pkill -x slurmd || true
  for i in $(seq 1 30); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 1; done
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for i in $(seq 1 60); do
  if healthy; then
    echo "Slurm ready: $(sinfo -h -o '%P %a %D %T %c CPUs')"
    exit 0
  fi
  # a node left down/drained by an earlier run (e.g. killed daemons) is put back in service
  if [ "$i" -eq 10 ] && sinfo -h -o '%T' 2>/dev/null | grep -qE '^(down|drain)'; then
    scontrol update NodeName="$node_name" State=RESUME || true
  fi
  sleep 1
done
echo "Slurm did not come up" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
