#!/usr/bin/env bash
# Builds the fuzz targets and replays their corpora and regression inputs
# under the fuzz build (ASan, debug assertions): seconds once built. Skipped
# without a nightly toolchain; tests/it/fuzz_replay.rs replays the same inputs
# on stable in every `cargo test`.
set -euo pipefail
cd "$(dirname "$0")"
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "== fuzz: no nightly toolchain; skipped (tests/it/fuzz_replay.rs replays the corpora)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo +nightly install cargo-fuzz --locked
fi
echo "== cargo +nightly fuzz build"
cargo +nightly fuzz build
for t in $(cargo +nightly fuzz list); do
    # corpus/ is not in git (only seeds/ and regressions/ are): take the
    # folders that exist, as libFuzzer refuses a missing one.
    dirs=()
    for d in "seeds/$t" "corpus/$t" "regressions/$t"; do
        if [ -d "$d" ]; then dirs+=("$d"); fi
    done
    echo "== fuzz replay $t ($(find "${dirs[@]}" -type f | wc -l) inputs)"
    cargo +nightly fuzz run "$t" "${dirs[@]}" -- -runs=0 -rss_limit_mb=2048 -timeout=30 2>&1 | tail -n 20
done
