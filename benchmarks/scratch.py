"""Shared by the benchmarks: the real stages, run in a scratch folder against a scratch MLflow store.

``Scratch(params)`` runs prepare and split once; ``train_and_evaluate(name, params)`` then runs the
train and evaluate stages with those params and returns their metrics files. Nothing here trains or
scores by itself: every figure comes from the stage scripts that ``dvc repro`` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def default_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def add_arguments(parser) -> None:
    """The options every scratch benchmark takes (see ``Scratch.from_args``)."""
    parser.add_argument("--max-rows", type=int, default=None, help="prepare.max_rows (default: all rows)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")


class Scratch:
    @classmethod
    def from_args(cls, args, experiment: str) -> Scratch:
        """The default params with ``--max-rows`` applied, prepared and split in a new scratch folder."""
        params = default_params()
        params["prepare"]["max_rows"] = args.max_rows
        return cls(params, experiment, keep=args.keep)

    def __init__(self, params: dict[str, Any], experiment: str, keep: bool = False):
        self.folder = Path(tempfile.mkdtemp(prefix=f"lmpipe-{experiment}-"))
        self.keep = keep
        self.env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{self.folder / 'mlflow.db'}",
            "HF_HUB_OFFLINE": "1",
        }
        self.params = {**params, "mlflow": {**params["mlflow"], "experiment": experiment}}
        base_file = self.write_params(self.folder, self.params)
        f = self.folder
        self.stage(
            ["prepare", "--params", base_file, "--out", f / "prepared", "--report", f / "prepare.json"]
        )
        self.stage(["split", "--params", base_file, "--data", f / "prepared/data.parquet",
                    "--out", f / "split", "--metrics", f / "split.json"])  # fmt: skip
        (f / "best_params.json").write_text(json.dumps({"enabled": False, "params": {}}))

    @staticmethod
    def write_params(folder: Path, params: dict[str, Any]) -> Path:
        path = folder / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    def stage(self, args: list[Any]) -> None:
        name, *rest = (str(a) for a in args)
        cmd = [sys.executable, f"stages/{name}.py", *rest]
        result = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")

    def split_sizes(self) -> dict[str, int]:
        return json.loads((self.folder / "split.json").read_text()).get("sizes", {})

    def train_and_evaluate(self, name: str, params: dict[str, Any]) -> dict[str, dict]:
        """The train and evaluate stages with ``params`` (prepare's and split's must be this scratch's);
        returns ``{"train": <train metrics>, "evaluate": <evaluate metrics>}``."""
        f, out = self.folder, self.folder / name
        out.mkdir()
        pfile = self.write_params(out, params)
        self.stage(["train", "--params", pfile, "--data", f / "split", "--labels", f / "prepared/labels.json",
                    "--search", f / "best_params.json", "--out", out / "model", "--adapter", out / "adapter",
                    "--checkpoints", f / "checkpoints", "--metrics", out / "train.json",
                    "--history", out / "history.csv"])  # fmt: skip
        self.stage(["evaluate", "--params", pfile, "--data", f / "split", "--model", out / "model",
                    "--train-metrics", out / "train.json", "--out", out / "evaluate"])  # fmt: skip
        shutil.rmtree(out / "model", ignore_errors=True)  # ~90 MB each; the metrics are what is kept
        return {
            "train": json.loads((out / "train.json").read_text()),
            "evaluate": json.loads((out / "evaluate/metrics.json").read_text()),
        }

    def close(self) -> None:
        if self.keep:
            print(f"scratch folder: {self.folder}")
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
