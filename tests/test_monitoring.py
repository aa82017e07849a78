"""monitoring/: the alert rules parse (promtool, else a schema check) and fire when they should (promtool's
rule unit tests), Prometheus loads them, and every marketprism_* metric that the rules and the dashboard
query is one the code exports — and every exported metric is documented in docs/operations.md."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import marketprism.ops.metrics  # noqa: F401 - registers the marketprism_* metrics

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "marketprism.json"
DOCS = ROOT / "docs" / "operations.md"
# storage-cold's metrics (marketprism/store/cold.py) and their documentation come with the cold tier: until
# they land, missing archive metrics are an expected failure, anything else a real one.
PENDING_COLD = "marketprism_archive_"
METRIC = re.compile(r"\bmarketprism_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count", ""), "gauge": ("",), "info": ("_info",),
            "summary": ("_sum", "_count", ""), "unknown": ("",)}
PROMTOOL = shutil.which("promtool")


def exported() -> set[str]:
    """Every series name the code can export, counters with their _total, histograms with their parts."""
    try:
        importlib.import_module("marketprism.store.cold")  # storage-cold's metrics, once it exists
    except ModuleNotFoundError:
        pass
    return {fam.name + s for fam in REGISTRY.collect() if fam.name.startswith("marketprism_")
            for s in SUFFIXES.get(fam.type, ("",))}


def families() -> set[str]:
    """Exported metric names as documented: counters with _total, histograms by their base name."""
    return {fam.name + ("_total" if fam.type == "counter" else "") for fam in REGISTRY.collect()
            if fam.name.startswith("marketprism_")}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def check_missing(missing: set[str], what: str) -> None:
    if missing and all(m.startswith(PENDING_COLD) for m in missing):
        pytest.xfail(f"{what}: {sorted(missing)} wait for the cold tier (storage-cold) to land")
    assert missing == set(), what


def test_alert_rules_have_the_required_shape():
    seen = set()
    for rule in rules():
        name = rule["alert"]
        assert name not in seen, f"duplicate alert {name}"
        seen.add(name)
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0s"))), name
    covered = " ".join(r["expr"] for r in rules())
    for topic in ("marketprism_coverage_age_seconds", "marketprism_archive_watermark_seconds",
                  "marketprism_store_errors_total", "marketprism_consumer_pending_messages",
                  "marketprism_disk_free_bytes"):
        assert topic in covered, f"no alert on {topic}"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_the_config():
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(MONITORING / "prometheus.yml")]):
        proc = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_loads_the_alert_rules():
    prom = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert [MONITORING / f for f in prom["rule_files"]] == [ALERTS]


def test_alert_and_dashboard_metrics_are_exported():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [r["expr"] for r in rules()] + [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in METRIC.findall(e)}
    check_missing(used - exported(), "monitoring/ queries metrics that marketprism does not export")


def test_every_exported_metric_is_documented_and_every_documented_one_exported():
    documented = set(METRIC.findall(DOCS.read_text()))
    check_missing(families() - documented, "exported but missing from docs/operations.md")
    check_missing(documented - families(), "documented in docs/operations.md but not exported")


UNIT_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'marketprism_coverage_age_seconds{{data_type="trade",exchange="okx",market_type="spot",service="collector"}}'
        values: '10 30 70 130 190 250 310'
      - series: 'marketprism_coverage_stale_after_seconds{{data_type="trade",exchange="okx",market_type="spot",service="collector"}}'
        values: '60x6'
      - series: 'marketprism_coverage_age_seconds{{data_type="funding_rate",exchange="okx",market_type="perpetual",service="collector"}}'
        values: '3000x6'
      - series: 'marketprism_coverage_stale_after_seconds{{data_type="funding_rate",exchange="okx",market_type="perpetual",service="collector"}}'
        values: '28800x6'
      - series: 'marketprism_rest_requests_total{{feed="binance_usdm",status="451",service="collector"}}'
        values: '0 1 2 3 4 5 6'
    alert_rule_test:
      - eval_time: 3m
        alertname: MarketPrismStreamStale
        exp_alerts: []
      - eval_time: 5m
        alertname: MarketPrismStreamStale
        exp_alerts:
          - exp_labels: {{severity: warning, data_type: trade, exchange: okx, market_type: spot}}
            exp_annotations:
              summary: "No trade from okx spot beyond its threshold"
              description: "The stream is 3m 10s past its staleness threshold. Check `marketprism health` and the collector log for this feed (reconnects, parse errors, blocked)."
      - eval_time: 5m
        alertname: MarketPrismVenueBlocked
        exp_alerts:
          - exp_labels: {{severity: critical, feed: binance_usdm, status: "451"}}
            exp_annotations:
              summary: "binance_usdm answers HTTP 451: the venue blocks this location"
              description: "The exchange refuses requests from this IP/region; its data is not being collected. Run the collector where the venue is permitted or remove the feed."
  - interval: 1m
    input_series:
      - series: 'marketprism_consumer_pending_messages{{stream="MARKET_DATA",consumer="storage-hot",service="storage-hot"}}'
        values: '90000x20'
      - series: 'marketprism_consumer_ack_pending_messages{{stream="MARKET_DATA",consumer="storage-hot",service="storage-hot"}}'
        values: '20000x20'
      - series: 'marketprism_disk_free_bytes{{path="/data",service="storage-hot"}}'
        values: '5x20'
      - series: 'marketprism_disk_size_bytes{{path="/data",service="storage-hot"}}'
        values: '100x20'
      - series: 'up{{job="marketprism",role="collector"}}'
        values: '1x20'
      - series: 'up{{job="marketprism",role="storage-hot"}}'
        values: '1x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: MarketPrismConsumerBacklog
        exp_alerts:
          - exp_labels: {{severity: warning, stream: MARKET_DATA, consumer: storage-hot}}
            exp_annotations:
              summary: "MARKET_DATA/storage-hot: 110000 messages waiting to be stored"
              description: "storage-hot is not keeping up or not running. `marketprism health` shows its insert errors and consumers."
      - eval_time: 15m
        alertname: MarketPrismDiskLow
        exp_alerts:
          - exp_labels: {{severity: warning, service: storage-hot, path: /data}}
            exp_annotations:
              summary: "storage-hot: /data has 5% free"
              description: "Free space (lower the hot TTL, archive, prune recordings) or grow the volume. `marketprism diagnose` lists the data dirs."
      - eval_time: 15m
        alertname: MarketPrismDiskCritical
        exp_alerts: []
      - eval_time: 15m
        alertname: MarketPrismRoleAbsent
        exp_alerts:
          - exp_labels: {{severity: critical, job: marketprism, role: storage-cold}}
            exp_annotations:
              summary: "No storage-cold is running"
              description: "Prometheus finds no storage-cold container. `docker compose ps`; `docker compose up -d`."
  - interval: 1m
    input_series:
      - series: 'marketprism_archive_watermark_seconds{{table="trades",service="storage-cold"}}'
        values: '0x360'
      - series: 'marketprism_archive_failed_windows{{table="trades",service="storage-cold"}}'
        values: '0x200 2x160'
    alert_rule_test:
      - eval_time: 3h
        alertname: MarketPrismArchiveLag
        exp_alerts: []
      - eval_time: 5h
        alertname: MarketPrismArchiveLag
        exp_alerts:
          - exp_labels: {{severity: warning, table: trades}}
            exp_annotations:
              summary: "Cold tier of trades is 5h 0m 0s behind"
              description: "storage-cold is not archiving. Check its health (failed windows) and ClickHouse."
      - eval_time: 5h
        alertname: MarketPrismArchiveLagCritical
        exp_alerts: []
      - eval_time: 3h40m
        alertname: MarketPrismArchiveFailedWindows
        exp_alerts: []
      - eval_time: 4h
        alertname: MarketPrismArchiveFailedWindows
        exp_alerts:
          - exp_labels: {{severity: warning, table: trades}}
            exp_annotations:
              summary: "2 window(s) of trades could not be archived and verified"
              description: "storage-cold retries them; `marketprism repair` re-copies failed windows. Its health lists them."
"""


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_alerts_fire_when_they_should(tmp_path):
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(UNIT_TESTS.format(alerts=ALERTS))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
