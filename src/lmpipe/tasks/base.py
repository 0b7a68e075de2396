"""The interface every task implements and every stage calls (``lmpipe.tasks.get(params.base.task)``).

A stage asks the task object; it never tests the task's name. Each method's comment names the stage
that calls it. The parts evaluate needs (``predict``, ``fit_baseline``, ``score``, ``versus_baseline``,
``tables``, ``plots``) return results and write nothing: ``Task.evaluate`` composes them, and the
evaluate stage alone logs and writes what they return.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from lmpipe.params import Params, PrepareParams, SplitParams


@dataclass
class Predictions:
    """One predictor's output on a split frame, a row per frame row (a text, or a sentence)."""

    labels: list[str]  # the label (tag) names, in the model's id order
    predicted: list[Any]  # per row: the predicted label (a text's), or the tag of each word (a sentence's)
    confidence: list[Any]  # per row: the predicted label's probability (per word, for a sentence)
    proba: np.ndarray | None = (
        None  # [rows, labels] class probabilities, where the task has one label per row
    )


@dataclass
class Evaluation:
    """What the evaluate stage records (``lmpipe.stages.evaluate.record``), computed by ``Task.evaluate``."""

    scores: dict[str, Any]  # scores.json: task, model, baseline, model_minus_baseline, test_rows, ...
    per_class: dict[str, Any]  # per_class.json: {"model": ..., "baseline": ...}, per class (entity type)
    tables: dict[str, pd.DataFrame]  # file name -> table: predictions, baseline predictions, misclassified
    plots: dict[str, pd.DataFrame] = field(default_factory=dict)  # plots/<path>.csv (DVC plots)
    figures: dict[str, Any] = field(default_factory=dict)  # MLflow plots/<name>.png -> matplotlib figure
    logged: dict[str, dict[str, float]] = field(default_factory=dict)  # MLflow metric prefix -> metrics


class Baseline:
    """A simple model fit on the train split (``Task.fit_baseline``), scored beside the trained one."""

    title: str = "baseline"  # e.g. "TF-IDF + LR", in figure titles and the model card

    def predict(self, frame: pd.DataFrame) -> Predictions:
        raise NotImplementedError

    def unit_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Its probabilities over the model's labels for every unit of ``frame`` (analyze's calibration)."""
        raise NotImplementedError


@dataclass
class Outputs:
    """A model on a split frame (compress): its logits (a row per unit read), its scores (``macro_f1`` the
    task's headline), and per frame row what it predicted and the truth, each as one string (a label; a
    sentence's tags joined by spaces): what a paired bootstrap over the rows resamples
    (``Task.bootstrap_scorer``)."""

    logits: np.ndarray
    scores: dict[str, float]
    predicted: list[str]
    truth: list[str]


@dataclass
class Pass:
    """The trained model on a split frame, unit by unit (analyze): what calibration, robustness and the
    slices start from, computed once."""

    logits: np.ndarray  # [units read, labels]
    y: np.ndarray  # [units read] the true label ids
    read: np.ndarray  # [units] which units the model read (a word past max_length is not)
    predicted: list[Any]  # per frame row: the predicted label id (a text's), or tag list (a sentence's)
    extra: dict[str, Any] = field(default_factory=dict)  # what the task's own parts reuse


@dataclass
class Analysis:
    """What analyze's parts share: the model, the splits, the baseline and the clean test pass."""

    params: Any  # Params
    model: Any
    tokenizer: Any
    labels: list[str]
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    baseline: Baseline
    clean: Pass  # the model on the test split
    baseline_clean: Predictions  # the baseline on the test split
    baseline_proba: np.ndarray  # [units, labels] its probabilities there (``Baseline.unit_proba``), once


@dataclass
class Part:
    """One analysis (robustness, attack, explain, slices): its report entries, tables and figures."""

    report: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    html: str | None = None  # the attributions page, where the part writes one


@dataclass
class Compress:
    """What the compress stage gives a task's own ``compress``."""

    params: Any  # Params
    model_dir: Any  # Path: the trained model
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    folder: Any  # Path: where the variants go (staged: it appears whole, or not at all)
    source: dict[str, str]  # the trained model's path and weights hash (each variant's recipe records it)


@dataclass
class Compressed:
    """What a task's ``compress`` returns: the report (DVC metrics; its ``variants`` rows also go to
    MLflow), the quality-against-speed points (a DVC plot), the printed summary and the budget warnings."""

    report: dict[str, Any]
    points: pd.DataFrame
    summary: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class Export:
    """What the export stage gives a task's ``export``: the model to ship and where its files go."""

    params: Any  # Params
    model_dir: Any  # Path: the model export.source names
    test: pd.DataFrame
    folder: Any  # Path: the export folder (staged: it appears whole, or not at all)
    records: dict[str, Any]  # the earlier stages' reports (export.read_records)
    temperature: float  # analyze's fitted temperature (1.0 without one)
    sources: list[str]  # the stage's NAME=FOLDER pairs (the compress variants export.compare may name)
    baseline_predictions: str  # evaluate's baseline predictions on the test split


@dataclass
class Exported:
    """What a task's ``export`` returns: its entries of the export report, and what the gate needs."""

    report: dict[str, Any]  # labels, test_rows, pytorch_fp32, onnx_*, served, latency, size_mb, ...
    variant: str  # the ONNX variant registered and served
    served: dict[str, Any]  # that variant's test scores (macro_f1, accuracy; int8: label_agreement, ok)
    versus: dict[str, Any]  # the served variant against evaluate's baseline, paired; baseline_macro_f1
    score_registered: Any  # Callable[[model uri], macro-F1 | None]: the gate's champion on this test split
    logged: tuple[str, ...]  # report keys logged to MLflow as metrics
    subfolders: list[str] = field(default_factory=list)  # folders beside the shipped model, not registered
    metric: str = "macro_f1"  # the score the gate compares (served, versus and the champion's)
    # the registered pyfunc's files: staging folder -> Package; None = the ONNX classifier of ``variant``
    package: Any = None
    checks: list[tuple[bool, str]] = field(default_factory=list)  # the gate's extra (ok, reason) conditions
    tags: dict[str, Any] = field(default_factory=dict)  # extra tags of the registered version


@dataclass
class Package:
    """An MLflow "models from code" pyfunc: its code file, artifacts, input example (with inference
    params, where it takes some), pip requirements and model config."""

    code: str
    artifacts: dict[str, Any]
    example: Any
    requirements: list[str]
    config: dict[str, Any] = field(default_factory=dict)


class Task:
    """What differs between tasks. A task is a package: its ``__init__.py`` subclasses this, sets the
    class attributes and implements what has no default here; the rest are functions of the same name
    in the part modules (``tasks/<name>/<part>.py``), which the defaults below load and call. A task
    overrides a default where its own code is shorter inline. ``tasks/classification/`` and
    ``tasks/token_classification/`` are the two to read."""

    name: ClassVar[str]  # the registry name (lmpipe.tasks.SUPPORTED), == params base.task == module name
    unit: ClassVar[str]  # what gets a label: "text" | "word"
    row: ClassVar[str]  # what a frame row is, in messages: "text" | "sentence"
    # what the stages may do with this task, asked as `"x" in task.supports`: augment, prompt_tuning,
    # folds (the params loader refuses them where absent), windows (base.reading other than head); analyze's calibration, robustness, slices, attack,
    # explain (a part not supported writes one line saying why); compress, export (the stage writes a note); compare (``lmpipe compare``)
    supports: ClassVar[frozenset[str]]
    # why a setting that needs augment, prompt_tuning or folds cannot work, for a task that lacks it
    # in ``supports`` (the params loader refuses it with this reason: ``param_problems``)
    refusals: ClassVar[dict[str, str]] = {}
    # a stage's headline metrics (reports.HEADLINE's dotted paths), where this task's differ
    headline: ClassVar[dict[str, tuple[str, ...]]] = {}
    peft_task_type: ClassVar[str]  # peft's TaskType for LoRA and prompt tuning (strategies)
    # the val score that picks the best epoch and a search's trial (the one training loop), and that
    # analyze's robustness plots; every task's dataset reports it among its val metrics
    selection_metric: ClassVar[str] = "macro_f1"
    # train.strategy: auto for this task; None = the model family's (full for an encoder, lora for a decoder)
    default_strategy: ClassVar[str | None] = None
    # compress: False = the stage's shared variants (int8, pruning, distillation of a model that answers
    # in one forward pass, judged on val macro-F1); True = the task's own ``compress``
    own_compression: ClassVar[bool] = False
    # the ONNX variants export may register (export.registered_variant); the params loader refuses others
    served_variants: ClassVar[tuple[str, ...]] = ("fp32", "int8", "fp32_opt", "int8_opt")
    # lmpipe compare's report: what an example, accuracy and macro-F1 are, where not a text and its label
    comparison_note: ClassVar[str | None] = None
    # the modules of a task's package (tasks/<name>/<part>.py) beside its __init__, one per group of
    # stages; a stage names those it uses (TASK_PARTS), and dvc.yaml lists them as its deps
    PARTS: ClassVar[tuple[str, ...]] = ("data", "model", "evaluation", "analysis", "export")

    def part(self, name: str):
        """The module ``tasks/<this task>/<name>.py``, imported on first use. Inside a stage that
        declared its parts (``tasks.for_stage``), a part it did not declare is an error: its deps in
        dvc.yaml would not name that file."""
        from lmpipe import tasks

        declared = tasks.stage_parts()
        if declared is not None and name not in declared[1]:
            raise RuntimeError(
                f"stage {declared[0]} uses the {self.name} task's '{name}' part but declares only "
                f"{list(declared[1])}: add it to TASK_PARTS in lmpipe/stages/{declared[0]}.py and to the "
                f"stage's deps in dvc.yaml (src/lmpipe/tasks/${{base.task}}/{name}.py)"
            )
        return importlib.import_module(f"{type(self).__module__}.{name}")

    # ----------------------------------------------------------------------------- prepare and split
    def load_source(self, prep: PrepareParams) -> tuple[pd.DataFrame, str]:
        """prepare: the raw rows ``prepare.source`` names, and a description for the report."""
        return self.part("data").load_source(prep)

    def clean(self, raw: pd.DataFrame, prep: PrepareParams, seed: int) -> tuple[pd.DataFrame, dict]:
        """prepare: the cleaned, deduplicated frame, and the report of what was dropped."""
        return self.part("data").prepare_frame(raw, prep, seed)

    def label_map(self, frame: pd.DataFrame) -> dict[str, int]:
        """prepare: label (tag) name -> id, sorted for determinism (labels.json)."""
        raise NotImplementedError

    def token_lengths(self, tokenizer, frame: pd.DataFrame) -> np.ndarray:
        """prepare: each row's length in the model's tokens (with special tokens); here, of its ``text``."""
        return np.array([len(ids) for ids in tokenizer(frame["text"].tolist(), verbose=False)["input_ids"]])

    def prepare_summary(
        self, report: Mapping[str, Any], labels: Mapping[str, int], prep: PrepareParams
    ) -> str:
        """prepare: the task's part of the stage's one-line summary."""
        raise NotImplementedError

    def split(self, frame: pd.DataFrame, cfg: SplitParams, seed: int) -> dict[str, pd.DataFrame]:
        """split: the seeded train/val/test parts, checked for leakage."""
        return self.part("data").split_frame(frame, cfg, seed)

    def split_report(self, parts: Mapping[str, pd.DataFrame]) -> dict:
        """split: sizes and label counts per part, and ``warnings``."""
        return self.part("data").split_report(parts)

    # ------------------------------------------------------------------------ search, train, compress
    def head(self) -> type:
        """The transformers auto class of the model head (train, search, compress; models.load_model)."""
        raise NotImplementedError

    def dataset(
        self,
        tokenizer,
        frame: pd.DataFrame,
        label2id: Mapping[str, int],
        max_length: int,
        reading: Mapping[str, Any] | None = None,
        train: bool = False,
        seed: int = 0,
        params: Params | None = None,
    ):
        """search, train, compress: a split frame as a dataset for the one training loop. The dataset's
        ``compute_metrics(prediction)`` gives the val scores, among them ``selection_metric``; ``params``
        carry what a task's rows need beyond these (generation: its prompt template)."""
        return self.part("model").dataset(tokenizer, frame, label2id, max_length, reading, train, seed)

    def val_outputs(
        self, model, tokenizer, frame: pd.DataFrame, max_length: int, batch_size: int, desc=None
    ) -> Outputs:
        """compress: the model's logits on a split (a row per unit read), its scores there, and each row's
        prediction and truth (``Outputs``)."""
        return self.part("model").val_outputs(model, tokenizer, frame, max_length, batch_size, desc)

    def param_problems(self, params: Params) -> Iterator[tuple[str, str]]:
        """params: settings that make no sense for this task, each by its key (``Params.problems``): here,
        those that need what ``supports`` lacks, with the task's reason (``refusals``); a task adds its own."""
        space = params.search.space
        searched = (space["strategy"].choices or ()) if "strategy" in space else ()
        needs = {
            "augment": ("train.augment.copies", params.train.augment.copies > 0),
            "prompt_tuning": (
                "train.strategy",
                params.train.strategy == "prompt_tuning" or "prompt_tuning" in searched,
            ),
            "folds": ("search.folds", params.search.folds > 1),
        }
        for what, (key, used) in needs.items():
            if used and what not in self.supports:
                yield key, self.refusals[what]
        if params.export.registered_variant not in self.served_variants:
            yield (
                "export.registered_variant",
                f"'{params.export.registered_variant}' is not an export of a {self.name} model: use one of "
                + ", ".join(self.served_variants),
            )

    def warnings(self, params: Params) -> list[str]:
        """train: settings that work but are likely to disappoint with this task."""
        return []

    # -------------------------------------------------------------------------------------- evaluate
    def predict(
        self, model_dir: str, frame: pd.DataFrame, max_length: int, batch_size: int, desc=None
    ) -> Predictions:
        """evaluate: the trained model's predictions for each row of ``frame``."""
        return self.part("evaluation").predict(model_dir, frame, max_length, batch_size, desc)

    def fit_baseline(self, train: pd.DataFrame, params: Params, labels: list[str]) -> Baseline:
        """evaluate, analyze: the task's simple baseline, fit on the train split."""
        return self.part("evaluation").fit_baseline(train, params, labels)

    def score(self, frame: pd.DataFrame, pred: Predictions) -> dict[str, Any]:
        """evaluate: ``metrics`` (with ``macro_f1``, the selection metric), ``per_class`` and what the
        task's plots need."""
        return self.part("evaluation").score(frame, pred)

    def versus_baseline(
        self, frame: pd.DataFrame, model: Predictions, baseline: Predictions, seed: int
    ) -> dict:
        """evaluate: the paired model-minus-baseline differences, with bootstrap CIs and McNemar's test."""
        return self.part("evaluation").versus_baseline(frame, model, baseline, seed)

    def tables(
        self, frame: pd.DataFrame, model: Predictions, baseline: Predictions
    ) -> dict[str, pd.DataFrame]:
        """evaluate: ``predictions.csv``, ``baseline_predictions.csv`` and ``misclassified.csv``."""
        return self.part("evaluation").tables(frame, model, baseline)

    def plots(
        self, frame: pd.DataFrame, model: Predictions, baseline: Predictions, scores: Mapping[str, dict]
    ) -> tuple[dict[str, pd.DataFrame], dict[str, Any], dict[str, dict[str, float]]]:
        """evaluate: DVC plot tables (``plots/<path>.csv``), MLflow figures, and extra MLflow metrics."""
        return self.part("evaluation").plots(frame, model, baseline, scores)

    def test_counts(self, frame: pd.DataFrame, scores: Mapping[str, Any]) -> dict[str, int]:
        """evaluate: how many rows (and units) the test scores rest on, for the report."""
        return {"test_rows": len(frame)}

    def evaluate_summary(self, scores: Mapping[str, Any]) -> str:
        """evaluate: the stage's printed summary."""
        return self.part("evaluation").evaluate_summary(scores)

    # --------------------------------------------------------------------------------------- analyze
    def analysis_pass(
        self, model, tokenizer, frame: pd.DataFrame, max_length: int, batch_size: int, desc=None
    ) -> Pass:
        """analyze: the model on ``frame``, unit by unit (calibration's logits and labels), once."""
        return self.part("analysis").analysis_pass(model, tokenizer, frame, max_length, batch_size, desc)

    def robustness(self, analysis: Analysis) -> Part:
        """analyze: both predictors under ``analyze.robustness.perturbations`` (a ``robustness`` table,
        strength 0 the clean scores, and a ``fragile`` table of the rows whose prediction changes)."""
        return self.part("analysis").robustness(analysis)

    def slices(self, analysis: Analysis) -> Part:
        """analyze: both predictors' scores by length bucket and by class, with CIs."""
        return self.part("analysis").slices(analysis)

    def attack(self, analysis: Analysis) -> Part:
        """analyze (``"attack" in supports``): the fewest words deleted to flip a prediction."""
        return self.part("analysis").attack(analysis)

    def explain(self, analysis: Analysis) -> Part:
        """analyze (``"explain" in supports``): token attributions and their faithfulness."""
        return self.part("analysis").explain(analysis)

    # -------------------------------------------------------------------------------------- compress
    def compress(self, job: Compress) -> Compressed:
        """compress, where ``own_compression``: the task's variants, each judged on val and timed."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- export
    def export(self, job: Export) -> Exported:
        """export: the ONNX files in ``job.folder``, each checked against PyTorch on the test split (an
        fp32 export that drifts fails the stage), their latency, and the served variant's scores."""
        return self.part("export").export(job)

    def export_summary(self, report: Mapping[str, Any]) -> str:
        """export: the task's figures for the first line of the stage's summary (the stage adds the
        registered version and its aliases, and the gate's line)."""
        return self.part("export").export_summary(report)

    def describe(self, labels: list[str]) -> str:
        """export: what the model is, in a few words ("a 5-class text classifier (...)")."""
        raise NotImplementedError

    def model_card(self, params: Params, records: dict[str, Any], export: dict[str, Any]) -> str:
        """export: MODEL_CARD.md, from the earlier stages' records and the export report (its shared
        sections: ``lmpipe.serve.modelcard``)."""
        return self.part("export").model_card(params, records, export)

    # ----------------------------------------------------------------------- lmpipe compare, lmpipe splits
    def paired_rows(self, predictions: pd.DataFrame) -> pd.DataFrame:
        """compare: a ``predictions.csv`` as one row per example that is resampled and tested (``id``,
        ``actual``, ``predicted``); a text is its own row."""
        return predictions

    def bootstrap_scorer(
        self, truths: list[np.ndarray], preds: list[np.ndarray], classes: list[str], metrics
    ):
        """compare: ``score(i, weights)``, candidate ``i``'s ``metrics`` under each row of bootstrap
        ``weights`` (over ``paired_rows``), and the classes to report."""
        return self.part("evaluation").bootstrap_scorer(truths, preds, classes, metrics)

    def evaluate(self, model_dir: str, train: pd.DataFrame, test: pd.DataFrame, params: Params) -> Evaluation:
        """evaluate: the model and the baseline on the test split, their paired difference, the tables
        and the plots (computed here, recorded by the stage)."""
        seed = params.base.seed
        model = self.predict(model_dir, test, params.base.max_length, params.evaluate.batch_size, desc="test")
        baseline = self.fit_baseline(train, params, model.labels).predict(test)
        ours, theirs = self.score(test, model), self.score(test, baseline)
        scores = {
            "task": self.name,
            "model": ours["metrics"],
            "baseline": theirs["metrics"],
            "model_minus_baseline": self.versus_baseline(test, model, baseline, seed),
            **self.test_counts(test, ours),
        }
        plots, figures, logged = self.plots(test, model, baseline, {"model": ours, "baseline": theirs})
        return Evaluation(
            scores=scores,
            per_class={"model": ours["per_class"], "baseline": theirs["per_class"]},
            tables=self.tables(test, model, baseline),
            plots=plots,
            figures=figures,
            logged=logged,
        )
