"""Fine-tuning strategies and resume, through the real train stage on the tiny encoder.

One temporary repo runs the real ``dvc repro`` once (strategy full); each strategy then runs
``stages/train.py`` there with its own params file and output folder, against the same MLflow store.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from lmpipe.params import write_params
from tests.conftest import (
    BIN,
    copy_pipeline_repo,
    git_commit,
    new_repo,
    remove,
    run,
    run_stage_in_process,
    train_cmd,
    train_until_checkpoint,
)

pytestmark = pytest.mark.extended

PHASES = [
    {"layers": 0, "epochs": 1, "learning_rate": 1.0e-3, "layer_lr_decay": 1.0},
    {"layers": 2, "epochs": 1, "learning_rate": 5.0e-4, "layer_lr_decay": 1.0},
    {"layers": 4, "epochs": 1, "learning_rate": 3.0e-4, "layer_lr_decay": 0.5},
]
ROWS, STEPS_PER_EPOCH = 64, 8  # 80 rows sampled, 80% to train, batches of 8


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_encoder) -> Iterator[Path]:
    repo = new_repo(
        tmp_path_factory.mktemp("strategies"),
        {
            "base": {"model": str(tiny_encoder), "max_length": 32},
            "prepare": {"max_rows": 80},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "logging_steps": 2,
                "patience": 0,
                "learning_rate": 1.0e-3,
                "phases": PHASES,
            },
            "mlflow": {"experiment": "strategies"},
        },
    )
    run(["dvc", "repro", "evaluate"], repo, timeout=900)  # compress and export are not what this tests
    yield repo
    remove(repo)


def train(repo: Path, name: str, check: bool = True, **train_params):
    """Run the train stage with ``train_params`` laid over the repo's params; outputs in runs/<name>."""
    write_params(repo / f"params-{name}.yaml", {"train": train_params}, repo / "params.yaml")
    result = run(train_cmd(name), repo, check=check, timeout=600)
    return result, repo / "runs" / name


def metrics_of(out: Path) -> dict:
    """The full training report of a run of ``train`` below."""
    return json.loads((out / "report.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("bert."): v for k, v in load_file(folder / "model.safetensors").items()}


def client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def split_digests(repo: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (repo / "data/split").iterdir()}


def test_full_is_the_default_through_dvc_repro(repo, tiny_encoder):
    m = json.loads((repo / "reports/train/report.json").read_text())
    assert m["strategy"] == "full" and m["resumed_from_step"] == 0 and m["augmented_rows"] == 0
    assert (
        m["trainable_parameters"]
        == m["parameters"]
        == sum(v.numel() for v in weights(repo / "models/model").values())
    )
    assert m["global_steps"] == 2 * STEPS_PER_EPOCH
    assert json.loads((repo / "models/adapter/adapter.json").read_text()) == {
        "strategy": "full",
        "adapter": None,
    }
    assert not any((repo / "checkpoints/train").iterdir())  # a finished run leaves no checkpoints
    assert run(["dvc", "status", "evaluate"], repo).stdout.strip().endswith("up to date.")
    evaluated = json.loads((repo / "reports/evaluate/report.json").read_text())
    assert 0 <= evaluated["model"]["macro_f1"] <= 1


def test_linear_probe_trains_the_head_only(repo, tiny_encoder):
    _, out = train(repo, "probe", strategy="linear_probe")
    m = metrics_of(out)
    base, trained = weights(tiny_encoder), weights(out / "model")
    head = {k: v for k, v in trained.items() if k.startswith(("pooler.", "classifier."))}
    assert m["trainable_parameters"] == sum(v.numel() for v in head.values()) == 32 * 32 + 32 + 32 * 5 + 5
    frozen = [k for k in base if not k.startswith("pooler.")]
    assert len(frozen) > 50
    for key in frozen:
        assert torch.equal(base[key], trained[key]), key  # bit-identical after training
    assert not torch.equal(base["pooler.dense.weight"], trained["pooler.dense.weight"])


def test_lora_keeps_the_adapter_and_a_merged_model_that_reloads(repo, tiny_encoder):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, out = train(
        repo,
        "lora",
        strategy="lora",
        lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
    )
    m = metrics_of(out)
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["query", "value"]
    adapter = load_file(out / "adapter/adapter_model.safetensors")
    assert sum("lora_A" in k for k in adapter) == 2 * 4  # query and value in each of the 4 layers
    # 4 layers x 2 modules x r (in + out), plus the classifier, which trains in full
    assert m["trainable_parameters"] == 4 * 2 * 4 * (32 + 32) + 32 * 5 + 5

    merged_weights, base = weights(out / "model"), weights(tiny_encoder)
    assert not any("lora" in k for k in merged_weights)
    assert torch.equal(
        merged_weights["encoder.layer.0.attention.self.key.weight"],
        base["encoder.layer.0.attention.self.key.weight"],
    )
    assert not torch.equal(
        merged_weights["encoder.layer.0.attention.self.query.weight"],
        base["encoder.layer.0.attention.self.query.weight"],
    )

    labels = json.loads((repo / "data/prepared/labels.json").read_text())
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    fresh = AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder, num_labels=len(labels), label2id=labels, id2label={i: k for k, i in labels.items()}
    )
    unmerged = PeftModel.from_pretrained(fresh, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    texts = pd.read_parquet(repo / "data/split/val.parquet")["text"].tolist()
    batch = tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, unmerged(**batch).logits, atol=1e-5)
    assert merged.config.label2id == labels


def test_gradual_unfreezing_runs_its_phases_as_steps_of_one_run(repo, tiny_encoder):
    _, out = train(repo, "gradual", strategy="gradual_unfreezing")
    m = metrics_of(out)
    assert len(m["phases"]) == 3 and m["epochs_run"] == 3 and m["global_steps"] == 3 * STEPS_PER_EPOCH
    history = pd.read_csv(out / "history.csv")
    assert history["phase"].tolist() == [0, 1, 2]
    trained = weights(out / "model")
    layer = sum(v.numel() for k, v in trained.items() if k.startswith("encoder.layer.3."))
    head = 32 * 32 + 32 + 32 * 5 + 5
    counts = [m["phases"][str(i)]["trainable_parameters"] for i in range(3)]
    assert counts == [head, head + 2 * layer, m["parameters"]]
    # the kept (best) epoch's weights: what its phase (and so every earlier one) froze is bit-identical
    best_phase = int(history.loc[history["epoch"] == m["best_epoch"], "phase"].iloc[0])
    unfrozen = PHASES[best_phase]["layers"]
    base = weights(tiny_encoder)
    for key, value in base.items():
        trains = key.startswith("pooler.") or any(
            key.startswith(f"encoder.layer.{i}.") for i in range(4 - unfrozen, 4)
        )
        trains = trains or (unfrozen == 4 and key.startswith("embeddings."))
        if not trains:
            assert torch.equal(value, trained[key]), key
    assert not torch.equal(base["pooler.dense.weight"], trained["pooler.dense.weight"])
    mlflow = client(repo)
    run_id = m["mlflow_run_id"]
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    steps = [x.step for x in mlflow.get_metric_history(run_id, "phase_trainable_parameters")]
    assert sorted(steps) == [0, 1, 2]
    rates = mlflow.get_metric_history(run_id, "learning_rate")
    for i, phase in enumerate(PHASES):  # each phase follows its own peak rate
        inside = [r.value for r in rates if i * STEPS_PER_EPOCH < r.step <= (i + 1) * STEPS_PER_EPOCH]
        assert inside and max(inside) <= phase["learning_rate"] * (1 + 1e-9)
        assert max(inside) >= 0.5 * phase["learning_rate"]


def test_fgm_changes_training_and_not_the_evaluation(repo):
    before = split_digests(repo)
    _, out = train(repo, "fgm", fgm_epsilon=1.0)
    m, full = metrics_of(out), json.loads((repo / "reports/train/report.json").read_text())
    assert m["global_steps"] == full["global_steps"] and m["val_rows"] == full["val_rows"] == 8
    assert m["train_rows"] == ROWS
    fgm_w, full_w = weights(out / "model"), weights(repo / "models/model")
    assert not torch.equal(
        fgm_w["embeddings.word_embeddings.weight"], full_w["embeddings.word_embeddings.weight"]
    )
    assert split_digests(repo) == before
    # val is scored clean: the reported val loss of the kept epoch is the saved model's loss on val
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    val = pd.read_parquet(repo / "data/split/val.parquet")
    batch = tokenizer(val["text"].tolist(), truncation=True, max_length=32, padding=True, return_tensors="pt")
    labels = torch.tensor([model.config.label2id[x] for x in val["label"]])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels).item()
    history = pd.read_csv(out / "history.csv")
    kept = history[history["epoch"] == m["best_epoch"]].iloc[0]
    assert loss == pytest.approx(kept["val_loss"], abs=1e-4)


def test_augmentation_adds_train_rows_only(repo):
    before = split_digests(repo)
    _, out = train(repo, "augment", augment={"copies": 1, "deletion": 0.1, "swap": 0.1, "replacement": 0.1})
    m, full = metrics_of(out), json.loads((repo / "reports/train/report.json").read_text())
    assert 0 < m["augmented_rows"] <= ROWS
    assert m["train_rows"] == ROWS + m["augmented_rows"]
    assert m["val_rows"] == full["val_rows"] == 8
    assert m["global_steps"] == 2 * -(-m["train_rows"] // 8) > full["global_steps"]
    assert split_digests(repo) == before
    assert not torch.equal(
        weights(out / "model")["classifier.weight"], weights(repo / "models/model")["classifier.weight"]
    )
    run_id = m["mlflow_run_id"]
    assert client(repo).get_run(run_id).data.metrics["augmented_rows"] == m["augmented_rows"]


def test_killed_training_resumes_from_its_checkpoint(repo):
    write_params(repo / "params-resume.yaml", {"train.epochs": 6}, repo / "params.yaml")
    root = repo / "checkpoints/train"
    already = set(root.iterdir())
    proc = train_until_checkpoint(repo, "resume")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr  # as an unhandled SIGTERM, but after the run's bookkeeping
    assert "Traceback" not in stderr and "terminated by signal" in stderr
    assert not (repo / "runs/resume/model").exists()  # no half-written model
    (folder,) = set(root.iterdir()) - already
    done = sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("checkpoint-*/trainer_state.json"))
    assert done and done[-1] < 6 * STEPS_PER_EPOCH
    killed_step = done[-1]
    killed_run = json.loads((folder / "run.json").read_text())["mlflow_run_id"]
    mlflow = client(repo)
    assert mlflow.get_run(killed_run).info.status == "KILLED"

    # other params do not pick up that checkpoint, and leave it alone
    _, other = train(repo, "other", epochs=1)
    assert metrics_of(other)["resumed_from_step"] == 0 and folder.is_dir()

    result = run(train_cmd("resume"), repo, timeout=600)
    assert f"resuming from the checkpoint at step {killed_step}" in result.stdout
    m = metrics_of(repo / "runs/resume")
    assert m["resumed_from_step"] == killed_step > 0
    assert m["global_steps"] == 6 * STEPS_PER_EPOCH and m["epochs_run"] == 6
    assert pd.read_csv(repo / "runs/resume/history.csv")["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    new_run = mlflow.get_run(m["mlflow_run_id"])
    assert new_run.info.status == "FINISHED"
    assert new_run.data.tags["resumed_from_run_id"] == killed_run
    assert new_run.data.tags["resumed_from_step"] == str(killed_step)
    # the resumed run trained from the checkpoint's step on, not from step 0
    losses = mlflow.get_metric_history(new_run.info.run_id, "train_loss")
    assert losses and min(x.step for x in losses) > killed_step
    assert sorted(x.step for x in mlflow.get_metric_history(new_run.info.run_id, "val_macro_f1")) == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    old = mlflow.get_run(killed_run)
    assert old.info.status == "KILLED" and old.data.tags["resumed_by_run_id"] == new_run.info.run_id
    assert not folder.exists()  # cleaned up once the outputs are written


@pytest.fixture(scope="module")
def prompt_repo(tiny_repo, tmp_path_factory) -> Iterator[Path]:
    """The whole pipeline (``dvc repro``: evaluate, analyze, compress, export) on a prompt-tuned model: a
    copy of the shared tiny pipeline with the train params changed, so prepare and split are not re-run."""
    repo = copy_pipeline_repo(tiny_repo, tmp_path_factory.mktemp("prompt") / "repo")
    prompt = {"virtual_tokens": 4, "learning_rate": 1.0e-2, "init": "vocab"}
    write_params(repo / "params.yaml", {"train": {"strategy": "prompt_tuning", "prompt_tuning": prompt}})
    git_commit(repo, "prompt tuning")
    log = run(["dvc", "repro"], repo, timeout=900).stdout
    assert "Running stage 'prepare'" not in log and "Running stage 'train'" in log
    yield repo
    remove(repo)


def test_prompt_tuning_model_goes_through_every_stage(prompt_repo, tiny_encoder):
    from lmpipe.modeling.models import load_model

    repo = prompt_repo
    m = json.loads((repo / "reports/train/report.json").read_text())
    head = 32 * 32 + 32 + 32 * 5 + 5  # pooler and classifier: the new head trains in full
    assert m["strategy"] == "prompt_tuning" and m["trainable_parameters"] == 4 * 32 + head
    saved, base = load_file(repo / "models/model/model.safetensors"), weights(tiny_encoder)
    assert saved["soft_prompt"].shape == (4, 32)
    for key, value in base.items():  # the encoder is frozen: bit-identical but for the head
        if not key.startswith("pooler."):
            assert torch.equal(value, saved[f"bert.{key}"]), key
    model = load_model(repo / "models/model")
    assert type(model).__name__ == "SoftPromptBertForSequenceClassification"
    assert json.loads((repo / "models/model/config.json").read_text())["soft_prompt_tokens"] == 4

    evaluated = json.loads((repo / "reports/evaluate/report.json").read_text())["model"]["macro_f1"]
    assert 0 <= evaluated <= 1
    # analyze reads the soft-prompted model as evaluate does: its clean row is evaluate's score
    robustness = pd.read_csv(repo / "reports/analyze/robustness.csv")
    clean = robustness[(robustness["strength"] == 0) & (robustness["predictor"] == "model")]
    assert clean["macro_f1"].iloc[0] == pytest.approx(evaluated)
    analyzed = json.loads((repo / "reports/analyze/report.json").read_text())
    assert analyzed["calibration"]["temperature"] > 0 and analyzed["explain"]["samples"] == 3
    variants = json.loads((repo / "reports/compress/report.json").read_text())["variants"]
    assert {"original", "int8", "pruned", "student"} <= set(variants)
    student = load_file(repo / "models/compress/student/model.safetensors")
    # the student starts from the teacher's prompt and distillation trains it along with its layers
    assert student["soft_prompt"].shape == saved["soft_prompt"].shape
    assert type(load_model(repo / "models/compress/student")).__name__.startswith("SoftPrompt")
    exported = json.loads((repo / "reports/export/report.json").read_text())
    assert exported["onnx_fp32"]["max_abs_logit_diff"] <= 1e-4
    assert exported["onnx_fp32"]["labels_differing"] == 0
    assert "soft prompt" in exported["optimize"]["skipped"]  # ONNX Runtime's fusions need a plain BERT

    texts = pd.read_parquet(repo / "data/split/test.parquet")[["text"]]
    texts.to_csv(repo / "in.csv", index=False)
    out = {}
    for backend in ("onnx", "pytorch"):
        run([str(BIN / "lmpipe"), "predict", "in.csv", "-o", f"{backend}.csv", "--backend", backend], repo)
        out[backend] = pd.read_csv(repo / f"{backend}.csv").filter(like="p_").to_numpy()
    assert abs(out["onnx"] - out["pytorch"]).max() <= 1e-4


@pytest.mark.parametrize(
    ("train_params", "expected"),
    [
        (
            {"strategy": "adapters"},
            "train.strategy: must be one of auto, full, linear_probe, lora, gradual_unfreezing, prompt_tuning",
        ),
        (
            {"strategy": "prompt_tuning", "prompt_tuning": {"virtual_tokens": 490, "learning_rate": 0.01}},
            "train.prompt_tuning.virtual_tokens: 490 + base.max_length 32 is more than the model's 512",
        ),
        (
            {"strategy": "gradual_unfreezing", "phases": [PHASES[0], {**PHASES[1], "epochs": 0}]},
            "train.phases[1].epochs: must be >= 1",
        ),
        (
            {
                "strategy": "lora",
                "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]},
            },
            "train.lora.target_modules: 'q_proj' matches no linear layer",
        ),
        (
            {"strategy": "gradual_unfreezing", "phases": [{**PHASES[0], "layers": 5}]},
            "train.phases[0].layers: 5 is more than the model's 4 layers",
        ),
    ],
)
def test_bad_strategy_settings_get_one_line(repo, train_params, expected):
    # in this process (the stage script through runpy): each is checked before a run or a checkpoint
    before = set((repo / "checkpoints/train").iterdir())
    write_params(repo / "params-bad.yaml", {"train": train_params}, repo / "params.yaml")
    code, stderr = run_stage_in_process(repo, "train", train_cmd("bad")[2:])
    out = repo / "runs/bad"
    assert code == 2
    # one error line, the last one (a model-loading report from transformers may come before it)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], stderr
    assert stderr.strip().splitlines()[-1] == errors[0]
    assert not out.exists()
    assert set((repo / "checkpoints/train").iterdir()) == before
