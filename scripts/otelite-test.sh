#!/usr/bin/env bash
# The same spans in a second, independent backend: otelite (crates.io), read back through its
# REST API (collector/tests/otelite.rs). Not part of scripts/test.sh: `cargo install --locked
# otelite` builds several hundred crates, tens of minutes on a small machine; once built it is
# kept in target/otelite/ and this takes about a minute. Run as root, after scripts/setup-test.sh.
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."

version=0.1.156
root=target/otelite
if [ -z "${SYNSPAN_OTELITE:-}" ]; then
    if ! "$root/bin/otelite" --version 2>/dev/null | grep -qF "$version"; then
        echo "otelite-test: installing otelite $version (cargo install --locked; slow the first time)" >&2
        cargo install --locked otelite --version "$version" --root "$root" --target-dir target/otelite-build
    fi
    export SYNSPAN_OTELITE="$PWD/$root/bin/otelite"
fi
cargo build --release --bins
cargo test --release --test otelite -- --ignored --nocapture
