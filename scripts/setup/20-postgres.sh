#!/usr/bin/env bash
# Real PostgreSQL for the tests: Debian's postgresql, cluster started without systemd,
# a role and database "funnel" (password "funnel") reachable on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
apt_install postgresql
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main"' | grep -q .; then
  pg_createcluster "$version" main >/dev/null
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" && $4=="online"' | grep -q .; then
  pg_ctlcluster "$version" main start
fi
for _ in $(seq 1 30); do
  su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname='funnel'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"create role funnel login createdb password 'funnel'\""
su postgres -c "psql -qtAc \"select 1 from pg_database where datname='funnel'\"" | grep -q 1 ||
  su postgres -c "createdb -O funnel funnel"
PGPASSWORD=funnel psql -h 127.0.0.1 -U funnel -d funnel -qtAc 'select 1' >/dev/null
echo "PostgreSQL $version ready: postgresql+psycopg://funnel:funnel@127.0.0.1:5432/funnel"
