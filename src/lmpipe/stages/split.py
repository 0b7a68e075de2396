"""split: a seeded train/val/test split with a leakage check: stratified by label for classification, by
sentence for token classification (with the entities per type in each part)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lmpipe import io, reports, tasks
from lmpipe.params import Params

# the modules of the task's package this stage uses (dvc.yaml: src/lmpipe/tasks/${base.task}/<part>.py)
TASK_PARTS = ("data",)


@dataclass(frozen=True)
class Paths:
    data: str  # prepared data.parquet
    out: str  # folder for {train,val,test}.parquet
    metrics: str  # split sizes (DVC metrics)
    report: str  # sizes and class counts per split


def run(params: Params, paths: Paths) -> str:
    task = tasks.for_stage(params.base.task, "split", TASK_PARTS)
    parts = task.split(pd.read_parquet(paths.data), params.split, params.base.seed)
    with io.atomic_dir(paths.out) as tmp:
        for name, part in parts.items():
            part.to_parquet(tmp / f"{name}.parquet", index=False)
    report = task.split_report(parts)
    reports.write("split", report, paths.metrics, paths.report)
    for warning in report.get("warnings", []):
        print(f"split: warning: {warning}")
    return "split: " + ", ".join(f"{k} {v}" for k, v in report["sizes"].items())
