#!/usr/bin/env bash
# Installs what the end-to-end tests use beyond the build toolchain: rotel (a real
# OpenTelemetry collector from PyPI, the OTLP receiver) into .venv, bpftool (checks that no
# program is left behind), stunnel and openssl (TLS in front of the receiver),
# protobuf-compiler (the test bed's Jaeger receiver, synspan-jaeger, is built on otlp-embedded),
# chromium and playwright-core from npm (the Jaeger UI test renders a trace page), musl-tools
# and rustup's x86_64-unknown-linux-musl target (the traced applications built for musl,
# scripts/build-musl.sh), libc6-dbg (libc's frames named from its separate debug file). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
for pkg in bpftool stunnel4 openssl util-linux protobuf-compiler chromium musl-tools libc6-dbg; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# node 20 or later (playwright-core's minimum): Debian 13's, or one installed before.
if ! command -v npm >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
    echo "setup-test: node ${node_major} found; playwright-core (the Jaeger UI test) needs node 20 or later:" \
        "install Node.js 20+ (Debian 13's nodejs, or NodeSource's) and run again" >&2
    exit 1
fi
if [ ! -d testbed/jaeger_ui/node_modules/playwright-core ]; then
    npm ci --prefix testbed/jaeger_ui --no-audit --no-fund --silent
fi
rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
ROTEL_VERSION=0.0.1a15
agent=.venv/lib/python3.11/site-packages/rotel/rotel-agent
if [ ! -x "$agent" ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "rotel==${ROTEL_VERSION}"
fi
[ -x "$agent" ] || { echo "setup-test: $agent missing after install (is python3 3.11?)" >&2; exit 1; }
# rotel-agent embeds libpython3.11.
if ldd "$agent" | grep -q 'not found'; then
    apt-get install -y -qq --no-install-recommends libpython3.11 >/dev/null
fi
echo "setup-test: ok" >&2
