#!/usr/bin/env bash
# slurmrestd for backend.slurm.mode: rest: Debian's daemon on a unix socket with
# rest_auth/local, started directly (no systemd), after 30-slurm.sh.
#
# rest_auth/local takes the caller from the socket's peer credentials and accepts only
# slurmrestd's own uid, so the daemon runs as the account the gateway runs as: root for
# this test suite. slurmrestd refuses root and SlurmUser unless told otherwise
# (SLURMRESTD_SECURITY=disable_user_check); a site runs it as the gateway's own service
# account instead (docs/admin.md, "Slurm REST mode"). The openapi/dbv* plugins are left
# out: they end the daemon when there is no slurmdbd.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
apt_install slurmrestd

run_dir=/run/slurmrestd
socket=$run_dir/slurmrestd.socket
pid_file=$run_dir/slurmrestd.pid
log=/var/log/slurm/slurmrestd.log
plugins=openapi/v0.0.36,openapi/v0.0.37,openapi/v0.0.38

# the socket's directory is the access control in depth: only root may reach the socket
mkdir -p "$run_dir" /var/log/slurm
chmod 700 "$run_dir"

conf_seen=$run_dir/slurm.conf.sha256  # the slurm.conf the running daemon read at start

running() {
  [ -s "$pid_file" ] && [ "$(cat "/proc/$(cat "$pid_file")/comm" 2>/dev/null)" = slurmrestd ]
}
answers() {
  curl -sf --max-time 10 --unix-socket "$socket" http://localhost/openapi/v3 -o /dev/null
}

conf_now=$(sha256sum /etc/slurm/slurm.conf | cut -d' ' -f1)
if running && [ "$conf_now" != "$(cat "$conf_seen" 2>/dev/null)" ]; then
  # slurmrestd reads slurm.conf once: 30-slurm.sh changed it, so start it again
  kill -INT "$(cat "$pid_file")" || true
  for _ in $(seq 1 40); do running || break; sleep 0.5; done
fi
if ! running; then
  rm -f "$socket"  # a stale socket file makes the bind fail
  echo "$conf_now" >"$conf_seen"
  # from /: a daemon left in the checkout it was started from dies when that is removed
  # (slurmrestd's getcwd at a job submission fails, and it exits)
  (cd / && export SLURMRESTD_SECURITY=disable_user_check &&
    exec setsid /usr/sbin/slurmrestd -a rest_auth/local -s "$plugins" "unix:$socket" \
      </dev/null >>"$log" 2>&1) &
  echo $! >"$pid_file"
fi
for _ in $(seq 1 60); do
  if answers; then
    echo "slurmrestd ready: unix:$socket (pid $(cat "$pid_file"))"
    exit 0
  fi
  running || break
  sleep 0.5
done
echo "slurmrestd did not come up" >&2
tail -n 20 "$log" >&2 || true
exit 1
