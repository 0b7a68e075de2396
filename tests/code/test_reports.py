"""The headline rule: each stage's DVC metrics file holds the few scalars HEADLINE names, picked from its
full report, and the whole `dvc exp show` table stays under MAX_COLUMNS."""

from __future__ import annotations

import json

from lmpipe import reports, tasks
from lmpipe.tracking import flatten
from tests.code.test_dvc_deps import STAGES

REPORT = {
    "variants": {
        name: {"macro_f1": 0.9, "delta_macro_f1": d, "speedup_b1": s, "latency_b1_p50_ms": 40.0, "run": "x"}
        for name, d, s in (("original", 0.0, 1.0), ("int8", -0.01, 1.5), ("student", -0.02, 1.9))
    },
    "pareto": ["int8"],
    "mlflow_run_id": "abc",
}


def test_headline_picks_scalars_in_order_and_nests_them():
    assert reports.headline("compress", REPORT) == {
        "variants": {
            "original": {"delta_macro_f1": 0.0, "speedup_b1": 1.0},
            "int8": {"delta_macro_f1": -0.01, "speedup_b1": 1.5},
            "student": {"delta_macro_f1": -0.02, "speedup_b1": 1.9},
        }
    }
    evaluate = {
        "model": {"accuracy": 0.9, "macro_f1": 0.8, "macro_recall": 0.7},
        "baseline": {"accuracy": 0.95, "macro_f1": 0.85},
        "model_minus_baseline": {"macro_f1": -0.05, "macro_f1_ci95_low": -0.1, "macro_f1_ci95_high": 0.01},
        "test_rows": 10,
        "mlflow_run_id": "abc",
    }
    shown = reports.headline("evaluate", evaluate)
    assert list(flatten(shown)) == list(reports.HEADLINE["evaluate"])
    assert "mlflow_run_id" not in shown and "macro_recall" not in shown["model"]


def test_missing_keys_and_non_scalars_are_left_out():
    assert reports.headline("search", {"enabled": False}) == {}  # search.enabled is a param column
    assert reports.headline("search", {"enabled": True, "complete": 4, "best_value": 0.9}) == {
        "complete": 4,
        "best_value": 0.9,
    }
    assert reports.headline("train", {"best_val_macro_f1": 0.9, "best_epoch": "2"}) == {
        "best_val_macro_f1": 0.9
    }
    assert reports.headline("export", {"served": {"macro_f1": 0.9, "latency_b1_p50_ms": None}}) == {
        "served": {"macro_f1": 0.9, "latency_b1_p50_ms": None}
    }


def test_write_puts_the_report_beside_its_headline(tmp_path):
    reports.write("compress", REPORT, tmp_path / "metrics.json", tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == REPORT
    assert json.loads((tmp_path / "metrics.json").read_text()) == reports.headline("compress", REPORT)


def test_the_default_pipeline_stays_under_the_column_bound():
    # every compress variant enabled (original, int8, pruned, student): the widest default table
    columns = sum(4 if "*" in path else 1 for paths in reports.HEADLINE.values() for path in paths)
    assert columns <= reports.MAX_COLUMNS
    for name in tasks.SUPPORTED:  # a task's own headline keeps the table as narrow
        headline = {**reports.HEADLINE, **tasks.get(name).headline}
        columns = sum(4 if "*" in path else 1 for paths in headline.values() for path in paths)
        assert columns <= reports.MAX_COLUMNS, name


def test_a_task_report_gets_its_own_headline():
    report = {
        "task": "token_classification",
        "model": {"f1": 0.4, "macro_f1": 0.3, "accuracy": 0.9},
        "baseline": {"f1": 0.3, "macro_f1": 0.2},
    }
    own = tasks.get("token_classification").headline["evaluate"]
    assert reports.headline("evaluate", report, own) == {
        "model": {"f1": 0.4, "macro_f1": 0.3},
        "baseline": {"macro_f1": 0.2},
    }


def test_dvc_yaml_declares_only_headline_files_as_metrics_and_no_metrics_file_as_params():
    metrics, params_files = set(), set()
    for stage, spec in STAGES.items():
        for entry in spec.get("metrics", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            assert path == f"reports/{stage}/metrics.json", (stage, path)
            metrics.add(path)
        for entry in spec.get("params", []):
            if isinstance(entry, dict):
                params_files |= set(entry)
        outs = {next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])}
        if stage in reports.HEADLINE:
            assert f"reports/{stage}/metrics.json" in metrics, stage
            report = f"reports/{stage}/report.json"
            assert report in outs, f"{stage}: {report} is not an output"
    assert not metrics & params_files
    assert set(reports.HEADLINE) == set(STAGES)
