"""Fast checks of the strategy building blocks: params, augmentation, model anatomy, the phase
schedule, soft prompts, FGM and checkpoint bookkeeping. The real train stage is exercised in tests/e2e."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lmpipe.errors import ParamsError, UserError
from lmpipe.modeling import checkpoints, models, strategies
from lmpipe.modeling.augment import augment_frame
from lmpipe.params import AugmentParams, PhaseParams, PromptTuningParams, load_params, write_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("train", "key", "fragment"),
    [
        ({"strategy": "adapters"}, "train.strategy", "must be one of auto, full, linear_probe"),
        ({"phases[1].epochs": 0}, "train.phases[1].epochs", "must be >= 1"),
        ({"phases[0].layer_lr_decay": 0}, "train.phases[0].layer_lr_decay", "must be > 0"),
        ({"phases[2].layers": 1}, "train.phases[2].layers", "phases only unfreeze"),
        ({"phases[0].lr": 0.1}, "train.phases[0].lr", "unknown key"),
        ({"strategy": "gradual_unfreezing", "phases": []}, "train.phases", "at least one phase"),
        ({"lora.rank": 0}, "train.lora.rank", "must be >= 1"),
        ({"lora.target_modules": "query"}, "train.lora.target_modules", "must be auto or a non-empty list"),
        ({"lora.target_modules": []}, "train.lora.target_modules", "non-empty list"),
        ({"augment.deletion": 1.0}, "train.augment.deletion", "must be in [0, 1)"),
        ({"label_smoothing": -0.1}, "train.label_smoothing", "must be in [0, 1)"),
        ({"dropout": 1.5}, "train.dropout", "must be null or in [0, 1)"),
        ({"fgm_epsilon": -1}, "train.fgm_epsilon", "must be >= 0"),
        ({"prompt_tuning.virtual_tokens": 0}, "train.prompt_tuning.virtual_tokens", "between 1 and 512"),
        ({"prompt_tuning.learning_rate": 0}, "train.prompt_tuning.learning_rate", "must be > 0"),
        ({"prompt_tuning.init": "text"}, "train.prompt_tuning.init", "must be one of vocab, random"),
    ],
)
def test_bad_strategy_params_are_named(tmp_path, train, key, fragment):
    adds = fragment == "unknown key"  # that case adds a key on purpose
    path = write_params(tmp_path / "params.yaml", {"train": train}, ROOT / "params.yaml", allow_new=adds)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_default_params_have_typed_strategy_sections():
    params = load_params(ROOT / "params.yaml")
    assert params.train.strategy == "auto"  # full for MiniLM, lora for a decoder (test_decoders.py)
    assert [p.layers for p in params.train.phases] == [0, 2, 6]  # MiniLM has 6 layers
    assert all(isinstance(p, PhaseParams) for p in params.train.phases)
    assert params.train.lora.target_modules == "auto"


# ------------------------------------------------------------------------------------- augmentation
FRAME = pd.DataFrame(
    {
        "id": [f"r{i}" for i in range(6)],
        "text": [f"the quick brown fox number {i} jumps over the lazy dog again" for i in range(6)],
        "label": ["a", "b"] * 3,
    }
)


def test_augmentation_is_seeded_and_keeps_labels():
    cfg = AugmentParams(copies=2, deletion=0.2, swap=0.2, replacement=0.2)
    first, added = augment_frame(FRAME, cfg, seed=1)
    again, _ = augment_frame(FRAME, cfg, seed=1)
    other, _ = augment_frame(FRAME, cfg, seed=2)
    pd.testing.assert_frame_equal(first, again)
    assert not first["text"].equals(other["text"])
    assert added == len(first) - len(FRAME) and 0 < added <= 12
    pd.testing.assert_frame_equal(first.iloc[: len(FRAME)], FRAME)  # the originals come first, unchanged
    extra = first.iloc[len(FRAME) :]
    source = extra["id"].str.replace(r"#aug\d$", "", regex=True)
    assert (extra["label"].to_numpy() == FRAME.set_index("id").loc[source, "label"].to_numpy()).all()
    vocabulary = {w for t in FRAME["text"] for w in t.split()}
    assert all(set(t.split()) <= vocabulary for t in extra["text"])  # replacements come from train only


def test_each_augmentation_does_what_it_says():
    words = FRAME["text"].iloc[0].split()
    deleted, _ = augment_frame(FRAME.iloc[:1], AugmentParams(1, 0.5, 0.0, 0.0), seed=3)
    assert len(deleted["text"].iloc[1].split()) < len(words)
    swapped, _ = augment_frame(FRAME.iloc[:1], AugmentParams(1, 0.0, 0.3, 0.0), seed=3)
    assert sorted(swapped["text"].iloc[1].split()) == sorted(words) != swapped["text"].iloc[1].split()
    off, added = augment_frame(FRAME, AugmentParams(0, 0.1, 0.1, 0.1), seed=3)
    assert added == 0 and off is FRAME


# ------------------------------------------------------------------------------------------ anatomy
@pytest.fixture(scope="module")
def tiny_classifier():
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=4,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def test_anatomy_finds_embeddings_layers_and_head(tiny_classifier):
    parts = strategies.anatomy(tiny_classifier)
    assert parts.depth == 3
    assert set(parts.head) == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }
    assert all(n.startswith("bert.embeddings.") for n in parts.embeddings)
    assert all(
        n.startswith(f"bert.encoder.layer.{i}.") for i, block in enumerate(parts.layers) for n in block
    )
    total = sum(p.numel() for p in tiny_classifier.parameters())
    named = dict(tiny_classifier.named_parameters())
    assert sum(named[n].numel() for n in strategies.trainable_names(parts, 3)) == total
    top = strategies.trainable_names(parts, 1)
    assert top == set(parts.head) | set(parts.layers[2])
    depths = strategies.layer_depths(parts)
    assert depths["classifier.weight"] == 0 and depths[parts.layers[2][0]] == 0
    assert depths[parts.layers[0][0]] == 2 and depths[parts.embeddings[0]] == 3


def test_phases_beyond_the_model_depth_are_refused(tiny_classifier):
    phases = [PhaseParams(0, 1, 1e-3, 1.0), PhaseParams(4, 1, 1e-4, 1.0)]
    with pytest.raises(UserError, match=r"train.phases\[1\].layers: 4 is more than the model's 3 layers"):
        strategies.check_phases(tiny_classifier, phases)


def test_lora_target_that_is_not_in_the_model(tiny_classifier):
    problem = strategies.lora_targets_problem(tiny_classifier, ["query", "q_proj"])
    assert problem.startswith("train.lora.target_modules: 'q_proj' matches no linear layer")
    assert "value" in problem
    assert strategies.lora_targets_problem(tiny_classifier, ["query", "value"]) is None


def test_phase_plan_rates():
    phases = [PhaseParams(0, 1, 1e-3, 1.0), PhaseParams(2, 2, 1e-4, 0.5)]
    plan = strategies.PhasePlan(phases, steps_per_epoch=10, warmup_ratio=0.0)
    assert plan.start_steps == [0, 10] and plan.start_epochs == [0, 1] and plan.total_epochs == 3
    assert [plan.phase_at(s) for s in (0, 9, 10, 29)] == [0, 0, 1, 1]
    assert [plan.phase_of_epoch(e) for e in (1, 2, 3)] == [0, 1, 1]
    head, deep = plan.lr_lambda(0), plan.lr_lambda(2)
    assert head(0) == pytest.approx(1e-3)  # each phase restarts at its own peak
    assert head(5) == pytest.approx(0.5e-3)  # and decays linearly within the phase
    assert head(10) == pytest.approx(1e-4)
    assert deep(10) == pytest.approx(1e-4 * 0.25)  # two layers down: decay ** 2
    warm = strategies.PhasePlan(phases, steps_per_epoch=10, warmup_ratio=0.2).lr_lambda(0)
    assert warm(0) < warm(1) < warm(2) == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------- soft prompts
PROMPT = PromptTuningParams(virtual_tokens=5, learning_rate=1e-2, init="vocab")


def prompt_tuned(tiny_classifier) -> torch.nn.Module:
    """A copy of the tiny classifier in peft prompt tuning, its prompt and head moved off their init."""
    import copy

    cfg = dataclasses.replace(
        load_params(ROOT / "params.yaml").train, strategy="prompt_tuning", prompt_tuning=PROMPT
    )
    model = strategies.prepare_model(copy.deepcopy(tiny_classifier), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    ids = torch.randint(0, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def encoder_inputs(model: torch.nn.Module, inputs: dict) -> dict:
    """What the classifier's encoder (``bert``) was called with."""
    seen = {}
    bert = model.get_submodule("base_model.bert" if strategies.is_prompt_tuned(model) else "bert")
    handle = bert.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        seen["logits"] = model(**inputs).logits
    handle.remove()
    return seen


def test_prompt_tuning_trains_the_prompt_and_the_head_only(tiny_classifier):
    model = prompt_tuned(tiny_classifier)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "prompt_encoder.default.embedding.weight",
        "base_model.bert.pooler.dense.modules_to_save.default.weight",
        "base_model.bert.pooler.dense.modules_to_save.default.bias",
        "base_model.classifier.modules_to_save.default.weight",
        "base_model.classifier.modules_to_save.default.bias",
    }
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == model.get_nb_trainable_parameters()[0] == 5 * 16 + (16 * 16 + 16) + (16 * 4 + 4)


@pytest.mark.parametrize("saved", [False, True])
def test_the_soft_prompt_is_prepended(tiny_classifier, saved):
    model = prompt_tuned(tiny_classifier)
    prompt = model.get_prompt_embedding_to_save("default")
    if saved:
        model = strategies.finalize_model(model).eval()
        assert torch.equal(model.soft_prompt, prompt)
    inputs = batch()
    seen = encoder_inputs(model, inputs)
    embeds, words = seen["inputs_embeds"], tiny_classifier.get_input_embeddings()(inputs["input_ids"])
    assert embeds.shape == (3, 5 + 7, 16)
    assert torch.equal(embeds[:, :5], prompt.expand(3, -1, -1)) and torch.equal(embeds[:, 5:], words)
    assert seen["attention_mask"][:, :5].eq(1).all()
    assert torch.equal(seen["attention_mask"][:, 5:], inputs["attention_mask"])
    assert seen["token_type_ids"].shape == (3, 12)


def test_prompt_tuned_model_saves_and_reloads_with_identical_logits(tiny_classifier, tmp_path):
    model = prompt_tuned(tiny_classifier)
    trained = encoder_inputs(model, batch())["logits"]
    final = strategies.finalize_model(model)
    assert all(p.requires_grad for p in final.parameters())
    final.save_pretrained(tmp_path)
    loaded = models.load_model(tmp_path).eval()
    assert isinstance(loaded, models.SoftPromptMixin) and loaded.config.soft_prompt_tokens == 5
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, trained)
    # the Trainer finds the labels argument (recovery fine-tunes and distillation need it)
    from transformers.utils import find_labels

    assert find_labels(type(loaded)) == ["labels"]
    # a classifier without a prompt still loads as the plain transformers class
    tiny_classifier.save_pretrained(tmp_path / "plain")
    assert type(models.load_model(tmp_path / "plain")) is type(tiny_classifier)


def test_prompt_and_text_must_fit_the_positions(tiny_classifier):
    cfg = dataclasses.replace(load_params(ROOT / "params.yaml").train, strategy="prompt_tuning")
    positions = tiny_classifier.config.max_position_embeddings  # 512
    strategies.validate(tiny_classifier, cfg, positions - cfg.prompt_tuning.virtual_tokens)
    with pytest.raises(UserError, match=r"^train.prompt_tuning.virtual_tokens: 20 \+ base.max_length 500 "):
        strategies.validate(tiny_classifier, cfg, 500)


def test_dropout_override(tiny_classifier):
    import copy

    model = copy.deepcopy(tiny_classifier)
    strategies.override_dropout(model, 0.3)
    ps = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.3}
    assert model.config.hidden_dropout_prob == 0.3 and model.config.attention_probs_dropout_prob == 0.3


def test_fgm_moves_each_example_by_epsilon(tiny_classifier):
    import copy

    model = copy.deepcopy(tiny_classifier).eval()  # no dropout: the two losses differ by delta alone
    fgm = strategies.FGM(model, epsilon=0.5)
    inputs = {"input_ids": torch.randint(0, 100, (3, 7)), "labels": torch.tensor([0, 1, 2])}
    with fgm.capture():
        model(**inputs).loss.backward()
    delta = fgm.delta()
    assert delta.shape == (3, 7, 16)
    assert delta.flatten(1).norm(dim=1) == pytest.approx(torch.full((3,), 0.5), abs=1e-5)
    model.zero_grad()
    with torch.no_grad():
        clean = model(**inputs).loss
        with fgm.perturb(delta):
            adversarial = model(**inputs).loss
    assert adversarial > clean  # the step goes up the loss gradient


# -------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_key_depends_on_params_and_data(tmp_path):
    data = tmp_path / "train.parquet"
    data.write_bytes(b"one")
    key = checkpoints.checkpoint_key({"train": {"epochs": 3}}, [data])
    assert key == checkpoints.checkpoint_key({"train": {"epochs": 3}}, [data])
    assert key != checkpoints.checkpoint_key({"train": {"epochs": 4}}, [data])
    data.write_bytes(b"two")
    assert key != checkpoints.checkpoint_key({"train": {"epochs": 3}}, [data])


def test_latest_checkpoint_skips_and_removes_incomplete_ones(tmp_path):
    for step, complete in ((8, True), (16, True), (24, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-32").mkdir()
    (tmp_path / "checkpoint-32" / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    latest = checkpoints.latest(tmp_path)
    assert latest.name == "checkpoint-16" and checkpoints.step_of(latest) == 16
    assert not (tmp_path / "checkpoint-24").exists() and not (tmp_path / "checkpoint-32").exists()
    assert checkpoints.latest(tmp_path / "none") is None and checkpoints.step_of(None) == 0
