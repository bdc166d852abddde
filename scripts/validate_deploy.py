"""Validates the deployment files without a container engine or a cluster: the compose stack,
the collector/Tempo/Prometheus/Grafana configuration under otel-config/, the Kubernetes
manifests and the systemd unit. One line per check; exits non-zero if any check fails.

Run it through scripts/validate-deploy.sh, which installs the tools it calls into the
repository's .venv and runs it with that environment's Python.
"""
import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import traceback
import urllib.parse
from pathlib import Path

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parent.parent
# The virtual environment scripts/validate-deploy.sh made: the Python tools are its
# console scripts, promtool sits in deploy-tools/ beside them.
VENV_BIN = Path(sys.executable).parent
TOOLS = VENV_BIN.parent / "deploy-tools"
K8S_VERSION = "1.31.0"
# (name, function) in the order the checks are declared and run.
CHECKS = []


class Failed(Exception):
    pass


def check(name):
    """Registers a check: a function that returns a detail (or nothing) or raises Failed."""
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def run_check(name, fn):
    """Runs one check and prints its line; True if it passed."""
    try:
        detail = fn() or ""
        print(f"ok    {name}{': ' + detail if detail else ''}")
        return True
    except Failed as err:
        print(f"FAIL  {name}")
        for line in str(err).splitlines():
            print(f"        {line}")
    # A check that crashes is reported as failed, and the others still run.
    except Exception:  # noqa: BLE001
        print(f"FAIL  {name} (crashed)")
        print("        " + traceback.format_exc().replace("\n", "\n        "))
    return False


def fail_if(problems):
    if problems:
        raise Failed("\n".join(dict.fromkeys(problems)))


def run(cmd, **kw):
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)


def load_yaml(path):
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise Failed(f"{path}: {err}")


COMPOSE = ROOT / "docker-compose.yml"
COLLECTOR = ROOT / "otel-config/otel-collector.yaml"
DASHBOARD = ROOT / "otel-config/grafana/dashboards/synspan.json"
DATASOURCES = ROOT / "otel-config/grafana/provisioning/datasources/datasources.yaml"
K8S = ROOT / "deploy/kubernetes"
UNIT = ROOT / "deploy/systemd/synspan.service"

# The capabilities synspan needs (README "Reliability", collector/src/privilege.rs): to load
# and attach (BPF, PERFMON), to read /proc/kallsyms with addresses (SYSLOG), to read other
# processes' /proc/<pid> (SYS_PTRACE, DAC_READ_SEARCH, kept), and for NAT evidence unless
# --no-nat is given (NET_ADMIN for conntrack; SYS_ADMIN to enter another network namespace).
# Each deployment must grant exactly its set: nothing missing, nothing extra.
CAPS_BASE = {"BPF", "PERFMON", "SYSLOG", "SYS_PTRACE", "DAC_READ_SEARCH"}
CAPS_NAT = {"SYS_ADMIN", "NET_ADMIN"}
# The systemd unit (a host without containers) leaves SYS_ADMIN out on purpose: conntrack in
# the host's own network namespace needs no setns(); deploy/README.md says why.
CAPS_NAT_UNIT = {"NET_ADMIN"}


def wanted_caps(args, nat_caps):
    return CAPS_BASE | (set() if "--no-nat" in args else nat_caps)


def caps_problems(where, got, want):
    problems = []
    if len(got) != len(set(got)):
        problems.append(f"{where}: capabilities listed twice: {got}")
    got = set(got)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        problems.append(f"{where}: capabilities {sorted(got)}, want exactly {sorted(want)}"
                        + (f"; missing {missing}" if missing else "")
                        + (f"; not wanted {extra}" if extra else ""))
    return problems


# --- Compose -----------------------------------------------------------------------------

@check("docker-compose.yml matches the Compose Specification schema")
def compose_schema():
    r = run([str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
             str(COMPOSE)])
    if r.returncode != 0:
        raise Failed((r.stdout + r.stderr).strip())
    return "check-jsonschema, vendor.compose-spec"


def compose():
    return load_yaml(COMPOSE)


def dockerfile_copies(dockerfile):
    """Sources of COPY/ADD lines that read the build context (not --from=stage)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        sources += args[:-1]
    return sources


@check("every service, build context, Dockerfile, mount and dependency in docker-compose.yml exists")
def compose_references():
    doc = compose()
    services = doc.get("services", {})
    volumes = set((doc.get("volumes") or {}).keys())
    problems = []
    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            ctx = build if isinstance(build, str) else build.get("context", ".")
            ctx_path = (ROOT / ctx).resolve()
            dockerfile = ctx_path / ("Dockerfile" if isinstance(build, str)
                                     else build.get("dockerfile", "Dockerfile"))
            if not ctx_path.is_dir():
                problems.append(f"{name}: build context {ctx} is not a directory")
            elif not dockerfile.is_file():
                problems.append(f"{name}: {dockerfile.relative_to(ROOT)} missing")
            else:
                for src in dockerfile_copies(dockerfile):
                    if src not in (".", "./") and not list(ctx_path.glob(src.lstrip("/"))):
                        problems.append(f"{name}: {dockerfile.relative_to(ROOT)} copies {src}, "
                                        f"absent from {ctx}")
        image = svc.get("image")
        if image is None and build is None:
            problems.append(f"{name}: neither image nor build")
        if image and build is None:
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                problems.append(f"{name}: image {image} is not pinned to a version")
        for mount in svc.get("volumes", []):
            if isinstance(mount, str):
                source = mount.split(":")[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            else:
                source, kind = mount.get("source", ""), mount.get("type")
            if kind == "volume" and source not in volumes:
                problems.append(f"{name}: named volume {source} is not declared")
            if kind == "bind" and source.startswith(".") and not (ROOT / source).exists():
                problems.append(f"{name}: mounts {source}, which does not exist")
        deps = svc.get("depends_on", {})
        for dep, cond in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif (cond or {}).get("condition") == "service_healthy" and \
                    "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
        for env_file in svc.get("env_file", []) if isinstance(svc.get("env_file"), list) else []:
            if not (ROOT / env_file).is_file():
                problems.append(f"{name}: env_file {env_file} missing")
    fail_if(problems)
    return f"{len(services)} services"


@check("compose synspan: exact capabilities, host pid and cgroup namespaces, read-only")
def compose_synspan():
    svc = compose()["services"]["synspan"]
    args = [str(a) for a in svc.get("command", [])]
    problems = []
    if svc.get("privileged"):
        problems.append("privileged")
    if svc.get("cap_drop") != ["ALL"]:
        problems.append("capabilities are not dropped to none first (cap_drop: [ALL])")
    want = wanted_caps(args, CAPS_NAT)
    problems += caps_problems("cap_add", [str(c).removeprefix("CAP_") for c in svc.get("cap_add", [])], want)
    for key, value in (("pid", "host"), ("cgroup", "host"), ("network_mode", "host"), ("read_only", True)):
        if svc.get(key) != value:
            problems.append(f"{key} is not {value}")
    fail_if(problems)
    return ", ".join(sorted(want)) + (" (--no-nat)" if "--no-nat" in args else "")


@check("Dockerfile builds with scripts/setup.sh, the toolchain's single source of truth")
def dockerfile_build():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"(?im)^FROM\s+", text)[1:]
    if len(stages) < 2:
        raise Failed("expected a build stage and a runtime stage")
    build, runtime = stages[0], stages[-1]
    problems = []
    runs = [m.group(1) for m in re.finditer(r"(?ms)^RUN\s+(.*?)(?<!\\)$", build)]
    setup_at = next((i for i, r in enumerate(runs) if re.search(r"(^|[\s/])scripts/setup\.sh\b", r)), None)
    cargo_at = next((i for i, r in enumerate(runs) if "cargo build --release" in r), None)
    if setup_at is None:
        problems.append("no RUN in the build stage calls scripts/setup.sh")
    if cargo_at is None:
        problems.append("no RUN in the build stage runs cargo build --release")
    if setup_at is not None and cargo_at is not None and setup_at > cargo_at:
        problems.append("scripts/setup.sh runs after cargo build")
    if "scripts/setup.sh" not in " ".join(dockerfile_copies(ROOT / "Dockerfile")):
        problems.append("scripts/setup.sh is not copied into the build stage")
    if "cargo" in runtime or "rustup" in runtime:
        problems.append("the runtime stage carries the toolchain")
    if not re.search(r"(?m)^COPY\s+--from=\S+\s+\S*synspan\s", runtime):
        problems.append("the runtime stage does not copy the synspan binary from the build")
    # What the build needs must survive .dockerignore: the script and the whole workspace.
    ignore = [l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    for needed in ["scripts/setup.sh", "Cargo.toml", "Cargo.lock", "rust-toolchain.toml", *members]:
        parts = Path(needed).parts
        for pattern in ignore:
            if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
                problems.append(f".dockerignore pattern {pattern!r} leaves {needed} out of the build")
    fail_if(problems)


# --- Collector -----------------------------------------------------------------------------

KINDS = ("receivers", "processors", "exporters", "connectors")


def collector():
    doc = load_yaml(COLLECTOR)
    if not isinstance(doc, dict):
        raise Failed(f"{COLLECTOR} is not a mapping")
    return doc


@check("collector pipelines use only defined components; spanmetrics bridges traces to metrics")
def collector_pipelines():
    doc = collector()
    defined = {k: set((doc.get(k) or {}).keys()) for k in KINDS}
    pipelines = (doc.get("service") or {}).get("pipelines") or {}
    problems, used = [], {k: set() for k in KINDS}
    conn_as_exporter, conn_as_receiver = {}, {}
    if not pipelines:
        problems.append("no pipelines")
    for pid, p in pipelines.items():
        ptype = pid.split("/")[0]
        if ptype not in ("traces", "metrics", "logs"):
            problems.append(f"pipeline {pid}: unknown signal {ptype}")
        # A connector stands where a receiver or an exporter would: `as_connector` records
        # on which side, and for which signal; processors have no connector side.
        for kind, as_connector in (("receivers", conn_as_receiver), ("processors", None),
                                   ("exporters", conn_as_exporter)):
            for name in p.get(kind) or []:
                if name in defined[kind]:
                    used[kind].add(name)
                elif as_connector is not None and name in defined["connectors"]:
                    used["connectors"].add(name)
                    as_connector.setdefault(name, set()).add(ptype)
                else:
                    problems.append(f"pipeline {pid}: {kind[:-1]} {name} is not defined")
        if not p.get("receivers") or not p.get("exporters"):
            problems.append(f"pipeline {pid}: needs receivers and exporters")
        procs = p.get("processors") or []
        if "memory_limiter" in defined["processors"] and procs[:1] != ["memory_limiter"]:
            problems.append(f"pipeline {pid}: memory_limiter must come first")
    for kind in KINDS:
        for unused in sorted(defined[kind] - used[kind]):
            problems.append(f"{kind[:-1]} {unused} is defined but in no pipeline")
    for c in defined["connectors"]:
        if c in used["connectors"] and not (c in conn_as_exporter and c in conn_as_receiver):
            problems.append(f"connector {c} must be an exporter in one pipeline and a receiver in another")
    spanmetrics = [c for c in defined["connectors"] if c.split("/")[0] == "spanmetrics"]
    if not spanmetrics:
        problems.append("no spanmetrics connector")
    for c in spanmetrics:
        if "traces" not in conn_as_exporter.get(c, ()):
            problems.append(f"{c} is not an exporter of a traces pipeline")
        if "metrics" not in conn_as_receiver.get(c, ()):
            problems.append(f"{c} is not a receiver of a metrics pipeline")
    fail_if(problems)
    return ", ".join(f"{pid} {len(p.get('exporters', []))} exporters" for pid, p in pipelines.items())


@check("collector, Tempo and Prometheus configs agree with each other and with the compose services")
def configs_agree():
    doc, services = collector(), set(compose()["services"])
    problems = []
    exporters = doc.get("exporters") or {}
    for name, cfg in exporters.items():
        if name.split("/")[0] in ("otlp", "otlphttp"):
            host = urllib.parse.urlsplit("//" + str(cfg.get("endpoint", "")).split("://")[-1]).hostname
            if host not in services:
                problems.append(f"exporter {name} sends to {host}, not a compose service")
    for dest in ("jaeger", "tempo"):
        if not any(n == f"otlp/{dest}" for n in exporters):
            problems.append(f"no otlp/{dest} exporter")
    tempo = load_yaml(ROOT / "otel-config/tempo.yaml")
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    if not str(exporters.get("otlp/tempo", {}).get("endpoint", "")).endswith(":" + tempo_grpc.rsplit(":", 1)[-1]):
        problems.append("otlp/tempo's port is not the one Tempo's OTLP gRPC receiver listens on")
    prom_port = str(exporters.get("prometheus", {}).get("endpoint", "")).rsplit(":", 1)[-1]
    scrape = load_yaml(ROOT / "otel-config/prometheus.yml")
    targets = [t for job in scrape.get("scrape_configs", [])
               for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
    if f"otel-collector:{prom_port}" not in targets:
        problems.append(f"Prometheus does not scrape otel-collector:{prom_port}, the prometheus exporter")
    for t in targets:
        if t.split(":")[0] not in services:
            problems.append(f"Prometheus scrapes {t}, not a compose service")
    r = run([str(TOOLS / "promtool"), "check", "config", "--syntax-only",
             str(ROOT / "otel-config/prometheus.yml")])
    if r.returncode != 0:
        problems.append("promtool check config: " + (r.stdout + r.stderr).strip())
    fail_if(problems)
    return "promtool check config ok"


# --- Grafana -------------------------------------------------------------------------------

def sanitize(name):
    return re.sub(r"[^a-zA-Z0-9_:]", "_", name)


def spanmetrics_names():
    """The Prometheus metric and label names the prometheus exporter shows for the
    spanmetrics connector, derived from the collector config (contrib 0.115: dots become
    underscores, counters get _total and histograms their unit, as add_metric_suffixes does
    by default)."""
    doc = collector()
    conn = next(v or {} for k, v in (doc.get("connectors") or {}).items()
                if k.split("/")[0] == "spanmetrics")
    prom = next(v or {} for k, v in (doc.get("exporters") or {}).items()
                if k.split("/")[0] == "prometheus")
    ns = conn.get("namespace", "traces.span.metrics")
    prefix = (prom.get("namespace") + "_") if prom.get("namespace") else ""
    suffixes = prom.get("add_metric_suffixes", True)
    base = prefix + sanitize(ns + "." if ns else "")
    hist = conn.get("histogram") or {}
    unit = {"ms": "milliseconds", "s": "seconds"}[hist.get("unit", "ms")]
    metrics = {base + "calls" + ("_total" if suffixes else ""): "calls"}
    if not hist.get("disable", False):
        dur = base + "duration" + (f"_{unit}" if suffixes else "")
        metrics.update({dur + "_bucket": "duration", dur + "_sum": "duration", dur + "_count": "duration"})
    events = conn.get("events") or {}
    if events.get("enabled"):
        metrics[base + "events" + ("_total" if suffixes else "")] = "events"
    labels = {"service.name", "span.name", "span.kind", "status.code"} - set(conn.get("exclude_dimensions") or [])
    labels |= {d["name"] for d in conn.get("dimensions") or []}
    labels = {sanitize(l) for l in labels} | {"job", "instance"}
    per_metric = {}
    for m, kind in metrics.items():
        ls = set(labels)
        if kind == "events":
            ls |= {sanitize(d["name"]) for d in events.get("dimensions") or []}
        if m.endswith("_bucket"):
            ls.add("le")
        per_metric[m] = ls
    return per_metric


CONNECT_METRICS = ROOT / "collector/src/connect_metrics.rs"


def connect_metrics_names():
    """The Prometheus names of synspan's connect metrics, from the instrument names in
    collector/src/connect_metrics.rs, as the prometheus exporter shows them (dots become
    underscores, counters get _total, the histogram its unit in seconds; the resource's
    service.name becomes `job`), when a metrics pipeline takes OTLP to it."""
    doc = collector()
    pipelines = (doc.get("service") or {}).get("pipelines") or {}
    routed = any(pid.split("/")[0] == "metrics" and "otlp" in (p.get("receivers") or [])
                 and any(e.split("/")[0] == "prometheus" for e in p.get("exporters") or [])
                 for pid, p in pipelines.items())
    if not routed:
        return {}
    source = CONNECT_METRICS.read_text()
    names = dict(re.findall(r'pub\(crate\) const ([A-Z_]+): &str = "(synspan\.connect\.[a-z_.]+)";', source))
    if set(names) != {"ATTEMPTS", "DURATION", "SYN_RETRANSMITS"}:
        raise Failed(f"{CONNECT_METRICS}: instrument names not found ({names})")
    labels = {"job", "instance", "server_address", "server_port", "network_type",
              "synspan_outcome", "error_type", "otel_metric_overflow"}
    out = {}
    for const in ("ATTEMPTS", "SYN_RETRANSMITS"):
        out[sanitize(names[const]) + "_total"] = set(labels)
    dur = sanitize(names["DURATION"]) + "_seconds"
    out[dur + "_bucket"] = labels | {"le"}
    out[dur + "_sum"] = set(labels)
    out[dur + "_count"] = set(labels)
    return out


def outcomes_from_readme():
    text = (ROOT / "README.md").read_text()
    section = text.split("### Outcomes", 1)[-1].split("\n#", 1)[0]
    found = set()
    for row in re.findall(r"(?m)^\|\s*(`[^|]*)\|", section):
        found |= set(re.findall(r"`([a-z_]+)`", row))
    return found


GRAFANA_VARS = {
    "$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
    "${service:regex}": ".*", "$service": ".*", "$$__tags": 'service_name="x"',
    "$__tags": 'service_name="x"',
}


def promql(expr):
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    if "$" in expr:
        raise Failed(f"unknown Grafana variable in: {expr}")
    m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*", expr)
    return (m.group(1), m.group(2)) if m else (expr, None)


def walk_selectors(expr):
    """(metric, {label: (op, value)}) for every vector selector, and the labels the
    expression aggregates by."""
    selectors, grouping = [], set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {}
            for m in node.matchers.matchers:
                matchers[m.name] = (str(m.op), m.value)
            selectors.append((node.name, matchers))
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return selectors, grouping


def datasource_uids(obj, found):
    if isinstance(obj, dict):
        ds = obj.get("datasource")
        if isinstance(ds, dict) and "uid" in ds:
            found.add(ds["uid"])
        elif isinstance(ds, str):
            found.add(ds)
        for v in obj.values():
            datasource_uids(v, found)
    elif isinstance(obj, list):
        for v in obj:
            datasource_uids(v, found)
    return found


def explore_links(dash):
    """The Explore panes that the dashboard's data links open, decoded."""
    out = []
    for url in re.findall(r'"url":\s*"(/explore[^"]*)"', json.dumps(dash)):
        panes = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("panes")
        if panes:
            text = panes[0]
            text = re.sub(r"\$\{[^}]*\}", "X", text)
            out.append(json.loads(text))
    return out


@check("Grafana dashboard queries only spanmetrics and connect-metric series this collector config produces")
def dashboard_queries():
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise Failed(f"{DASHBOARD}: {err}")
    produced = spanmetrics_names()
    produced.update(connect_metrics_names())
    outcomes = outcomes_from_readme()
    exprs = []
    for panel in dash.get("panels", []):
        for t in panel.get("targets", []):
            if "expr" in t:
                exprs.append((panel.get("title"), t["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and q:
            exprs.append((f"variable {var['name']}", q))
    datasources = load_yaml(DATASOURCES)
    for ds in datasources.get("datasources", []):
        for q in (ds.get("jsonData", {}).get("tracesToMetrics", {}) or {}).get("queries", []):
            exprs.append((f"datasource {ds['uid']} tracesToMetrics", q["query"]))
    problems, rules, used = [], [], set()
    for where, raw in exprs:
        try:
            expr, label_arg = promql(raw)
            selectors, grouping = walk_selectors(expr)
        except Failed as err:
            problems.append(f"{where}: {err}")
            continue
        except ValueError as err:  # promql_parser's parse error
            problems.append(f"{where}: does not parse: {err}\n  {raw}")
            continue
        rules.append(expr)
        for metric, matchers in selectors:
            if metric is None:
                problems.append(f"{where}: a selector without a metric name")
                continue
            used.add(metric)
            if metric not in produced:
                problems.append(f"{where}: {metric} is not a metric the spanmetrics connector "
                                f"or synspan's connect metrics produce here (they make "
                                f"{', '.join(sorted(produced))})")
                continue
            for label, (op, value) in matchers.items():
                if label not in produced[metric]:
                    problems.append(f"{where}: {metric} has no label {label}")
                if label == "synspan_outcome" and op in ("=", "!=", "MatchOp.Equal", "MatchOp.NotEqual") \
                        and value not in outcomes:
                    problems.append(f"{where}: {value!r} is not an outcome the README lists")
            for label in grouping | ({label_arg} if label_arg else set()):
                if label not in produced[metric]:
                    problems.append(f"{where}: groups by {label}, which {metric} does not carry")
    # Prometheus' own parser too, through promtool: each expression as a recording rule.
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(rules)]}]}, f)
    r = run([str(TOOLS / "promtool"), "check", "rules", f.name])
    os.unlink(f.name)
    if r.returncode != 0:
        problems.append("promtool check rules: " + (r.stdout + r.stderr).strip())
    fail_if(problems)
    return f"{len(exprs)} queries, metrics {', '.join(sorted(used))}"


@check("every Grafana datasource uid the dashboard and its links use is provisioned")
def datasources_provisioned():
    dash = json.loads(DASHBOARD.read_text())
    provisioned = load_yaml(DATASOURCES).get("datasources", [])
    uids = [d.get("uid") for d in provisioned]
    problems = []
    if len(set(uids)) != len(uids) or None in uids:
        problems.append(f"datasource uids must be set and unique: {uids}")
    wanted = datasource_uids(dash, set())
    for pane in explore_links(dash):
        wanted = datasource_uids(pane, wanted)
    for ds in provisioned:
        for key in ("exemplarTraceIdDestinations",):
            for dest in (ds.get("jsonData") or {}).get(key, []):
                wanted.add(dest.get("datasourceUid"))
        ttm = (ds.get("jsonData") or {}).get("tracesToMetrics")
        if ttm:
            wanted.add(ttm.get("datasourceUid"))
    wanted.discard("-- Grafana --")
    for uid in sorted(wanted - set(uids)):
        problems.append(f"uid {uid} is used but not provisioned")
    services = set(compose()["services"])
    for ds in provisioned:
        host = urllib.parse.urlsplit(ds.get("url", "")).hostname
        if host not in services:
            problems.append(f"datasource {ds['uid']} points at {host}, not a compose service")
    provider = load_yaml(ROOT / "otel-config/grafana/provisioning/dashboards/dashboards.yaml")
    paths = {p["options"]["path"] for p in provider.get("providers", [])}
    mounts = {m.split(":")[1] for m in compose()["services"]["grafana"].get("volumes", [])
              if isinstance(m, str) and m.startswith("./otel-config/grafana/dashboards")}
    if not paths & mounts:
        problems.append(f"the dashboard provider reads {paths}, compose mounts the dashboards at {mounts}")
    fail_if(problems)
    return f"uids {', '.join(sorted(wanted))}"


# --- Kubernetes ----------------------------------------------------------------------------

def kubernetes_validate(paths):
    r = run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--no-warn",
             "--kubernetes-version", K8S_VERSION, *map(str, paths)])
    if r.returncode != 0:
        raise Failed((r.stdout + r.stderr).strip())


@check(f"Kubernetes manifests validate against the Kubernetes {K8S_VERSION} OpenAPI schemas")
def kubernetes_schemas():
    kust = load_yaml(K8S / "kustomization.yaml")
    resources = kust.get("resources", [])
    problems = []
    missing = [r for r in resources if not (K8S / r).is_file()]
    if missing:
        problems.append(f"kustomization lists missing files: {missing}")
    stray = sorted(p.name for p in K8S.glob("*.yaml")
                   if p.name != "kustomization.yaml" and p.name not in resources)
    if stray:
        problems.append(f"manifests not in the kustomization: {stray}")
    fail_if(problems)
    kubernetes_validate([K8S / r for r in resources])
    how = "kubernetes-validate --strict, file by file"
    if shutil.which("kubectl"):
        r = run(["kubectl", "kustomize", str(K8S)])
        if r.returncode != 0:
            raise Failed("kubectl kustomize: " + r.stderr.strip())
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(r.stdout)
        try:
            kubernetes_validate([f.name])
        finally:
            os.unlink(f.name)
        how += ", and the kubectl kustomize output"
    return how


@check("DaemonSet: not privileged, exact capabilities, hostPID, no OTEL_RESOURCE_ATTRIBUTES, memory and CPU as specified")
def daemonset():
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "daemonset.yaml").read_text())}
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    c = spec["containers"][0]
    sc = c.get("securityContext", {})
    env = {e["name"]: e for e in c.get("env", [])}
    problems = []
    if sc.get("privileged"):
        problems.append("privileged")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities are not dropped to none first")
    want = wanted_caps([str(a) for a in c.get("args", [])], CAPS_NAT)
    problems += caps_problems("capabilities.add", sc.get("capabilities", {}).get("add", []), want)
    if not spec.get("hostPID"):
        problems.append("hostPID is not set")
    # synspan builds each span's resource from the traced process, never from its own
    # environment: a resource attribute set here would reach no span.
    if "OTEL_RESOURCE_ATTRIBUTES" in env:
        problems.append("OTEL_RESOURCE_ATTRIBUTES is set, but it reaches no span")
    want = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}}
    if c.get("resources") != want:
        problems.append(f"resources {c.get('resources')}, want {want}")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf"):
        if not mounts.get(path, {}).get("readOnly"):
            problems.append(f"{path} is not mounted read-only")
    fail_if(problems)


# --- systemd -------------------------------------------------------------------------------

@check("systemd unit verifies and its sandbox scores as exposure 'OK' or better")
def systemd_unit():
    if not shutil.which("systemd-analyze"):
        raise Failed("systemd-analyze is not installed (apt-get install systemd)")
    text = UNIT.read_text()
    exec_start = re.search(r"(?m)^ExecStart=(\S+)", text)
    if not exec_start:
        raise Failed("no ExecStart")
    with tempfile.TemporaryDirectory() as tmp:
        # verify insists the binary exists: stand a stub in for /usr/local/bin/synspan.
        stub = Path(tmp) / "synspan"
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
        unit = Path(tmp) / "synspan.service"
        unit.write_text(text.replace(exec_start.group(1), str(stub)))
        r = run(["systemd-analyze", "verify", "--man=no", str(unit)], cwd=tmp)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or out:
            out = out.replace(str(unit), str(UNIT.relative_to(ROOT)))
            raise Failed("systemd-analyze verify: " + (out or f"exit {r.returncode}"))
        # The threshold is in tenths: 30 is an exposure of 3.0, the top of "OK".
        r = run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                 "--threshold=30", str(unit)], cwd=tmp)
        score = re.search(r"Overall exposure level for \S+: (\S+ \S+)", r.stdout)
        if r.returncode != 0:
            raise Failed("systemd-analyze security: exposure above 3.0: "
                         + (score.group(1) if score else r.stdout[-500:]))
    problems = []
    for key, want in (("KillSignal", "SIGTERM"), ("Restart", "on-failure"),
                      ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict")):
        if not re.search(rf"(?m)^{key}={want}\s*$", text):
            problems.append(f"{key} is not {want}")
    want = wanted_caps(re.search(r"(?m)^ExecStart=(.*)$", text).group(1).split(), CAPS_NAT_UNIT)
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        lines = re.findall(rf"(?m)^{key}=(.*)$", text)
        if len(lines) != 1:
            problems.append(f"{key} must be set exactly once, found {len(lines)}")
            continue
        got = lines[0].split()
        if any(not c.startswith("CAP_") for c in got):
            problems.append(f"{key}: {lines[0]} is not a plain list of CAP_ names")
        problems += caps_problems(key, [c.removeprefix("CAP_") for c in got], want)
    stop = re.search(r"(?m)^TimeoutStopSec=(\d+)s?$", text)
    if not stop or not 5 < int(stop.group(1)) <= 30:
        problems.append("TimeoutStopSec must be a little above --shutdown-timeout (5s)")
    fail_if(problems)
    return f"exposure {score.group(1)}"


# --- Flags and scripts ---------------------------------------------------------------------

@check("synspan flags used in compose, Kubernetes and systemd are ones the README documents")
def flags_documented():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"\|\s*`(--[a-z-]+)", readme))
    used = {}
    c = compose()["services"]["synspan"]
    sources = {"docker-compose.yml": " ".join(c.get("command", [])),
               "daemonset.yaml": " ".join(yaml.safe_load_all((K8S / "daemonset.yaml").read_text()).__next__()
                                          ["spec"]["template"]["spec"]["containers"][0].get("args", [])),
               "synspan.service": re.search(r"(?m)^ExecStart=(.*)$", UNIT.read_text()).group(1)}
    problems = []
    for where, cmd in sources.items():
        for flag in re.findall(r"(?<!\S)(--[a-z-]+)", cmd):
            used.setdefault(flag, set()).add(where)
            if flag not in documented:
                problems.append(f"{where}: {flag} is not in the README's options table")
    binary = ROOT / "target/release/synspan"
    if binary.is_file():
        helptext = run([str(binary), "--help"]).stdout
        for flag in used:
            if flag not in helptext:
                problems.append(f"{flag} is not in target/release/synspan --help")
    fail_if(problems)
    return ", ".join(sorted(used)) + (" (also against --help)" if binary.is_file() else "")


@check("demo and script syntax")
def script_syntax():
    problems = []
    for py in sorted((ROOT / "demo").glob("*.py")):
        try:
            compile(py.read_text(), str(py), "exec")  # no __pycache__ left in the tree
        except SyntaxError as err:
            problems.append(f"{py.relative_to(ROOT)}: {err}")
    for sh in [*sorted((ROOT / "demo").glob("*.sh")), ROOT / "scripts/validate-deploy.sh"]:
        r = run(["bash", "-n", str(sh)])
        if r.returncode:
            problems.append(r.stderr.strip())
        if not os.access(sh, os.X_OK):
            problems.append(f"{sh.relative_to(ROOT)} is not executable")
    fail_if(problems)


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    results = [run_check(name, fn) for name, fn in CHECKS]
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
