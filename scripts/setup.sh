#!/usr/bin/env bash
# Installs everything synspan needs to build and run on Debian/Ubuntu x86-64.
# The single source of truth for the toolchain: README, CI and the Dockerfile all call it.
# Idempotent: a second run only checks.
set -euo pipefail

RUST_TOOLCHAIN=1.98.0
# The nightly that builds the eBPF crate; its LLVM (22) must match bpf-linker's.
EBPF_NIGHTLY=nightly-2026-06-20
LLVM_MAJOR=22
BPF_LINKER_VERSION=0.13.0

log() { printf 'setup: %s\n' "$*" >&2; }

need_apt=()
for pkg in "llvm-${LLVM_MAJOR}-dev" "libclang-${LLVM_MAJOR}-dev" libzstd-dev zlib1g-dev \
           iproute2 iptables conntrack procps util-linux ca-certificates curl python3-venv; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    log "apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v rustup >/dev/null 2>&1; then
    log "rustup not found: install it from your distribution or rustup.rs, then re-run" >&2
    exit 1
fi
rustup toolchain list | grep -q "^${RUST_TOOLCHAIN}" || {
    log "rustup toolchain install ${RUST_TOOLCHAIN}"
    rustup toolchain install "${RUST_TOOLCHAIN}" --profile minimal --component clippy,rustfmt
}
rustup component list --toolchain "${RUST_TOOLCHAIN}" --installed | grep -q '^clippy' \
    || rustup component add --toolchain "${RUST_TOOLCHAIN}" clippy rustfmt
rustup toolchain list | grep -q "^${EBPF_NIGHTLY}" || {
    log "rustup toolchain install ${EBPF_NIGHTLY}"
    rustup toolchain install "${EBPF_NIGHTLY}" --profile minimal --component rust-src
}

if ! bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"; then
    log "cargo install bpf-linker ${BPF_LINKER_VERSION} (llvm-${LLVM_MAJOR})"
    LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo +"${RUST_TOOLCHAIN}" install bpf-linker \
        --version "${BPF_LINKER_VERSION}" --locked --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

# tracefs is where tracepoints are attached from; some hosts do not mount it.
if [ ! -d /sys/kernel/tracing/events ] && [ "$(id -u)" = 0 ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || log "could not mount tracefs at /sys/kernel/tracing"
fi
log "ok"
