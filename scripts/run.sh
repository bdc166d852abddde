#!/usr/bin/env bash
# Sets up the toolchain if needed, builds synspan, and runs it with the arguments given.
#   scripts/run.sh                # one line per connect attempt on this host (as root, or through sudo)
#   scripts/run.sh --help
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
scripts/setup.sh
# Only the agent: the test bed (and its Jaeger receiver, which needs protoc) is for the tests.
cargo build --release -p synspan --bin synspan >&2
exec target/release/synspan "$@"
