#!/usr/bin/env bash
# fuzz/run.sh [runs]: runs every fuzz target on a fixed number of inputs each (default 20000)
# and fails if any of them finds a crash. A run reads only what is committed: the seeds
# (fuzz/seeds/<target>/) and the dictionary (fuzz/dicts/<target>.dict); what libFuzzer adds to
# its corpus goes to a temporary folder that is deleted afterwards. libFuzzer's random seed is
# fixed (FUZZ_SEED, default 1) and the run stops after that many inputs (-runs), not after a
# time: the same commit, toolchain and run count explore the same inputs on any machine, so a
# CI verdict replays anywhere with `fuzz/run.sh <runs>`.
#
# fuzz/run.sh --hunt [seconds]: for long hunts (default 600 s a target): a new random seed
# each run, a wall-clock budget, and the local corpus fuzz/corpus/<target>/ (not checked in),
# which grows from run to run. Its verdicts replay only from the crashing input.
#
# Installs cargo-fuzz when it is missing and prints one summary line per target. Crashing
# inputs land in fuzz/artifacts/<target>/; reproduce one with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# (or, without nightly: RUSTC_BOOTSTRAP=1 cargo fuzz run ...)
set -euo pipefail
usage() { echo "usage: [FUZZ_SEED=n] fuzz/run.sh [inputs per target] | fuzz/run.sh --hunt [seconds per target]" >&2; exit 2; }
if [ "${1:-}" = --hunt ]; then
    mode=hunt budget=${2:-600}
else
    mode=ci budget=${1:-20000}
fi
case $budget in '' | *[!0-9]* | 0) usage ;; esac
seed=${FUZZ_SEED:-1}
case $seed in '' | *[!0-9]*) echo "fuzz/run.sh: FUZZ_SEED must be a number (0 = random), not '$seed'" >&2; exit 2 ;; esac
[ "$mode" = hunt ] && seed=0
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
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in $targets; do
    mkdir -p "artifacts/$t"
    log="artifacts/$t.log"
    if [ "$mode" = ci ]; then
        corpus="$scratch/$t" limit=(-runs="$budget")
        echo "==> fuzz $t on $budget inputs (seed $seed, committed seeds only)" >&2
    else
        corpus="corpus/$t" limit=(-max_total_time="$budget")
        echo "==> fuzz $t for $budget s (random seed, local corpus)" >&2
    fi
    mkdir -p "$corpus"
    set +e
    dict=()
    [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
    start=$SECONDS
    cargo "${toolchain[@]}" fuzz run "$t" "$corpus" "seeds/$t" -- \
        "${limit[@]}" -seed="$seed" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
        >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        echo "$t: ok, ${execs:-?} execs in $((SECONDS - start)) s"
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
