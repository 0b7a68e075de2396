"""train: fine-tune a sequence classifier on the pretrained encoder with `train.strategy`, keep the best
epoch, and log it all to MLflow. The search stage's best params reach here through ``params.search_overrides``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lmpipe import data, distributed, io, plots, reports, tasks, tracking
from lmpipe.modeling import augment, checkpoints, hub, models, strategies
from lmpipe.modeling.training import train_model
from lmpipe.params import Params

# the modules of the task's package this stage uses (dvc.yaml: src/lmpipe/tasks/${base.task}/<part>.py)
TASK_PARTS = ("model",)


@dataclass(frozen=True)
class Paths:
    data: str  # folder with train.parquet and val.parquet
    labels: str  # labels.json from prepare
    search: str  # best_params.json from the search stage
    out: str  # the model folder
    adapter: str  # the unmerged LoRA adapter (or adapter.json saying there is none)
    checkpoints: str  # resumable checkpoints (not a DVC output)
    metrics: str  # headline figures (DVC metrics)
    report: str  # the training summary
    history: str  # per-epoch history (CSV plot)


def run(params: Params, paths: Paths) -> str:
    """``params`` already carry the search's best values (``params.search_overrides``). With
    ``train.distributed`` asking for several processes this process only launches them (each runs this
    function); rank 0 alone writes the outputs and the MLflow run."""
    base, cfg = params.base, params.train
    launched = distributed.launch(cfg.distributed)
    if launched is not None:
        return f"train: {launched.message}"
    searched = io.read_json(paths.search)
    label2id = data.read_label_map(paths.labels)
    model_dir = models.resolve_model_dir(base.model, base.revision)
    models.seed_everything(base.seed)  # before the head is created: its init is random
    tokenizer = models.load_tokenizer(model_dir)
    model = models.load_model(model_dir, label2id, task=base.task)
    # auto values made concrete for this model (params itself stays as written: its hash tags the runs);
    # a bad strategy setting fails here, before a run
    cfg = strategies.resolve(cfg, model)
    strategies.validate(model, cfg, base.max_length)
    task = tasks.for_stage(base.task, "train", TASK_PARTS)
    for warning in task.warnings(params) + strategies.advice(cfg):
        print(warning)
    train_frame, augmented = augment.augment_frame(
        data.read_split(paths.data, "train"), cfg.augment, base.seed
    )
    reading = base.reading.as_dict()
    train_set = task.dataset(
        tokenizer, train_frame, label2id, base.max_length, reading, True, base.seed, params=params
    )
    val_set = task.dataset(
        tokenizer, data.read_split(paths.data, "val"), label2id, base.max_length, reading, params=params
    )

    run_dir, previous, resume_step = resume_point(params, paths)
    tags = {"search_run_id": searched["mlflow_run_id"]} if searched.get("mlflow_run_id") else {}
    if previous:
        tags.update(resumed_from_run_id=previous, resumed_from_step=str(resume_step))
    with tracking.stage_run(
        params,
        "train",
        tags={
            **tags,
            "search_params": ",".join(sorted(searched.get("params", {}))),
            "strategy": cfg.strategy,
        },
    ) as run:
        if previous:
            tracking.mark_resumed(previous, run.info.run_id, resume_step)
        checkpoints.write_run(run_dir, {"mlflow_run_id": run.info.run_id, "params_hash": params.digest()})
        counts = models.count_parameters(model)
        result = train_model(
            model,
            tokenizer,
            train_set,
            val_set,
            cfg,
            base.seed,
            callbacks=[tracking.MlflowTrainingLogger()],
            checkpoint_dir=run_dir,
        )
        if distributed.is_worker():  # its share of the training is done; rank 0 writes
            return ""
        # what a dataset had to cut to fit (generation: prompts and targets), by split
        cuts = {f"{name}_{k}": v for name, ds in (("train", train_set), ("val", val_set))
                for k, v in getattr(ds, "cuts", {}).items()}  # fmt: skip
        summary = record(
            params, cfg, paths, result, counts, tokenizer, augmented, len(train_set), len(val_set),
            run.info.run_id, cuts,
        )  # fmt: skip
    checkpoints.remove(run_dir)  # a finished run leaves no checkpoints behind
    return (
        f"train: {cfg.strategy}, best val {result.selection_metric} {result.best_val_score:.4f} at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs, {result.train_seconds:.0f} s, {result.processes} process(es), "
        f"global batch {result.global_batch_size}, "
        f"{result.trainable_parameters:,} trainable params); MLflow run {summary['mlflow_run_id']}"
    )


def resume_point(params: Params, paths: Paths) -> tuple[Path, str | None, int]:
    """This run's checkpoint folder (keyed by the params and data that shape training), the MLflow run
    of an interrupted run with the same key, and the step its latest checkpoint resumes from (0: none)."""
    base, cfg = params.base, params.train
    inputs = [Path(paths.data) / "train.parquet", Path(paths.data) / "val.parquet", Path(paths.labels)]
    # where the processes meet does not shape training; how many there are does (the global batch)
    shape = {**dataclasses.asdict(cfg), "distributed": {"world_size": cfg.distributed.world_size}}
    key = checkpoints.checkpoint_key({"base": dataclasses.asdict(base), "train": shape}, inputs)
    run_dir = Path(paths.checkpoints) / key
    previous = checkpoints.read_run(run_dir).get("mlflow_run_id")
    resume_step = checkpoints.step_of(checkpoints.latest(run_dir))
    if checkpoints.others(paths.checkpoints, key):
        print(f"train: ignoring checkpoints of other params or data in {paths.checkpoints}/ (safe to delete)")
    if resume_step:
        print(f"train: resuming from the checkpoint at step {resume_step} in {run_dir}")
    return run_dir, previous, resume_step


def record(
    params: Params,
    cfg,
    paths: Paths,
    result,
    counts: dict,
    tokenizer,
    augmented: int,
    train_rows: int,
    val_rows: int,
    run_id: str,
    inputs: dict | None = None,
) -> dict:
    """Rank 0's outputs, all or none: the model folder and the adapter, the history, the report and its
    DVC metrics; and the same figures in the active MLflow run. Returns the report."""
    inputs = inputs or {}  # cfg: params.train with its auto values resolved (strategies.resolve)
    counts["trainable_parameters"] = result.trainable_parameters
    tracking.log_metrics({**counts, "augmented_rows": augmented})
    for phase in result.phases:  # gradual unfreezing: one step per phase
        tracking.log_metrics({f"phase_{k}": v for k, v in phase.items() if k != "phase"}, step=phase["phase"])
    for row in result.history:  # epochs done before a resume: their val metrics were logged elsewhere
        if row["step"] <= result.resumed_from_step:
            tracking.log_metrics({k: v for k, v in row.items() if k.startswith("val_")}, step=row["epoch"])
    # both folders appear only if all else succeeded; neither is ever half-written
    with io.atomic_dir(paths.out) as model_tmp, io.atomic_dir(paths.adapter) as adapter_tmp:
        lora = cfg.strategy == "lora"
        final = strategies.finalize_model(result.model, adapter_tmp if lora else None)
        if not lora:
            io.write_json(adapter_tmp / "adapter.json", {"strategy": cfg.strategy, "adapter": None})
        models.write_model(final, tokenizer, model_tmp)
        summary = {
            **result.summary(),
            **counts,
            "strategy": cfg.strategy,
            "train_rows": train_rows,
            "augmented_rows": augmented,
            "val_rows": val_rows,
            **inputs,
            "resumed_from_step": result.resumed_from_step,
            "phases": {str(p["phase"]): {k: v for k, v in p.items() if k != "phase"} for p in result.phases},
            "device": str(models.device()),
            "precision": models.precision_name(cfg.precision),
            "peak_gpu_memory_mb": models.peak_gpu_memory_mb(),
            "mlflow_run_id": run_id,
        }
        tracking.log_metrics(result.summary())
        tracking.log_artifact(model_tmp, "model")  # the final (best) model, once
        if lora:
            tracking.log_artifact(adapter_tmp, "adapter")
        fig = plots.history_figure(result.history)
        tracking.log_figure(fig, "plots/history.png")
        plots.close(fig)
        io.write_csv(paths.history, pd.DataFrame(result.history))
        reports.write(
            "train",
            summary,
            paths.metrics,
            paths.report,
            tasks.get(params.base.task).headline.get("train"),
            model=hub.record_of(params.base),
        )
        tracking.log_dict(summary, "train_report.json")
    return summary
