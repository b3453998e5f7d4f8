#!/usr/bin/env bash
# The message broker of the event-sink tests: Debian's redis-server, started without
# systemd on 127.0.0.1:6379 (no persistence, no password: a test broker), and the
# redis client in .venv. Idempotent: a running server is left as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
apt_install redis-server
.venv/bin/python -c 'import redis' 2>/dev/null || pip_quiet install 'redis>=5.0'
PORT=6379
if ! redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; then
  mkdir -p /var/lib/funnel-redis
  redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes --save '' --appendonly no \
    --dir /var/lib/funnel-redis --logfile /var/lib/funnel-redis/redis.log \
    --pidfile /var/lib/funnel-redis/redis.pid
  for _ in $(seq 1 50); do
    redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG && break
    sleep 0.2
  done
fi
redis-cli -h 127.0.0.1 -p "$PORT" ping | grep -q PONG
echo "Redis $(redis-server --version | awk '{print $3}') ready: redis://127.0.0.1:$PORT/0"
