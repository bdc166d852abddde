#!/usr/bin/env bash
# Runs every check CI runs: format, lints, unit tests, and the kernel-level end-to-end tests
# (which need root: they load eBPF programs and create network namespaces).
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-test.sh
cargo fmt --all --check
# The deployment files (compose, collector config, dashboards, Kubernetes, systemd).
scripts/validate-deploy.sh
cargo clippy --release --all-targets -- -D warnings
# The parsers of hostile input, 10 s a target (scripts/fuzz.sh SECONDS runs them longer).
scripts/fuzz.sh 10
# The end-to-end tests run the release binaries of this workspace.
cargo build --release --bins
scripts/build-musl.sh
cargo test --release -- "$@"
# The compose demo's application publishing its context, against synspan (PyPI for its SDK).
scripts/demo-context-test.sh
