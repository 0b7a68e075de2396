"""split: a seeded, stratified train/val/test split with a leakage check."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lmpipe import data, io
from lmpipe.params import Params


@dataclass(frozen=True)
class Paths:
    data: str  # prepared data.parquet
    out: str  # folder for {train,val,test}.parquet
    metrics: str  # split sizes and class counts (JSON metrics)


def run(params: Params, paths: Paths) -> str:
    parts = data.split_frame(pd.read_parquet(paths.data), params.split, params.base.seed)
    with io.atomic_dir(paths.out) as tmp:
        for name, part in parts.items():
            part.to_parquet(tmp / f"{name}.parquet", index=False)
    report = data.split_report(parts)
    io.write_json(paths.metrics, report)
    return "split: " + ", ".join(f"{k} {v}" for k, v in report["sizes"].items())
