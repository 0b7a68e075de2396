"""The export stage for real: ``dvc repro`` on the tiny encoder, ONNX parity recomputed independently, the
registry and its aliases, ``mlflow models serve`` answering HTTP on loopback, and ``lmpipe predict``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from lmpipe.metrics import classification_metrics
from lmpipe.modeling.models import load_model
from lmpipe.params import write_params
from lmpipe.serve.serving import OnnxTextClassifier, softmax
from tests.conftest import REGISTERED as NAME
from tests.conftest import pipeline_env, run, run_stage_in_process, stage_args
from tests.services import serve_model


@pytest.fixture(scope="module")
def repo(tiny_repo) -> Path:
    """The shared tiny pipeline (tests/conftest.py): its export registered ``tiny-clf`` version 1 with the
    gate's baseline off, so that the aliases are exercised. Read it only; changes take ``tiny_repo_copy``."""
    return tiny_repo


def metrics(repo: Path, stage: str = "export") -> dict:
    """A stage's full report."""
    return json.loads((repo / "reports" / stage / "report.json").read_text())


def client(repo: Path) -> MlflowClient:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_export_folder_and_parity(repo):
    folder = repo / "models/export"
    assert {"model.onnx", "model.int8.onnx", "classifier.json", "MODEL_CARD.md", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    m = metrics(repo)
    assert m["onnx_fp32"]["max_abs_logit_diff"] <= 1e-4 and m["onnx_fp32"]["labels_differing"] == 0
    assert m["onnx_fp32"]["ok"] is True

    # recompute independently: PyTorch vs ONNX Runtime one text at a time and in one padded batch
    test = pd.read_parquet(repo / "data/split/test.parquet")
    texts = test["text"].tolist()
    model = load_model(repo / "models/model").eval()
    fp32 = OnnxTextClassifier(folder)
    session = fp32.session
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"]] * len(session.get_inputs())
    ref_all, onnx_all = [], []
    for batch in [[t] for t in texts] + [texts]:
        features = fp32.encode(batch)
        with torch.inference_mode():
            ref = model(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.numpy()
        got = fp32.logits(features)
        assert np.abs(ref - got).max() <= 1e-4
        assert (ref.argmax(1) == got.argmax(1)).all()
        if len(batch) > 1:
            ref_all, onnx_all = ref, got

    # int8: the agreement and macro-F1 written are what ONNX Runtime gives on the test split
    int8 = ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    int8_logits = np.concatenate(
        [int8.run(None, fp32.encode(texts[i : i + 32]))[0] for i in range(0, len(texts), 32)]
    )
    agreement = float((int8_logits.argmax(1) == ref_all.argmax(1)).mean())
    assert m["onnx_int8"]["label_agreement"] == pytest.approx(agreement)
    labels = json.loads((folder / "classifier.json").read_text())["labels"]
    y_true = test["label"].map({n: i for i, n in enumerate(labels)}).to_numpy()
    assert m["onnx_int8"]["macro_f1"] == pytest.approx(
        classification_metrics(y_true, int8_logits.argmax(1))["macro_f1"]
    )
    # and the PyTorch scores match the evaluate stage's on the same split
    assert m["pytorch_fp32"]["macro_f1"] == pytest.approx(metrics(repo, "evaluate")["model"]["macro_f1"])
    assert m["onnx_fp32"]["macro_f1"] == pytest.approx(
        classification_metrics(y_true, onnx_all.argmax(1))["macro_f1"]
    )


def test_latency_metrics(repo):
    m = metrics(repo)
    rows = {"pytorch_fp32", "onnx_fp32", "onnx_int8", "onnx_fp32_opt", "onnx_int8_opt", "student_onnx_int8"}
    assert set(m["latency"]) == rows and set(m["comparison"]) == rows
    for cases in m["latency"].values():
        # the shape of compress's latency figures too (lmpipe.latency.summary)
        assert set(cases) == {
            f"{k}_b{n}_{u}"
            for n in (1, 8)
            for k, u in (("latency", "p50_ms"), ("latency", "p95_ms"), ("throughput", "per_s"), ("cpu", "ms"))
        }
        for n in (1, 8):
            assert 0 < cases[f"latency_b{n}_p50_ms"] <= cases[f"latency_b{n}_p95_ms"]
            assert cases[f"throughput_b{n}_per_s"] == pytest.approx(
                n * 1000 / cases[f"latency_b{n}_p50_ms"], rel=0.01
            )
    assert m["speedup_wall"]["onnx_int8_vs_pytorch_b1"] == pytest.approx(
        m["latency"]["pytorch_fp32"]["latency_b1_p50_ms"] / m["latency"]["onnx_int8"]["latency_b1_p50_ms"],
        rel=1e-2,
    )
    assert m["speedup_cpu"]["onnx_int8_vs_pytorch_b1"] == pytest.approx(
        m["latency"]["pytorch_fp32"]["cpu_b1_ms"] / m["latency"]["onnx_int8"]["cpu_b1_ms"], rel=1e-2
    )
    # the busy check (the tests' other worker may well be busy): its verdict picks the speed-ups shown
    assert m["latency_reliable"] == (m["other_load"] <= 0.25)
    assert m["speedup_basis"] == ("wall" if m["latency_reliable"] else "cpu")
    assert m["speedup"] == m[f"speedup_{m['speedup_basis']}"]
    # the DVC metrics: the served variant's headline figures
    shown = json.loads((repo / "reports/export/metrics.json").read_text())
    assert shown == {
        "served": {
            "macro_f1": m["served"]["macro_f1"],
            "latency_b1_p50_ms": m["latency"]["onnx_fp32"]["latency_b1_p50_ms"],
            "size_mb": m["size_mb"]["fp32"],
        },
        "latency_reliable": m["latency_reliable"],
        "gate": {"passed": m["gate"]["passed"]},
    }


def test_optimized_and_student_rows_hold_parity(repo):
    """export.optimize's fused graph is checked like model.onnx and holds parity on the tiny BERT; int8 is
    also quantised from it; the student's int8 (export.compare) is timed and scored beside them."""
    m, folder = metrics(repo), repo / "models/export"
    assert m["optimize"]["Attention"] == 4 and m["optimize"]["SkipLayerNormalization"] == 8
    assert "fallback" not in m["optimize"]
    opt = m["onnx_fp32_opt"]
    assert opt["ok"] and opt["max_abs_logit_diff"] <= 1e-4 and opt["labels_differing"] == 0
    assert m["onnx_int8_opt"]["label_agreement"] > 0.5
    assert {"model.opt.onnx", "model.opt.int8.onnx"} <= {p.name for p in folder.iterdir()}
    student = m["student_onnx_int8"]
    assert student["variant"] == "int8_opt" and student["optimize"]["Attention"] == 2
    # the student's files are a classifier folder of their own, scored as the report says
    test = pd.read_parquet(repo / "data/split/test.parquet")
    served = OnnxTextClassifier(folder / "student", "model.opt.int8.onnx")
    y_true = test["label"].map({n: i for i, n in enumerate(served.labels)}).to_numpy()
    f1 = classification_metrics(y_true, served.predict_proba(test["text"].tolist()).argmax(1))["macro_f1"]
    assert student["macro_f1"] == pytest.approx(f1)
    row = m["comparison"]["student_onnx_int8"]
    assert row["macro_f1_loss_pt"] == pytest.approx(100 * (m["pytorch_fp32"]["macro_f1"] - f1), abs=1e-3)
    assert row["speedup_b1"] == m["speedup"]["student_onnx_int8_vs_pytorch_b1"] > 0
    assert m["speedup"]["onnx_fp32_opt_vs_onnx_fp32_b1"] > 0


def test_registered_version_links_run_commit_and_metrics(repo):
    m, train, evaluate = metrics(repo), metrics(repo, "train"), metrics(repo, "evaluate")
    mlflow = client(repo)
    version = mlflow.get_model_version(NAME, m["registry"]["version"])
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert version.tags["train_run_id"] == train["mlflow_run_id"]
    assert version.tags["evaluate_run_id"] == evaluate["mlflow_run_id"]
    assert version.tags["export_run_id"] == m["mlflow_run_id"]
    assert version.tags["git_commit"] == commit
    assert float(version.tags["test_macro_f1"]) == pytest.approx(m["served"]["macro_f1"], abs=1e-6)
    assert float(version.tags["baseline_test_macro_f1"]) == pytest.approx(evaluate["baseline"]["macro_f1"])
    assert train["mlflow_run_id"] in version.description and commit in version.description
    assert mlflow.get_run(m["mlflow_run_id"]).info.status == "FINISHED"
    # the first passing version is both challenger and champion, and the metrics say why
    assert m["gate"]["passed"] is True and m["gate"]["aliases"] == ["challenger", "champion"]
    assert "no champion yet: becomes champion" in m["gate"]["reasons"]
    # the gate's served-minus-baseline CI: the served fp32 ONNX model gives PyTorch's labels, so the paired
    # bootstrap on its own predictions is evaluate's, to the digit
    versus = m["gate"]["minus_baseline"]
    for key in ("macro_f1", "macro_f1_ci95_low", "macro_f1_ci95_high"):
        assert versus[key] == pytest.approx(evaluate["model_minus_baseline"][key]), key
    for alias in ("challenger", "champion"):
        assert str(mlflow.get_model_version_by_alias(NAME, alias).version) == m["registry"]["version"]
    # the logged model holds ONNX, tokenizer and JSON: no pickled weights
    files = {a.path for a in mlflow.list_artifacts(m["mlflow_run_id"])}
    assert "MODEL_CARD.md" in files


def test_model_card(repo):
    card = (repo / "models/export/MODEL_CARD.md").read_text()
    m, evaluate, split = metrics(repo), metrics(repo, "evaluate"), metrics(repo, "split")
    sizes = split["sizes"]
    assert f"train {sizes['train']}, val {sizes['val']}, test {sizes['test']}" in card
    assert f"| TF-IDF + logistic regression baseline | {evaluate['baseline']['macro_f1']:.4f} |" in card
    assert f"| PyTorch fp32 (this model) | {evaluate['model']['macro_f1']:.4f} |" in card
    gap = evaluate["model_minus_baseline"]
    assert f"the model alone is right on {gap['model_only_right']} test texts" in card
    p50 = m["latency"]["onnx_int8"]["latency_b1_p50_ms"]
    assert f"| onnx_int8 | {p50:.2f} |" in card
    for heading in ("## Data", "## Model and training", "## Export", "## Compression", "## Intended use"):
        assert heading in card
    assert "## Limitations" in card and "first 32 tokens" in card
    assert f"version {m['registry']['version']}" in card


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    """``mlflow models serve`` of version 1 on a free loopback port; stopped at the end of the module."""
    env = {**pipeline_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_model(f"models:/{NAME}/1", repo, env, log) as url:
        yield url


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_served_model_predicts_like_pytorch(repo, server):
    test = pd.read_parquet(repo / "data/split/test.parquet")
    texts = test["text"].tolist()[:5]
    status, body = post(server, json.dumps({"inputs": texts}).encode())
    assert status == 200, body
    predictions = body["predictions"]
    labels = json.loads((repo / "models/export/classifier.json").read_text())["labels"]
    served = np.array([[p["probabilities"][name] for name in labels] for p in predictions])
    assert [p["label"] for p in predictions] == [labels[i] for i in served.argmax(1)]
    # the same numbers as the PyTorch model on the same (truncated) inputs, at the temperature analyze
    # fit on val (the served probabilities are calibrated)
    model = load_model(repo / "models/model").eval()
    features = OnnxTextClassifier(repo / "models/export").encode(texts)
    temperature = json.loads((repo / "models/calibration.json").read_text())["temperature"]
    with torch.inference_mode():
        logits = model(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.numpy()
    assert np.abs(served - softmax(logits / temperature)).max() < 1e-5
    if abs(temperature - 1) > 0.05:  # and they are not the raw softmax
        assert np.abs(served - softmax(logits)).max() > 1e-3
    # a one-column CSV body is a DataFrame of texts
    csv = pd.DataFrame({"text": texts[:2]}).to_csv(index=False).encode()
    status, body = post(server, csv, "text/csv")
    assert status == 200 and [p["label"] for p in body["predictions"]] == [
        p["label"] for p in predictions[:2]
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": ["fine", ""]}', "row 2: text is empty"),
        (b'{"inputs": ["fine", 5]}', "Expected type str, but got int"),
        (b'{"inputs": [null]}', "Expected type str, but got NoneType"),
        (b'{"inputs": []}', "input holds no texts"),
        (b'{"texts": ["a"]}', "'inputs' key"),
        (b"not json", "valid JSON"),
    ],
)
def test_served_model_rejects_malformed_requests_with_4xx(server, body, message):
    status, answer = post(server, body)
    assert 400 <= status < 500, answer
    assert message in answer["message"]


def test_predict_cli_onnx_and_pytorch(repo, tmp_path):
    short = ["Shares fell sharply on Wall Street.", "The striker scored twice in the final.", "A new phone."]
    long_text = " ".join(["word"] * 400)
    pd.DataFrame({"id": range(4), "text": [*short, long_text]}).to_csv(tmp_path / "in.csv", index=False)
    result = run(["lmpipe", "predict", str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.csv")], repo)
    assert "1 of 4 texts were longer than the model's max_length and were truncated" in result.stderr
    out = pd.read_csv(tmp_path / "out.csv")
    labels = json.loads((repo / "models/export/classifier.json").read_text())["labels"]
    proba = out[[f"p_{n}" for n in labels]].to_numpy()
    assert out["row"].tolist() == [1, 2, 3, 4]
    assert out["truncated"].tolist() == [False, False, False, True]
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-4)
    assert out["label"].tolist() == [labels[i] for i in proba.argmax(1)]

    run(
        [
            "lmpipe",
            "predict",
            str(tmp_path / "in.csv"),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--backend",
            "pytorch",
        ],
        repo,
    )
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    torch_proba = np.array([[r["probabilities"][n] for n in labels] for r in records])
    assert [r["label"] for r in records] == out["label"].tolist()
    assert np.abs(torch_proba - proba).max() < 1e-4


def test_predict_cli_bad_input_is_one_line(repo, tmp_path):
    (tmp_path / "in.csv").write_text("body\nsome text\n")
    result = run(
        ["lmpipe", "predict", str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.csv")], repo, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'in.csv'}: column 'text' not found (columns: body); use --text-column"
    ]
    assert not (tmp_path / "out.csv").exists()


def test_second_export_stays_challenger_on_a_tie(tiny_repo_copy):
    """On a copy (it adds a version): the same model re-exported scores the same as the
    champion on the same split, so it becomes challenger and the champion stays."""
    repo = tiny_repo_copy
    first = metrics(repo)
    run(["dvc", "repro", "--force", "--single-item", "export"], repo, timeout=600)
    second = metrics(repo)
    assert int(second["registry"]["version"]) == int(first["registry"]["version"]) + 1
    gate = second["gate"]
    assert gate["passed"] and gate["aliases"] == ["challenger"]
    assert gate["champion_before"] == first["registry"]["version"]
    # the champion was re-scored on this test split with its own ONNX model
    assert gate["champion_before_macro_f1"] == pytest.approx(first["served"]["macro_f1"])
    assert "does not beat champion" in gate["reasons"][-1]
    mlflow = client(repo)
    assert str(mlflow.get_model_version_by_alias(NAME, "champion").version) == first["registry"]["version"]
    assert str(mlflow.get_model_version_by_alias(NAME, "challenger").version) == second["registry"]["version"]


def test_failed_parity_fails_the_stage_and_writes_nothing(tiny_repo_copy, tmp_path):
    # in this process (the stage script through runpy); on a copy, whose MLflow store gets the failed run
    repo = tiny_repo_copy
    params = write_params(tmp_path / "params.yaml", {"export.max_logit_diff": 1e-15}, repo / "params.yaml")
    out, metrics_file, report = tmp_path / "export", tmp_path / "metrics.json", tmp_path / "report.json"
    replace = {
        "--params": str(params),
        "--out": str(out),
        "--metrics": str(metrics_file),
        "--report": str(report),
    }
    code, stderr = run_stage_in_process(repo, "export", stage_args(repo, "export", replace))
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: export.max_logit_diff: the ONNX fp32 export differs from PyTorch by")
    assert "Traceback" not in stderr
    assert not out.exists() and not metrics_file.exists() and not report.exists()


def test_export_of_a_compress_variant(tiny_repo_copy):
    """``export.source: student`` ships the compress stage's distilled student: the ONNX model has the
    student's depth, matches the student (not the trained model) and the card says which it is."""
    repo = tiny_repo_copy
    write_params(repo / "params.yaml", {"export.source": "student"})
    status = run(["dvc", "status"], repo).stdout
    assert "export:" in status and "compress:" not in status and "train:" not in status
    run(["dvc", "repro", "export"], repo, timeout=600)
    m = metrics(repo)
    assert m["onnx_fp32"]["max_abs_logit_diff"] <= 1e-4 and m["onnx_fp32"]["labels_differing"] == 0
    texts = pd.read_parquet(repo / "data/split/test.parquet")["text"].tolist()[:8]
    exported = OnnxTextClassifier(repo / "models/export")
    features = exported.encode(texts)
    got = exported.logits(features)
    inputs = {k: torch.from_numpy(v) for k, v in features.items()}
    student = load_model(repo / "models/compress/student").eval()
    trained = load_model(repo / "models/model").eval()
    assert student.config.num_hidden_layers == 2  # every other layer of the 4-layer encoder
    with torch.inference_mode():
        assert np.abs(student(**inputs).logits.numpy() - got).max() <= 1e-4
        assert np.abs(trained(**inputs).logits.numpy() - got).max() > 1e-3
    card = (repo / "models/export/MODEL_CARD.md").read_text()
    assert "compress stage's `student` variant" in card
    compress = metrics(repo, "compress")
    f1 = compress["variants"]["student"]["macro_f1"]
    (row,) = [line for line in card.splitlines() if line.startswith("| student |")]
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    # the compression table: variant, val loss, its bound, within the budget, test loss [CI], test macro-F1
    assert cells[3] == "yes" and cells[5] == f"{f1:.4f}", cells
    assert m["served"]["macro_f1"] == pytest.approx(f1, abs=1e-9)
