"""Bad input through the real stage scripts: one line on stderr, no traceback, non-zero exit, no outputs.

Each kind of bad input runs the prepare script in this process (``run_stage_in_process``: no start-up of
its own); a misspelt key and a good user file run it as a real process, as DVC does."""

from __future__ import annotations

import pandas as pd
import pytest

from lmpipe.params import write_params
from tests.conftest import ROOT, run, run_stage_in_process

OUTPUTS = ["--out", "out/prepared", "--metrics", "out/metrics.json", "--report", "out/report.json"]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    pd.DataFrame({"body": [f"text {i}" for i in range(12)], "topic": ["a", "b", "c"] * 4}).to_csv(
        tmp_path / "good.csv", index=False
    )
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,a\nthe,b\n".encode("latin-1"))
    pd.DataFrame({"text": ["one", "two", "three"], "label": ["x"] * 3}).to_csv(
        tmp_path / "one.csv", index=False
    )
    return tmp_path


def prepare(workdir):
    return run(["python", str(ROOT / "stages/prepare.py"), *OUTPUTS], workdir, check=False)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train": {"learning_rate": -0.001}}, "train.learning_rate: must be > 0"),
        ({"split": {"train": 0.7}}, "split.train: split.train + split.val + split.test must sum to 1"),
        ({"prepare": {"source": "missing.csv"}}, "prepare.source: missing.csv not found"),
        (
            {"prepare": {"source": "good.csv", "label_column": "topic"}},
            "prepare.text_column: column 'text' not found",
        ),
        ({"prepare": {"source": "latin.csv"}}, "prepare.encoding: latin.csv is not valid utf-8"),
        ({"prepare": {"source": "one.csv"}}, "prepare.label_column: need at least 2 classes"),
        ({"base": {"model": "no/such/model"}}, "base.model: 'no/such/model' is not a local model folder"),
    ],
)
def test_bad_input_gets_one_line(workdir, overrides, expected):
    write_params(workdir / "params.yaml", overrides)
    code, stderr = run_stage_in_process(workdir, "prepare", OUTPUTS)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not (workdir / "out").exists()


def test_unknown_key_is_named(workdir):
    text = (workdir / "params.yaml").read_text().replace("  patience:", "  patiance:")
    (workdir / "params.yaml").write_text(text)
    result = prepare(workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: train.patiance: unknown key"), lines
    assert "Traceback" not in result.stderr and not (workdir / "out").exists()


def test_user_file_runs_through_prepare(workdir):
    write_params(
        workdir / "params.yaml",
        {"prepare": {"source": "good.csv", "text_column": "body", "label_column": "topic"}},
    )
    result = prepare(workdir)
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(workdir / "out/prepared/data.parquet")
    assert len(frame) == 12 and sorted(frame["label"].unique()) == ["a", "b", "c"]
