"""The one training loop of the pipeline, shared by train (and later search and distillation).

It is the transformers ``Trainer``: AdamW with decoupled weight decay, linear warmup then linear decay,
gradient clipping, evaluation of val macro-F1 after every epoch, early stopping with a patience, and
the best epoch's weights restored at the end. Callers add behaviour through ``callbacks`` (MLflow
logging, pruning) and ``compute_loss`` (a different loss, e.g. distillation), never by copying it.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lmpipe.errors import UserError
from lmpipe.metrics import classification_metrics
from lmpipe.models import precision_flags, seed_everything
from lmpipe.params import TrainParams

SELECTION_METRIC = "macro_f1"


class TextDataset(torch.utils.data.Dataset):
    """Tokenised texts (truncated to ``max_length``, padded per batch by the collator) and label ids."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str],
        labels: Sequence[int] | None,
        max_length: int,
    ):
        self.encodings = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.labels = None if labels is None else [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self.encodings["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def frame_dataset(
    tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, label2id: dict[str, int], max_length: int
) -> TextDataset:
    unknown = sorted(set(frame["label"]) - set(label2id))
    if unknown:
        raise UserError(f"labels {unknown} are not in the label map of the prepared data")
    return TextDataset(tokenizer, frame["text"].tolist(), frame["label"].map(label2id).tolist(), max_length)


def eval_metrics(prediction) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy and macro-F1 from logits."""
    logits = (
        prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    )
    y_pred = np.asarray(logits).argmax(axis=-1)
    metrics = classification_metrics(np.asarray(prediction.label_ids), y_pred)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


@dataclass
class TrainResult:
    best_val_macro_f1: float
    best_epoch: int
    epochs_run: int
    global_steps: int
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {
            "best_val_macro_f1": self.best_val_macro_f1,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "global_steps": self.global_steps,
            "train_seconds": round(self.train_seconds, 1),
        }


class _HistoryCallback(TrainerCallback):
    """Collects one row per epoch: the mean train loss since the last eval, and the val metrics."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []
        self._losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._losses.append(float(logs["loss"]))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        row = {"epoch": round(state.epoch or 0), "step": state.global_step}
        if self._losses:
            row["train_loss"] = float(np.mean(self._losses))
        self._losses = []
        for key, value in (metrics or {}).items():
            if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
                row[key.replace("eval_", "val_")] = float(value)
        self.rows.append(row)


class _NanGuard(TrainerCallback):
    """Stops with a clear error as soon as the logged training loss is not finite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
            raise FloatingPointError(f"training loss became {logs['loss']} at step {state.global_step}")


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
) -> TrainResult:
    """Fine-tune ``model`` in place and leave the best epoch's weights in it (by val macro-F1).

    Checkpoints live in a temporary folder that is deleted afterwards: the caller saves the final
    model once, so MLflow and DVC never see intermediate checkpoints.
    """
    seed_everything(seed)
    history = _HistoryCallback()
    extra: list[TrainerCallback] = [history, _NanGuard(), *callbacks]
    if cfg.patience > 0:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.patience))
    with tempfile.TemporaryDirectory(prefix="lmpipe-ckpt-") as ckpt_dir:
        args = TrainingArguments(
            output_dir=ckpt_dir,
            num_train_epochs=cfg.epochs,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            lr_scheduler_type="linear",
            optim="adamw_torch",
            max_grad_norm=cfg.max_grad_norm,
            eval_strategy="epoch",
            save_strategy="epoch",
            save_total_limit=1,  # plus the best one, which load_best_model_at_end always keeps
            save_only_model=True,
            load_best_model_at_end=True,
            metric_for_best_model=SELECTION_METRIC,
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
            **precision_flags(cfg.precision),
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=eval_metrics,
            compute_loss_func=compute_loss,
            callbacks=extra,
        )
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        state = trainer.state
    rows = history.rows
    best = max(rows, key=lambda r: r.get(f"val_{SELECTION_METRIC}", -1.0)) if rows else {}
    return TrainResult(
        best_val_macro_f1=float(best.get(f"val_{SELECTION_METRIC}", float("nan"))),
        best_epoch=int(best.get("epoch", 0)),
        epochs_run=len(rows),
        global_steps=int(output.global_step or state.global_step),
        train_seconds=seconds,
        history=rows,
    )
