#!/usr/bin/env bash
# User-space instructions per transaction and per forwarded message, counted
# by callgrind: the same on a busy machine as on an idle one, so a change in
# the figure is a change in the code.
#
# Starts a throwaway Postgres + tollgate (`tollgate quickstart`) for the
# cluster and the token, then a second tollgate, `serve` under
# `valgrind --tool=callgrind`, in front of the same cluster. Runs pgbench
# through the valgrind one three times (one client, select-only,
# -M prepared): a warm-up, then TXNS and 2×TXNS transactions, with a
# callgrind dump after each run (`callgrind_control -d`). Each dump holds
# only what happened since the previous one, so
#
#   instructions per transaction = (Ir[2×TXNS run] − Ir[TXNS run]) / TXNS
#
# which cancels what both runs pay once (pgbench's connections, their
# logins and token checks). The warm-up absorbs process start-up and the
# first upstream login (the one PBKDF2 derivation before the key cache is
# warm).
#
# Usage (repo root, as root): perf/callgrind.sh
# Environment: TXNS (default 2000), TOLLGATE_BIN, PGBENCH, TOP (functions
# listed, 15), KEEP_WORK=1 to keep the callgrind.out files (path printed),
# MODE (pgbench -M: prepared, simple or extended), CLIENTS (1; TXNS are
# shared among them), POOL=transaction for transaction pooling over
# POOL_SIZE (8) server connections. Transaction pooling's figure:
# POOL=transaction CLIENTS=50 MODE=simple perf/callgrind.sh
#
# Reading the figures: a select-only transaction with -M prepared is 9
# messages: Bind, Describe, Execute, Sync from the client (~49 bytes) and
# BindComplete, RowDescription, DataRow, CommandComplete, ReadyForQuery from
# the server (~71 bytes). tollgate reads each direction's burst with one
# read and writes it with one write, so the figure is mostly the cost of
# two wake-ups of the session task, two reads, two writes and two header
# scans in the io_uring runtime: kernel work (TCP, io_uring) is not counted
# here; see perf/syscalls.sh and perf/flamegraph.sh for that. The list
# after the figures is instructions per transaction by function (self cost,
# the same TXNS-run difference), so a regression points at its function.
set -euo pipefail
# shellcheck source=perf/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TXNS=${TXNS:-2000}
TOP=${TOP:-15}
MODE=${MODE:-prepared}
CLIENTS=${CLIENTS:-1}
THREADS=$((CLIENTS < 2 ? CLIENTS : 2))
POOL=${POOL:-}
POOL_SIZE=${POOL_SIZE:-8}
# Messages per select-only transaction (see above): simple is Query and
# RowDescription, DataRow, CommandComplete, ReadyForQuery; extended adds
# Parse and its ParseComplete to prepared's.
case $MODE in
    prepared) MSGS_PER_TXN=9 ;;
    simple) MSGS_PER_TXN=5 ;;
    extended) MSGS_PER_TXN=11 ;;
    *) die "MODE: prepared, simple or extended, not $MODE" ;;
esac
[[ -z "$POOL" || "$POOL" == transaction ]] || die "POOL: transaction or unset, not $POOL"

command -v valgrind >/dev/null || die "valgrind not found: apt-get install valgrind"
command -v callgrind_control >/dev/null || die "callgrind_control not found (part of valgrind)"
command -v ss >/dev/null || die "ss not found: apt-get install iproute2"

tg_init
tg_start_quickstart
tg_pgbench_init

# A copy of quickstart's config in the same folder (tokens.toml is found
# relative to it): any free port, one shard, JSON logs to read byte counts.
cfg=$TG_QS_DIR/callgrind.toml
# Any [log] or [pool] table quickstart wrote is dropped (TOML allows one).
awk '/^\[/ { skip = ($0 == "[log]" || $0 == "[pool]") } !skip' "$TG_QS_DIR/tollgate.toml" |
    sed -e 's/^listen = .*/listen = "127.0.0.1:0"/' -e 's/^workers = .*/workers = 1/' >"$cfg"
printf '\n[log]\nlevel = "info"\nformat = "json"\n' >>"$cfg"
if [[ "$POOL" == transaction ]]; then
    printf '\n[pool]\nmode = "transaction"\nmax_server_connections = %d\n' "$POOL_SIZE" >>"$cfg"
fi

out=$TG_WORK/callgrind.out
serve_log=$TG_WORK/serve.log
note "starting tollgate serve under callgrind"
# --fair-sched: valgrind runs one thread at a time; a fair lock hands it
# over in turn. (valgrind 3.19 keeps its lock while a thread waits in
# io_uring_enter, so the main thread only gets to log "listening" once a
# connection wakes the shard; the port is read from ss instead.)
# vgdb's FIFOs go to the work folder, which is removed on exit (valgrind
# only removes them itself when it exits normally).
vgdb_prefix=$TG_WORK/vgdb
valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$out" \
    --log-file="$TG_WORK/valgrind.log" --vgdb-prefix="$vgdb_prefix" \
    "$TG_BIN" serve --config "$cfg" >"$serve_log" 2>&1 &
vg_pid=$!
on_exit "stop_pid $vg_pid KILL 10"

port=""
for ((i = 0; i < 1200; i++)); do
    port=$(ss -Hltnp 2>/dev/null | awk -v p="pid=$vg_pid," 'index($0, p) { n = split($4, a, ":"); print a[n]; exit }')
    [[ -n "$port" ]] && break
    kill -0 "$vg_pid" 2>/dev/null || {
        cat "$TG_WORK/valgrind.log" "$serve_log" >&2
        die "tollgate under valgrind exited"
    }
    sleep 0.1
done
[[ -n "$port" ]] || die "tollgate under valgrind did not listen within 120 s"
note "tollgate (valgrind pid $vg_pid) on 127.0.0.1:$port"

dumps=0
# Runs pgbench against the valgrind tollgate, then dumps callgrind's
# counters. Sets RUN_TXNS, RUN_IR, RUN_DUMP, RUN_BYTES_C, RUN_BYTES_S.
run() {
    local n=$1 bench_out=$TG_WORK/pgbench-$1.txt before per_client
    per_client=$(((n + CLIENTS - 1) / CLIENTS))
    before=$(wc -l <"$serve_log")
    note "pgbench -S -M $MODE -c $CLIENTS -t $per_client through callgrind"
    if ! PGPORT=$port timeout 600 "$PGBENCH" -n -S -M "$MODE" -c "$CLIENTS" -j "$THREADS" -t "$per_client" >"$bench_out" 2>&1; then
        cat "$bench_out" >&2
        die "pgbench failed"
    fi
    RUN_TXNS=$(pgbench_transactions "$bench_out")
    # Let the shard log the session's end before the dump.
    sleep 1
    callgrind_control --vgdb-prefix="$vgdb_prefix" -d "$vg_pid" >"$TG_WORK/callgrind_control.log" 2>&1 || {
        cat "$TG_WORK/callgrind_control.log" >&2
        die "callgrind_control -d failed (it uses vgdb, which needs ptrace)"
    }
    dumps=$((dumps + 1))
    RUN_DUMP=$out.$dumps
    for ((i = 0; i < 100; i++)); do
        grep -q '^totals:' "$RUN_DUMP" 2>/dev/null && break
        sleep 0.1
    done
    RUN_IR=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$RUN_DUMP")
    [[ -n "$RUN_IR" ]] || die "no totals in $RUN_DUMP"
    RUN_BYTES_C=$(tail -n +"$((before + 1))" "$serve_log" | grep -o '"bytes_from_client":[0-9]*' |
        awk -F: '{ s += $2 } END { print s + 0 }')
    RUN_BYTES_S=$(tail -n +"$((before + 1))" "$serve_log" | grep -o '"bytes_from_server":[0-9]*' |
        awk -F: '{ s += $2 } END { print s + 0 }')
}

run 100
warm_ir=$RUN_IR
run "$TXNS"
a_txns=$RUN_TXNS a_ir=$RUN_IR a_dump=$RUN_DUMP a_bc=$RUN_BYTES_C a_bs=$RUN_BYTES_S
run $((2 * TXNS))
b_txns=$RUN_TXNS b_ir=$RUN_IR b_dump=$RUN_DUMP b_bc=$RUN_BYTES_C b_bs=$RUN_BYTES_S
stop_pid "$vg_pid" KILL 10

d_txns=$((b_txns - a_txns))
[[ $d_txns -gt 0 ]] || die "pgbench runs did not differ in transactions ($a_txns, $b_txns)"
per_txn=$(ratio $((b_ir - a_ir)) "$d_txns" 0)
fixed=$(awk -v a="$a_ir" -v n="$a_txns" -v p="$per_txn" 'BEGIN { printf "%.0f\n", a - n * p }')

figure transactions "$a_txns + $b_txns" "pgbench -S -M $MODE -c $CLIENTS, $TXNS transactions, then $((2 * TXNS))${POOL:+; transaction pooling over $POOL_SIZE}"
figure instructions_per_txn "$per_txn" "user-space Ir per transaction, marginal (difference of the two runs)"
figure instructions_per_message "$(ratio "$per_txn" "$MSGS_PER_TXN" 0)" "per forwarded message, both directions ($MSGS_PER_TXN per transaction)"
figure instructions_per_txn_whole_run "$(ratio "$b_ir" "$b_txns" 0)" "Ir of the -t $((2 * TXNS)) run / its transactions, connections included"
figure instructions_per_pgbench_run "$fixed" "rough: one pgbench run's connections, logins (SCRAM cache hit), token checks (inherits the per-txn spread × TXNS)"
figure instructions_startup_warmup "$warm_ir" "process start + first login (PBKDF2) + 100 transactions"
figure bytes_per_txn_client "$(ratio $((b_bc - a_bc)) "$d_txns" 1)" "client-to-server bytes per transaction (from the session-end logs)"
figure bytes_per_txn_server "$(ratio $((b_bs - a_bs)) "$d_txns" 1)" "server-to-client bytes per transaction"

# Per-function self cost per transaction: the same difference, by function.
# Read from the callgrind.out format directly (callgrind_annotate 3.19 mixes
# inclusive costs into its --inclusive=no list for inlined frames): cost
# lines add to the current fn=, except the line after calls=, which is the
# inclusive cost of a call. Function ids are shared by fn= and cfn=.
by_function() {
    awk '
        function name_of(spec,    id, rest) {
            if (match(spec, /^\([0-9]+\)/)) {
                id = substr(spec, 2, RLENGTH - 2)
                rest = substr(spec, RLENGTH + 1); sub(/^ /, "", rest)
                if (rest != "") names[id] = rest
                return names[id]
            }
            return spec
        }
        /^fn=/ { cur = name_of(substr($0, 4)); next }
        /^cfn=/ { callee = name_of(substr($0, 5)); next }
        /^calls=/ { split(substr($0, 7), c, " "); calls[callee] += c[1]; skip = 1; next }
        /^[0-9+*-]/ { if (skip) { skip = 0; next } self[cur] += $2; next }
        END { for (f in self) if (self[f] > 0 || calls[f] > 0) printf "%d\t%d\t%s\n", self[f], calls[f], f }
    ' "$1"
}
by_function "$a_dump" >"$TG_WORK/fn-a.tsv"
by_function "$b_dump" >"$TG_WORK/fn-b.tsv"
# Calls of a function per transaction (same difference).
calls_per_txn() {
    awk -F'\t' -v f="$1" -v n="$d_txns" 'NR == FNR { if ($3 == f) a = $2; next }
        $3 == f { b = $2 } END { printf "%.2f\n", (b - a) / n }' "$TG_WORK/fn-a.tsv" "$TG_WORK/fn-b.tsv"
}
reads=$(calls_per_txn 'tollgate::protocol::frame::Framer::scan')
parks=$(calls_per_txn 'monoio::driver::uring::IoUringDriver::inner_park')
polls=$(calls_per_txn 'monoio::task::raw::poll')
figure reads_per_txn "$reads" "reads that returned data (Framer::scan calls); 2 = one per direction"
figure parks_per_txn "$parks" "runtime parks (io_uring_enter waits); timing-dependent, hence the spread"
figure task_polls_per_txn "$polls" "session task polls (wake-ups)"
figure instructions_per_park "$(ratio "$per_txn" "$parks" 0)" "user-space cost of one event-loop turn"
echo "top_functions_per_txn:             # self Ir per transaction (difference of the two runs), function"
awk -F'\t' -v n="$d_txns" 'NR == FNR { a[$3] = $1; next } { d = ($1 - a[$3]) / n; if (d >= 1) printf "%9.0f  %s\n", d, substr($3, 1, 120) }' \
    "$TG_WORK/fn-a.tsv" "$TG_WORK/fn-b.tsv" | sort -rn | head -n "$TOP"
if [[ -n "${KEEP_WORK:-}" ]]; then
    figure callgrind_files "$a_dump $b_dump" "callgrind_annotate --inclusive=yes FILE, or kcachegrind"
fi
