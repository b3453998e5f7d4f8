#!/usr/bin/env bash
# Install funnel-hpc on this machine and start the server on its embedded
# defaults: SQLite database and the local backend, work dir ./funnel-work,
# TES API on http://127.0.0.1:8000. Safe to run again (restarts the server).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
# python + venv; bubblewrap runs task containers where no docker/podman/apptainer works;
# busybox-static makes the "busybox" image of the hello world with no registry
apt_install python3 python3-venv git ca-certificates procps bubblewrap busybox-static
make_venv
pip_quiet install .  # a normal install: the package, its config and templates
mkdir -p funnel-work
# Offline: seed the worker's image cache (worker.image_cache "" = funnel-work/image-cache)
# with a real busybox image (one layer, config, manifest) built from busybox-static, so
# the hello world runs in an image, not over the host. A registry, when reachable, serves
# every other image.
seed=$(mktemp -d)
mkdir -p "$seed/bin" "$seed/etc" "$seed/tmp"
cp /bin/busybox "$seed/bin/busybox"
for applet in $("$seed/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$seed/bin/$applet"
done
echo "root:x:0:0:root:/tmp:/bin/sh" >"$seed/etc/passwd"
.venv/bin/python -m funnel_hpc.worker.images seed docker.io/library/busybox:latest \
  --from-dir "$seed" --cache funnel-work/image-cache
rm -rf "$seed"
if [ -f funnel-work/server.pid ] && kill -0 "$(cat funnel-work/server.pid)" 2>/dev/null; then
  kill "$(cat funnel-work/server.pid)"; sleep 1
fi
PATH="$PWD/.venv/bin:$PATH" nohup .venv/bin/funnel server run ${FUNNEL_CONFIG:+--config "$FUNNEL_CONFIG"} \
  >funnel-work/server.log 2>&1 &
echo $! >funnel-work/server.pid
for _ in $(seq 1 50); do
  if .venv/bin/python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/ga4gh/tes/v1/service-info', timeout=1)" 2>/dev/null; then
    echo "funnel-hpc is running: http://127.0.0.1:8000/ga4gh/tes/v1 (pid $(cat funnel-work/server.pid), log funnel-work/server.log)"
    exit 0
  fi
  sleep 0.2
done
echo "the server did not start; see funnel-work/server.log" >&2
tail -n 20 funnel-work/server.log >&2
exit 1
