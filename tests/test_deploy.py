"""The operator's kit (deploy/) against a real node: dashboard, alert rules, systemd unit.

One node (supervisor, two workers, HAProxy; OG_LOG_FORMAT=json, a systemd
notification socket) serves the /metrics text that every PromQL expression
of deploy/grafana/oddsgate.json and deploy/prometheus/alerts.yml is checked
against: each metric an expression names must be one that /metrics exposes,
with the labels the expression uses, or one of PENDING_METRICS. The same
node's log must be one JSON object a line, and it must have told systemd
READY=1.

The alert rules also go through `promtool check rules` and `promtool test
rules` (series shaped like the node's, one firing case per alert) when
Debian's promtool is installed (scripts/bootstrap.sh installs it); without
it they are checked by parsing only. The unit file is parsed, and checked
with `systemd-analyze verify` where that runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from haproxy.settings import HAProxySettings
from supervisor.embedded_redis import free_port
from supervisor.haproxy import FD_RESERVE, HAProxyProcess
from supervisor.node import STOP_GRACE_S
from supervisor.settings import NodeSettings
from tests.conftest import ROOT, token
from tests.node_harness import Node, start_node

DASHBOARD = ROOT / "deploy" / "grafana" / "oddsgate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
UNIT = ROOT / "deploy" / "systemd" / "oddsgate.service"
PROMTOOL = shutil.which("promtool")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

pytestmark = pytest.mark.timeout(120)

# Metrics other modules will export (webhooks, redirects) that the dashboard
# and the alerts already use, with the labels they will carry. Exactly these
# names may be absent from /metrics; once one is exposed, the test says to
# drop it from here. Any other name must be on a real node's /metrics.
PENDING_METRICS: dict[str, set[str]] = {
    "og_redirects_total": set(),  # counter
}
# Series Prometheus makes itself (the alerts' scrape-down rule), not /metrics.
PROMETHEUS_SERIES: dict[str, set[str]] = {"up": set()}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
# Families /metrics exposes that the dashboard does not plot, and why. Empty:
# a new family fails test_dashboard_shows_every_exposed_family until it gets
# a panel or a line here.
NOT_ON_DASHBOARD: dict[str, str] = {}


# -- PromQL: which metrics and labels an expression uses -----------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                       re.IGNORECASE)
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_TOKEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[smhdwy]?|[A-Za-z_:][\w:]*|\S")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}


@dataclass
class Usage:
    metrics: dict[str, set[str]]  # metric -> labels its selectors match on
    grouping: set[str]  # labels of by/without/on/ignoring/group_* clauses


def promql_usage(expr: str) -> Usage:
    """The metric names and label names in a PromQL expression (Grafana's $vars allowed).

    Strings go first (a matcher's value may hold anything), then grouping
    clauses and selectors' braces (label names), then range brackets; what
    remains are functions (a name before `(`), keywords, numbers and
    durations, and metric names.
    """
    text = _STRING.sub('""', expr)
    grouping: set[str] = set()
    for match in _GROUPING.finditer(text):
        grouping |= {label.strip() for label in match.group(2).split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    metrics: dict[str, set[str]] = {}
    for match in _SELECTOR.finditer(text):
        name = match.group(1)
        assert name, f"a selector without a metric name in {expr!r}"
        metrics.setdefault(name, set()).update(_MATCHER_LABEL.findall(match.group(2)))
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    text = _RANGE.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    tokens = _TOKEN.findall(text)
    for i, tok in enumerate(tokens):
        if not re.match(r"[A-Za-z_:]", tok) or tok.lower() in _KEYWORDS:
            continue
        if i + 1 < len(tokens) and tokens[i + 1] == "(":
            continue  # a function or an aggregation
        metrics.setdefault(tok, set())
    return Usage(metrics, grouping)


def test_promql_usage_reads_what_a_dashboard_writes() -> None:
    usage = promql_usage(
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{instance=~"$i", '
        'x="}b{"}[$__rate_interval]))) > 0.25 and on(instance) max(b) by (job) '
        '/ clamp_min(c offset 5m, 1e3) unless d{y!~"z"}[5m:1m]')
    assert usage.metrics == {"a_bucket": {"instance", "x"}, "b": set(), "c": set(),
                             "d": {"y"}}
    assert usage.grouping == {"instance", "le", "job"}
    assert promql_usage("up{job=\"oddsgate\"} == 0").metrics == {"up": {"job"}}


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every query: panel targets, rows' panels, templating queries."""
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"panel {panel['title']!r}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert inner, f"variable {var['name']}: {query!r}"
            found.append((f"variable {var['name']!r}", inner.group(1)))
    return found


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


# -- the node ----------------------------------------------------------------------


def dispatcher_metrics(port: int) -> str:
    """The supervised dispatcher's /metrics, once it has started and seen its endpoints."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
            if "og_webhook_deliveries_total{" in text:
                return text
        except OSError:
            pass
        assert time.monotonic() < deadline, "the node's webhook dispatcher never served /metrics"
        time.sleep(0.1)


@dataclass
class Observed:
    node: Node
    notify: socket.socket
    metrics: dict[str, set[str]]  # sample name -> label names, as /metrics shows it
    families: dict[str, str]  # family name -> type


@pytest.fixture(scope="module")
def observed(redis_server, tmp_path_factory) -> Iterator[Observed]:
    runtime = tmp_path_factory.mktemp("ops")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(runtime / "notify.sock"))
    notify.settimeout(10)
    # The node hosts the webhook dispatcher (OG_WEBHOOKS=1), whose own /metrics Prometheus
    # scrapes beside the node's; one endpoint is registered so its series exist.
    hooks_port = free_port()
    registered = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "webhooks", "add", "--partner", "ops",
         "--url", "https://ops.example/hook"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "OG_REDIS_URL": redis_server.url}, timeout=30, check=True)
    assert registered.stdout.splitlines()[-1].startswith("whsec_")
    node = start_node(redis_server.url, runtime / "run", OG_LOG_FORMAT="json",
                      NOTIFY_SOCKET=str(runtime / "notify.sock"),
                      OG_AGGREGATE="1",  # the region's aggregator too: its metrics
                      OG_WEBHOOKS="1", OG_WEBHOOKS_METRICS_PORT=str(hooks_port))
    try:
        metrics: dict[str, set[str]] = {}
        families: dict[str, str] = {}
        for text in (node.metrics(), dispatcher_metrics(hooks_port)):
            for family in text_string_to_metric_families(text):
                families[family.name] = family.type
                for sample in family.samples:
                    metrics.setdefault(sample.name, set()).update(sample.labels)
        yield Observed(node, notify, metrics, families)
    finally:
        node.stop()
        notify.close()


def _check_usage(where: str, expr: str, exposed: dict[str, set[str]]) -> list[str]:
    known = {**exposed, **PENDING_METRICS, **PROMETHEUS_SERIES}
    usage = promql_usage(expr)
    problems = [f"{where}: {name} is not on /metrics (nor pending)"
                for name in usage.metrics if name not in known]
    labels_there = TARGET_LABELS.union(*(known.get(name, set()) for name in usage.metrics))
    for name, labels in usage.metrics.items():
        if name in known:
            problems += [f"{where}: {name} has no label {label}"
                         for label in labels - known[name] - TARGET_LABELS]
    problems += [f"{where}: no metric of it has a label {label}"
                 for label in usage.grouping - labels_there]
    return problems


def test_the_node_told_systemd_it_is_ready(observed: Observed) -> None:
    message = observed.notify.recv(4096).decode()
    assert message.splitlines()[0] == "READY=1", message
    assert "STATUS=2 of 2 workers serving" in message


def test_dashboard_names_only_exposed_metrics(observed: Observed) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) > 30
    problems = [p for where, expr in exprs for p in _check_usage(where, expr, observed.metrics)]
    assert problems == []


def test_dashboard_shows_every_exposed_family(observed: Observed) -> None:
    used = {name for _, expr in dashboard_exprs(json.loads(DASHBOARD.read_text()))
            for name in promql_usage(expr).metrics}
    families = {name for name in observed.families if name.startswith("oddsgate_")}
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    missing = [name for name in sorted(families - set(NOT_ON_DASHBOARD))
               if not any(name + s in used for s in suffixes[observed.families[name]])]
    assert missing == [], "give them a panel in deploy/grafana/oddsgate.json, or a line " \
                          "in NOT_ON_DASHBOARD saying why not"


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "oddsgate" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and panel.get("description"), panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    # what the operator asked to see, each somewhere on the dashboard
    exprs = " ".join(expr for _, expr in dashboard_exprs(dashboard))
    for wanted in ["sum by (worker) (oddsgate_connections",
                   "sum by (worker) (oddsgate_subscriptions", "rate(oddsgate_deliveries_total",
                   "histogram_quantile(0.5,",
                   "histogram_quantile(0.99,", "oddsgate_connections_backpressure{",
                   "oddsgate_breaker_open", "oddsgate_worker_draining",
                   "oddsgate_worker_restarts_total", "oddsgate_pubsub_lag_seconds",
                   "oddsgate_redis_reconnects_total", "oddsgate_gc_full_pause_seconds_total",
                   "sum by (endpoint, outcome) (rate(og_webhook_deliveries_total",
                   "rate(og_redirects_total"]:
        assert wanted in exprs, wanted


def test_pending_metrics_are_used_and_not_yet_exposed(observed: Observed) -> None:
    used = {name for _, expr in dashboard_exprs(json.loads(DASHBOARD.read_text()))
            for name in promql_usage(expr).metrics}
    used |= {name for rule in alert_rules() for name in promql_usage(rule["expr"]).metrics}
    assert set(PENDING_METRICS) <= used  # no stale entry
    landed = set(PENDING_METRICS) & set(observed.metrics)
    assert not landed, f"{landed} are on /metrics now: take them out of PENDING_METRICS"


# -- alert rules ------------------------------------------------------------------------

# The operator's list, and the rule answering each.
REQUIRED_ALERTS = {
    "worker restarting in a loop": ["OddsgateWorkerCrashLooping", "OddsgateWorkerFailed"],
    "breaker open for more than a minute": ["OddsgateBreakerOpen"],
    "Redis disconnected": ["OddsgateRedisDisconnected"],
    "pub/sub lag above a bound": ["OddsgatePubSubLagHigh"],
    "fan-out p99 above a bound": ["OddsgateFanoutLatencyHigh"],
    "a worker's heartbeat stale": ["OddsgateWorkerHeartbeatStale"],
    "FD usage near the limit": ["OddsgateFileDescriptorsNearLimit"],
    "dead letters growing": ["OddsgateWebhookDeadLettersGrowing"],
}


def test_alert_rules_are_complete_and_documented() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    missing = {need: alerts for need, alerts in REQUIRED_ALERTS.items()
               if not set(alerts) <= set(names)}
    assert missing == {}
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        notes = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(notes), rule["alert"]
        steps = [line for line in notes["runbook"].splitlines() if re.match(r"\d+\. ", line)]
        assert len(steps) >= 2, f"{rule['alert']}: a runbook is numbered steps"
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    breaker = next(r for r in rules if r["alert"] == "OddsgateBreakerOpen")
    assert breaker["for"] == "1m"


def test_alert_rules_name_only_exposed_metrics(observed: Observed) -> None:
    problems = [p for rule in alert_rules()
                for p in _check_usage(rule["alert"], rule["expr"], observed.metrics)]
    assert problems == []


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


# One firing case per alert, with series labelled as the node labels them
# (plus the target's instance and job), and a neighbour that must not fire.
T = 'instance="n1:9100", job="oddsgate"'
FIRING: dict[str, dict] = {
    "OddsgateNodeDown": {
        "series": {f"up{{{T}}}": "1 0x20", 'up{instance="n2:9100", job="oddsgate"}': "1x20"},
        "at": "2m", "labels": {"instance": "n1:9100", "job": "oddsgate"}},
    "OddsgateWorkerCrashLooping": {
        "series": {f'oddsgate_worker_restarts_total{{{T}, worker="1"}}': "0 0 1 1 2 2 3 3 3 3",
                   f'oddsgate_worker_restarts_total{{{T}, worker="0"}}': "0x9"},
        "at": "2m", "labels": {"instance": "n1:9100", "job": "oddsgate", "worker": "1"}},
    "OddsgateWorkerFailed": {
        "series": {f'oddsgate_worker_phase{{{T}, worker="0", phase="failed"}}': "0 1x20",
                   f'oddsgate_worker_phase{{{T}, worker="1", phase="failed"}}': "0x20"},
        "at": "2m", "labels": {"instance": "n1:9100", "job": "oddsgate", "worker": "0",
                               "phase": "failed"}},
    "OddsgateBreakerOpen": {
        "series": {f"oddsgate_breaker_open{{{T}}}": "0 1x20"},
        "at": "2m", "labels": {"instance": "n1:9100"}, "quiet_at": "45s"},
    "OddsgateRedisDisconnected": {
        "series": {f'oddsgate_redis_connected{{{T}, worker="0", slot="0"}}': "1 0x20",
                   f'oddsgate_redis_connected{{{T}, worker="1", slot="1"}}': "1x20"},
        "at": "1m", "labels": {"instance": "n1:9100", "worker": "0"}},
    "OddsgatePubSubSilentLoss": {
        "series": {f'oddsgate_pubsub_silent_losses_total{{{T}, worker="0", slot="0"}}':
                   "0 1x20",
                   f'oddsgate_pubsub_silent_losses_total{{{T}, worker="1", slot="1"}}': "0x20"},
        "at": "2m", "labels": {"instance": "n1:9100", "worker": "0"}},
    "OddsgatePubSubLagHigh": {
        "series": {f'oddsgate_pubsub_lag_seconds{{{T}, worker="0", slot="0"}}': "2x20",
                   f'oddsgate_pubsub_lag_seconds{{{T}, worker="1", slot="1"}}': "0.01x20"},
        "at": "3m", "labels": {"instance": "n1:9100", "worker": "0"}},
    "OddsgateFanoutLatencyHigh": {
        "series": {f'oddsgate_fanout_latency_seconds_bucket{{{T}, le="0.1"}}': "0x80",
                   f'oddsgate_fanout_latency_seconds_bucket{{{T}, le="0.25"}}': "0x80",
                   f'oddsgate_fanout_latency_seconds_bucket{{{T}, le="0.5"}}': "0+10x80",
                   f'oddsgate_fanout_latency_seconds_bucket{{{T}, le="+Inf"}}': "0+10x80"},
        "at": "16m", "labels": {"instance": "n1:9100"}, "quiet_at": "9m"},
    "OddsgateWorkerHeartbeatStale": {
        "series": {f'oddsgate_worker_heartbeat_age_seconds{{{T}, worker="1", slot="3"}}': "20x20",
                   f'oddsgate_worker_heartbeat_age_seconds{{{T}, worker="0", slot="0"}}': "0.1x20"},
        "at": "2m", "labels": {"instance": "n1:9100", "worker": "1", "slot": "3"}},
    "OddsgateFileDescriptorsNearLimit": {
        "series": {f'oddsgate_worker_open_fds{{{T}, worker="0"}}': "900x40",
                   f'oddsgate_worker_max_fds{{{T}, worker="0"}}': "1000x40",
                   f'oddsgate_worker_open_fds{{{T}, worker="1"}}': "500x40",
                   f'oddsgate_worker_max_fds{{{T}, worker="1"}}': "1000x40"},
        "at": "6m", "labels": {"instance": "n1:9100", "worker": "0"}},
    "OddsgateAggregatorDiverged": {
        "series": {f"oddsgate_aggregator_diverged{{{T}}}": "0 1x20"},
        "at": "1m", "labels": {"instance": "n1:9100", "job": "oddsgate"}},
    "OddsgateAggregatorDown": {
        "series": {f"oddsgate_aggregator_up{{{T}}}": "1 0x20",
                   f"oddsgate_aggregator_diverged{{{T}}}": "0x20"},
        "at": "2m", "labels": {"instance": "n1:9100", "job": "oddsgate"}, "quiet_at": "30s"},
    "OddsgateAggregatorSlow": {
        "series": {f'oddsgate_aggregator_input_to_publish_seconds{{{T}, quantile="0.99"}}':
                   "2x40",
                   f'oddsgate_aggregator_input_to_publish_seconds{{{T}, quantile="0.5"}}':
                   "0.1x40"},
        "at": "6m", "labels": {"instance": "n1:9100", "job": "oddsgate", "quantile": "0.99"},
        "quiet_at": "3m"},
    "OddsgateWebhookDeadLettersGrowing": {
        "series": {f"og_webhook_dead_letters{{{T}}}": "0+1x200"},
        "at": "20m", "labels": {"instance": "n1:9100"}, "quiet_at": "14m"},
}


def test_every_alert_has_a_firing_case_on_series_shaped_like_the_nodes(
        observed: Observed) -> None:
    assert set(FIRING) == {rule["alert"] for rule in alert_rules()}
    known = {**observed.metrics, **PENDING_METRICS, **PROMETHEUS_SERIES}
    for alert, case in FIRING.items():
        for series in case["series"]:
            name, _, labels = series.partition("{")
            assert name in known, (alert, name)
            names = set(re.findall(r"(\w+)=", labels)) - TARGET_LABELS
            assert names <= known[name], (alert, series, known[name])


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_fires_each_alert_on_its_case(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    severity = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            severity[rule["alert"]] = rule["labels"]["severity"]
            # promtool compares annotations too; the templates are check_rules' job
            rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tests = []
    for alert, case in FIRING.items():
        checks = [{"eval_time": case["at"], "alertname": alert, "exp_alerts": [
            {"exp_labels": {**case["labels"], "severity": severity[alert]}}]}]
        if "quiet_at" in case:
            checks.append({"eval_time": case["quiet_at"], "alertname": alert,
                           "exp_alerts": []})
        tests.append({"interval": "15s",
                      "input_series": [{"series": s, "values": v}
                                       for s, v in case["series"].items()],
                      "alert_rule_test": checks})
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": tests}))
    done = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the systemd unit ------------------------------------------------------------------


def unit_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> every value it is given, as systemd reads a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, raw
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    units = {"": 1, "s": 1, "min": 60, "ms": 0.001}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(min|ms|s|)", value).groups()
    return float(number) * units[unit]


def test_unit_file_runs_the_node_the_way_it_expects() -> None:
    unit = unit_entries(UNIT.read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Type"] in ("notify", "simple")
    if service["Type"] == "notify":
        assert service["NotifyAccess"] == "main"
    binary, *start_args = service["ExecStart"].split()
    assert start_args[:1] == ["run"], service["ExecStart"]
    assert service["ExecReload"].split()[:2] == [binary, "reload"]
    # the unit's binary is the one the install steps create: <checkout>/.venv/bin/oddsgate
    checkout = service["WorkingDirectory"]
    assert binary == f"{checkout}/.venv/bin/oddsgate"
    assert (ROOT / ".venv" / "bin" / "oddsgate").exists()
    # SIGTERM to the supervisor alone, which drains; the stop timeout outlasts the drain
    # deadline, HAProxy's graceful stop (its default timeout, then 2 s) and the workers'
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    haproxy_stop = HAProxyProcess.stop.__defaults__[0] + 2.0
    needed = NodeSettings().shutdown_deadline_s + haproxy_stop + STOP_GRACE_S
    assert _seconds(service["TimeoutStopSec"]) >= needed
    # descriptors for HAProxy's default maxconn (two each) and a worker's capacity
    nofile = int(service["LimitNOFILE"])
    assert nofile >= 2 * HAProxySettings.__dataclass_fields__["maxconn"].default + FD_RESERVE
    assert nofile >= NodeSettings().connections_per_worker + 4096
    # its own runtime directory, private, and the node told to use it
    assert service["RuntimeDirectory"] == "oddsgate"
    assert service["RuntimeDirectoryMode"] == "0700"
    environment = dict(value.split("=", 1) for value in unit["Service"]["Environment"])
    assert environment["OG_RUNTIME_DIR"] == "/run/oddsgate"
    assert environment.get("OG_LOG_FORMAT", "text") in ("text", "json")
    # hardening
    assert service["User"] not in ("", "root")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "CapabilityBoundingSet": ""}.items():
        assert service[key] == value, key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _systemd_analyze_runs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    try:
        done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(probe)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    if not _systemd_analyze_runs(tmp_path):
        pytest.skip("systemd-analyze verify does not run here")
    checkout = unit_entries(UNIT.read_text())["Service"]["WorkingDirectory"][-1]
    unit = tmp_path / "oddsgate.service"  # its paths pointed at this checkout
    unit.write_text(UNIT.read_text().replace(checkout, str(ROOT)))
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                          text=True, timeout=30)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if "oddsgate.service" in line]
    assert done.returncode == 0 and complaints == [], done.stdout + done.stderr


# -- the node's log, in JSON ------------------------------------------------------------


def test_the_node_logs_one_json_object_a_line(observed: Observed) -> None:
    node = observed.node
    secret = token("log-player", "log-session")
    url = f"http://127.0.0.1:{node.frontend_port}/v1/topics?token={secret}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
    request = "GET /v1/topics?token=REDACTED HTTP/1.1"

    def records() -> list[dict]:
        return [orjson.loads(line) for line in node.log().splitlines()]

    node.wait(lambda: any(r.get("request") == request for r in records()), 10,
              "HAProxy's request line relayed")
    lines = records()
    assert secret not in node.log()
    for record in lines:
        assert list(record)[:7] == ["time", "level", "logger", "role", "index", "pid",
                                    "message"], record
    roles = {(r["role"], r["index"]) for r in lines}
    assert {("supervisor", None), ("worker", 0), ("worker", 1), ("haproxy", None)} <= roles
    started = [r for r in lines if r["message"].startswith("worker 1 started")]
    assert started and started[0]["worker"] == 1 and started[0]["worker_pid"] > 0
    (haproxy,) = [r for r in lines if r.get("request") == request]
    assert haproxy["message"] == f"{request} 200" and haproxy["status"] == 200
    assert haproxy["backend"] == "gateway" and haproxy["server"] in ("w0", "w1")


def test_sigterm_tells_systemd_it_is_stopping(observed: Observed) -> None:
    """Last: stops the module's node."""
    assert observed.node.stop() == 0, observed.node.log()[-3000:]
    messages = []
    observed.notify.settimeout(0.5)
    while True:
        try:
            messages.append(observed.notify.recv(4096).decode())
        except TimeoutError:
            break
    assert any(m.startswith("STOPPING=1\n") for m in messages), messages
