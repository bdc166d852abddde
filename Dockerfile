# synspan's container image. Build from the repository root: docker build -t synspan .
#
# The build stage gets its toolchain from scripts/setup.sh, the same script developers and CI
# run, so the pinned Rust toolchains, LLVM and bpf-linker versions live in one place.
# scripts/validate-deploy.sh fails if this file stops calling it.

# The rust image brings rustup; setup.sh adds the pinned stable, the nightly that builds the
# kernel programs, LLVM 22 (from Debian's bookworm-security) and bpf-linker.
FROM rust:1.98-bookworm AS build
WORKDIR /src
# Only the script first: the toolchain layer (bpf-linker alone builds for minutes) is then
# reused until setup.sh itself changes, whatever happens to the sources.
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh
COPY . .
# BuildKit caches for the crate downloads and the build directory make a rebuild after a
# source change incremental; the binary is copied out of the cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --bins \
    && install -D -m 0755 target/release/synspan /out/synspan

# Runtime: the binary is linked against glibc and libgcc_s only (checked with ldd), both in
# Debian's slim image. ca-certificates is for https:// collectors.
FROM debian:12.8-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/synspan /usr/local/bin/synspan
# Root inside the container, but with only the capabilities the runtime grants (listed, each
# with its reason, in docker-compose.yml and the DaemonSet; deploy/README.md has the table):
# a non-root user would not get them into its effective set, since container runtimes do not
# set ambient capabilities.
USER 0
# With no arguments it prints every attempt on stdout, like the binary does.
ENTRYPOINT ["/usr/local/bin/synspan"]
