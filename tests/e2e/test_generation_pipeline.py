"""The generation task end to end: the real ``dvc repro`` of all eight stages on the BBC headlines (80 rows)
with the tiny decoder (SmolLM2's tokenizer and chat template), LoRA by default; evaluate's three
predictors with paired CIs, the predictions table, analyze's perturbations, and the stages that do not
apply yet writing their note."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import TINY, check_report_shape, new_repo, run

pytestmark = pytest.mark.extended


@pytest.fixture(scope="module")
def gen_repo(tmp_path_factory, tiny_decoder):
    overrides = {
        **TINY,
        "base": {"task": "generation", "model": str(tiny_decoder), "max_length": 64},
        "prepare": {"source": "data/builtin/bbc_headlines.yaml", "max_rows": 80},
        "train": {**TINY["train"], "learning_rate": 1.0e-3},
        "generation": {"val_rows": 8, "analyze_rows": 8, "max_new_tokens": 8, "max_target_tokens": 16},
    }
    repo = new_repo(tmp_path_factory.mktemp("generation"), overrides)
    out = run(["dvc", "repro"], repo, timeout=900)
    return repo, out.stdout


def read(repo, path):
    return json.loads((repo / path).read_text())


def test_every_stage_runs_and_train_picks_the_epoch_on_val_rouge(gen_repo):
    repo, log = gen_repo
    train = read(repo, "reports/train/report.json")
    assert train["strategy"] == "lora" and "best_val_rougeL" in train
    history = pd.read_csv(repo / "reports/train/history.csv")
    assert {"val_rougeL", "val_perplexity", "val_loss"} <= set(history.columns)
    assert read(repo, "reports/train/metrics.json").keys() == {
        "best_val_rougeL",
        "best_epoch",
        "train_seconds",
    }
    config = read(repo, "models/model/config.json")
    assert config["lmpipe_task"] == "generation" and config["architectures"] == ["LlamaForCausalLM"]
    assert "{text}" in config["lmpipe_generation"]["prompt_template"]
    assert "Running stage 'export'" in log


def test_evaluate_scores_the_model_and_both_baselines_with_paired_cis(gen_repo):
    repo, _ = gen_repo
    scores = read(repo, "reports/evaluate/scores.json")
    for who in ("model", "baseline", "zero_shot"):
        assert {"rouge1", "rouge2", "rougeL", "exact_match"} <= scores[who].keys(), who
    assert scores["model"]["perplexity"] > 1 and scores["zero_shot"]["perplexity"] > 1
    assert scores["baseline"]["rougeL"] > 0.1  # the article's first words share words with its title
    for versus in ("model_minus_baseline", "model_minus_zero_shot"):
        ci = scores[versus]
        assert ci["rougeL_ci95_low"] <= ci["rougeL"] <= ci["rougeL_ci95_high"]
    assert scores["lead_words"] == 5 and scores["prompts_truncated"] == scores["test_rows"] == 8
    table = pd.read_csv(repo / "reports/evaluate/predictions.csv", keep_default_na=False)
    assert list(table.columns[:4]) == ["id", "prompt", "reference", "generation"] and len(table) == 8
    assert table["prompt"].str.endswith("<|im_start|>assistant\n").all()
    baselines = pd.read_csv(repo / "reports/evaluate/baseline_predictions.csv", keep_default_na=False)
    assert {"lead", "lead_rougeL", "zero_shot", "zero_shot_rougeL"} <= set(baselines.columns)


def test_analyze_perturbs_the_inputs_and_the_rest_says_what_does_not_apply(gen_repo):
    repo, _ = gen_repo
    report = read(repo, "reports/analyze/report.json")
    assert report["calibration"] == {"note": "calibration needs class probabilities"}
    robust = pd.read_csv(repo / "reports/analyze/robustness.csv")
    assert set(robust["perturbation"]) == {"clean", "char_noise", "lowercase", "window_shift"}
    assert {"rougeL", "rougeL_drop", "changed"} <= set(robust.columns)
    lead = robust[(robust.predictor == "baseline") & (robust.perturbation == "window_shift")]
    assert (lead["rougeL_drop"] > 0).all()  # cutting the article's start hurts the lead baseline
    assert "generation" in pd.read_csv(repo / "reports/analyze/attack.csv")["note"][0]
    slices = pd.read_csv(repo / "reports/analyze/slices_length.csv")
    assert slices["rows"].sum() == 8 and {"model_rougeL", "model_ci95_low"} <= set(slices.columns)
    for stage in ("compress", "export"):
        assert read(repo, f"reports/{stage}/report.json")["applicable"] is False
        assert (repo / f"models/{stage}/NOTE.md").read_text().startswith(f"{stage}: not yet for generation")
    status = run(["dvc", "status"], repo).stdout
    assert "up to date" in status


def test_the_reports_keep_their_shape(gen_repo):
    """Every report key of the generation pipeline, against tests/golden/generation.json (a key that
    moves is a change to the DVC metrics people compare): LMPIPE_UPDATE_GOLDEN=1 rewrites it."""
    check_report_shape(gen_repo[0], "generation.json")


def test_predict_refuses_a_generator_in_one_line(gen_repo, tmp_path):
    repo, _ = gen_repo
    texts = tmp_path / "in.txt"
    texts.write_text("Some article text.\n")
    for extra in ([], ["--backend", "pytorch", "--max-length", "64", "--model", "models/model"]):
        out = run(
            ["lmpipe", "predict", str(texts), "-o", str(tmp_path / "out.csv"), *extra], repo, check=False
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().count("\n") == 0, out.stderr  # one line
