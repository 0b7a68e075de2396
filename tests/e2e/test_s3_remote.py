"""A DVC remote on S3 (moto's server over HTTP): ``dvc remote add`` with an endpoint, ``dvc push``, a fresh
``git clone``, ``dvc pull``, and then nothing to re-run. prepare and split are the smallest part of the
pipeline with real outputs (data/prepared, data/split)."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.conftest import git_commit, new_repo, pipeline_env, run
from tests.services import S3_ENV

pytestmark = [pytest.mark.extended, pytest.mark.services]


def test_push_to_s3_then_pull_into_a_fresh_clone(tmp_path, s3):
    bucket = s3.create_bucket("dvc-remote")
    env = {**pipeline_env(), **S3_ENV}  # the keys come from the environment, never from .dvc/config
    repo = new_repo(tmp_path / "repo", {"prepare": {"max_rows": 80}})
    run(["dvc", "remote", "add", "-d", "team", f"s3://{bucket}/lmpipe"], repo, env=env)
    run(["dvc", "remote", "modify", "team", "endpointurl", s3.endpoint], repo, env=env)
    run(["dvc", "repro", "split"], repo, env=env)
    git_commit(repo, "split on the S3 remote")
    pushed = run(["dvc", "push"], repo, env=env)
    keys = s3.keys(bucket, "lmpipe/")
    assert keys, pushed.stdout  # the objects are in the bucket, listed over HTTP

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data/split").exists()
    run(["dvc", "pull", "prepare", "split"], clone, env=env)
    pd.testing.assert_frame_equal(
        pd.read_parquet(clone / "data/split/train.parquet"),
        pd.read_parquet(repo / "data/split/train.parquet"),
    )
    assert "up to date" in run(["dvc", "status", "prepare", "split"], clone, env=env).stdout
    assert "Running stage" not in run(["dvc", "repro", "split"], clone, env=env).stdout


def test_missing_bucket_is_one_line(tmp_path, s3):
    env = {**pipeline_env(), **S3_ENV}
    repo = new_repo(tmp_path / "repo", {"prepare": {"max_rows": 40}})
    run(["dvc", "remote", "add", "-d", "team", "s3://no-such-bucket/lmpipe"], repo, env=env)
    run(["dvc", "remote", "modify", "team", "endpointurl", s3.endpoint], repo, env=env)
    run(["dvc", "repro", "prepare"], repo, env=env)
    result = run(["dvc", "push"], repo, env=env, check=False, timeout=120)
    assert result.returncode != 0
    # DVC's own message, one line (it does not name the bucket; the remote's url in .dvc/config does)
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "bucket does not exist" in errors[0], result.stderr
