"""The compress stage's variants, each built from the trained model and measured alike: the original,
int8 (dynamic quantization, keeping the most sensitive Linear layers fp32 within the budget), pruned
(the largest sparsity that fits the budget on val, recovered by fine-tuning) and a distilled student;
their test scores, sizes and latency, and their comparison table."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from lmpipe import data, latency, plots, tasks, tracking
from lmpipe.compress import compression
from lmpipe.modeling import models
from lmpipe.modeling.training import TrainResult, train_model
from lmpipe.params import Params, TrainParams
from lmpipe.tasks.base import Outputs


@dataclass
class Inputs:
    """What every variant is built from and measured on."""

    params: Params
    model_dir: Path
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    tokenizer: Any
    label2id: dict[str, int]
    source: dict[str, str]  # the original's path and weights hash, recorded with the int8 recipe
    reference: dict[str, Outputs] = dataclasses.field(default_factory=dict)  # the original's, by split
    bootstrap_seconds: float = 0.0  # what the losses' bootstraps (bounds, CIs) have cost so far

    @property
    def task(self):
        return tasks.get(self.params.base.task)

    def reference_outputs(self, split: str) -> Outputs:
        """The trained model's outputs on ``split``: what every loss is measured against (computed once)."""
        if split not in self.reference:
            model = models.load_model(self.model_dir).to(models.device())
            self.reference[split] = self.outputs(model, split, "original")
        return self.reference[split]

    def datasets(self, max_train_samples: int | None = None):
        base = self.params.base
        train = data.stratified_sample(self.train, max_train_samples, base.seed)
        reading = base.reading.as_dict()
        return (
            self.task.dataset(
                self.tokenizer, train, self.label2id, base.max_length, reading, True, base.seed
            ),
            self.task.dataset(self.tokenizer, self.val, self.label2id, base.max_length, reading),
        )

    def outputs(self, model: nn.Module, split: str, desc: str) -> Outputs:
        """The model's logits on the val or test split through the one inference loop (a row per text; per
        word read, for token classification), its scores there (``macro_f1`` the task's headline), and
        each row's prediction and truth (``Outputs``)."""
        frame = {"val": self.val, "test": self.test}[split]
        base, batch_size = self.params.base, self.params.train.eval_batch_size
        return self.task.val_outputs(
            model, self.tokenizer, frame, base.max_length, batch_size, desc=f"{desc} ({split})"
        )

    def loss(self, split: str, candidate: Outputs) -> dict[str, Any]:
        """``candidate``'s macro-F1 loss against the trained model on ``split`` (original minus candidate:
        negative = it did better), with its paired bootstrap over the split's rows: the one-sided upper
        bound at ``compress.confidence`` and the 95% CI (``compression.paired_loss``). On val, with
        ``compress.bound: prediction``, the bound is on the loss a new split of the test split's size
        will show."""
        reference, cfg = self.reference_outputs(split), self.params.compress
        loss = float(reference.scores["macro_f1"] - candidate.scores["macro_f1"])
        classes = sorted(set(reference.truth) | set(reference.predicted) | set(candidate.predicted))
        code = {c: i for i, c in enumerate(classes)}
        truth = np.array([code[t] for t in reference.truth])
        preds = [np.array([code[p] for p in o.predicted]) for o in (reference, candidate)]
        start = time.perf_counter()
        score, _ = self.task.bootstrap_scorer([truth, truth], preds, classes, ["macro_f1"])
        paired = compression.paired_loss(
            lambda w: score(0, w)["macro_f1"] - score(1, w)["macro_f1"],
            len(truth),
            cfg.resamples,
            self.params.base.seed,
            cfg.confidence,
            cfg.future_rows(len(self.test)) if split == "val" else None,
        )
        self.bootstrap_seconds += time.perf_counter() - start
        return {"loss": loss, **paired}

    def judge_val(self, model: nn.Module, desc: str, budget: float) -> ValScore:
        """What every budget decision is made on: the model's val macro-F1 (entity macro-F1, for token
        classification), its loss against the trained model and that loss's bound, and the rule's verdict
        (``compression.within``)."""
        outputs = self.outputs(model, "val", desc)
        loss = self.loss("val", outputs)
        within = compression.within(loss["loss"], loss["bound"], budget)
        return ValScore(float(outputs.scores["macro_f1"]), loss["loss"], loss["bound"], within, outputs)


@dataclass
class ValScore:
    """A model judged on val: its macro-F1, its loss against the trained model (point, and the upper
    bound at ``compress.confidence``, None without one) and whether that is within its budget."""

    f1: float
    loss: float
    bound: float | None
    within: bool
    outputs: Outputs


@dataclass
class Variant:
    """A measured model: its test scores and sizes (``row``), the model on the CPU for timing, its run."""

    row: dict[str, Any]
    model: nn.Module
    run_id: str = ""
    warnings: list[str] = dataclasses.field(default_factory=list)  # budget misses, printed and logged
    val: ValScore | None = None  # judged on val (the budget's evidence)
    test: Outputs | None = None  # scored on test (reported, never used to choose)


CURVE_COLUMNS = ["sparsity", "recovered", "val_macro_f1", "val_f1_loss", "val_f1_loss_bound", "within_budget"]


def curve_point(sparsity: float, recovered: bool, judged: ValScore) -> dict:
    """One point of the pruning curve (a row of ``CURVE_COLUMNS``)."""
    values = (sparsity, recovered, judged.f1, judged.loss, judged.bound, judged.within)
    return dict(zip(CURVE_COLUMNS, values, strict=True))


def judge(inputs: Inputs, name: str, variant: Variant) -> None:
    """The variant's val loss against the original (point and bound), its budget and the rule's flag,
    and its test loss with the 95% CI (reported beside, so that a user sees when val and test disagree),
    in its row; a miss warns."""
    cfg = inputs.params.compress
    budget, val = cfg.budget(name), variant.val
    test = inputs.loss("test", variant.test)
    variant.row.update(
        val_f1_loss=val.loss,
        val_f1_loss_bound=val.bound,
        max_loss=budget,
        within_budget=val.within,
        test_f1_loss=test["loss"],
        test_f1_loss_ci95=test["ci95"],
    )
    tracking.log_metrics({"within_budget": int(val.within)})  # the row's numbers reach the run with the row
    tracking.set_tags({"within_budget": str(val.within).lower()})
    if not val.within:
        evidence = (
            f"its {100 * cfg.confidence:g}% upper bound {100 * val.bound:.2f} pt"
            if val.bound is not None
            else f"{100 * val.loss:.2f} pt"
        )
        variant.warnings.append(
            f"{name} loses {100 * val.loss:.2f} pt of val macro-F1 ({evidence}), over its budget of "
            f"{100 * budget:g} pt (flagged within_budget: false; export refuses it unless "
            "export.allow_over_budget names it)"
        )


def child_run(params: Params, name: str, section: dict):
    return tracking.child_run(
        params, name, {"variant": name, **section}, "compress-variant", {"variant": name}
    )


def variant_params(params: Params, name: str) -> dict[str, Any]:
    """The params a variant's child run logs: its own section (and its fine-tune's settings)."""
    cfg = params.compress
    if name == "original":
        return {}
    if name == "int8":
        return dataclasses.asdict(cfg.quantize)
    if name == "pruned":
        section: dict[str, Any] = {"prune": dataclasses.asdict(cfg.prune)}
        if cfg.prune.recovery_epochs:
            section["train"] = dataclasses.asdict(recovery_params(params))
        return section
    return {"distill": dataclasses.asdict(cfg.distill), "train": dataclasses.asdict(student_params(params))}


def plain_train(params: Params) -> TrainParams:
    """The recovery and distillation fine-tunes train every weight of their model, whatever
    train.strategy says (a LoRA wrapper or a frozen encoder would undo pruning or starve the student)."""
    return dataclasses.replace(params.train, strategy="full", fgm_epsilon=0.0)


def recovery_params(params: Params) -> TrainParams:
    p = params.compress.prune
    return dataclasses.replace(
        plain_train(params), epochs=max(p.recovery_epochs, 1), learning_rate=p.learning_rate
    )


def student_params(params: Params) -> TrainParams:
    d = params.compress.distill
    return dataclasses.replace(plain_train(params), epochs=d.epochs, learning_rate=d.learning_rate)


def measure(
    inputs: Inputs, model: nn.Module, folder: Path, desc: str, val: ValScore, test: Outputs | None = None
) -> tuple[dict[str, Any], Outputs]:
    """Test accuracy and macro-F1 (reported, never used to choose), val macro-F1 (what the budget is
    judged on: ``val``), weight size and parameters; and the test outputs (``test`` when already known)."""
    test = test or inputs.outputs(model, "test", desc)
    return {
        "accuracy": test.scores["accuracy"],
        "macro_f1": test.scores["macro_f1"],
        "val_f1": val.f1,  # val macro-F1 (not val_macro_f1: a fine-tune logs that per epoch)
        "size_mb": compression.weights_bytes(folder) / 2**20,
        "layers": model.config.num_hidden_layers,
        **compression.parameter_counts(model),
    }, test


def log_training(result: TrainResult) -> None:
    tracking.log_metrics(result.summary())
    fig = plots.history_figure(result.history)
    tracking.log_figure(fig, "plots/history.png")
    plots.close(fig)


def original(inputs: Inputs, folder: Path) -> Variant:
    """The trained model itself, scored the same way as the variants (nothing is written to ``folder``)."""
    model = models.load_model(inputs.model_dir).to(models.device())
    reference = inputs.reference_outputs("val")
    val = ValScore(float(reference.scores["macro_f1"]), 0.0, None, True, reference)
    row, test = measure(inputs, model, inputs.model_dir, "original", val, inputs.reference_outputs("test"))
    row["val_f1_loss"] = 0.0
    return Variant(row, model.cpu().eval(), val=val, test=test)


def quantized(inputs: Inputs, folder: Path) -> Variant:
    """Dynamic int8 of every Linear layer. When that breaks the budget on val, the Linear layers whose
    int8 version moves the val predictions most (one layer quantized at a time, KL to the fp32 outputs)
    stay fp32: 1, 2, 4, ... of them, up to ``quantize.max_fp32_layers``, until the loss fits. Measured as
    reloaded from what was saved."""
    cfg = inputs.params.compress
    fp32 = models.load_model(inputs.model_dir).cpu().eval()
    budget = cfg.budget("int8")
    fp32_layers: list[str] = []
    chosen = compression.quantize_dynamic_int8(fp32)
    judged = inputs.judge_val(chosen, "int8", budget)
    trials = [{"fp32_layers": 0, "val_macro_f1": judged.f1, "val_f1_loss_bound": judged.bound}]
    sensitivity: list[dict[str, Any]] = []
    steps = compression.fp32_steps(cfg.quantize.max_fp32_layers, len(compression.linear_names(fp32)))
    if not judged.within and steps:
        sensitivity = int8_sensitivity(inputs, fp32)
        ranked = [s["layer"] for s in sensitivity]
        for k in steps:
            fp32_layers = ranked[:k]
            chosen = compression.quantize_dynamic_int8(fp32, fp32_layers)
            judged = inputs.judge_val(chosen, f"int8, {k} fp32", budget)
            trials.append({"fp32_layers": k, "val_macro_f1": judged.f1, "val_f1_loss_bound": judged.bound})
            if judged.within:
                break
    compression.save_int8(chosen, inputs.tokenizer, folder, inputs.source)
    model = compression.load_int8(folder)
    tracking.log_artifact(folder / compression.INT8_RECIPE)
    row, test = measure(inputs, model, folder, "int8", judged)
    row.update(fp32_layer_count=len(fp32_layers), fp32_layers=fp32_layers, fp32_trials=trials)
    if sensitivity:
        row["sensitivity"] = sensitivity[: max(cfg.quantize.max_fp32_layers, 1)]
        tracking.log_dict(sensitivity, "int8_sensitivity.json")
    return Variant(row, model, val=judged, test=test)


def int8_sensitivity(inputs: Inputs, fp32: nn.Module) -> list[dict[str, Any]]:
    """Each Linear layer quantized alone, ranked by how far it moves the val outputs (mean KL of the
    softmax against fp32's): the most sensitive first."""
    reference = inputs.outputs(fp32, "val", "sensitivity: fp32").logits
    scores, layers = [], compression.linear_names(fp32)
    for name in tqdm(layers, desc="int8 sensitivity", unit="layer"):
        others = [n for n in layers if n != name]
        alone = compression.quantize_dynamic_int8(fp32, others)
        logits = inputs.outputs(alone, "val", name).logits
        scores.append({"layer": name, "val_kl": compression.mean_kl(reference, logits)})
    return sorted(scores, key=lambda s: -s["val_kl"])


def fine_tunes(inputs: Inputs) -> None:
    """What a rank other than 0 runs: the variants' fine-tunes, in the order rank 0 runs them (the pruning
    plan is scored on val on every rank alike, so all ranks agree on whether to fine-tune)."""
    cfg = inputs.params.compress
    if cfg.prune.enabled:
        plan = plan_pruning(inputs)
        if plan.recover:
            prune_and_recover(inputs, plan.sparsity, recover=True)
    if cfg.distill.enabled:
        distill(inputs)


@dataclass
class PrunePlan:
    """The val curve of magnitude pruning without recovery, and what to build: ``sparsity``, fine-tuned
    or not; ``fallback`` is the no-recovery choice kept if an ``auto`` recovery still misses the budget."""

    judged: dict[float, ValScore]  # each sparsity scored without recovery (the curve's points)
    curve: list[dict[str, Any]]
    sparsity: float
    recover: bool
    chosen_by: str
    fallback: float | None = None
    fallback_chosen_by: str = ""  # why the fallback, when it is kept


def plan_pruning(inputs: Inputs) -> PrunePlan:
    """Score every grid sparsity (and a user's target) on val without recovery, then decide:

    * a target ``prune.sparsity`` is honoured; ``auto`` fine-tunes it only if it misses the budget;
    * otherwise the largest grid sparsity within the budget is chosen; ``auto`` then tries the next one up
      the grid once, if it loses at most ``RECOVERABLE`` budgets without recovery, with one bounded
      recovery fine-tune (``recovery_epochs`` on at most ``recovery_max_train_samples`` rows), and keeps
      it only if it then fits;
    * ``always`` fine-tunes the chosen sparsity; ``never`` never fine-tunes.
    """
    p, budget = inputs.params.compress.prune, inputs.params.compress.budget("pruned")
    models.seed_everything(inputs.params.base.seed)
    model = models.load_model(inputs.model_dir).to(models.device())
    judged: dict[float, ValScore] = {}
    curve: list[dict[str, Any]] = []

    def score(sparsity: float) -> None:
        pruned_copy = copy.deepcopy(model)
        compression.magnitude_prune(pruned_copy, sparsity)
        judged[sparsity] = inputs.judge_val(pruned_copy, f"sparsity {sparsity:g}", budget)
        curve.append(curve_point(sparsity, False, judged[sparsity]))

    # up the grid, stopping after two misses in a row: the pruned sets are nested (a larger sparsity
    # zeroes a superset of the weights), so the loss rarely comes back, and each point is a val pass
    for sparsity in sorted(p.grid):
        score(sparsity)
        if len(curve) >= 2 and not (curve[-1]["within_budget"] or curve[-2]["within_budget"]):
            break
    if p.sparsity is not None and p.sparsity not in [c["sparsity"] for c in curve]:
        score(p.sparsity)
    curve.sort(key=lambda c: c["sparsity"])
    if p.sparsity is not None:
        target = next(c for c in curve if c["sparsity"] == p.sparsity)
        recover = p.recovery == "always" or (p.recovery == "auto" and not target["within_budget"])
        return PrunePlan(judged, curve, p.sparsity, recover, "prune.sparsity, set by the user")
    best = compression.largest_fitting(
        [c for c in curve if c["sparsity"] in p.grid]
    )  # (a target is not a choice)
    chosen = best["sparsity"] if best else min(p.grid)
    how = "largest grid sparsity within the budget on val" if best else "no grid sparsity fits: the smallest"
    if p.recovery == "always":
        return PrunePlan(judged, curve, chosen, True, f"{how}, then fine-tuned")
    up = compression.next_up(p.grid, best["sparsity"] if best else None)
    point = next((c for c in curve if c["sparsity"] == up), None)
    if p.recovery == "auto" and point is not None and point["val_f1_loss"] <= RECOVERABLE * budget:
        missed = f"{how} (a recovery fine-tune at {up:g} missed)"
        how = (
            "next grid sparsity up, after a recovery fine-tune"
            if best
            else f"{how}, after a recovery fine-tune"
        )
        return PrunePlan(judged, curve, up, True, how, chosen, missed)
    if p.recovery == "auto" and point is not None:
        how += f" (no recovery tried: {up:g} loses more than {RECOVERABLE:g}x the budget without one)"
    return PrunePlan(judged, curve, chosen, False, how)


# auto recovery is tried only where the loss without it is at most this many budgets: a short, bounded
# fine-tune won back nothing measurable (docs/figures.md#the-quality-budget: BBC at 0.6, 2.05 pt lost
# before and 2.53 after; BBC titles at 0.4, 2.45 before, 3.77 after, 2.42 with the whole train split)
RECOVERABLE = 2.0


def prune_and_recover(inputs: Inputs, sparsity: float, recover: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The model pruned to ``sparsity``, after its recovery fine-tune if asked, and what to report."""
    params, p = inputs.params, inputs.params.compress.prune
    models.seed_everything(params.base.seed)
    model = models.load_model(inputs.model_dir).to(models.device())
    keep = compression.magnitude_prune(model, sparsity)
    extra: dict[str, Any] = {
        "sparsity_after_pruning": compression.sparsity_of(model),
        "recovery_epochs_run": 0,
    }
    if recover:
        train_set, val_set = inputs.datasets(p.recovery_max_train_samples)
        result = train_model(
            model,
            inputs.tokenizer,
            train_set,
            val_set,
            recovery_params(params),
            params.base.seed,
            callbacks=[compression.KeepPruned(model, keep), tracking.MlflowTrainingLogger()],
        )
        log_training(result)
        extra["recovery_epochs_run"] = result.epochs_run
    return model, extra


def pruned(inputs: Inputs, folder: Path) -> Variant:
    """Global magnitude pruning of the encoder's Linear weights at the sparsity ``plan_pruning`` picks,
    with a recovery fine-tune (pruned weights kept at zero) when the plan asks for one."""
    plan = plan_pruning(inputs)
    budget = inputs.params.compress.budget("pruned")
    model, extra = prune_and_recover(inputs, plan.sparsity, plan.recover)
    sparsity, chosen_by = plan.sparsity, plan.chosen_by
    # without recovery the model is the one the plan scored (pruning is deterministic): its val judgement
    judged = plan.judged[sparsity]
    if plan.recover:
        judged = inputs.judge_val(model, f"sparsity {sparsity:g}, recovered", budget)
        plan.curve.append(curve_point(sparsity, True, judged))
        if not judged.within and plan.fallback is not None:  # the fine-tune did not earn the higher sparsity
            sparsity, chosen_by = plan.fallback, plan.fallback_chosen_by
            model, extra = prune_and_recover(inputs, sparsity, recover=False)
            extra["recovery_tried_at"] = plan.sparsity
            judged = plan.judged[sparsity]
    tracking.log_metrics(
        {f"val_macro_f1_at_{c['sparsity']:g}": c["val_macro_f1"] for c in plan.curve if not c["recovered"]}
    )
    models.write_model(model, inputs.tokenizer, folder)
    model = models.load_model(folder).to(models.device()).eval()
    row, test = measure(inputs, model, folder, "pruned", judged)
    row.update(
        sparsity=sparsity,
        chosen_by=chosen_by,
        target_sparsity=inputs.params.compress.prune.sparsity,
        measured_sparsity=compression.sparsity_of(model),
        curve=plan.curve,
        **extra,
    )
    return Variant(row, model.cpu(), val=judged, test=test)


def distill(inputs: Inputs) -> tuple[nn.Module, TrainResult]:
    """A shallower student that keeps some of the teacher's layers, distilled in the shared loop (which
    keeps the best val epoch)."""
    params, d = inputs.params, inputs.params.compress.distill
    models.seed_everything(params.base.seed)
    teacher = models.load_model(inputs.model_dir).to(models.device())
    model = compression.make_student(teacher, d.keep_layers)
    tracking.log_metrics({"student_parameters": compression.parameter_counts(model)["parameters"]})
    loss = compression.DistillationLoss(teacher, model, d.temperature, d.alpha)
    train_set, val_set = inputs.datasets()
    try:
        result = train_model(
            model,
            inputs.tokenizer,
            train_set,
            val_set,
            student_params(params),
            params.base.seed,
            callbacks=[tracking.MlflowTrainingLogger()],
            compute_loss=loss,
        )
    finally:
        loss.close()
    log_training(result)
    return model, result


def student(inputs: Inputs, folder: Path) -> Variant:
    """The distilled student (``distill``), written and measured."""
    model, result = distill(inputs)
    models.write_model(model, inputs.tokenizer, folder)
    tracking.log_artifact(folder, "model")
    model = models.load_model(folder).to(models.device()).eval()
    judged = inputs.judge_val(model, "student", inputs.params.compress.budget("student"))
    row, test = measure(inputs, model, folder, "student", judged)
    row.update(
        kept_layers=",".join(map(str, model.config.distilled_from_layers)),
        best_val_macro_f1=result.best_val_macro_f1,
        best_epoch=result.best_epoch,
    )
    return Variant(row, model.cpu(), val=judged, test=test)


def time_variants(inputs: Inputs, variants: dict[str, Variant]) -> dict[str, Any]:
    """CPU latency of every variant, in the same interleaved rounds, at batch 1 and the larger batch: wall
    p50/p95 and CPU cost per call into each row. Returns the busy check's verdict (``latency.reliability``);
    a disturbed timing on more than one thread measures the CPU cost again on one (as export does:
    ``onnx_export.latency_benchmark``)."""
    lat, max_length = inputs.params.compress.latency, inputs.params.base.max_length
    texts = inputs.test["text"].tolist()
    loaded = {name: v.model for name, v in variants.items()}
    cases = [(1, lat.repeats), (lat.batch_size, lat.batch_repeats)]
    batches = {n: compression.fixed_batch(inputs.tokenizer, texts, n, max_length) for n, _ in cases}

    def timed(threads: int, cpu_only: bool) -> list:
        shares = []
        for n, repeats in cases:
            desc = f"cpu cost, 1 thread, batch {n}" if cpu_only else f"latency batch {n}"
            measured = compression.time_models(loaded, batches[n], lat.warmup, repeats, threads, desc)
            for name in loaded:
                row = measured.summary(name, n)
                variants[name].row.update({f"cpu_b{n}_ms": row[f"cpu_b{n}_ms"]} if cpu_only else row)
            shares += measured.other_load.values()
        return shares

    shares = timed(lat.threads, cpu_only=False)
    return latency.reliability(
        shares, lat.max_other_load, "compress", lat.threads, lambda: timed(1, cpu_only=True)
    )


def comparison(
    variants: dict[str, Variant], batch_size: int, basis: str = "wall"
) -> dict[str, dict[str, Any]]:
    """Each variant's row with its change against the original: scores, size ratio, and speed-ups from
    wall-clock p50 (``wall_speedup_b<n>``) and from CPU cost per call (``cpu_speedup_b<n>``), of which
    ``basis`` gives ``speedup_b<n>`` (cpu when the timing was disturbed: ``latency.reliability``)."""
    first = variants["original"].row
    rows = {}
    for name, variant in variants.items():
        row = dict(variant.row)
        row["size_mb"] = round(row["size_mb"], 3)
        row["delta_accuracy"] = row["accuracy"] - first["accuracy"]
        row["delta_macro_f1"] = row["macro_f1"] - first["macro_f1"]
        for n in (1, batch_size):
            row[f"wall_speedup_b{n}"] = latency.speedup(first, row, n, "wall")
            row[f"cpu_speedup_b{n}"] = latency.speedup(first, row, n, "cpu")
            row[f"speedup_b{n}"] = row[f"{basis}_speedup_b{n}"]
        row["size_ratio"] = round(row["size_mb"] / round(first["size_mb"], 3), 3)
        row["mlflow_run_id"] = variant.run_id
        rows[name] = row
    return rows
