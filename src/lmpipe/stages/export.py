"""export: the model ``export.source`` names, as ONNX files checked against PyTorch and timed (the task's
``export``: ``lmpipe.tasks``), registered in MLflow behind a promotion gate, with a model card. ``run``
reads the records, the task exports and checks, and ``record`` registers, gates and writes."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lmpipe import data, io, reports, tasks, tracking
from lmpipe.errors import UserError
from lmpipe.modeling import hub
from lmpipe.params import Params
from lmpipe.serve import onnx_export, promotion, serving
from lmpipe.serve.serving import CLASSIFIER_FILE, FP32_FILE, VARIANT_FILES
from lmpipe.tasks.base import Export, Exported, Package

# the modules of the task's package this stage uses (dvc.yaml: src/lmpipe/tasks/${base.task}/<part>.py)
TASK_PARTS = ("evaluation", "export")


@dataclass(frozen=True)
class Paths:
    source: list[str]  # NAME=FOLDER pairs: the models export.source may choose from
    data: str  # folder with test.parquet
    prepare_report: str  # prepare stage report (for the card)
    split_report: str  # split stage report (for the card)
    train_report: str  # train stage report (run id, for the card)
    eval_scores: str  # evaluate's scores (for the gate and the card)
    baseline_predictions: str  # evaluate's baseline predictions on test (the gate's paired CI)
    calibration: str | None  # analyze's fitted temperature (served probabilities are softmax(logits / T))
    compress_report: str | None  # report of the compressed variants (for the card)
    out: str  # the export folder
    metrics: str  # headline figures (DVC metrics)
    report: str  # the export report


def chosen_model(params: Params, pairs: list[str]) -> Path:
    """The folder of the model ``export.source`` names, among the stage's NAME=FOLDER pairs."""
    sources = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--source: expected NAME=FOLDER, got {pair!r}")
        sources[name] = folder
    if params.export.source not in sources:
        raise UserError(
            f"export.source: '{params.export.source}' is not among the models this stage was given "
            f"({', '.join(sorted(sources))}); add --source {params.export.source}=<folder> in dvc.yaml"
        )
    chosen = Path(sources[params.export.source])
    if not (chosen / "config.json").is_file():
        raise UserError(
            f"export.source: '{params.export.source}' has no model in {chosen} (is that compress variant "
            "enabled in params.yaml?)"
        )
    return chosen


def budget_check(params: Params, compression: dict | None) -> dict[str, Any]:
    """Refuse a compress variant that broke compress's quality budget on val, unless
    ``export.allow_over_budget`` names it. Returns what the report records about the source's budget."""
    source = params.export.source
    row = (compression or {}).get("variants", {}).get(source)
    if source == "model" or row is None or "within_budget" not in row:
        return {"source_within_budget": None}
    loss, budget, bound = row["val_f1_loss"], row["max_loss"], row.get("val_f1_loss_bound")
    conf = (compression or {}).get("confidence")
    how = f"loses {100 * loss:.2f} pt of val macro-F1" + (
        f" (at most {100 * bound:.2f} pt with {100 * conf:g}% confidence)"
        if bound is not None and conf
        else ""
    )
    if not row["within_budget"]:
        if source not in params.export.allow_over_budget:
            raise UserError(
                f"export.source: '{source}' {how} against the trained model, over compress's budget of "
                f"{100 * budget:g} pt; ship another model, or add '{source}' to export.allow_over_budget to "
                "ship it anyway"
            )
        print(
            f"export: WARNING: shipping '{source}' although it {how}, over the budget of {100 * budget:g} pt "
            "(export.allow_over_budget)"
        )
    return {
        "source_within_budget": row["within_budget"],
        "source_val_f1_loss": loss,
        "source_val_f1_loss_bound": bound,
        "source_max_loss": budget,
    }


def registry_task_check(params: Params) -> None:
    """Refuse to register a model under a name that holds another task's models: the gate could not
    score one task's champion on the other's test split, and the MLflow UI would mix the two."""
    name = params.export.registered_model
    held = tracking.registered_model_tag(name, "task")
    if held is not None and held != params.base.task:
        raise UserError(
            f"export.registered_model: '{name}' holds {held} models, and this is a {params.base.task} model; "
            "give it a registered model name of its own"
        )


def read_records(params: Params, paths: Paths) -> dict[str, Any]:
    """The earlier stages' reports the card, the gate and the registry tags are written from, and the run
    ids: the evaluate run is the latest finished one of the train run (the scores carry no run id, so that
    an evaluate re-run that scores the same does not re-run export).

    Compress's report is read first and the source's budget checked on it, before any other file is
    opened: a variant outside the budget is refused with that reason, not with a missing file's."""
    compression = io.read_json(paths.compress_report) if paths.compress_report else None
    budget = budget_check(params, compression)
    registry_task_check(params)
    records = {
        "prepare": io.read_json(paths.prepare_report),
        "split": io.read_json(paths.split_report),
        "train": io.read_json(paths.train_report),
        "evaluate": io.read_json(paths.eval_scores),
        "compression": compression,
        "budget": budget,
    }
    train_run_id = records["train"].get("mlflow_run_id", "")
    evaluation = tracking.evaluate_run_of(train_run_id) if train_run_id else None
    records["evaluate_run_id"] = evaluation.info.run_id if evaluation else ""
    return records


def run(params: Params, paths: Paths) -> str:
    task = tasks.for_stage(params.base.task, "export", TASK_PARTS)
    if "export" not in task.supports:
        note = f"not available for {task.name}"
        return reports.not_applicable(
            "export", note, paths.metrics, paths.report, [paths.out], model=hub.record_of(params.base)
        )
    model_dir = chosen_model(params, paths.source)
    records = read_records(params, paths)  # checks the source's budget before any work
    test = data.read_split(paths.data, "test")
    calibration = io.read_json(paths.calibration) if paths.calibration else {"temperature": 1.0}
    tags = {
        "train_run_id": records["train"].get("mlflow_run_id", ""),
        "evaluate_run_id": records["evaluate_run_id"],
        "export_source": params.export.source,
    }
    torch.set_num_threads(params.export.latency.threads)
    with tracking.stage_run(params, "export", tags=tags) as active, io.atomic_dir(paths.out) as tmp:
        job = Export(
            params, model_dir, test, tmp, records, float(calibration["temperature"]), paths.source,
            paths.baseline_predictions,
        )  # fmt: skip
        exported = task.export(job)
        git = tracking.git_info()  # once: the registered version's tags and the metrics name the same commit
        registered = register_and_gate(params, exported, test, tmp, records, active.info.run_id, git)
        report = {
            "task": task.name,
            "source": params.export.source,
            **records["budget"],
            **exported.report,
            **registered,
            "git_commit": git["git_commit"],
            "mlflow_run_id": active.info.run_id,
        }
        record(task, params, records, report, exported.logged, tmp, paths)
    registry, aliases = report["registry"], ", ".join(report["gate"]["aliases"]) or "none"
    return (
        f"{task.export_summary(report)} | {registry['name']} v{registry['version']} aliases: {aliases}\n"
        f"export: {gate_line(report['gate'])}"
    )


def record(
    task, params: Params, records: dict, report: dict, logged: tuple[str, ...], folder: Path, paths: Paths
) -> None:
    """The model card beside the export and in the MLflow run, the report's figures as MLflow metrics, the
    report and its DVC metrics."""
    (folder / "MODEL_CARD.md").write_text(task.model_card(params, records, report), encoding="utf-8")
    tracking.log_artifact(folder / "MODEL_CARD.md")
    tracking.log_metrics({k: report[k] for k in logged})
    tracking.log_metrics(
        {
            "gate_passed": int(report["gate"]["passed"]),
            "registered_version": int(report["registry"]["version"]),
        }
    )
    tracking.log_dict(report, "export_report.json")
    reports.write(
        "export",
        report,
        paths.metrics,
        paths.report,
        task.headline.get("export"),
        model=hub.record_of(params.base),
    )


def gate_line(gate: dict[str, Any]) -> str:
    """The gate's decision in a few words, with the failed checks."""
    failed = [r.removeprefix("FAIL: ") for r in gate["reasons"] if r.startswith("FAIL: ")]
    return "gate passed" if gate["passed"] else "gate FAILED: " + "; ".join(failed)


def classifier_package(
    staging_root: Path, exported: Exported, folder: Path, test: pd.DataFrame, task: str
) -> Package:
    """The registered classifier (or tagger): the served ONNX variant as model.onnx, with its tokenizer
    and labels, run by ``lmpipe.serve.serving``."""
    staging = staging_root / "classifier"
    shutil.copytree(folder, staging, ignore=shutil.ignore_patterns("*.onnx", "*.md", *exported.subfolders))
    shutil.copy2(folder / VARIANT_FILES[exported.variant], staging / FP32_FILE)
    info = json.loads((staging / CLASSIFIER_FILE).read_text())
    info.update(onnx_file=FP32_FILE, variant=exported.variant)
    (staging / CLASSIFIER_FILE).write_text(json.dumps(info, indent=2) + "\n")
    example = [t[:300] for t in test["text"].tolist()[:2]]
    return Package(
        serving.__file__, {"classifier": staging}, example, onnx_export.pip_requirements(), {"task": task}
    )


def register_and_gate(
    params: Params,
    exported: Exported,
    test: pd.DataFrame,
    folder: Path,
    records: dict,
    run_id: str,
    git: dict[str, str],
) -> dict[str, Any]:
    """Log the served ONNX variant (its test scores ``exported.served``) as a pyfunc model, decide the
    promotion gate against the baseline (``exported.versus``: the paired difference) and the current
    champion (``exported.score_registered`` scores a registered model on this test split, or None),
    register the new version with its provenance tags, and set its aliases."""
    cfg, task = params.export, params.base.task
    served, variant, versus, metric = exported.served, exported.variant, exported.versus, exported.metric
    score_champion: Callable[[str], float | None] = exported.score_registered
    train_run_id = records["train"].get("mlflow_run_id", "")
    baseline_score = versus[f"baseline_{metric}"]
    label = promotion.METRIC_NAMES.get(metric, metric)

    with tempfile.TemporaryDirectory() as staging_root:
        package = (exported.package or classifier_package)(Path(staging_root), exported, folder, test, task)
        model_uri = tracking.log_pyfunc_model(
            package.code, package.artifacts, package.example, package.requirements, package.config
        )

    name = cfg.registered_model
    champion_version = tracking.alias_version(name, promotion.CHAMPION)
    champion_score = None
    if champion_version is not None:
        champion_score = score_champion(f"models:/{name}@{promotion.CHAMPION}")
    checks = list(exported.checks)
    if variant.startswith("int8"):
        agreement = served["label_agreement"]
        checks.append(
            (
                served["ok"],
                f"int8 label agreement {agreement:.4f} vs min_int8_agreement {cfg.min_int8_agreement}",
            )
        )
    decision = promotion.decide(
        served[metric], versus, cfg.gate, champion_score, champion_version, checks, metric=metric
    )
    low, high = versus[f"{metric}_ci95_low"], versus[f"{metric}_ci95_high"]
    version = tracking.register_model_version(
        model_uri,
        name,
        tags={
            "train_run_id": train_run_id,
            # the latest finished evaluate run of this train run (evaluate runs before export)
            "evaluate_run_id": records["evaluate_run_id"],
            "export_run_id": run_id,
            "git_commit": git["git_commit"],
            "git_dirty": git["git_dirty"],
            "params_hash": params.digest(),
            "task": task,
            "source": cfg.source,
            "variant": variant,
            f"test_{metric}": f"{served[metric]:.6f}",
            **({"test_accuracy": f"{served['accuracy']:.6f}"} if "accuracy" in served else {}),
            f"baseline_test_{metric}": f"{baseline_score:.6f}",
            f"minus_baseline_{metric}_ci95": f"[{low:.4f}, {high:.4f}]",
            "test_rows": len(test),
            "test_split_sha256": onnx_export.split_fingerprint(test),
            "gate_passed": str(decision.passed).lower(),
            **exported.tags,
        },
        description=(
            f"ONNX {variant} export of '{cfg.source}' from training run "
            f"{train_run_id or 'n/a'} at git commit {git['git_commit']}. "
            f"Test {label} {served[metric]:.4f} on {len(test)} rows; baseline {baseline_score:.4f}. Gate: "
            + "; ".join(decision.reasons)
        ),
    )
    tracking.set_registered_model_tag(name, "task", task)  # registry_task_check reads it
    for alias in decision.aliases:
        tracking.set_alias(name, alias, version)
    return {
        "registry": {"name": name, "version": version, "model_uri": model_uri},
        "gate": {
            **decision.to_dict(),
            f"baseline_{metric}": baseline_score,
            "minus_baseline": {k: v for k, v in versus.items() if k != f"baseline_{metric}"},
            "champion_before": champion_version,
            f"champion_before_{metric}": champion_score,
        },
    }
