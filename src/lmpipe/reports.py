"""What each stage writes about itself, in two files:

* ``reports/<stage>/report.json``: everything (per-class counts, latency percentiles, parameter counts,
  run ids, ...), a plain output that git versions and the stage also logs to MLflow;
* ``reports/<stage>/metrics.json``: the few headline scalars a reader compares across experiments, the
  only file ``dvc.yaml`` declares as ``metrics:``. These make the columns of ``dvc exp show``.

``HEADLINE`` names each stage's headline keys, as dotted paths into its report; ``*`` matches every key at
that level (each compressed variant). A new figure goes into the report; it becomes a DVC metric only by
being added here, and ``tests/code/test_reports.py`` keeps the whole table under ``MAX_COLUMNS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lmpipe import io

HEADLINE: dict[str, tuple[str, ...]] = {
    "prepare": ("rows_out", "classes", "token_length.truncated_fraction"),
    "split": ("sizes.train", "sizes.val", "sizes.test"),
    "search": ("complete", "best_value"),  # search.enabled is a param: dvc exp show has it already
    "train": ("best_val_macro_f1", "best_epoch", "train_seconds"),
    "evaluate": (
        "model.macro_f1",
        "model.accuracy",
        "baseline.macro_f1",
        "model_minus_baseline.macro_f1",
        "model_minus_baseline.macro_f1_ci95_low",
        "model_minus_baseline.macro_f1_ci95_high",
    ),
    "analyze": (
        "robustness.model_mean_drop",
        "attack.model.success_rate",
        "explain.faithfulness.comprehensiveness_minus_random",
        "calibration.model_scaled.ece",
    ),
    "compress": (
        "variants.*.delta_macro_f1",
        "variants.*.speedup_b1",
        "variants.*.within_budget",
        "variants.pruned.sparsity",
        "latency_reliable",  # false: other processes disturbed the timing, speedup_b1 is from CPU cost
    ),
    "export": (
        "served.macro_f1",
        "served.latency_b1_p50_ms",
        "served.size_mb",
        "latency_reliable",
        "gate.passed",
    ),
}

# the most metric columns `dvc exp show` may have for the default pipeline (compress: 4 variants)
MAX_COLUMNS = 40


def _select(report: Mapping[str, Any], parts: list[str]) -> dict[str, Any]:
    head, rest = parts[0], parts[1:]
    keys = list(report) if head == "*" else [head]
    out: dict[str, Any] = {}
    for key in keys:
        if key not in report:
            continue
        value = report[key]
        if not rest:
            if value is None or isinstance(value, (bool, int, float)):
                out[key] = value
        elif isinstance(value, Mapping) and (inner := _select(value, rest)):
            out[key] = inner
    return out


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value  # _select builds fresh dicts: nothing to copy


def headline(stage: str, report: Mapping[str, Any], paths: Sequence[str] | None = None) -> dict[str, Any]:
    """The headline scalars of ``stage`` in ``report``, nested as in the report, in HEADLINE's order (or
    ``paths``'s: a task's own headline, ``Task.headline``). Keys the report lacks (a disabled search, a
    skipped variant) are left out, and so are non-scalars."""
    out: dict[str, Any] = {}
    for path in HEADLINE[stage] if paths is None else paths:
        _merge(out, _select(report, path.split(".")))
    return out


def write(
    stage: str,
    report: Mapping[str, Any],
    metrics_path: str | Path,
    report_path: str | Path,
    paths: Sequence[str] | None = None,
    model: Mapping[str, Any] | None = None,
) -> None:
    """Write the full report and its headline metrics (``headline``), each atomically; the report first,
    so that a metrics file never describes a report that is not there. ``model`` is the base model's
    record (``lmpipe.modeling.hub.record_of``: its id, source and resolved revision), kept as
    ``base_model`` by every stage that reads the model or what was trained from it."""
    if model is not None:
        report = {**report, "base_model": dict(model)}
    io.write_json(report_path, report)
    io.write_json(metrics_path, headline(stage, report, paths))


def not_applicable(
    stage: str,
    note: str,
    metrics_path: str | Path,
    report_path: str | Path,
    folders: Sequence[str | Path] = (),
    tables: Sequence[str | Path] = (),
    model: Mapping[str, Any] | None = None,
) -> str:
    """A stage that does not apply to this pipeline's task or model still writes every output it declares
    in dvc.yaml (DVC wants them): each folder with a NOTE.md, each table one ``note`` row, and a report
    saying why. Returns the stage's one-line summary."""
    for folder in folders:
        with io.atomic_dir(folder) as tmp:
            (tmp / "NOTE.md").write_text(f"{stage}: {note}\n", encoding="utf-8")
    for table in tables:
        Path(table).parent.mkdir(parents=True, exist_ok=True)
        io.write_csv(table, pd.DataFrame({"note": [note]}))
    write(stage, {"applicable": False, "note": note}, metrics_path, report_path, ("applicable",), model=model)
    return f"{stage}: {note}"
