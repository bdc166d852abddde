#!/usr/bin/env bash
# Installs the OTLP receiver the end-to-end tests export to: rotel, a real OpenTelemetry
# collector from PyPI, into .venv. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROTEL_VERSION=0.0.1a15
agent=.venv/lib/python3.11/site-packages/rotel/rotel-agent
if [ ! -x "$agent" ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "rotel==${ROTEL_VERSION}"
fi
[ -x "$agent" ] || { echo "setup-receiver: $agent missing after install (is python3 3.11?)" >&2; exit 1; }
# rotel-agent embeds libpython3.11.
if ldd "$agent" | grep -q 'not found'; then
    apt-get install -y -qq --no-install-recommends libpython3.11 >/dev/null
fi
echo "setup-receiver: ok" >&2
