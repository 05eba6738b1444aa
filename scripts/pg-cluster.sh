#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the tests and benchmarks, on loopback.
#
#   scripts/pg-cluster.sh start DIR [PORT]   initdb in DIR (if new), start it; prints the
#                                            admin URL (also in DIR/url)
#   scripts/pg-cluster.sh stop DIR [MODE]    pg_ctl stop (MODE: fast, the default, or
#                                            immediate)
#   scripts/pg-cluster.sh restart DIR        start it again after a stop
#
# PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` user
# (created by Debian's package). When no PostgreSQL server is installed, it is installed
# with apt-get (root, Debian). The superuser is `postgres` with the password `webwaka`,
# over TCP on 127.0.0.1 only (scram-sha-256), so a test can also present a wrong one.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop|restart DIR [PORT|MODE]" >&2; exit 2; }

find_bin() {
    if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return; fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$found" ] && [ -x "$found/initdb" ]; then echo "$found"; return; fi
    return 1
}

bin=$(find_bin || true)
if [ -z "$bin" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "PostgreSQL server not found: installing it (apt-get install postgresql)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }
        bin=$(find_bin)
    else
        echo "error: no PostgreSQL server (initdb) found; install postgresql or set PG_BIN" >&2
        exit 1
    fi
fi

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

data="$dir/data"
case "$cmd" in
start)
    port=${3:-}
    if [ -z "$port" ]; then
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    if [ ! -f "$data/PG_VERSION" ]; then
        pwfile="$dir/pwfile"
        echo webwaka > "$pwfile"
        if [ "$(id -u)" = 0 ]; then chown postgres: "$pwfile"; fi
        as_owner "$bin/initdb" -D "$data" -U postgres --pwfile="$pwfile" -E UTF8 --locale=C \
            --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; exit 1; }
        rm -f "$pwfile"
        cat >> "$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 400
shared_buffers = 128MB
shared_preload_libraries = 'pg_stat_statements'
log_min_messages = warning
log_min_error_statement = panic
CONF
    fi
    port=$(sed -n "s/^port = \([0-9]*\)$/\1/p" "$data/postgresql.conf" | tail -n 1)
    as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start >/dev/null
    url="postgres://postgres:webwaka@127.0.0.1:$port/postgres"
    echo "$url" > "$dir/url"
    echo "$url"
    ;;
restart)
    as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start >/dev/null
    ;;
stop)
    mode=${3:-fast}
    if [ -f "$data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop >/dev/null || true
    fi
    ;;
*)
    echo "usage: $0 start|stop|restart DIR [PORT|MODE]" >&2
    exit 2
    ;;
esac
