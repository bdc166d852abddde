#!/usr/bin/env bash
# Validates the deployment files without a container engine or a cluster: the compose stack,
# the collector/Tempo/Prometheus/Grafana configuration under otel-config/, the Kubernetes
# manifests and the systemd unit. One line per check; exits non-zero if any check fails.
# The checks are scripts/validate_deploy.py; this installs what they call, lints them, and
# runs them.
#
# Tools, all from the registries this project uses, installed once (idempotent):
#   - check-jsonschema (PyPI): the Compose Specification's JSON schema it ships
#     (vendor.compose-spec), and the JSON-schema validation itself;
#   - kubernetes-validate (PyPI): the Kubernetes OpenAPI schemas, strict mode;
#   - promql-parser (PyPI): parses the dashboard's PromQL to list the metrics and labels
#     it uses;
#   - promtool, from Debian's prometheus package (unpacked, not installed): Prometheus' own
#     config and PromQL parsers;
#   - ruff (PyPI): lints scripts/validate_deploy.py before it runs;
#   - PyYAML; systemd-analyze and kubectl when the machine has them (kubectl renders the
#     kustomization; without it the manifests are validated file by file).
# Python packages go into the repository's .venv, promtool into .venv/deploy-tools/.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
TOOLS="$VENV/deploy-tools"
PY_PINS=(check-jsonschema==0.39.0 kubernetes-validate==1.37.0 promql-parser==0.11.0 PyYAML==6.0.3
         ruff==0.17.6)

log() { printf 'validate-deploy: %s\n' "$*" >&2; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.validate-deploy-$(printf '%s\n' "${PY_PINS[@]}" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    log "pip install ${PY_PINS[*]}"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PINS[@]}"
    touch "$stamp"
fi

mkdir -p "$TOOLS"
if [ ! -x "$TOOLS/promtool" ]; then
    log "promtool from Debian's prometheus package"
    work=$(mktemp -d)
    # apt-get download needs package lists; a fresh machine may have none yet.
    if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
        apt-get update -qq
        (cd "$work" && apt-get download prometheus >/dev/null 2>&1)
    fi
    dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
    install -m 0755 "$work/root/usr/bin/promtool" "$TOOLS/promtool"
    rm -rf "$work"
fi

"$VENV/bin/ruff" check --quiet --isolated --no-cache scripts/validate_deploy.py
exec "$VENV/bin/python" scripts/validate_deploy.py "$@"
