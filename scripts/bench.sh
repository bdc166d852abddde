#!/usr/bin/env bash
# The benchmark: connects per second of a loopback connect storm without and with synspan
# (A/B pairs, nine modes), synspan's CPU time and peak RSS, and its accounting. Prints the
# table and writes BENCHMARKS.md. Needs root: it loads eBPF programs and creates (and
# removes) a network namespace, the only place it sends traffic to.
#   scripts/bench.sh                          # 3 pairs x 9 modes x 5 s, and the peers, about 14 minutes
#   scripts/bench.sh --pairs 5 --seconds 10   # see `target/release/synspan-bench --help`
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-test.sh
# The peers measured beside synspan (synspan-bench --peers).
need_apt=()
for pkg in bpftrace libbpf-tools; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "bench: installing ${need_apt[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
cargo build --release --bins >&2
# The command line BENCHMARKS.md names, quoted so that it can be run again as it is.
SYNSPAN_BENCH_COMMAND="scripts/bench.sh"
if [ $# -gt 0 ]; then
    SYNSPAN_BENCH_COMMAND+="$(printf ' %q' "$@")"
fi
export SYNSPAN_BENCH_COMMAND
exec target/release/synspan-bench "$@"
