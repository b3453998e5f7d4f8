#!/usr/bin/env bash
# A real single-host Grid Engine (Debian gridengine 8.1.9) for the tests: qmaster and execd
# started directly (no systemd), this host as admin/submit/exec host, one queue "all.q"
# with 2 slots, the DRMAA 1.0 library for the Python `drmaa` package.
#
# Idempotent: a second run finds the queue usable and only re-checks it with a job.
# On a fresh machine the Debian packages are pre-seeded so their postinst creates the
# cell; when a cell was installed without a master host (act_qmaster empty, spool not
# initialised) the script writes act_qmaster and runs the master's init_cluster itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
export PATH="/usr/bin:/usr/sbin:$PATH"
SPOOL=/var/spool/gridengine
COMMON=$SGE_ROOT/$SGE_CELL/common
ADMIN=sgeadmin
QUEUE=all.q
SLOTS=2

host=$(hostname)
# Grid Engine resolves every host name: this one must resolve (to any address)
if ! getent hosts "$host" >/dev/null; then
  echo "127.0.1.1 $host" >>/etc/hosts
fi

# ---- packages (debconf answers first, so the postinst configures the cell) ----
for pkg in gridengine-common gridengine-master; do
  debconf-set-selections <<SEL
$pkg shared/gridenginemaster string $host
$pkg shared/gridenginecell string $SGE_CELL
$pkg shared/gridengineconfig boolean true
SEL
done
apt_install gridengine-common gridengine-master gridengine-exec gridengine-client \
  gridengine-drmaa1.0 procps

# ---- the cell: act_qmaster and an initialised spool ----
mkdir -p "$COMMON" "$SPOOL/qmaster/job_scripts" "$SPOOL/spooldb" "$SPOOL/execd"
chown "$ADMIN:$ADMIN" "$SGE_ROOT" "$SGE_ROOT/$SGE_CELL" "$COMMON" "$SPOOL/qmaster" \
  "$SPOOL/qmaster/job_scripts" "$SPOOL/spooldb" "$SPOOL/execd"
if [ ! -s "$COMMON/bootstrap" ]; then
  install -m0644 -o "$ADMIN" -g "$ADMIN" /usr/share/gridengine/default-bootstrap "$COMMON/bootstrap"
fi
if [ "$(cat "$COMMON/act_qmaster" 2>/dev/null)" != "$host" ]; then
  echo "$host" >"$COMMON/act_qmaster"
  chown "$ADMIN:$ADMIN" "$COMMON/act_qmaster"
fi
# Grid Engine checks that a peer's address resolves back to the name it claims. Where
# the host name's address resolves back to another name (here 127.0.0.1 -> localhost,
# listed first in /etc/hosts), declare that name an alias of this host.
addr=$(getent hosts "$host" | awk '{print $1; exit}')
back=$(getent hosts "$addr" | awk '{print $2; exit}')
aliases_before=$(cat "$COMMON/host_aliases" 2>/dev/null || true)
if [ -n "$back" ] && [ "$back" != "$host" ]; then
  printf '%s %s\n' "$host" "$back" >"$COMMON/host_aliases"
else
  rm -f "$COMMON/host_aliases"
fi
aliases_changed=$([ "$aliases_before" = "$(cat "$COMMON/host_aliases" 2>/dev/null || true)" ] \
  && echo no || echo yes)

if [ ! -e "$SPOOL/spooldb/sge" ]; then
  echo "initialising the Grid Engine cell ($SGE_ROOT/$SGE_CELL, spool $SPOOL/spooldb)"
  su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL \
$SPOOL/spooldb $ADMIN" "$ADMIN"
fi

# ---- daemons ----
# has GREP-OPTION PATTERN COMMAND...: does the command's output match? (the whole output is
# read first: qconf complains about a pipe closed early by grep -q)
has() { local opt=$1 pattern=$2 out; shift 2; out=$("$@" 2>/dev/null) || return 1
  grep -q "$opt" -- "$pattern" <<<"$out"; }
qmaster_up() { timeout 10 qconf -sh >/dev/null 2>&1; }
# a live daemon (a killed one may linger as a zombie until its parent reaps it)
running() { ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }
stop() {
  running "$1" || return 0
  kill "$(ps -C "$1" -o pid= -o stat= | awk '$2 !~ /^Z/ {print $1}')" 2>/dev/null || true
  for _ in $(seq 1 30); do running "$1" || return 0; sleep 0.5; done
}
if [ "$aliases_changed" = yes ]; then  # the daemons read host_aliases when they start
  stop sge_execd; stop sge_qmaster
fi
# (re)start the master when it is not running; one still shutting down is waited for
for _ in $(seq 1 60); do
  qmaster_up && break
  if ! running sge_qmaster; then
    rm -f "$SPOOL/qmaster/lock"   # left by a killed qmaster; it refuses to start with it
    /usr/sbin/sge_qmaster
  fi
  sleep 0.5
done
qmaster_up || { echo "sge_qmaster did not come up" >&2; tail -n 20 "$SPOOL/qmaster/messages" >&2 || true; exit 1; }

# root is refused as a manager by default in some cells: make it one (harmless if it is)
has -x root qconf -sm || qconf -am root >/dev/null
has -x "$host" qconf -sh || qconf -ah "$host" >/dev/null
has -x "$host" qconf -ss || qconf -as "$host" >/dev/null

# the tests (and many single-user set-ups) submit as root: allow uid/gid 0
if has -E '^min_(u|g)id +[1-9]' qconf -sconf global; then
  tmpdir=$(mktemp -d)
  qconf -sconf global | sed -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
    >"$tmpdir/global"   # -Mconf names the configuration after the file
  qconf -Mconf "$tmpdir/global" >/dev/null
  rm -rf "$tmpdir"
  stop sge_execd   # a running execd keeps checking jobs against the old limits
fi
# exec host: add it once (from a template with only the name set)
if ! has -x "$host" qconf -sel; then
  tmp=$(mktemp)
  printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' \
    "$host" >"$tmp"
  qconf -Ae "$tmp" >/dev/null
  rm -f "$tmp"
fi
# the host group the queue runs on
if ! has -x '@allhosts' qconf -shgrpl; then
  tmp=$(mktemp)
  printf 'group_name @allhosts\nhostlist %s\n' "$host" >"$tmp"
  qconf -Ahgrp "$tmp" >/dev/null
  rm -f "$tmp"
elif ! has -w "$host" qconf -shgrp @allhosts; then
  qconf -aattr hostgroup hostlist "$host" @allhosts >/dev/null
fi
# a parallel environment "smp" (all slots on one host), attached to the queue: -pe smp N
if ! has -x smp qconf -spl; then
  tmp=$(mktemp)
  printf 'pe_name smp\nslots 9999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\nstop_proc_args NONE\nallocation_rule $pe_slots\ncontrol_slaves FALSE\njob_is_first_task TRUE\nurgency_slots min\naccounting_summary FALSE\nqsort_args NONE\n' >"$tmp"
  qconf -Ap "$tmp" >/dev/null
  rm -f "$tmp"
fi
# the queue: 2 slots, scripts run by the interpreter of their #! line, no load alarms
# (other work on a small test machine must not put the queue in alarm state)
if ! has -x "$QUEUE" qconf -sql; then
  tmp=$(mktemp)
  qconf -sq 2>/dev/null | sed -e "s/^qname .*/qname $QUEUE/" -e 's/^hostlist .*/hostlist @allhosts/' \
    -e "s/^slots .*/slots $SLOTS/" -e 's/^pe_list .*/pe_list smp/' \
    -e 's/^shell_start_mode .*/shell_start_mode unix_behavior/' -e 's#^shell .*#shell /bin/bash#' \
    -e 's/^load_thresholds .*/load_thresholds NONE/' >"$tmp"
  qconf -Aq "$tmp" >/dev/null
  rm -f "$tmp"
fi
[ "$(qconf -sq "$QUEUE" | awk '$1 == "slots" {print $2}')" = "$SLOTS" ] ||
  qconf -mattr queue slots "$SLOTS" "$QUEUE" >/dev/null
# scheduler: look at new jobs every second (the default 15 s makes tests slow)
if ! has -E '^schedule_interval +0:0:1$' qconf -ssconf; then
  qconf -ssconf | sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' -e 's/^flush_finish_sec .*/flush_finish_sec 1/' \
    >"$SPOOL/sched.conf"
  qconf -Msconf "$SPOOL/sched.conf" >/dev/null
  rm -f "$SPOOL/sched.conf"
fi

if ! running sge_execd; then
  /usr/sbin/sge_execd
fi

# ---- usable: queue instance without error/alarm/disabled flags, then a real job ----
queue_ok() {
  qstat -f -q "$QUEUE@$host" 2>/dev/null | awk -v q="$QUEUE@$host" \
    '$1 == q { ok = ($6 == "" || $6 !~ /[uaAEcdDsSoC]/) } END { exit ok ? 0 : 1 }'
}
# leftovers of an interrupted earlier run, and an error state a failed job left on the queue
qdel funnel-setup-check >/dev/null 2>&1 || true
qmod -c "$QUEUE" >/dev/null 2>&1 || true
for _ in $(seq 1 60); do
  queue_ok && break
  sleep 1
done
if ! queue_ok; then
  echo "queue $QUEUE@$host is not usable:" >&2
  qstat -f >&2 || true
  tail -n 20 "$SPOOL/qmaster/messages" "$SPOOL/execd/$host/messages" >&2 2>/dev/null || true
  exit 1
fi
out=$(cd /tmp && timeout 60 qsub -sync y -b y -o /dev/null -e /dev/null -N funnel-setup-check /bin/true 2>&1) || {
  echo "a trivial qsub -sync y job did not run: $out" >&2; exit 1; }
echo "Grid Engine ready: $(qstat -f | awk -v q="$QUEUE@$host" '$1 == q {print $1, $2, $3}')"
