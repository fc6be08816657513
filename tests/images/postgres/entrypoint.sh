#!/bin/sh
# Initialise a cluster from POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, then run PostgreSQL
# in the foreground, listening on every address with password authentication.
set -eu
bin=/usr/lib/postgresql/15/bin
data=/tmp/pgdata
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
printf '%s\n' "${POSTGRES_PASSWORD:-postgres}" > /tmp/pwfile
"$bin/initdb" -D "$data" -U "$user" --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >/dev/null
rm /tmp/pwfile
echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
"$bin/pg_ctl" -D "$data" -o "-c listen_addresses='' -k /tmp" -w start >/dev/null
[ "$db" = "postgres" ] || "$bin/psql" -h /tmp -U "$user" -d postgres -c "CREATE DATABASE \"$db\"" >/dev/null
"$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
exec "$bin/postgres" -D "$data" -c listen_addresses='*' -k /tmp -c fsync=off -c synchronous_commit=off
