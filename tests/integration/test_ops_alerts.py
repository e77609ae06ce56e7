"""The Prometheus alert rules shipped in deploy/prometheus/alerts.yml are valid (promtool,
from Debian's `prometheus` package, which ./scripts/test.sh installs: a missing promtool is
a failure, never a skip), and name only metrics smsq exports."""

from __future__ import annotations

import re
import shutil
import subprocess

from prometheus_client import CollectorRegistry

from consumer import metrics
from tests.support import ROOT

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"


def exported_names(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run ./scripts/test.sh (it installs Debian's prometheus)"
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout


def test_every_metric_in_the_rules_is_exported(settings):
    names = set()
    for group in (metrics.INGEST_METRICS, metrics.DISPATCH_METRICS, metrics.SERVE_METRICS):
        names |= exported_names(metrics.program_registry(group, settings.database_dsn))
    used = set(re.findall(r"\bsmsq_[a-z_]+", RULES.read_text()))
    assert used and used <= names, f"not exported: {sorted(used - names)}"
