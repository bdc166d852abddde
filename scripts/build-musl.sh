#!/usr/bin/env bash
# Builds the traced test applications (synspan-traced, synspan-traced-dl and their two TLS
# libraries) for x86_64-unknown-linux-musl, dynamically linked against Debian's musl
# (musl-gcc from musl-tools, scripts/setup-test.sh installs it): the thread-context tests run
# them to check the reader against musl's TLS layout. Their C code and ring's are built by
# musl-gcc. Arguments go to cargo. A cold build takes about 4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
# A dynamically linked Rust program for musl links libgcc_s for unwinding; Debian's is built
# for glibc. Rust's own LLVM libunwind for musl stands in, through a linker script.
sysroot=$(rustc --print sysroot)
unwind="$sysroot/lib/rustlib/$target/lib/self-contained/libunwind.a"
[ -f "$unwind" ] || { echo "build-musl: $unwind missing (rustup target add $target)" >&2; exit 1; }
shim=target/musl-link
mkdir -p "$shim"
printf 'INPUT ( %s )\n' "$unwind" > "$shim/libgcc_s.so"
export CC_x86_64_unknown_linux_musl=musl-gcc
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=musl-gcc
# -crt-static: musl's dlopen needs its dynamic loader, which a static executable lacks.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=-crt-static -C force-frame-pointers=yes -L $PWD/$shim"
exec cargo build --release --target "$target" -p synspan-testbed \
    --bin synspan-traced --bin synspan-traced-dl "$@"
