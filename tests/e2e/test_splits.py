"""The k-split yardstick for real: the documented recipe (DVC experiments up to evaluate, one per
``base.seed``), then ``lmpipe splits`` on them."""

from __future__ import annotations

import json

import pytest

from lmpipe.experiments.runs import experiment_refs
from tests.conftest import BIN, new_repo, run

pytestmark = pytest.mark.extended

SEEDS = [1, 2]


def test_splits_recipe_reports_each_split_and_the_mean(tiny_encoder, tmp_path):
    params = {
        "base": {"model": str(tiny_encoder), "max_length": 32},
        "prepare": {"max_rows": 60},
        "train": {"epochs": 1, "batch_size": 8, "logging_steps": 2},
        "mlflow": {"experiment": "splits"},
    }
    repo = new_repo(tmp_path / "repo", params)
    for seed in SEEDS:  # as docs/experiments.md says, without the queue: evaluate and what it needs
        run(
            ["dvc", "exp", "run", "evaluate", "-n", f"split-{seed}", "-S", f"base.seed={seed}"],
            repo,
            timeout=900,
        )
    names = [f"split-{seed}" for seed in SEEDS]
    out = run([str(BIN / "lmpipe"), "splits", *names, "--resamples", "300"], repo)
    result = json.loads((repo / "reports/splits/splits.json").read_text())
    assert "Over 2 splits" in out.stdout and (repo / "reports/splits/report.md").is_file()
    refs = experiment_refs(repo)
    for row, name, seed in zip(result["per_split"], names, SEEDS, strict=True):
        (ref,) = refs[name]
        metrics = json.loads(run(["git", "show", f"{ref}:reports/evaluate/metrics.json"], repo).stdout)
        assert row["run"] == name and row["seed"] == str(seed)
        assert row["macro_f1"]["model"] == pytest.approx(metrics["model"]["macro_f1"])
        assert row["macro_f1"]["baseline"] == pytest.approx(metrics["baseline"]["macro_f1"])
        # evaluate's paired CI and the per-split one are the same statistics (seed differs: same point)
        assert row["macro_f1"]["diff"] == pytest.approx(metrics["model_minus_baseline"]["macro_f1"])
    model_f1 = [row["macro_f1"]["model"] for row in result["per_split"]]
    assert result["summary"]["macro_f1"]["model"]["mean"] == pytest.approx(sum(model_f1) / 2)
    assert result["summary"]["splits"] == 2

    # an experiment that is not on another seed is refused, with nothing written
    bad = run([str(BIN / "lmpipe"), "splits", names[0], names[0], "--out", "bad"], repo, check=False)
    assert bad.returncode != 0 and "base.seed" in bad.stderr and "Traceback" not in bad.stderr
    assert not (repo / "bad").exists()
