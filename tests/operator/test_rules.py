"""The chart's Prometheus rules and Alertmanager example, checked by the real tools:
`promtool check rules` and `promtool test rules` on charts/elasticmoe/files/rules.yaml, the
same on the PrometheusRule the chart renders (so the templated thresholds are checked too), and
`amtool check-config` on the example Alertmanager configuration.

promtool and amtool come from the Debian packages `prometheus` and `prometheus-alertmanager`;
a missing tool fails the test with the command that installs it, never a skip.
"""

from __future__ import annotations

import copy
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

import chartutil

FILES = chartutil.CHART / "files"
RULES, RULES_TEST = FILES / "rules.yaml", FILES / "rules_test.yaml"
MONITORING = chartutil.ci_values()["monitoring-values.yaml"]
ALL_ENABLED = {"metrics": {"prometheusRule": {"enabled": True}}, "alertmanager": {"exampleReceiver": {"enabled": True}}}


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, (f"{name} is not installed; it comes from the Debian package `{package}`: "
                  f"apt-get install -y {package}")
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool", "prometheus")


@pytest.fixture(scope="module")
def amtool() -> str:
    return _tool("amtool", "prometheus-alertmanager")


def _run(*command: str, cwd: pathlib.Path | None = None) -> str:
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def rendered() -> dict[str, chartutil.Rendered]:
    jobs = {"defaults": ALL_ENABLED, "monitoring-values.yaml": MONITORING}
    results = dict(zip(jobs, chartutil.render_many([{"values": v} for v in jobs.values()])))
    for name, result in results.items():
        assert not result.error, f"helm install with {name} failed: {result.error}"
    return results


def _groups(result: chartutil.Rendered) -> list[dict]:
    return result.one("PrometheusRule")["spec"]["groups"]


def _write_rules(groups: list[dict], path: pathlib.Path) -> pathlib.Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_rules_file_is_valid(promtool):
    assert "SUCCESS: 6 rules found" in _run(promtool, "check", "rules", str(RULES))


def test_rules_unit_tests_pass(promtool):
    # Firing and not firing: see the cases in rules_test.yaml.
    _run(promtool, "test", "rules", RULES_TEST.name, cwd=FILES)


@pytest.mark.parametrize("name", ["defaults", "monitoring-values.yaml"])
def test_rendered_prometheus_rule_is_valid(promtool, rendered, name, tmp_path):
    rules = _write_rules(_groups(rendered[name]), tmp_path / "rules.yaml")
    assert "SUCCESS: 6 rules found" in _run(promtool, "check", "rules", str(rules))


def test_defaults_of_the_rules_file_are_the_chart_defaults(rendered):
    # The thresholds and `for` written in rules.yaml are what values.yaml renders: the file that
    # promtool tests is the rule set a default install ships.
    assert _groups(rendered["defaults"]) == yaml.safe_load(RULES.read_text())["groups"]


def test_rendered_thresholds_take_effect(promtool, rendered, tmp_path):
    # At the monitoring values' TTFT threshold (1.5s), `ok` (p90 1.75s) violates it too.
    assert MONITORING["metrics"]["prometheusRule"]["slo"]["ttftP90Seconds"] == 1.5
    _write_rules(_groups(rendered["monitoring-values.yaml"]), tmp_path / "rules.yaml")
    latency = copy.deepcopy(yaml.safe_load(RULES_TEST.read_text())["tests"][0])
    summary = "ElasticMoE ml/{0}: time to first token above its SLO"
    description = ("p90 time to first token over the last minute is {0}, above the SLO threshold; "
                   "more devices shorten the queue before prefill.")
    latency.pop("promql_expr_test")
    latency["alert_rule_test"] = [{
        "eval_time": "2m", "alertname": "ElasticMoETTFTHigh",
        "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "ml", "elasticmoe_instance": name},
                        "exp_annotations": {"summary": summary.format(name), "description": description.format(value)}}
                       for name, value in (("slow", "4.75s"), ("ok", "1.75s"))],
    }]
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "15s", "tests": [latency]}, sort_keys=False))
    _run(promtool, "test", "rules", "rules_test.yaml", cwd=tmp_path)


def test_rules_use_only_exported_metrics_and_keep_the_instance_labels():
    exported = {"elasticmoe_time_to_first_token_seconds_bucket", "elasticmoe_time_per_output_token_seconds_bucket",
                "elasticmoe_num_requests_waiting", "elasticmoe_healthy"}
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    records = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        names = set(re.findall(r"\b[a-z_]+:[a-z0-9_:]+|\belasticmoe_[a-z0-9_]+", rule["expr"]))
        names -= {"elasticmoe_instance"}
        assert names and names <= exported | records, rule
        # Every aggregation keeps exactly the labels that name one ElasticMoE.
        for by in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            assert {x.strip() for x in by.split(",")} - {"le"} == {"namespace", "elasticmoe_instance"}, rule


def test_alertmanager_example_is_valid(amtool, rendered, tmp_path):
    config_map = rendered["defaults"].one("ConfigMap", "emoe-operator-alertmanager-example")
    config = tmp_path / "alertmanager.yaml"
    config.write_text(config_map["data"]["alertmanager.yaml"])
    assert "SUCCESS" in _run(amtool, "check-config", str(config))
    # The route sends every alert of the rules file to the operator, and nothing else.
    for alert in (r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r):
        receiver = _run(amtool, "config", "routes", "test", "--config.file", str(config),
                        f"alertname={alert}", "namespace=ml", "elasticmoe_instance=qwen").strip()
        assert receiver == "elasticmoe-operator", (alert, receiver)
    assert _run(amtool, "config", "routes", "test", "--config.file", str(config), "alertname=Watchdog").strip() == "null"
