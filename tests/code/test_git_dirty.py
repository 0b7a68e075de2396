"""``git_dirty`` on MLflow runs: true when code, params or data differ from the commit, not when only the
pipeline's own outputs (dvc.yaml outs, metrics, plots) or dvc.lock changed."""

from __future__ import annotations

import subprocess

import pytest

from lmpipe import tracking

DVC_YAML = """stages:
  train:
    cmd: python train.py
    deps: [train.py]
    outs: [models/model]
    metrics:
      - reports/train/metrics.json:
          cache: false
"""


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("train: {epochs: 1}\n")
    (tmp_path / "train.py").write_text("print('train')\n")
    (tmp_path / "reports/train").mkdir(parents=True)
    (tmp_path / "reports/train/metrics.json").write_text("{}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_outputs_and_the_lock_file_do_not_count(repo):
    (repo / "reports/train/metrics.json").write_text('{"f1": 1}\n')
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "reports/train/plot.csv").write_text("x\n")  # untracked, under an output? no: beside one
    (repo / "models/model").mkdir(parents=True)
    (repo / "models/model/weights.bin").write_text("w")  # an untracked output
    assert tracking.changed_inputs() == ["reports/train/plot.csv"]
    (repo / "reports/train/plot.csv").unlink()
    assert tracking.changed_inputs() == []
    assert tracking.git_info()["git_dirty"] == "false"


@pytest.mark.parametrize(
    "path, text", [("params.yaml", "train: {epochs: 2}\n"), ("train.py", "print(2)\n"), ("new.py", "x = 1\n")]
)
def test_code_params_and_new_files_count(repo, path, text):
    (repo / path).write_text(text)
    info = tracking.git_info()
    assert info["git_dirty"] == "true" and info["git_changed"] == path


def test_a_deleted_input_counts(repo):
    (repo / "train.py").unlink()
    assert tracking.changed_inputs() == ["train.py"]
