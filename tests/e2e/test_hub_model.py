"""A pipeline on a Hugging Face model id at a pinned revision, offline: ``base.model: org/name`` with
``base.revision: <commit>`` read from a hub-layout cache (tests/hubcache.py) in a temporary ``HF_HOME``,
built from the embedded MiniLM's files. The real ``dvc repro`` runs every stage on it; the resolved commit
must be in every report, every MLflow run's tags and the model card. Then the bad cases, through the
stage: a wrong hash, a missing model, a branch name (resolved, warned about, recorded as its commit), and a
changed revision re-running what depends on the model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmpipe.modeling.models import resolve_model_dir
from lmpipe.params import EMBEDDED_MODEL, write_params
from tests.conftest import TINY, new_repo, pipeline_env, remove, run
from tests.hubcache import COMMIT, OTHER, add_snapshot

pytestmark = [pytest.mark.extended]

MODEL = "lmpipe-test/minilm"
# every stage that reads the model, or what was trained from it (split reads neither: it records none)
STAGES = ("prepare", "search", "train", "evaluate", "analyze", "compress", "export")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    add_snapshot(home / "hub", MODEL, resolve_model_dir(EMBEDDED_MODEL), COMMIT, ("main",))
    return home


def env_with(hf_home: Path) -> dict[str, str]:
    return {**pipeline_env(), "HF_HOME": str(hf_home)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, hf_home) -> Iterator[Path]:
    overrides = {
        **TINY,
        "base": {"model": MODEL, "revision": COMMIT, "max_length": 32},
        "train": {"epochs": 1, "batch_size": 16, "logging_steps": 2},
        # int8 alone: the other variants' fine-tunes are not what this test is about
        "compress": {
            "prune": {"enabled": False},
            "distill": {"enabled": False},
            "latency": {"warmup": 1, "repeats": 3, "batch_repeats": 2},
        },
        "export": {
            "latency": {"batch_sizes": [1], "warmup": 1, "repeats": 3, "batch_repeats": 2, "threads": 1},
            "gate": {"baseline": "none", "min_macro_f1": None},
        },
    }
    repo = new_repo(tmp_path_factory.mktemp("hub-repo"), overrides)
    result = run(["dvc", "repro"], repo, env=env_with(hf_home), timeout=900)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    yield repo
    remove(repo)


def test_every_report_records_the_commit(repo):
    assert "WARNING: base.revision" not in (repo / "repro.log").read_text()  # pinned: nothing to warn about
    for stage in STAGES:
        report = json.loads((repo / "reports" / stage / "report.json").read_text())
        assert report["base_model"] == {"id": MODEL, "source": "hub", "revision": COMMIT}, stage
    assert "base_model" not in json.loads((repo / "reports/split/report.json").read_text())


def test_every_mlflow_run_is_tagged_with_the_commit(repo):
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stages = {r.data.tags["stage"] for r in runs}
    assert {"train", "evaluate", "compress", "export"} <= stages
    for found in runs:
        tags = found.data.tags
        assert (tags["base_model"], tags["base_model_revision"], tags["base_model_source"]) == (
            MODEL,
            COMMIT,
            "hub",
        ), tags["stage"]


def test_the_model_card_names_the_commit(repo):
    card = (repo / "models/export/MODEL_CARD.md").read_text()
    assert f"fine-tuned from `{MODEL}` (revision `{COMMIT}`)" in card


def one_line_error(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_bad_revisions_and_models_fail_in_one_line(repo, hf_home, tmp_path):
    """Each on a copy of the params: a wrong hash, then a model the cache does not hold, through the real
    prepare stage (the first that reads the model); nothing is written."""
    params = tmp_path / "params.yaml"
    prepare = ["python", "stages/prepare.py", "--params", str(params), "--out", str(tmp_path / "out")]
    prepare += ["--metrics", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.json")]
    write_params(params, {"base.revision": OTHER}, repo / "params.yaml")
    line = one_line_error(run(prepare, repo, check=False, env=env_with(hf_home)))
    assert line.startswith(f"error: base.revision: commit '{OTHER}' of '{MODEL}' is not in the Hugging Face")
    assert f"(cached: main (branch/tag), {COMMIT})" in line and f"lmpipe fetch-model {MODEL}" in line
    line = one_line_error(run(prepare, repo, check=False, env=env_with(tmp_path / "empty-hf-home")))
    assert line.startswith(f"error: base.model: '{MODEL}' is not in the Hugging Face cache")
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


def test_a_branch_is_resolved_warned_about_and_reruns_the_model_stages(repo, hf_home):
    """Pinning ``main`` instead of the commit changes a param prepare, train and evaluate depend on, so DVC
    re-runs them; prepare warns once and records the commit ``main`` pointed at."""
    write_params(repo / "params.yaml", {"base.revision": "main"})
    try:
        status = run(["dvc", "status", "--json"], repo, env=env_with(hf_home)).stdout
        changed = set(json.loads(status))
        assert {"prepare", "train", "evaluate", "compress", "export"} <= changed, changed
        result = run(["dvc", "repro", "-s", "prepare"], repo, env=env_with(hf_home))
        warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING: base.revision")]
        assert len(warnings) == 1 and f"pin base.revision: {COMMIT}" in warnings[0]
        report = json.loads((repo / "reports/prepare/report.json").read_text())
        assert report["base_model"]["revision"] == COMMIT
    finally:
        write_params(repo / "params.yaml", {"base.revision": COMMIT})
