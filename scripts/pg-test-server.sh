#!/usr/bin/env bash
# Makes sure the tests have PostgreSQL on 127.0.0.1:5432 (trust authentication for 127.0.0.1,
# database `test`): when nothing answers there, installs Debian's `postgresql` package if
# missing, starts its cluster and configures it. The tests create one fresh database per test
# (chitin_test_<random>) and drop it afterwards. Override the server with CHITIN_TEST_PG_URL.
set -euo pipefail
if [ -n "${CHITIN_TEST_PG_URL:-}" ]; then
  exit 0
fi
answers() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if answers; then
  exit 0
fi
if ! command -v pg_lsclusters >/dev/null; then
  apt-get update && apt-get install -y postgresql
fi
version="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
if ! pg_lsclusters -h | grep -q "^$version main"; then
  pg_createcluster "$version" main
fi
conf="/etc/postgresql/$version/main"
# Trust for loopback TCP only (a test server; never do this on a shared host).
if ! grep -q "chitin-tests" "$conf/pg_hba.conf"; then
  {
    echo "# chitin-tests: trust on loopback"
    echo "host all all 127.0.0.1/32 trust"
    echo "host all all ::1/128 trust"
    cat "$conf/pg_hba.conf"
  } > "$conf/pg_hba.conf.new"
  mv "$conf/pg_hba.conf.new" "$conf/pg_hba.conf"
  chown postgres:postgres "$conf/pg_hba.conf"
fi
sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" "$conf/postgresql.conf"
sed -i "s/^#\?port = .*/port = 5432/" "$conf/postgresql.conf"
# The tests run in parallel, each with its own database and a small pool.
sed -i "s/^#\?max_connections = .*/max_connections = 300/" "$conf/postgresql.conf"
pg_ctlcluster "$version" main restart || pg_ctlcluster "$version" main start
for _ in $(seq 1 60); do
  answers && break
  sleep 1
done
answers || { echo "scripts/pg-test-server.sh: PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test"
