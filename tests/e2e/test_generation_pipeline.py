"""The generation task end to end: the real ``dvc repro`` of all eight stages on the BBC headlines (80 rows)
with the tiny decoder (SmolLM2's tokenizer and chat template), LoRA by default; evaluate's three
predictors with paired CIs, the predictions table, analyze's perturbations, compress's int8 and int4
variants judged on val ROUGE-L, export's ONNX Runtime GenAI folders checked token by token against
PyTorch, the registered generator served over HTTP (and its 400s), and ``lmpipe predict``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pandas as pd
import pytest

from tests.conftest import TINY, check_report_shape, new_repo, pipeline_env, run
from tests.services import serve_model

pytestmark = pytest.mark.extended


@pytest.fixture(scope="module")
def gen_repo(tmp_path_factory, tiny_decoder):
    overrides = {
        **TINY,
        "base": {"task": "generation", "model": str(tiny_decoder), "max_length": 64},
        "prepare": {"source": "data/builtin/bbc_headlines.yaml", "max_rows": 80},
        "train": {**TINY["train"], "learning_rate": 1.0e-3},
        "generation": {
            "val_rows": 8, "analyze_rows": 8, "max_new_tokens": 8, "max_target_tokens": 16,
            "serve_max_new_tokens": 32,
        },
        # rtn: k-quants need a real model's widths (the tiny decoder's 16-wide key-value head is not one)
        "compress": {
            "max_loss": 1.0,
            "int4": {"algo": "rtn"},
            "latency": {"threads": 1, "warmup": 1, "batch_repeats": 2},
        },
        "export": {"registered_model": "tiny-gen", "latency": {"warmup": 1, "batch_repeats": 2, "threads": 1}},
    }  # fmt: skip
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
    status = run(["dvc", "status"], repo).stdout
    assert "up to date" in status


def test_compress_judges_int8_and_int4_on_val_rouge_and_times_each_token(gen_repo):
    repo, log = gen_repo
    report = read(repo, "reports/compress/report.json")
    rows = report["variants"]
    assert list(rows) == ["original", "int8", "int4"]
    assert rows["int4"]["runtime"] == "onnxruntime-genai" and rows["int8"]["runtime"] == "pytorch"
    # int4 weights are the smallest; the original's size is its safetensors
    assert rows["int4"]["size_mb"] < rows["original"]["size_mb"]
    for name, row in rows.items():
        assert 0 <= row["val_rougeL"] <= 1 and row["test_perplexity"] > 1, name
        assert row["ttft_ms"] > 0 and row["tokens_per_s"] > 0, name
    for name in ("int8", "int4"):
        row = rows[name]
        assert row["val_rougeL_loss"] == pytest.approx(
            rows["original"]["val_rougeL"] - row["val_rougeL"], abs=1e-4
        )
        assert row["within_budget"] == (row["val_rougeL_loss"] <= row["max_loss"])
    assert set(report["skipped"]) == {"pruned", "student"}
    assert "pruning is skipped for a causal LM" in log
    assert report["latency_setup"]["prompt_tokens"] == 64 and report["latency_setup"]["new_tokens"] == 8
    assert (repo / "models/compress/int4/genai_config.json").is_file()
    assert (repo / "models/compress/int8/int8.safetensors").is_file()


def test_export_checks_fp32_token_by_token_and_registers_a_generator(gen_repo):
    repo, _ = gen_repo
    report = read(repo, "reports/export/report.json")
    fp32, int4 = report["onnx_fp32"], report["onnx_int4"]
    assert fp32["identical_share"] >= 0.95 and fp32["divergent_prompts"] == len(fp32["divergences"])
    assert 0 <= int4["token_agreement"] <= 1 and "within_budget" in int4
    for who in ("pytorch", "onnx_fp32", "onnx_int4"):
        assert report[who]["ttft_ms"] > 0 and report[who]["tokens_per_s"] > 0, who
    assert report["size_mb"]["int4"] < report["size_mb"]["fp32"]
    assert report["registry"]["name"] == "tiny-gen" and report["registry"]["version"] == "1"
    assert "rougeL" in report["gate"]["minus_baseline"]
    card = (repo / "models/export/MODEL_CARD.md").read_text()
    assert "| ONNX Runtime GenAI int4 |" in card and "max_new_tokens" in card
    for variant in ("fp32", "int4"):
        info = read(repo, f"models/export/{variant}/generator.json")
        assert info["max_length"] == 64 and info["max_new_tokens_limit"] == 32


@pytest.fixture(scope="module")
def server(gen_repo, tmp_path_factory):
    repo, _ = gen_repo
    env = {**pipeline_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    log = tmp_path_factory.mktemp("serve-gen") / "serve.log"
    with serve_model("models:/tiny-gen/1", repo, env, log) as url:
        yield url


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_the_served_model_generates_as_export_did_and_refuses_bad_requests(gen_repo, server):
    repo, _ = gen_repo
    test = pd.read_parquet(repo / "data/split/test.parquet")
    status, body = post(server, {"inputs": test["text"].tolist()[:2], "params": {"max_new_tokens": 8}})
    assert status == 200, body
    answers = body["predictions"]
    assert len(answers) == 2 and all(a["new_tokens"] <= 8 and a["prompt_tokens"] <= 64 for a in answers)
    # greedy is deterministic: the same request gives the same texts; a seeded sample repeats too
    assert post(server, {"inputs": test["text"].tolist()[:2], "params": {"max_new_tokens": 8}})[1] == body
    sample = {
        "inputs": ["Shares rose in London."],
        "params": {"do_sample": True, "temperature": 1.5, "seed": 7},
    }
    first, again = post(server, sample), post(server, sample)
    assert first[0] == 200 and first == again
    bad = {
        "missing prompt": {"inputs": [""]},
        "no prompts": {"inputs": []},
        "max_new_tokens too large": {"inputs": ["x"], "params": {"max_new_tokens": 33}},
        "max_new_tokens zero": {"inputs": ["x"], "params": {"max_new_tokens": 0}},
        "wrong type": {"inputs": [3, 4]},
        "wrong param type": {"inputs": ["x"], "params": {"max_new_tokens": "many"}},
    }
    for case, request in bad.items():
        status, answer = post(server, request)
        assert 400 <= status < 500, (case, status, answer)


def test_predict_generates_for_a_file_from_the_export(gen_repo, tmp_path):
    repo, _ = gen_repo
    texts = tmp_path / "in.txt"
    texts.write_text("Some article text about the markets.\nAnother article on football.\n")
    out = run(["lmpipe", "predict", str(texts), "-o", str(tmp_path / "out.csv"), "--variant", "int4"], repo)
    frame = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(frame.columns) == ["row", "generation", "new_tokens", "prompt_tokens", "truncated"]
    assert len(frame) == 2 and (frame["new_tokens"] <= 8).all(), out.stderr


def test_the_reports_keep_their_shape(gen_repo):
    """Every report key of the generation pipeline, against tests/golden/generation.json (a key that
    moves is a change to the DVC metrics people compare): LMPIPE_UPDATE_GOLDEN=1 rewrites it."""
    check_report_shape(gen_repo[0], "generation.json")


def test_predict_refuses_a_generator_s_pytorch_folder_in_one_line(gen_repo, tmp_path):
    repo, _ = gen_repo
    texts = tmp_path / "in.txt"
    texts.write_text("Some article text.\n")
    for extra in (["--backend", "pytorch", "--max-length", "64", "--model", "models/model"],):
        out = run(
            ["lmpipe", "predict", str(texts), "-o", str(tmp_path / "out.csv"), *extra], repo, check=False
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().count("\n") == 0, out.stderr  # one line
