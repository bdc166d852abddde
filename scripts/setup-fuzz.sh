#!/usr/bin/env bash
# Installs cargo-fuzz, which builds and runs the fuzz targets in fuzz/ with the eBPF nightly
# (scripts/setup.sh installs it). Idempotent: a second run only checks.
set -euo pipefail
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "${CARGO_FUZZ_VERSION}"; then
    echo "setup-fuzz: cargo install cargo-fuzz ${CARGO_FUZZ_VERSION}" >&2
    cargo install --locked cargo-fuzz --version "${CARGO_FUZZ_VERSION}"
fi
echo "setup-fuzz: ok" >&2
