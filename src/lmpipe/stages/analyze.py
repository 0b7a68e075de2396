"""analyze: where and how the trained model fails, beside the task's baseline, on the test split.

Each part is the task's (``lmpipe.tasks``) and returns its report entries, tables and figures; this
module runs the parts ``params.analyze`` enables and the task supports, and records what they return:
* calibration (both tasks): a temperature fit on val, ECE, Brier and reliability tables, per unit (a
  text, or a word), for the model before and after scaling and for the baseline;
* robustness: both predictors under perturbations, with flip rates and their CIs, and the fragile rows;
* attack and explain (one label per text): the fewest words deleted to flip a prediction, and token
  attributions (integrated gradients) with their faithfulness;
* slices: scores by length bucket and by class, with CIs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from lmpipe import data, io, plots, reports, tasks, tracking
from lmpipe.analysis import calibration
from lmpipe.errors import ParamsError
from lmpipe.modeling import hub
from lmpipe.modeling.models import device, load_model, load_tokenizer
from lmpipe.params import Params
from lmpipe.tasks.base import Analysis, Part

# every table the stage declares in dvc.yaml, by the part that fills it: a part switched off in params
# still writes its files, with one row saying so, since DVC wants every declared output
# the modules of the task's package this stage uses (dvc.yaml: src/lmpipe/tasks/${base.task}/<part>.py)
TASK_PARTS = ("evaluation", "analysis")


TABLES = {
    "robustness": "robustness",
    "fragile": "robustness",
    "attack": "attack",
    "faithfulness": "explain",
    "top_tokens": "explain",
    "slices_length": "slices",
    "slices_class": "slices",
}
PARTS = ("robustness", "attack", "explain", "slices")  # in the order they run, after calibration


@dataclass(frozen=True)
class Paths:
    data: str  # folder with train.parquet, val.parquet and test.parquet
    model: str  # the trained model folder
    train_report: str  # train stage report (for the MLflow run id)
    out: str  # folder for the analysis outputs
    calibration: str  # JSON file with the fitted temperature (export's dep)


def run(params: Params, paths: Paths) -> str:
    task, cfg = tasks.for_stage(params.base.task, "analyze", TASK_PARTS), params.analyze
    train, val, test = (data.read_split(paths.data, s) for s in ("train", "val", "test"))
    for part in ("explain", "attack"):
        wanted = getattr(cfg, part).samples if getattr(cfg, part).enabled and part in task.supports else 0
        if wanted > len(test):
            raise ParamsError(
                f"analyze.{part}.samples",
                f"asks for {wanted} texts, but the test split has {len(test)} texts",
            )
    train_run_id = io.read_json(paths.train_report).get("mlflow_run_id", "")
    seconds, clock = {}, time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        seconds[part], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

    analysis = load(task, params, paths.model, train, val, test)
    lap("clean")
    report: dict = {"task": task.name, "test_rows": len(test)}
    results: dict[str, Part] = {}
    with tracking.stage_run(params, "analyze", tags={"train_run_id": train_run_id}) as run:
        if "calibration" in task.supports:
            calibrated, reliab, temperature = calibrate(task, analysis)
        else:  # no class probabilities to calibrate
            calibrated, reliab, temperature = Part({"note": NOT_SUPPORTED["calibration"]}), {}, 1.0
        report["calibration"] = calibrated.report
        lap("calibration")
        for part in PARTS:
            if not getattr(cfg, part).enabled:
                continue
            if part not in task.supports:
                results[part] = not_supported(task, part)
                continue
            results[part] = getattr(task, part)(analysis)
            report.update(results[part].report)
            lap(part)
        report["seconds"] = {**seconds, "total": round(sum(seconds.values()), 1)}
        report["mlflow_run_id"] = run.info.run_id
        report["train_mlflow_run_id"] = train_run_id
        tables = {name: frame for r in results.values() for name, frame in r.tables.items()}
        figures = calibrated.figures | {
            name: fig for r in results.values() for name, fig in r.figures.items()
        }
        html = next((r.html for r in results.values() if r.html), None) or (
            "<!doctype html><title>attributions</title><p>off: analyze.explain.enabled is false</p>"
        )
        _write_outputs(
            paths, report, tables, reliab, figures, html, temperature, len(val),
            cfg.calibration.enabled and "calibration" in task.supports, task.selection_metric,
            model=hub.record_of(params.base),
        )  # fmt: skip
    return _summary(report)


def load(
    task, params: Params, model_dir: str, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame
) -> Analysis:
    """The model, the baseline fit on train, and both on the test split: what every part starts from."""
    model = load_model(model_dir).to(device()).eval()
    tokenizer = load_tokenizer(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    baseline = task.fit_baseline(train, params, labels)
    clean = task.analysis_pass(
        model, tokenizer, test, params.base.max_length, params.train.eval_batch_size, desc="test"
    )
    return Analysis(
        params, model, tokenizer, labels, train, val, test, baseline, clean, baseline.predict(test),
        baseline.unit_proba(test),
    )  # fmt: skip


def calibrate(task, analysis: Analysis) -> tuple[Part, dict[str, pd.DataFrame], float]:
    """Temperature scaling fit on val (when enabled), and ECE, Brier and the reliability tables of the
    model before and after it and of the baseline, over the test units the model read."""
    cfg, base = analysis.params.analyze.calibration, analysis.params.base
    temperature = 1.0
    if cfg.enabled:
        val = task.analysis_pass(
            analysis.model, analysis.tokenizer, analysis.val, base.max_length,
            analysis.params.train.eval_batch_size, desc="val",
        )  # fmt: skip
        temperature = calibration.fit_temperature(val.logits, val.y)
    clean, y = analysis.clean, analysis.clean.y
    probas = {
        "model": calibration.softmax(clean.logits),
        "model_scaled": calibration.softmax(clean.logits, temperature),
        "baseline": analysis.baseline_proba[clean.read],
    }
    reliab = {k: calibration.reliability(v, y, cfg.bins) for k, v in probas.items()}
    report = {
        "enabled": cfg.enabled,
        "temperature": temperature,
        "bins": cfg.bins,
        f"{task.unit}s": len(y),
        **{k: calibration.summary(v, y, cfg.bins) for k, v in probas.items()},
    }
    figure = plots.reliability_figure(reliab, {k: report[k]["ece"] for k in reliab})
    return Part(report, figures={"reliability": figure}), reliab, temperature


# why a task without a part in its ``supports`` cannot run it
NOT_SUPPORTED = {
    "calibration": "calibration needs class probabilities",
    "attack": "the attack and the attributions explain one label per text",
    "explain": "the attack and the attributions explain one label per text",
    "robustness": "the perturbations are scored on class labels",
    "slices": "the slices are scored on class labels",
}


def not_supported(task, part: str) -> Part:
    """A part the task cannot run: its tables and page say why (DVC wants every declared output)."""
    note = f"not for {task.name.replace('_', ' ')}: {NOT_SUPPORTED[part]}"
    names = [name for name, owner in TABLES.items() if owner == part]
    return Part(
        tables={name: pd.DataFrame({"note": [note]}) for name in names},
        html=f"<!doctype html><title>attributions</title><p>{note}</p>" if part == "explain" else None,
    )


def _write_outputs(
    paths: Paths,
    report: dict,
    tables: dict[str, pd.DataFrame],
    reliab: dict[str, pd.DataFrame],
    figures: dict[str, object],
    html: str,
    temperature: float,
    val_rows: int,
    fitted: bool,
    metric: str = "macro_f1",
    model: dict | None = None,
) -> None:
    """Every output the stage declares, together or not at all, the same in the active MLflow run, and
    the temperature export serves (``paths.calibration``). A table no part filled gets one row saying
    why: DVC wants every declared output."""
    for name, part in TABLES.items():
        tables.setdefault(name, pd.DataFrame({"note": [f"off: analyze.{part}.enabled is false"]}))
    with io.staged_outputs(paths.out) as out:  # all outputs appear together, or none
        for name, frame in tables.items():
            frame.to_csv(out / f"{name}.csv", index=False)
        for name, table in reliab.items():
            (out / "plots" / "reliability").mkdir(parents=True, exist_ok=True)
            table.to_csv(out / "plots" / "reliability" / f"{name}.csv", index=False)
        if "robustness" in tables and metric in tables["robustness"].columns:
            (out / "plots" / "robustness").mkdir(parents=True, exist_ok=True)
            wide = tables["robustness"].pivot_table(
                index=["perturbation", "strength"], columns="predictor", values=metric
            )
            for kind, part in wide.groupby(level=0):
                part.reset_index(level=0, drop=True).add_suffix(f"_{metric}").reset_index().to_csv(
                    out / "plots" / "robustness" / f"{kind}.csv", index=False
                )
        (out / "attributions.html").write_text(html, encoding="utf-8")
        for name, fig in figures.items():
            tracking.log_figure(fig, f"plots/{name}.png")
            plots.close(fig)
        for entry in sorted(out.iterdir()):
            if entry.is_file():
                tracking.log_artifact(entry, "analysis")
        tracking.log_metrics(tracking.flatten(reports.headline("analyze", report)))
        reports.write("analyze", report, out / "metrics.json", out / "report.json", model=model)
        tracking.log_dict(report, "analyze_report.json")
    io.write_json(
        paths.calibration,
        {
            "temperature": temperature,
            "fitted_on": "val" if fitted else None,
            "rows": val_rows,
        },
    )


def _summary(report: dict) -> str:
    lines = []
    cal = report["calibration"]
    if "temperature" in cal:
        lines.append(
            f"analyze: calibration: temperature {cal['temperature']:.3f}; test ECE {cal['model']['ece']:.4f} -> "
            f"{cal['model_scaled']['ece']:.4f} (baseline {cal['baseline']['ece']:.4f})"
        )
    for key, r in report.get("robustness", {}).get("perturbations", {}).items():
        if "model_macro_f1" not in r:  # a generator's: ROUGE-L and the share of outputs that change
            lines.append(
                f"analyze: {key:<22} model ROUGE-L {r['model_rougeL']:.4f} (drop {r['model_drop']:+.4f}, "
                f"{100 * r['model_changed']:.0f}% changed) | baseline {r['baseline_rougeL']:.4f}"
            )
            continue
        lines.append(
            f"analyze: {key:<22} model macro-F1 {r['model_macro_f1']:.4f} (flips {100 * r['model_flip_rate']:.1f}%) | "
            f"baseline {r['baseline_macro_f1']:.4f} (flips {100 * r['baseline_flip_rate']:.1f}%)"
        )
    if report.get("attack", {}).get("samples"):
        a = report["attack"]
        lines.append(
            f"analyze: attack ({a['samples']} texts, <= {100 * a['max_edit_share']:g}% of words deleted): success model "
            f"{100 * a['model']['success_rate']:.0f}%, baseline {100 * a['baseline']['success_rate']:.0f}%"
        )
    if "explain" in report:
        f = report["explain"]["faithfulness"]
        lines.append(
            f"analyze: faithfulness: comprehensiveness {f['comprehensiveness']:.3f} (random "
            f"{f['random_comprehensiveness']:.3f}), sufficiency {f['sufficiency']:.3f} (random "
            f"{f['random_sufficiency']:.3f})"
        )
    lines.append(f"analyze: {report['seconds']['total']:.0f} s ({report['seconds']})")
    return "\n".join(lines)
