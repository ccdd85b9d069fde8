# shellcheck shell=bash
# Shared helpers for the perf/ scripts; sourced, not run.
#
# Gives each script: the tollgate binary, pgbench, a work folder removed on
# exit, a throwaway Postgres + tollgate started with `tollgate quickstart`
# (stopped on exit, however the script ends), and pgbench helpers that
# connect through tollgate with the quickstart token.
#
# Progress and notes go to stderr; the figures each script prints go to
# stdout, one per line, as `name: value  # how to read it`.

TG_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TG_BIN=${TOLLGATE_BIN:-$TG_ROOT/target/release/tollgate}
# One shard by default: one thread to attach to, and figures per shard.
TG_WORKERS=${WORKERS:-1}

TG_WORK=""
TG_QS_PID=""
TG_CLEANUPS=()

note() { printf '# %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Prints a figure: name, value, and how to read it.
figure() {
    printf '%-34s %s\n' "$1:" "$2${3:+  # $3}"
}

# Runs the registered clean-ups (newest first), then stops quickstart and
# removes the work folder. Installed as the EXIT trap by tg_init.
tg_cleanup() {
    local status=$?
    set +e
    local i
    for ((i = ${#TG_CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${TG_CLEANUPS[$i]}"
    done
    tg_stop_quickstart
    if [[ -n "$TG_WORK" && -d "$TG_WORK" && -z "${KEEP_WORK:-}" ]]; then
        rm -rf "$TG_WORK"
    fi
    return "$status"
}

# Registers a shell command to run on exit.
on_exit() { TG_CLEANUPS+=("$1"); }

# Kills a process we started (by pid), politely first, and reaps it.
stop_pid() {
    local pid=$1 sig=${2:-TERM} wait_s=${3:-20}
    kill -0 "$pid" 2>/dev/null || return 0
    kill -"$sig" "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < wait_s * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        note "pid $pid ignored SIG$sig for ${wait_s}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

tg_init() {
    [[ $(uname -s) == Linux ]] || die "Linux only"
    TG_WORK=$(mktemp -d /tmp/tollgate-perf.XXXXXX)
    trap tg_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    if [[ ! -x "$TG_BIN" ]]; then
        note "building $TG_BIN (cargo build --release)"
        (cd "$TG_ROOT" && cargo build --release --bin tollgate) >&2
    fi
    PGBENCH=${PGBENCH:-$(tg_find_pg_tool pgbench)} || die "pgbench not found: apt-get install postgresql (or set PGBENCH)"
}

# Finds a PostgreSQL client tool: $PATH, then the newest /usr/lib/postgresql/*/bin.
tg_find_pg_tool() {
    local name=$1 p
    if p=$(command -v "$name"); then
        echo "$p"
        return 0
    fi
    p=$(printf '%s\n' /usr/lib/postgresql/*/bin/"$name" | grep -v '\*' | sort -V | tail -n 1)
    [[ -n "$p" ]] && echo "$p"
}

# Starts `tollgate quickstart` (throwaway Postgres + tollgate) and waits
# until it prints its psql line. Sets TG_QS_PID (the proxy's pid: the one to
# attach to; the Postgres processes are its children, not its threads),
# TG_QS_DIR (config and token store), and exports PGHOST/PGPORT/PGUSER/
# PGDATABASE/PGPASSWORD for pgbench.
tg_start_quickstart() {
    local out=$TG_WORK/quickstart.out err=$TG_WORK/quickstart.err
    note "starting tollgate quickstart (workers=$TG_WORKERS)"
    "$TG_BIN" quickstart --listen 127.0.0.1:0 --workers "$TG_WORKERS" >"$out" 2>"$err" &
    TG_QS_PID=$!
    local i
    for ((i = 0; i < 1200; i++)); do
        grep -q '^Config and token store:' "$out" 2>/dev/null && break
        if ! kill -0 "$TG_QS_PID" 2>/dev/null; then
            cat "$err" >&2
            TG_QS_PID=""
            die "tollgate quickstart exited before it was ready"
        fi
        sleep 0.1
    done
    grep -q '^Config and token store:' "$out" || {
        cat "$err" >&2
        die "tollgate quickstart not ready after 120 s"
    }
    local conninfo
    conninfo=$(sed -n 's/^ *psql "\(.*\)"$/\1/p' "$out")
    TG_QS_DIR=$(sed -n 's/^Config and token store: //p' "$out")
    export PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD PGSSLMODE
    # Measure the plaintext relay unless asked otherwise (PGSSLMODE=require
    # measures client-side TLS, where the config offers it).
    PGSSLMODE=${PGSSLMODE:-disable}
    PGHOST=$(conninfo_get "$conninfo" host)
    PGPORT=$(conninfo_get "$conninfo" port)
    PGUSER=$(conninfo_get "$conninfo" user)
    PGDATABASE=$(conninfo_get "$conninfo" dbname)
    PGPASSWORD=$(conninfo_get "$conninfo" password)
    [[ -n "$PGPORT" && -n "$PGPASSWORD" && -d "$TG_QS_DIR" ]] ||
        die "could not read quickstart's output: $(cat "$out")"
    note "tollgate pid $TG_QS_PID on $PGHOST:$PGPORT, config in $TG_QS_DIR"
}

conninfo_get() {
    tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"
}

# Ctrl-C equivalent: quickstart stops its cluster and removes its folder.
tg_stop_quickstart() {
    if [[ -n "$TG_QS_PID" ]]; then
        stop_pid "$TG_QS_PID" INT 30
        TG_QS_PID=""
    fi
}

# `pgbench -i -s 1` through tollgate (quietly).
tg_pgbench_init() {
    note "pgbench -i -s ${SCALE:-1}"
    timeout 300 "$PGBENCH" -i -q -s "${SCALE:-1}" >"$TG_WORK/pgbench-init.log" 2>&1 || {
        cat "$TG_WORK/pgbench-init.log" >&2
        die "pgbench -i failed"
    }
}

# Transactions pgbench reports as processed in its output file.
pgbench_transactions() {
    sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1"
}

pgbench_tps() {
    sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$1" | tail -n 1
}

# a / b with `scale` decimals (awk, so no bc needed).
ratio() {
    awk -v a="$1" -v b="$2" -v s="${3:-2}" 'BEGIN { if (b == 0) print "n/a"; else printf "%.*f\n", s, a / b }'
}
