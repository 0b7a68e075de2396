"""Shared by the benchmarks: the real stages, run in a scratch folder against a scratch MLflow store.

``Scratch(overrides)`` runs prepare and split once, with ``overrides`` laid over params.yaml;
``train_and_evaluate(name, overrides)`` then runs the train and evaluate stages with more overrides laid
over those and returns their metrics files. Nothing here trains or
scores by itself: every figure comes from the stage scripts that ``dvc repro`` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmpipe.params import Params, load_params, write_params

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser) -> None:
    """The options every scratch benchmark takes (see ``Scratch.from_args``)."""
    parser.add_argument("--max-rows", type=int, default=None, help="prepare.max_rows (default: all rows)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")


class Scratch:
    @classmethod
    def from_args(cls, args, experiment: str) -> Scratch:
        """params.yaml with ``--max-rows`` applied, prepared and split in a new scratch folder."""
        return cls({"prepare": {"max_rows": args.max_rows}}, experiment, keep=args.keep)

    def __init__(self, overrides: Mapping[str, Any], experiment: str, keep: bool = False):
        self.folder = Path(tempfile.mkdtemp(prefix=f"lmpipe-{experiment}-"))
        self.keep = keep
        self.env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{self.folder / 'mlflow.db'}",
            "HF_HUB_OFFLINE": "1",
        }
        self.params_file = write_params(
            self.folder / "params.yaml", {**overrides, "mlflow.experiment": experiment}, ROOT / "params.yaml"
        )
        self.params: Params = load_params(self.params_file)  # checked before any stage runs
        f, base_file = self.folder, self.params_file
        self.stage(
            ["prepare", "--params", base_file, "--out", f / "prepared", "--metrics", f / "prepare-metrics.json",
             "--report", f / "prepare.json"]
        )  # fmt: skip
        self.stage(["split", "--params", base_file, "--data", f / "prepared/data.parquet",
                    "--out", f / "split", "--metrics", f / "split-metrics.json", "--report", f / "split.json"])  # fmt: skip
        (f / "best_params.json").write_text(json.dumps({"enabled": False, "params": {}}))

    def stage(self, args: list[Any]) -> None:
        name, *rest = (str(a) for a in args)
        cmd = [sys.executable, f"stages/{name}.py", *rest]
        result = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")

    def split_sizes(self) -> dict[str, int]:
        return json.loads((self.folder / "split.json").read_text()).get("sizes", {})

    def train_and_evaluate(self, name: str, overrides: Mapping[str, Any]) -> dict[str, dict]:
        """The train and evaluate stages with ``overrides`` laid over this scratch's params (leave the
        prepare and split sections alone); returns ``{"train": <train metrics>, "evaluate": <evaluate
        metrics>}``."""
        f, out = self.folder, self.folder / name
        out.mkdir()
        pfile = write_params(out / "params.yaml", overrides, self.params_file)
        self.stage(["train", "--params", pfile, "--data", f / "split", "--labels", f / "prepared/labels.json",
                    "--search", f / "best_params.json", "--out", out / "model", "--adapter", out / "adapter",
                    "--checkpoints", f / "checkpoints", "--metrics", out / "train-metrics.json", "--report", out / "train.json",
                    "--history", out / "history.csv"])  # fmt: skip
        self.stage(["evaluate", "--params", pfile, "--data", f / "split", "--model", out / "model",
                    "--train-report", out / "train.json", "--out", out / "evaluate"])  # fmt: skip
        shutil.rmtree(out / "model", ignore_errors=True)  # ~90 MB each; the metrics are what is kept
        return {
            "train": json.loads((out / "train.json").read_text()),
            "evaluate": json.loads((out / "evaluate/report.json").read_text()),
        }

    def close(self) -> None:
        if self.keep:
            print(f"scratch folder: {self.folder}")
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
