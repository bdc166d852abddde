#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS (default 20) each, starting from its seeds in
# fuzz/seeds/<target>/ and what earlier runs found (fuzz/corpus/<target>/, not checked in).
# Fails on the first crash, hang (an input that runs over 10 s) or runaway allocation; the
# input that did it is left in fuzz/artifacts/<target>/, and `cargo fuzz run <target> <file>`
# replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
# The nightly that builds the kernel programs builds the fuzz targets too.
nightly=$(sed -n 's/^EBPF_NIGHTLY=//p' scripts/setup.sh)
scripts/setup-fuzz.sh
cd fuzz
cargo +"$nightly" fuzz build -O
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# In CI every target makes a fixed number of runs from a fixed seed, starting from the
# checked-in seeds alone: a CI result is reproducible, and a run that passed here passes
# there. Elsewhere each target fuzzes for SECONDS and keeps what it finds in corpus/.
fresh=$(mktemp -d)
trap 'rm -f "$log"; rm -rf "$fresh"' EXIT
for target in $(cargo +"$nightly" fuzz list); do
    if [ "${CI:-}" = true ]; then
        corpus="$fresh/$target"
        budget=(-seed=1 -runs="${FUZZ_RUNS:-100000}")
    else
        corpus="corpus/$target"
        budget=(-max_total_time="$seconds")
    fi
    mkdir -p "$corpus"
    if ! cargo +"$nightly" fuzz run -O "$target" "$corpus" "seeds/$target" -- \
        "${budget[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        grep -E 'panicked|==ERROR|SUMMARY|Failing input' -A2 "$log" >&2 || tail -n 40 "$log" >&2
        echo "fuzz: $target failed; the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz: $target: ${runs:-?} runs, no failure" >&2
done
echo "fuzz: ok" >&2
