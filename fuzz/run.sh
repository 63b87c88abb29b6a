#!/usr/bin/env bash
# fuzz/run.sh [seconds]: runs every fuzz target for N seconds each (default 30) and fails if
# any of them finds a crash. libFuzzer's random seed is fixed (FUZZ_SEED, default 1) so a run
# explores the same inputs every time and a CI failure replays anywhere; FUZZ_SEED=0 picks a
# new seed each run (libFuzzer's own default), for long hunts. CI-friendly: installs
# cargo-fuzz when it is missing, starts from the checked-in seeds (fuzz/seeds/<target>/, with
# the dictionary fuzz/dicts/<target>.dict) plus whatever corpus earlier runs left in
# fuzz/corpus/<target>/ (not checked in), and prints one summary line per target.
# Crashing inputs land in fuzz/artifacts/<target>/; reproduce one with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# (or, without nightly: RUSTC_BOOTSTRAP=1 cargo fuzz run ...)
set -euo pipefail
secs=${1:-30}
case $secs in '' | *[!0-9]*) echo "usage: [FUZZ_SEED=n] fuzz/run.sh [seconds per target]" >&2; exit 2 ;; esac
seed=${FUZZ_SEED:-1}
case $seed in '' | *[!0-9]*) echo "fuzz/run.sh: FUZZ_SEED must be a number (0 = random), not '$seed'" >&2; exit 2 ;; esac
cd "$(dirname "$0")"

# cargo-fuzz passes unstable flags (-Zsanitizer=address) to rustc. A nightly toolchain is used
# when one is installed; otherwise the default toolchain with RUSTC_BOOTSTRAP=1, which accepts
# the same flags (machines that reach only crates.io cannot download nightly).
if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    echo "==> no nightly toolchain: using $(rustc --version) with RUSTC_BOOTSTRAP=1" \
        "(rustup toolchain install nightly to use nightly instead)" >&2
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz from crates.io" >&2
    cargo install --locked cargo-fuzz
fi

# Release build with debug assertions and overflow checks (cargo-fuzz's default) and ASan.
cargo "${toolchain[@]}" fuzz build
targets=$(cargo "${toolchain[@]}" fuzz list)
failed=()
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t.log"
    echo "==> fuzz $t for ${secs} s (seed $seed)" >&2
    set +e
    dict=()
    [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
    cargo "${toolchain[@]}" fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -seed="$seed" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
        >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        echo "$t: ok, ${execs:-?} execs in ${secs} s"
    else
        failed+=("$t")
        echo "$t: FAILED (exit $rc) after ${execs:-?} execs; log: fuzz/$log" >&2
        grep -E "panicked at|^SUMMARY|ERROR: libFuzzer|Test unit written" -A2 "$log" | head -20 >&2 || true
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}" >&2
    exit 1
fi
