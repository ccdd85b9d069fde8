#!/usr/bin/env bash
# Syscalls, io_uring submissions and context switches per transaction.
#
# Starts a throwaway Postgres + tollgate (`tollgate quickstart`), runs a
# fixed pgbench workload through it (select-only, -M prepared, 8 clients,
# -t transactions per client), and counts kernel events on the tollgate
# process only (`perf stat -p`: all its threads, not its Postgres children)
# while pgbench runs. Every count is divided by the transactions pgbench
# reports.
#
# Usage (repo root, as root): perf/syscalls.sh
# Environment: TXNS (per client, default 2500), CLIENTS (8), WORKERS (shards,
# 1), TOLLGATE_BIN, PGBENCH, PERF (perf binary).
#
# Reading the figures: a select-only transaction is one round trip: the
# client sends Bind/Describe/Execute/Sync, the server answers with five
# messages. The least a relay can do is one read and one write per direction
# per round trip: 4 I/O operations per transaction. With io_uring these are
# submissions (SQEs), and the syscall count is how often the shard had to
# enter the kernel (io_uring_enter) to submit them and wait; under load one
# enter carries several sessions' work, so syscalls/txn can drop below 1.
# `poll_arm` counts reads that found no data and had to wait for it;
# `async_work` counts requests punted to io-wq kernel threads (should be ~0).
set -euo pipefail
# shellcheck source=perf/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TXNS=${TXNS:-2500}
CLIENTS=${CLIENTS:-8}
THREADS=$((CLIENTS < 2 ? CLIENTS : 2))
PERF=${PERF:-$(command -v perf || echo /usr/bin/perf)}

[[ $EUID -eq 0 ]] || note "not root: tracepoints usually need root (or perf_event_paranoid=-1)"
[[ -x "$PERF" ]] || die "perf not found: apt-get install linux-perf"

# Tracepoints live in tracefs; mount it if this system has not.
if [[ ! -e /sys/kernel/tracing/events && ! -e /sys/kernel/debug/tracing/events ]]; then
    note "mounting tracefs at /sys/kernel/tracing"
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null ||
        mount -t debugfs nodev /sys/kernel/debug 2>/dev/null ||
        note "could not mount tracefs/debugfs: tracepoint counts will be missing"
fi

# Keep only the events this kernel and perf know; report the others.
available=$("$PERF" list --raw-dump tracepoint 2>/dev/null || true)
events=()
want() {
    local ev=$1
    if grep -qw -- "$ev" <<<"$available"; then
        events+=("$ev")
    else
        note "event $ev is not available here (kernel config, tracefs or permissions)"
    fi
}
want raw_syscalls:sys_enter
want syscalls:sys_enter_io_uring_enter
want syscalls:sys_enter_epoll_wait
# io_uring_submit_req since 5.18 (earlier: io_uring_submit_sqe).
if grep -qw io_uring:io_uring_submit_req <<<"$available"; then
    want io_uring:io_uring_submit_req
else
    want io_uring:io_uring_submit_sqe
fi
want io_uring:io_uring_complete
want io_uring:io_uring_poll_arm
want io_uring:io_uring_queue_async_work
# Software events: always there.
events+=(context-switches cpu-migrations task-clock)

tg_init
tg_start_quickstart
tg_pgbench_init

# Threads of the proxy, for the record (shards are tg-shard-N).
note "tollgate threads: $(ps -T -o comm= -p "$TG_QS_PID" | sort | uniq -c | awk '{printf "%s×%s ", $1, $2}')"

note "warm-up: 1 s of pgbench"
timeout 60 "$PGBENCH" -n -S -M prepared -c "$CLIENTS" -j "$THREADS" -T 1 >/dev/null 2>&1 || true

stat_out=$TG_WORK/perf-stat.txt
bench_out=$TG_WORK/pgbench.txt
note "perf stat -p $TG_QS_PID during pgbench -S -M prepared -c $CLIENTS -t $TXNS"
# With -p, the command only sets how long to count: the counters are on the
# tollgate process, not on pgbench.
if ! timeout 600 "$PERF" stat -x, -o "$stat_out" -p "$TG_QS_PID" \
    -e "$(
        IFS=,
        echo "${events[*]}"
    )" \
    -- "$PGBENCH" -n -S -M prepared -c "$CLIENTS" -j "$THREADS" -t "$TXNS" >"$bench_out" 2>&1; then
    cat "$bench_out" "$stat_out" >&2 || true
    die "perf stat or pgbench failed (see above)"
fi
txns=$(pgbench_transactions "$bench_out")
[[ -n "$txns" && "$txns" -gt 0 ]] || {
    cat "$bench_out" >&2
    die "pgbench reported no transactions"
}

# perf stat -x, lines: value,unit,event,run-time,percentage,...
count() {
    awk -F, -v ev="$1" '$3 == ev { print $1 }' "$stat_out" | head -n 1
}
per_txn() {
    local ev=$1 name=$2 how=$3 v
    v=$(count "$ev")
    if [[ -z "$v" ]]; then
        return 0
    elif [[ "$v" == "<not supported>" || "$v" == "<not counted>" ]]; then
        figure "$name" "$v" "$how"
    else
        figure "$name" "$(ratio "$v" "$txns" 2)" "$how ($v in total)"
    fi
}

figure transactions "$txns" "pgbench -S -M prepared -c $CLIENTS -t $TXNS, $(pgbench_tps "$bench_out") tps under perf"
figure shards "$TG_WORKERS" "tollgate worker threads"
per_txn raw_syscalls:sys_enter syscalls_per_txn "every syscall by any tollgate thread"
per_txn syscalls:sys_enter_io_uring_enter io_uring_enter_per_txn "kernel entries to submit and/or wait"
per_txn syscalls:sys_enter_epoll_wait epoll_wait_per_txn "nonzero means the epoll fallback driver is in use"
per_txn io_uring:io_uring_submit_req io_uring_submissions_per_txn "SQEs: reads, writes, timeouts; 4 is one read + one write per direction"
per_txn io_uring:io_uring_submit_sqe io_uring_submissions_per_txn "SQEs: reads, writes, timeouts; 4 is one read + one write per direction"
per_txn io_uring:io_uring_complete io_uring_completions_per_txn "CQEs reaped"
per_txn io_uring:io_uring_poll_arm io_uring_poll_arms_per_txn "reads/writes that had to wait for the socket"
per_txn io_uring:io_uring_queue_async_work io_uring_async_punts_per_txn "requests handed to io-wq threads; should be ~0"
per_txn context-switches context_switches_per_txn "tollgate threads going to sleep and waking (1 per wait)"
per_txn cpu-migrations cpu_migrations_per_txn "shards are pinned: should be ~0"
cpu_ms=$(count task-clock)
if [[ -n "$cpu_ms" && "$cpu_ms" != "<"* ]]; then
    figure cpu_us_per_txn "$(ratio "$(awk -v m="$cpu_ms" 'BEGIN { print m * 1000 }')" "$txns" 2)" \
        "tollgate CPU time (user + kernel) per transaction"
fi
