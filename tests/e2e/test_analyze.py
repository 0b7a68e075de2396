"""The analyze stage in the real pipeline (tiny settings): its tables hold what they claim, the fitted
temperature reaches every served path, and an analysis param re-runs analyze but not export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lmpipe.analysis import calibration
from lmpipe.params import write_params
from tests.conftest import BIN, captured, git_commit, run, run_stage_in_process, stage_args


def report(repo):
    return json.loads((repo / "reports/analyze/report.json").read_text())


def test_analyze_ran_and_its_numbers_add_up(tiny_repo):
    assert "Running stage 'analyze'" in captured(tiny_repo, "first_repro.log")
    r = report(tiny_repo)
    test = pd.read_parquet(tiny_repo / "data/split/test.parquet")
    evaluate = json.loads((tiny_repo / "reports/evaluate/report.json").read_text())

    rob = pd.read_csv(tiny_repo / "reports/analyze/robustness.csv")
    assert set(rob["perturbation"]) == {"char_noise", "lowercase", "window_shift"}
    clean = rob[rob["strength"] == 0]
    # the clean rows are evaluate's scores: the same model, the same baseline, the same test split
    assert clean[clean["predictor"] == "model"]["macro_f1"].iloc[0] == pytest.approx(
        evaluate["model"]["macro_f1"]
    )
    assert clean[clean["predictor"] == "baseline"]["macro_f1"].iloc[0] == pytest.approx(
        evaluate["baseline"]["macro_f1"]
    )
    perturbed = rob[rob["strength"] > 0]
    assert (
        (perturbed["flip_rate_ci95_low"] <= perturbed["flip_rate"])
        & (perturbed["flip_rate"] <= perturbed["flip_rate_ci95_high"])
    ).all()
    # MiniLM is uncased: lower-casing leaves every token id as it was, so nothing can flip
    lower = perturbed[(perturbed["perturbation"] == "lowercase") & (perturbed["predictor"] == "model")].iloc[
        0
    ]
    assert lower["model_inputs_changed"] == 0 and lower["flip_rate"] == 0 and lower["texts_changed"] > 0
    assert (tiny_repo / "reports/analyze/plots/robustness/char_noise.csv").is_file()
    curve = pd.read_csv(tiny_repo / "reports/analyze/plots/robustness/window_shift.csv")
    assert list(curve.columns) == ["strength", "baseline_macro_f1", "model_macro_f1"] and len(curve) == 2

    attack = pd.read_csv(tiny_repo / "reports/analyze/attack.csv")
    assert sorted(set(attack["predictor"])) == ["baseline", "model"] and len(attack) == 4
    assert (attack["edits"] <= attack["budget"]).all()
    assert r["attack"]["model"]["success_rate"] == pytest.approx(
        attack[attack["predictor"] == "model"]["success"].mean()
    )

    faith = pd.read_csv(tiny_repo / "reports/analyze/faithfulness.csv")
    assert len(faith) == 3 and set(faith["id"]) <= set(test["id"])
    summary = r["explain"]["faithfulness"]
    assert summary["comprehensiveness"] == pytest.approx(faith["comprehensiveness"].mean())
    html = (tiny_repo / "reports/analyze/attributions.html").read_text()
    # the explained texts the model gets wrong (evaluate's predictions) are marked, and only those; the
    # tiny model gets some wrong, so the count is not 0 == 0
    predictions = pd.read_csv(tiny_repo / "reports/evaluate/predictions.csv").set_index("id")
    wrong = int((~predictions.loc[faith["id"], "correct"]).sum())
    assert wrong >= 1
    assert html.count("MISCLASSIFIED") == wrong == r["explain"]["misclassified"]
    top = pd.read_csv(tiny_repo / "reports/analyze/top_tokens.csv")
    assert {"class", "token", "total_attribution"} <= set(top.columns)

    lengths = pd.read_csv(tiny_repo / "reports/analyze/slices_length.csv")
    assert lengths.groupby("predictor")["texts"].sum().tolist() == [len(test), len(test)]
    classes = pd.read_csv(tiny_repo / "reports/analyze/slices_class.csv")
    assert set(classes["class"]) == set(test["label"])

    cal = r["calibration"]
    assert cal["temperature"] > 0 and cal["model"]["ece"] >= 0
    metrics = json.loads((tiny_repo / "reports/analyze/metrics.json").read_text())
    assert metrics["calibration"]["model_scaled"]["ece"] == cal["model_scaled"]["ece"]
    assert set(r["seconds"]) >= {"clean", "calibration", "robustness", "attack", "explain", "slices", "total"}


def test_the_fitted_temperature_is_served_by_onnx_pyfunc_and_pytorch(tiny_repo, tmp_path):
    temperature = json.loads((tiny_repo / "models/calibration.json").read_text())["temperature"]
    assert json.loads((tiny_repo / "models/export/classifier.json").read_text())["temperature"] == temperature
    export = json.loads((tiny_repo / "reports/export/report.json").read_text())
    assert export["temperature"] == temperature
    assert export["onnx_fp32"]["max_abs_proba_diff"] <= 1e-4
    texts = pd.read_parquet(tiny_repo / "data/split/test.parquet")[["text"]]
    texts.to_csv(tmp_path / "in.csv", index=False)
    out = {}
    for backend in ("onnx", "pytorch"):
        run(
            [str(BIN / "lmpipe"), "predict", str(tmp_path / "in.csv"), "-o", str(tmp_path / f"{backend}.csv"),
             "--backend", backend],
            tiny_repo,
        )  # fmt: skip
        out[backend] = pd.read_csv(tmp_path / f"{backend}.csv").filter(like="p_").to_numpy()
    assert np.abs(out["onnx"] - out["pytorch"]).max() <= 1e-4
    # and they are the calibrated probabilities, not the raw softmax (unless T came out as 1)
    from lmpipe.modeling.inference import predict_logits_model
    from lmpipe.modeling.models import load_model, load_tokenizer

    model = tiny_repo / "models/model"
    logits, _ = predict_logits_model(
        load_model(model), load_tokenizer(model), texts["text"].tolist(), 32, 8, None
    )
    assert np.abs(out["pytorch"] - calibration.softmax(logits, temperature)).max() <= 1e-5


def test_an_analysis_param_reruns_analyze_but_not_export(tiny_repo_copy):
    repo = tiny_repo_copy
    write_params(
        repo / "params.yaml", {"analyze": {"calibration": {"bins": 5}, "robustness": {"resamples": 300}}}
    )
    git_commit(repo, "analysis params")
    status = run(["dvc", "status"], repo).stdout
    assert "analyze:" in status and "export:" not in status
    log = run(["dvc", "repro"], repo).stdout
    assert "Running stage 'analyze'" in log
    assert "Running stage 'export'" not in log  # the temperature is the same bytes
    assert report(repo)["calibration"]["bins"] == 5


def test_a_sample_larger_than_the_test_split_is_one_line_naming_the_key(tiny_repo, tmp_path):
    # in this process (the stage script through runpy): the check comes before any model is loaded
    params = write_params(
        tmp_path / "params.yaml", {"analyze.explain.samples": 500}, tiny_repo / "params.yaml"
    )
    out, calibration = tmp_path / "analyze", tmp_path / "calibration.json"
    replace = {"--params": str(params), "--out": str(out), "--calibration": str(calibration)}
    code, stderr = run_stage_in_process(tiny_repo, "analyze", stage_args(tiny_repo, "analyze", replace))
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert (
        line.startswith("error: params.yaml: analyze.explain.samples:")
        and "500" in line
        and "test split has 8" in line
    )
    assert not out.exists() and not calibration.exists()
