#!/usr/bin/env bash
# Bring up the local PostgreSQL used by the tests and benchmarks (Debian packages, run as root).
#
# Idempotent: installs `postgresql` with apt-get only when pg_ctlcluster is missing, starts the
# cluster unless it is running, and only edits configuration that is not already right.
# End state: postgres/postgres on 127.0.0.1:5432 with password (scram/md5) authentication,
# max_connections >= 300, accepting connections.
set -euo pipefail

PG_PASSWORD="${CHOREO_PG_PASSWORD:-postgres}"
MIN_CONNECTIONS=300

say() { echo "postgres.sh: $*"; }

if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (it may install packages and edits the cluster)" >&2
    exit 1
fi
cd /  # su/psql complain when the cwd is unreadable for the postgres user

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    say "pg_ctlcluster missing: installing Debian's postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends postgresql
else
    say "postgresql already installed"
fi

# Newest installed major version.
PG_VERSION=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z "${PG_VERSION}" ]]; then
    PG_VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
fi
if [[ ! -d "/etc/postgresql/${PG_VERSION}/main" ]]; then
    say "creating cluster ${PG_VERSION}/main"
    pg_createcluster "${PG_VERSION}" main
fi

ctl() { pg_ctlcluster --skip-systemctl-redirect "${PG_VERSION}" main "$@"; }
status() { pg_lsclusters -h | awk -v v="${PG_VERSION}" '$1 == v && $2 == "main" {print $4}'; }
psql_su() { su postgres -c "psql -X -q -t -A -v ON_ERROR_STOP=1 -c \"$1\""; }

if [[ "$(status)" == online* ]]; then
    say "cluster ${PG_VERSION}/main already running"
else
    say "starting cluster ${PG_VERSION}/main"
    ctl start || [[ "$(status)" == online* ]]
fi

wait_ready() {
    local port=$1
    for _ in $(seq 1 60); do
        if pg_isready -q -h 127.0.0.1 -p "${port}"; then return 0; fi
        sleep 0.5
    done
    say "PostgreSQL did not become ready on 127.0.0.1:${port}" >&2
    return 1
}

# Wait on the local socket first: listen_addresses/port may still need fixing.
for _ in $(seq 1 60); do
    if su postgres -c "pg_isready -q" >/dev/null 2>&1; then break; fi
    sleep 0.5
done

say "setting the password of role postgres"
psql_su "ALTER ROLE postgres WITH PASSWORD '${PG_PASSWORD}'" >/dev/null

need_restart=0

listen=$(psql_su "SHOW listen_addresses")
case ",${listen// /}," in
    *,localhost,* | *,127.0.0.1,* | *,\*,* | *,0.0.0.0,*)
        say "listen_addresses='${listen}' covers 127.0.0.1" ;;
    *)
        say "listen_addresses='${listen}' misses 127.0.0.1: adding it"
        psql_su "ALTER SYSTEM SET listen_addresses = '${listen:+${listen},}127.0.0.1'" >/dev/null
        need_restart=1 ;;
esac

port=$(psql_su "SHOW port")
if [[ "${port}" != "5432" ]]; then
    say "port is ${port}: switching to 5432"
    psql_su "ALTER SYSTEM SET port = 5432" >/dev/null
    need_restart=1
fi

max_conn=$(psql_su "SHOW max_connections")
if (( max_conn < MIN_CONNECTIONS )); then
    say "max_connections=${max_conn}: raising to ${MIN_CONNECTIONS}"
    psql_su "ALTER SYSTEM SET max_connections = ${MIN_CONNECTIONS}" >/dev/null
    need_restart=1
else
    say "max_connections=${max_conn} (>= ${MIN_CONNECTIONS})"
fi

# The first pg_hba rule that matches a TCP connection from 127.0.0.1 must ask for a password.
hba_file=$(psql_su "SHOW hba_file")
first_rule=$(psql_su "SELECT auth_method FROM pg_hba_file_rules
    WHERE type IN ('host', 'hostnossl') AND 'all' = ANY(database) AND 'all' = ANY(user_name)
      AND address IN ('127.0.0.1', 'all', 'samehost')
      AND error IS NULL ORDER BY line_number LIMIT 1")
if [[ "${first_rule}" == "scram-sha-256" || "${first_rule}" == "md5" ]]; then
    say "pg_hba: 127.0.0.1 uses ${first_rule}"
else
    say "pg_hba: 127.0.0.1 uses '${first_rule:-nothing}': prepending a scram-sha-256 rule to ${hba_file}"
    sed -i "1i host    all             all             127.0.0.1/32            scram-sha-256" "${hba_file}"
    psql_su "SELECT pg_reload_conf()" >/dev/null
fi

if (( need_restart )); then
    say "restarting cluster ${PG_VERSION}/main"
    ctl restart
fi

wait_ready 5432
if ! PGPASSWORD="${PG_PASSWORD}" psql -X -q -h 127.0.0.1 -p 5432 -U postgres -d postgres -c "SELECT 1" >/dev/null; then
    say "password login to 127.0.0.1:5432 failed" >&2
    exit 1
fi
say "ready: postgresql://postgres:${PG_PASSWORD}@127.0.0.1:5432/postgres (PostgreSQL ${PG_VERSION})"
