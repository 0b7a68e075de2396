"""The compression library on a small in-memory BERT: int8 save/load, pruning, the student, the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmpipe import latency
from lmpipe.compress import compression
from lmpipe.errors import ParamsError, UserError
from lmpipe.modeling.inference import predict_proba_model
from lmpipe.modeling.models import load_tokenizer, resolve_model_dir
from lmpipe.tasks.classification.data import load_bbc_news
from tests.conftest import tiny_bert_classifier

LABELS = ["business", "entertainment", "politics", "sport", "tech"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_bbc_news()["text"].iloc[::37].tolist()[:60]


@pytest.fixture
def model(tokenizer):
    """A 4-layer, 32-wide classifier whose wide random init gives clearly input-dependent predictions."""
    return tiny_bert_classifier(tokenizer, LABELS)


def test_int8_round_trip_is_exact_and_agrees_with_fp32(model, tokenizer, texts, tmp_path):
    quantized = compression.quantize_dynamic_int8(model)
    compression.save_int8(quantized, tokenizer, tmp_path, {"path": "in-memory"})
    reloaded = compression.load_int8(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    original, _ = predict_proba_model(model, tokenizer, texts, 32, 16)
    in_memory, _ = predict_proba_model(quantized, tokenizer, texts, 32, 16)
    from_disk, names = predict_proba_model(reloaded, tokenizer, texts, 32, 16)
    assert names == LABELS
    np.testing.assert_array_equal(in_memory, from_disk)  # the stored int8 weights are the quantized ones
    assert len(set(original.argmax(1))) >= 3  # the check below is not trivially met by a constant model
    assert (original.argmax(1) == from_disk.argmax(1)).mean() >= 0.9
    assert 0 < np.abs(original - from_disk).max() < 0.1  # quantized: close, not identical
    # every Linear weight is stored in 1 byte instead of 4 (this tiny model is mostly embeddings)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert fp32_bytes - 3 * linear < compression.weights_bytes(tmp_path) < fp32_bytes - 3 * linear + 20_000
    counts = compression.parameter_counts(reloaded)
    assert counts["parameters"] == sum(p.numel() for p in model.parameters())


def test_int8_keeps_the_named_layers_fp32_on_disk_and_in_onnx(model, tokenizer, texts, tmp_path):
    """The budget's fallback: named Linear layers stay fp32 in the torch int8 model, survive save/load,
    and become the ONNX Runtime int8 model's ``nodes_to_exclude``."""
    import onnx

    from lmpipe.serve import onnx_export

    keep = ["bert.encoder.layer.3.output.dense", "classifier"]
    quantized = compression.quantize_dynamic_int8(model, keep)
    assert isinstance(quantized.classifier, torch.nn.Linear)
    assert not isinstance(quantized.bert.encoder.layer[0].output.dense, torch.nn.Linear)
    compression.save_int8(quantized, tokenizer, tmp_path / "int8", {"path": "in-memory"})
    reloaded = compression.load_int8(tmp_path / "int8")
    assert compression.linear_names(reloaded) == keep
    in_memory, _ = predict_proba_model(quantized, tokenizer, texts, 32, 16)
    from_disk, _ = predict_proba_model(reloaded, tokenizer, texts, 32, 16)
    np.testing.assert_array_equal(in_memory, from_disk)
    torch.testing.assert_close(reloaded.classifier.weight, model.classifier.weight)  # not quantized
    with pytest.raises(ValueError, match="not Linear layers"):
        compression.quantize_dynamic_int8(model, ["bert.embeddings"])

    folder = tmp_path / "onnx"
    model.save_pretrained(tmp_path / "fp32")
    tokenizer.save_pretrained(tmp_path / "fp32")
    onnx_export.write_classifier_folder(tmp_path / "fp32", folder, 32, 18)
    nodes = onnx_export.nodes_of_modules(folder / "model.onnx", keep)
    assert len(nodes) == 3  # a MatMul, and the classifier's Gemm under both names the quantizer uses
    onnx_export.quantize_onnx_int8(folder, keep)
    graph = onnx.load(str(folder / "model.int8.onnx")).graph
    floats = {n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")}
    quantized = [n.name for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(quantized) == 4 * 6 + 2 - 2  # every Linear's MatMul but the two kept fp32 ...
    assert nodes[0] in floats and not any(
        q.startswith(tuple(nodes)) for q in quantized
    )  # ... which stay float
    with pytest.raises(ValueError, match="no MatMul/Gemm node"):
        onnx_export.nodes_of_modules(folder / "model.onnx", ["bert.nothing"])


def test_budget_helpers():
    assert (
        compression.fits(0.01, 0.01) and compression.fits(-0.02, 0.0) and not compression.fits(0.0101, 0.01)
    )
    curve = [
        {"sparsity": 0.3, "within_budget": True},
        {"sparsity": 0.5, "within_budget": False},
        {"sparsity": 0.6, "within_budget": True},  # noisy: a larger sparsity that fits is still the largest
        {"sparsity": 0.8, "within_budget": False},
    ]
    assert compression.largest_fitting(curve)["sparsity"] == 0.6
    assert compression.largest_fitting([c for c in curve if not c["within_budget"]]) is None
    assert compression.next_up([0.3, 0.5, 0.8], 0.3) == 0.5 and compression.next_up([0.5, 0.3], None) == 0.3
    assert compression.next_up([0.3, 0.5], 0.5) is None
    assert compression.fp32_steps(8, 38) == [1, 2, 4, 8] and compression.fp32_steps(6, 38) == [1, 2, 4, 6]
    assert compression.fp32_steps(8, 3) == [1, 2, 3] and compression.fp32_steps(0, 38) == []
    # the rule: the bound when there is one, else the point loss
    assert compression.within(0.004, 0.012, 0.01) is False and compression.within(0.004, None, 0.01) is True
    same = np.array([[1.0, 2.0, 0.5]])
    assert compression.mean_kl(same, same) == pytest.approx(0.0, abs=1e-12)
    assert compression.mean_kl(same, same[:, ::-1].copy()) > 0.01


def test_global_pruning_hits_the_target_and_spares_the_head(model):
    head = model.classifier.weight.detach().clone()
    embeddings = model.bert.embeddings.word_embeddings.weight.detach().clone()
    keep = compression.magnitude_prune(model, 0.3)
    assert compression.sparsity_of(model) == pytest.approx(0.3, abs=1e-4)
    assert (
        len(keep) == 4 * 6
    )  # every Linear of the encoder's layers; not the pooler (head), see prunable_linears
    assert torch.count_nonzero(model.bert.pooler.dense.weight) == model.bert.pooler.dense.weight.numel()
    assert not [n for n, _ in model.named_parameters() if n.endswith(("_orig", "_mask"))]  # permanent
    assert torch.equal(model.classifier.weight, head)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings)
    # global, not per layer: the layers end up with different sparsities
    per_layer = [float((m.weight == 0).float().mean()) for m in compression.prunable_linears(model).values()]
    assert max(per_layer) - min(per_layer) > 0.01
    # a recovery step moves every weight; KeepPruned puts the pruned ones back to zero
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    compression.KeepPruned(model, keep).apply()
    assert compression.sparsity_of(model) == pytest.approx(0.3, abs=1e-4)


def test_student_keeps_chosen_layers_with_teacher_weights(model, tokenizer, texts):
    student = compression.make_student(model)
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert student.config.distilled_from_layers == [1, 3]
    for new, old in ((0, 1), (1, 3)):
        a = student.bert.encoder.layer[new].output.dense.weight
        b = model.bert.encoder.layer[old].output.dense.weight
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # a copy, the teacher is untouched
    assert len(model.bert.encoder.layer) == 4
    proba, _ = predict_proba_model(student, tokenizer, texts[:4], 32, 4)
    assert proba.shape == (4, len(LABELS))
    assert compression.default_keep_layers(6) == [1, 3, 5] and compression.default_keep_layers(5) == [0, 2, 4]
    assert compression.make_student(model, [0]).config.num_hidden_layers == 1
    with pytest.raises(UserError, match=r"compress.distill.keep_layers: \[4\] not layers"):
        compression.make_student(model, [0, 4])
    with pytest.raises(UserError, match="keep fewer"):
        compression.make_student(model, [0, 1, 2, 3])


def test_distillation_loss_values():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert compression.distillation_loss(student, teacher, labels, 2.0, 0.0) == pytest.approx(float(ce))
    assert compression.distillation_loss(teacher, teacher, labels, 3.0, 1.0) == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p_t = torch.softmax(teacher / t, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    mixed = compression.distillation_loss(student, teacher, labels, t, 0.25)
    assert mixed == pytest.approx(float(0.25 * kl + 0.75 * ce), rel=1e-5)
    # normalised by the examples of the whole accumulated batch when the Trainer says how many
    assert compression.distillation_loss(student, teacher, labels, t, 0.25, 12) == pytest.approx(
        float(mixed) / 2
    )


def test_distillation_hook_runs_the_teacher_on_the_student_inputs(model, tokenizer, texts):
    student = compression.make_student(model)
    hook = compression.DistillationLoss(model, student, 2.0, 1.0)
    batch = compression.fixed_batch(tokenizer, texts, 3, 16)
    labels = torch.tensor([0, 1, 2])
    outputs = student(**batch)
    loss = hook(outputs, labels)
    expected = compression.distillation_loss(outputs.logits, model(**batch).logits, labels, 2.0, 1.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.requires_grad
    assert hook.teacher_passes == 1
    # the next epoch: the same examples in another order come from the cache, with the same loss
    order = torch.tensor([2, 0, 1])
    shuffled = {k: v[order] for k, v in batch.items()}
    again = hook(student(**shuffled), labels[order])
    assert hook.teacher_passes == 1
    assert again.item() == pytest.approx(loss.item(), rel=1e-5)
    # a new example makes the teacher run again
    hook(student(**compression.fixed_batch(tokenizer, texts[3:], 3, 16)), labels)
    assert hook.teacher_passes == 2
    hook.close()
    assert not student._forward_pre_hooks


def test_token_distillation_counts_only_labelled_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    labels = torch.tensor([[-100, 0, 2, -100], [-100, 1, -100, -100]])  # [CLS], words, subwords, padding
    kept = labels != -100
    flat = compression.distillation_loss(student[kept], teacher[kept], labels[kept], 2.0, 0.3)
    assert compression.distillation_loss(student, teacher, labels, 2.0, 0.3) == pytest.approx(float(flat))
    # what sits at an unlabelled position never matters
    noisy = student.clone()
    noisy[~kept] = 100.0
    assert compression.distillation_loss(noisy, teacher, labels, 2.0, 0.3) == pytest.approx(float(flat))


def test_token_teacher_logits_are_cached_unpadded_and_padded_again(tokenizer, texts):
    from transformers import BertForTokenClassification

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    teacher = BertForTokenClassification(tiny_bert_config(tokenizer.vocab_size, num_labels=3)).eval()
    hook = compression.DistillationLoss(teacher, compression.make_student(teacher), 2.0, 1.0)
    first = tokenizer(texts[:2], truncation=True, max_length=12, padding="max_length", return_tensors="pt")
    logits = hook.teacher_logits(dict(first))
    # the same two sentences padded to another length, in another order: from the cache, re-padded
    again = tokenizer(texts[1::-1], truncation=True, max_length=12, padding="max_length", return_tensors="pt")
    longer = {k: torch.nn.functional.pad(v, (0, 5)) for k, v in again.items()}
    cached = hook.teacher_logits(longer)
    assert hook.teacher_passes == 1 and cached.shape == (2, 17, 3)
    for i, j in ((0, 1), (1, 0)):
        mask = first["attention_mask"][j].bool()
        assert torch.allclose(cached[i][longer["attention_mask"][i].bool()], logits[j][mask])
    hook.close()


def test_fixed_batch_and_latency_summary(tokenizer):
    batch = compression.fixed_batch(tokenizer, ["short", "a longer text here"], 5, 24)
    assert batch["input_ids"].shape == (5, 24)
    summary = latency.summary(np.array([0.010, 0.020, 0.030, 0.040, 0.050]), 4)
    assert summary == {
        "latency_b4_p50_ms": 30.0,
        "latency_b4_p95_ms": 48.0,
        "throughput_b4_per_s": pytest.approx(133.33),
    }


def test_pareto_front():
    # (latency, score): b is faster and better than a; c is the fastest; d is the best
    points = [(10, 0.90), (8, 0.92), (3, 0.80), (12, 0.95), (9, 0.80)]
    assert compression.pareto_front(points) == [False, True, True, True, False]


def test_compress_params_are_checked(tmp_path):
    from lmpipe.params import load_params, write_params
    from tests.code.test_params import ROOT

    for section, key, value, fragment in [
        ("prune", "sparsity", 1.0, "between 0 and 1"),
        ("prune", "grid", [], "at least one sparsity"),
        ("prune", "grid", [0.5, 1.2], "between 0 and 1 (exclusive)"),
        ("prune", "grid", [0.0], "between 0 and 1 (exclusive)"),
        ("prune", "max_loss", -0.1, "between 0 and 1"),
        ("prune", "recovery", "sometimes", "must be one of auto, always, never"),
        ("quantize", "max_loss", 1.5, "between 0 and 1"),
        ("quantize", "max_fp32_layers", -1, "must be >= 0"),
        ("distill", "alpha", 1.5, "must be in [0, 1]"),
        ("distill", "keep_layers", [1, 1], "must not repeat"),
        ("latency", "repeats", 1, "must be >= 2"),
        ("latency", "max_other_load", 0, "a share of the machine's cores"),
    ]:
        path = write_params(
            tmp_path / "params.yaml", {f"compress.{section}.{key}": value}, ROOT / "params.yaml"
        )
        with pytest.raises(ParamsError) as err:
            load_params(path)
        assert err.value.key == f"compress.{section}.{key}" and fragment in str(err.value)


def test_the_compress_budget_is_checked_and_resolved(tmp_path):
    from lmpipe.params import load_params, write_params
    from tests.code.test_params import ROOT

    for value in (-0.01, 1.01, None):
        path = write_params(tmp_path / "params.yaml", {"compress.max_loss": value}, ROOT / "params.yaml")
        with pytest.raises(ParamsError) as err:
            load_params(path)
        assert err.value.key == "compress.max_loss", value
    path = write_params(
        tmp_path / "params.yaml",
        {"compress.max_loss": 0.02, "compress.prune.max_loss": 0.05},
        ROOT / "params.yaml",
    )
    cfg = load_params(path).compress
    assert cfg.budget("pruned") == 0.05 and cfg.budget("int8") == 0.02 and cfg.budget("student") == 0.02
    for key, value, fragment in [
        ("confidence", 1.0, "from 0.5 to below 1"),
        ("confidence", 0.3, "from 0.5 to below 1"),
        ("bound", "loss", "prediction"),
        ("resamples", 10, "must be >= 100"),
    ]:
        path = write_params(tmp_path / "params.yaml", {f"compress.{key}": value}, ROOT / "params.yaml")
        with pytest.raises(ParamsError) as err:
            load_params(path)
        assert err.value.key == f"compress.{key}" and fragment in str(err.value)
    path = write_params(tmp_path / "params.yaml", {"compress.confidence": None}, ROOT / "params.yaml")
    assert load_params(path).compress.confidence is None  # the point rule


def test_the_paired_bound_is_tight_for_a_copy_and_wide_for_a_few_rows():
    """The budget's evidence (``compression.paired_loss``): the reference minus the candidate, resampled
    over the same rows. A copy of the reference has no loss in any resample; a candidate that is wrong on
    2 of 200 rows loses 1 pt, and its 90% bound is above that (the same 2 rows drawn more often)."""
    from lmpipe.experiments.compare import weighted_scores

    y = np.arange(200) % 4
    wrong = y.copy()
    wrong[[0, 1]] = (y[[0, 1]] + 1) % 4

    def loss_of(candidate):
        return lambda w: (
            weighted_scores(w, y, y, 4)["accuracy"] - weighted_scores(w, y, candidate, 4)["accuracy"]
        )

    copy = compression.paired_loss(loss_of(y.copy()), 200, 500, 0, 0.9)
    assert copy["bound"] == 0 and copy["ci95"] == [0, 0]
    few = compression.paired_loss(loss_of(wrong), 200, 500, 0, 0.9)
    assert 0.01 < few["bound"] <= 0.03 and few["ci95"][0] >= 0 and few["ci95"][1] > 0.01
    assert compression.paired_loss(loss_of(wrong), 200, 500, 0, 0.9) == few  # seeded
    assert compression.paired_loss(loss_of(wrong), 200, 500, 0, None)["bound"] is None


def test_a_prediction_bound_adds_the_new_rows_own_noise():
    """``compress.bound: prediction`` (``compression.upper_bound`` with ``future_rows``): the loss n new
    rows will show is less certain than the loss itself, more so the fewer they are; with many new rows it
    comes back to the confidence bound. A copy is still bounded at 0 (it disagrees on no row)."""
    from lmpipe.experiments.compare import weighted_scores

    y = np.arange(200) % 4
    wrong = y.copy()
    wrong[::20] = (y[::20] + 1) % 4  # 10 rows of 200: a 5-pt accuracy loss

    def loss_of(candidate):
        return lambda w: (
            weighted_scores(w, y, y, 4)["accuracy"] - weighted_scores(w, y, candidate, 4)["accuracy"]
        )

    plain = compression.paired_loss(loss_of(wrong), 200, 1000, 0, 0.9)["bound"]
    same = compression.paired_loss(loss_of(wrong), 200, 1000, 0, 0.9, 200)["bound"]
    fewer = compression.paired_loss(loss_of(wrong), 200, 1000, 0, 0.9, 50)["bound"]
    many = compression.paired_loss(loss_of(wrong), 200, 1000, 0, 0.9, 10**7)["bound"]
    # the spread of a 200-row loss is ~1.5 pt: the bound 1.28 of it above 5 pt, the prediction ~sqrt(2) as far
    assert 0.06 < plain < 0.08 and fewer > same > plain and abs(many - plain) < 0.002
    assert 1.2 < (same - 0.05) / (plain - 0.05) < 1.65
    assert compression.paired_loss(loss_of(y.copy()), 200, 500, 0, 0.9, 50)["bound"] == 0
