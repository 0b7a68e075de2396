"""The one training loop of the pipeline, shared by train, search and distillation.

It is the transformers ``Trainer``: AdamW with decoupled weight decay, linear warmup then linear decay,
gradient clipping, evaluation of val macro-F1 after every epoch, early stopping with a patience, and
the best epoch's weights restored at the end. Callers add behaviour through ``callbacks`` (MLflow
logging, pruning) and ``compute_loss`` (a different loss, e.g. distillation), never by copying it.

``cfg.strategy`` and its options (``strategies.py``) are applied here, around the same loop: freezing
(linear probe), peft adapters (lora), phases with their own rates as one Trainer run with a per-group
schedule (gradual unfreezing), FGM in ``training_step``, label smoothing and a dropout override.
With ``checkpoint_dir`` the run checkpoints there every epoch and resumes from the newest complete
checkpoint it finds (``checkpoints.py``).

Under torchrun (``distributed.py``) the same loop trains with DDP: ``cfg.batch_size`` is per process,
each process sees its shard of train, and evaluation gathers every process's predictions, so the val
metrics (and ``rows``, the count they were computed on) cover all of val on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lmpipe import distributed
from lmpipe.metrics import classification_metrics
from lmpipe.modeling import checkpoints, strategies
from lmpipe.modeling.encoding import set_model_reading
from lmpipe.modeling.models import precision_flags, seed_everything
from lmpipe.params import TrainParams

SELECTION_METRIC = "macro_f1"


def eval_metrics(prediction, val_set: Any = None) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: the val set's own (``compute_metrics(prediction)``, which a
    task's dataset may define: ``Task.dataset``), else accuracy and macro-F1 from one label per row. When
    ``val_set`` holds windows (``base.reading.mode: windows``), its windows' logits are pooled into its
    texts' first. Either way ``macro_f1`` is the selection metric."""
    if hasattr(val_set, "compute_metrics"):
        return val_set.compute_metrics(prediction)
    logits = np.asarray(
        prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    )
    y_true = np.asarray(prediction.label_ids)
    if getattr(val_set, "windowed", False):
        logits, y_true = val_set.pool(logits), np.asarray(val_set.labels)
    y_pred = logits.argmax(axis=-1)
    metrics = classification_metrics(y_true, y_pred)
    # rows: how many val predictions were scored (all of val, also when several processes share it)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "rows": len(y_pred)}


@dataclass
class TrainResult:
    best_val_score: float  # the best epoch's val ``selection_metric``
    best_epoch: int
    epochs_run: int
    global_steps: int
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    # the trained module (a peft wrapper for lora: see strategies.finalize_model), the trainable
    # parameter count (of the last phase), per-phase summaries, and the step a resumed run started from
    model: Any = None
    trainable_parameters: int = 0
    phases: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0
    # processes that trained together (DDP), and the examples per optimiser step over all of them:
    # processes x batch_size x gradient_accumulation_steps
    processes: int = 1
    global_batch_size: int = 0
    selection_metric: str = (
        SELECTION_METRIC  # the val score that picked the best epoch (Task.selection_metric)
    )

    @property
    def best_val_macro_f1(self) -> float:
        return self.best_val_score if self.selection_metric == SELECTION_METRIC else float("nan")

    def summary(self) -> dict[str, float | int]:
        return {
            f"best_val_{self.selection_metric}": self.best_val_score,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "global_steps": self.global_steps,
            "train_seconds": round(self.train_seconds, 1),
            "processes": self.processes,
            "global_batch_size": self.global_batch_size,
        }


def history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One row per epoch from the Trainer's log history (which a resumed run restores from its
    checkpoint): the mean train loss logged since the previous eval, and the val metrics."""
    rows: list[dict[str, float]] = []
    losses: list[float] = []
    for entry in log_history:
        if "loss" in entry:
            losses.append(float(entry["loss"]))
        if not any(k.startswith("eval_") for k in entry):
            continue
        row = {"epoch": round(entry.get("epoch") or 0), "step": int(entry.get("step", 0))}
        if losses:
            row["train_loss"] = float(np.mean(losses))
        losses = []
        for key in sorted(entry, key=lambda k: (k != "eval_loss", k)):  # val_loss first, then a-z
            if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second", "_rows")):
                row[key.replace("eval_", "val_")] = float(entry[key])
        rows.append(row)
    return rows


class _NanGuard(TrainerCallback):
    """Stops with a clear error as soon as the logged training loss is not finite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
            raise FloatingPointError(f"training loss became {logs['loss']} at step {state.global_step}")


class _PhaseSwitch(TrainerCallback):
    """Gradual unfreezing: before each optimiser step, make the current phase's weights trainable."""

    def __init__(self, plan: strategies.PhasePlan, parts: strategies.Anatomy):
        self.plan, self.parts, self.current = plan, parts, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        phase = self.plan.phase_at(state.global_step)
        if phase != self.current and model is not None:
            strategies.set_trainable(
                model, strategies.trainable_names(self.parts, self.plan.phases[phase].layers)
            )
            self.current = phase


class _LastPhaseEarlyStopping(EarlyStoppingCallback):
    """Early stopping that only counts evaluations from ``start_epoch`` on (the last phase's)."""

    def __init__(self, patience: int, start_epoch: int):
        super().__init__(early_stopping_patience=patience)
        self.start_epoch = start_epoch

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        if round(state.epoch or 0) > self.start_epoch:
            super().on_evaluate(args, state, control, metrics, **kwargs)


class _StrategyTrainer(Trainer):
    """The Trainer, plus a per-phase optimiser and schedule (gradual unfreezing) and FGM."""

    def __init__(self, *args, plan=None, parts=None, fgm_epsilon: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan, self.parts = plan, parts
        self.fgm = strategies.FGM(self.model, fgm_epsilon) if fgm_epsilon > 0 else None

    def create_optimizer(self, model=None):
        if self.plan is None:
            return super().create_optimizer(model)
        if self.optimizer is None:
            target = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(target))
            self.optimizer = strategies.phase_optimizer(target, self.parts, decay, self.args.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.plan is None:
            return super().create_scheduler(num_training_steps, optimizer)
        expected = self.plan.total_epochs * self.plan.steps_per_epoch
        if num_training_steps != expected:  # a bug in the step arithmetic, not a user error
            raise RuntimeError(f"phase plan expects {expected} steps, the Trainer plans {num_training_steps}")
        if self.lr_scheduler is None:
            self.lr_scheduler = strategies.phase_scheduler(optimizer or self.optimizer, self.plan)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.fgm is None:
            return super().training_step(model, inputs, num_items_in_batch)
        with self.fgm.capture():  # the clean pass keeps d(loss)/d(word embeddings)
            loss = super().training_step(model, dict(inputs), num_items_in_batch)
        delta = self.fgm.delta()
        if delta is not None:  # the adversarial pass adds its gradient to the clean one
            adv_inputs = self._prepare_inputs(dict(inputs))
            with self.fgm.perturb(delta), self.compute_loss_context_manager():
                adv_loss = self.compute_loss(model, adv_inputs, num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                adv_loss = adv_loss.mean()
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (
                    self.model_accepts_loss_kwargs and num_items_in_batch is not None
                ) or self.compute_loss_func is not None
            if not scaled:
                adv_loss = adv_loss / self.current_gradient_accumulation_steps
            self.accelerator.backward(adv_loss)
        return loss


def selection_metric(val_set: Any) -> str:
    """The val score that picks the best epoch: the val set's (its task's ``selection_metric``), else
    macro-F1."""
    return getattr(val_set, "selection_metric", SELECTION_METRIC)


def steps_per_epoch(n_rows: int, batch_size: int, accumulation: int) -> int:
    """Optimiser steps per epoch, as the Trainer counts them (the last partial batch included)."""
    batches = math.ceil(n_rows / batch_size)
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def train_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_set: torch.utils.data.Dataset,
    val_set: torch.utils.data.Dataset,
    cfg: TrainParams,
    seed: int,
    callbacks: Sequence[TrainerCallback] = (),
    compute_loss: Callable | None = None,
    show_progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Fine-tune ``model`` with ``cfg.strategy`` and leave the best epoch's weights in it (by val
    macro-F1). ``result.model`` is the module that was trained: ``model`` itself, or its peft wrapper
    for lora (``strategies.finalize_model`` turns that into a plain model to save).

    Without ``checkpoint_dir``, checkpoints live in a temporary folder that is deleted afterwards: the
    caller saves the final model once, so MLflow and DVC never see intermediate checkpoints. With it,
    full checkpoints (optimizer, scheduler, RNG states) are kept there and a re-run resumes from the
    newest complete one; the caller deletes the folder when it has saved the result.
    """
    seed_everything(seed)
    metric = selection_metric(val_set)
    # the model reads texts as train_set does; saved in its config, so every later consumer reads alike
    set_model_reading(model, getattr(train_set, "reading", None))
    model = strategies.prepare_model(model, cfg)
    plan = parts = None
    epochs, phase_counts = cfg.planned_epochs, []
    if cfg.strategy == "gradual_unfreezing":
        parts = strategies.anatomy(model)
        for phase in cfg.phases:
            phase_counts.append(
                strategies.set_trainable(model, strategies.trainable_names(parts, phase.layers))
            )
        strategies.set_trainable(model, strategies.trainable_names(parts, cfg.phases[0].layers))
    extra: list[TrainerCallback] = [_NanGuard(), *callbacks]
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        resume = checkpoints.latest(checkpoint_dir)
        folder = contextlib.nullcontext(str(checkpoint_dir))
    else:
        resume = None
        folder = tempfile.TemporaryDirectory(prefix="lmpipe-ckpt-")
    with folder as ckpt_dir:
        args = TrainingArguments(
            output_dir=ckpt_dir,
            num_train_epochs=epochs,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            learning_rate=cfg.peak_learning_rate,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            lr_scheduler_type="linear",
            optim="adamw_torch",
            max_grad_norm=cfg.max_grad_norm,
            label_smoothing_factor=cfg.label_smoothing,
            eval_strategy="epoch",
            save_strategy="epoch",
            save_total_limit=1,  # plus the best one, which load_best_model_at_end always keeps
            save_only_model=checkpoint_dir is None,  # resuming needs the optimizer, scheduler and RNGs
            load_best_model_at_end=True,
            metric_for_best_model=metric,
            greater_is_better=True,
            logging_strategy="steps",
            logging_steps=cfg.logging_steps,
            logging_first_step=True,
            seed=seed,
            data_seed=seed,
            report_to="none",
            disable_tqdm=not show_progress,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            ddp_backend=distributed.backend() if distributed.under_launcher() else None,
            # several machines need their own copy of each checkpoint, to load the best and to resume
            save_on_each_node=distributed.world_size() > int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            **precision_flags(cfg.precision),
        )
        if parts is not None:
            spe = steps_per_epoch(len(train_set), args.train_batch_size, cfg.gradient_accumulation_steps)
            plan = strategies.PhasePlan(list(cfg.phases), spe, cfg.warmup_ratio)
            extra.append(_PhaseSwitch(plan, parts))
        if cfg.patience > 0:
            start = plan.start_epochs[-1] if plan is not None else 0
            extra.append(_LastPhaseEarlyStopping(cfg.patience, start))
        trainer = _StrategyTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            processing_class=tokenizer,
            data_collator=train_set.collator(tokenizer),
            compute_metrics=functools.partial(eval_metrics, val_set=val_set),
            compute_loss_func=compute_loss,
            # a val set whose scores need no logits (a causal LM's are [rows, tokens, vocabulary]) keeps less
            preprocess_logits_for_metrics=getattr(val_set, "preprocess_logits", None),
            callbacks=extra,
            plan=plan,
            parts=parts,
            fgm_epsilon=cfg.fgm_epsilon,
        )
        if hasattr(val_set, "bind"):  # a val set that scores by generating needs the model being trained
            val_set.bind(trainer.model)
        start = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        seconds = time.perf_counter() - start
        state = trainer.state
    rows = history_rows(state.log_history)
    if plan is not None:
        for row in rows:
            row["phase"] = plan.phase_of_epoch(int(row["epoch"]))
    best = max(rows, key=lambda r: r.get(f"val_{metric}", -1.0)) if rows else {}
    phases = []
    if plan is not None:
        for i, phase in enumerate(plan.phases):
            done = [r for r in rows if r["phase"] == i]
            phases.append(
                {
                    "phase": i,
                    "layers": phase.layers,
                    "epochs": len(done),
                    "learning_rate": phase.learning_rate,
                    "trainable_parameters": phase_counts[i],
                    "best_val_macro_f1": max(
                        (r.get("val_macro_f1", float("nan")) for r in done), default=float("nan")
                    ),
                    "end_step": max((int(r["step"]) for r in done), default=0),
                }
            )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainResult(
        best_val_score=float(best.get(f"val_{metric}", float("nan"))),
        best_epoch=int(best.get("epoch", 0)),
        epochs_run=len(rows),
        global_steps=int(output.global_step or state.global_step),
        train_seconds=seconds,
        history=rows,
        model=model,
        trainable_parameters=phase_counts[-1] if phase_counts else trainable,
        phases=phases,
        resumed_from_step=checkpoints.step_of(resume),
        processes=args.world_size,
        global_batch_size=args.train_batch_size * args.world_size * cfg.gradient_accumulation_steps,
        selection_metric=metric,
    )
