#!/usr/bin/env bash
# Where tollgate's CPU time goes: `perf record` with call graphs on the
# tollgate process during a pgbench run, a flame graph (SVG) if inferno is
# available, and the top functions as text.
#
# Usage (repo root, as root): perf/flamegraph.sh
# Environment: DURATION (seconds of pgbench, default 10), CLIENTS (8),
# WORKERS (shards, 1), FREQ (samples/s, 499), CALLGRAPH (dwarf | fp | lbr;
# default dwarf, because Rust release builds omit frame pointers), OUT
# (folder for flamegraph.svg and the folded stacks; default target/perf),
# NO_INSTALL=1 to not `cargo install inferno` when it is missing.
#
# Reading the output: the SVG is interactive (open it in a browser; click
# to zoom). Widths are shares of tollgate's samples, user and kernel
# together; with io_uring most of the relay's time is the kernel's TCP
# stack, entered from io_uring_enter, so the user-space part (Framer::scan,
# the monoio runtime, the session futures) should be a thin slice. The
# text figures below the SVG path are the top functions by self time.
set -euo pipefail
# shellcheck source=perf/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
THREADS=$((CLIENTS < 2 ? CLIENTS : 2))
FREQ=${FREQ:-499}
CALLGRAPH=${CALLGRAPH:-dwarf}
OUT=${OUT:-$TG_ROOT/target/perf}
PERF=${PERF:-$(command -v perf || echo /usr/bin/perf)}

[[ -x "$PERF" ]] || die "perf not found: apt-get install linux-perf"
case "$CALLGRAPH" in
dwarf) callgraph=(--call-graph "dwarf,16384") ;;
fp) callgraph=(--call-graph fp) ;;
lbr) callgraph=(--call-graph lbr) ;;
*) die "CALLGRAPH must be dwarf, fp or lbr" ;;
esac

# inferno: the flame graph tools, from crates.io.
have_inferno() { command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; }
if ! have_inferno && [[ -x "$HOME/.cargo/bin/inferno-flamegraph" ]]; then
    PATH=$HOME/.cargo/bin:$PATH
fi
if ! have_inferno && [[ -z "${NO_INSTALL:-}" ]]; then
    note "installing inferno (cargo install inferno --locked); takes a few minutes once"
    cargo install inferno --locked >&2 || note "cargo install inferno failed: no flame graph, text report only"
    PATH=$HOME/.cargo/bin:$PATH
fi

tg_init
mkdir -p "$OUT"
tg_start_quickstart
tg_pgbench_init

data=$TG_WORK/perf.data
bench_out=$TG_WORK/pgbench.txt
note "perf record -F $FREQ ${callgraph[*]} -p $TG_QS_PID during pgbench -S -M prepared -c $CLIENTS -T $DURATION"
if ! timeout $((DURATION + 120)) "$PERF" record -q -F "$FREQ" "${callgraph[@]}" -o "$data" -p "$TG_QS_PID" \
    -- "$PGBENCH" -n -S -M prepared -c "$CLIENTS" -j "$THREADS" -T "$DURATION" >"$bench_out" 2>&1; then
    cat "$bench_out" >&2
    die "perf record or pgbench failed (kernel.perf_event_paranoid=$(cat /proc/sys/kernel/perf_event_paranoid 2>/dev/null); root needed for kernel stacks)"
fi
txns=$(pgbench_transactions "$bench_out")
# The proxy is stopped before the (slow) symbol resolution: perf reads
# the binary, not the process.
tg_stop_quickstart

samples=$("$PERF" report -i "$data" --stdio -g none --no-children --sort dso 2>/dev/null |
    sed -n 's/^# Samples: \([0-9.]*[KM]\{0,1\}\).*/\1/p' | head -n 1)
figure transactions "${txns:-?}" "pgbench -S -M prepared -c $CLIENTS -T $DURATION, $(pgbench_tps "$bench_out") tps while sampled"
figure samples "${samples:-?}" "at $FREQ Hz per busy CPU; fewer samples = an idler proxy"

# Kernel vs user: share of samples in the kernel.
kernel=$("$PERF" report -i "$data" --stdio -g none --no-children --sort dso 2>/dev/null |
    awk '$2 ~ /kernel/ { gsub("%", "", $1); s += $1 } END { printf "%.1f%%\n", s }')
figure kernel_share "$kernel" "tollgate samples in the kernel (TCP stack, io_uring); the rest is user space"

report() {
    "$PERF" report -i "$data" --stdio -g none --no-children --no-inline --sort symbol "$@" 2>/dev/null |
        awk '/^ +[0-9.]+%/ { pct = $1; $1 = ""; $2 = ""; sub(/^ +/, ""); sub(/( +-)+ *$/, ""); printf "  %7s  %s\n", pct, substr($0, 1, 110) }'
}
echo "top_functions_by_self_time:        # percent of all tollgate samples, user and kernel"
report --percent-limit 0.5 | head -n 15
echo "top_user_space_functions:          # percent of all tollgate samples, tollgate binary and libc only"
report --dsos "$(basename "$TG_BIN"),libc.so.6" --percent-limit 0.1 | head -n 20

if have_inferno; then
    event=$("$PERF" evlist -i "$data" 2>/dev/null | head -n 1)
    case "$event" in
    cpu-clock* | task-clock*) unit=ns ;;
    *) unit=$event ;;
    esac
    folded=$OUT/tollgate.folded
    svg=$OUT/flamegraph.svg
    user_svg=$OUT/flamegraph-user.svg
    note "collapsing stacks (perf script; can take a minute with dwarf call graphs)"
    "$PERF" script -i "$data" --no-inline 2>/dev/null | inferno-collapse-perf --kernel >"$folded"
    inferno-flamegraph --title "tollgate: pgbench -S -M prepared -c $CLIENTS, $DURATION s" \
        --countname "$unit" <"$folded" >"$svg"
    # The same stacks cut at the first kernel frame: user-space code at a
    # readable width, each syscall shown as one [kernel] box.
    awk '{ n = $NF; $NF = ""; sub(/ $/, ""); k = index($0, "_[k]");
           if (k) { s = substr($0, 1, k - 1); sub(/;[^;]*$/, "", s); $0 = s ";[kernel]" }
           print $0, n }' "$folded" |
        inferno-flamegraph --title "tollgate user space (kernel time folded into [kernel])" \
            --countname "$unit" >"$user_svg"
    figure flamegraph "$svg" "open in a browser; click a frame to zoom; orange = kernel"
    figure flamegraph_user "$user_svg" "user space only; kernel time as one [kernel] box per call site"
    figure folded_stacks "$folded" "one stack per line (weights in $unit); diff two runs with inferno-diff-folded"
else
    figure flamegraph "not made" "inferno-collapse-perf/inferno-flamegraph not found (cargo install inferno)"
fi
