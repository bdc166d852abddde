#!/usr/bin/env bash
# The compose demo's context publishing, proven without Docker: the demo's Python
# requirements (PyPI) into target/demo/venv, its otel_context extension built there, then
# collector/tests/demo_context.rs runs demo/app.py against synspan and a real receiver.
# Needs root and the release binaries (cargo build --release --bins).
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
dir=target/demo
if [ ! -x "$dir/venv/bin/python3" ]; then
    python3 -m venv "$dir/venv"
fi
"$dir/venv/bin/pip" install --quiet --disable-pip-version-check -r demo/requirements.txt
PYTHON="$dir/venv/bin/python3" demo/build-otel-context.sh "$dir"
SYNSPAN_DEMO_PYTHON="$PWD/$dir/venv/bin/python3" SYNSPAN_DEMO_EXT="$PWD/$dir" \
    exec cargo test --release --test demo_context -- --ignored "$@"
