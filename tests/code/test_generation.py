"""The generation task's parts on small real data: the BBC headlines, prompt/response and chat files and
their errors, prompts (template, chat template, truncation), the target-only loss, the scores, and one
LoRA training step and greedy generation on the tiny decoder (SmolLM2's tokenizer)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmpipe import tasks
from lmpipe.errors import UserError
from lmpipe.modeling.models import load_model, load_tokenizer
from lmpipe.params import load_params
from lmpipe.tasks.generation import encode_prompts, encode_targets, normalise, paired_ci, rouge_rows

ROOT = Path(__file__).resolve().parents[2]
TASK = tasks.get("generation")


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def prep(params, **kw):
    return dataclasses.replace(params.prepare, **kw)


def test_bbc_headlines_are_article_bodies_and_their_titles(params):
    raw, description = TASK.load_source(prep(params, source="data/builtin/bbc_headlines.yaml"))
    assert len(raw) == 2225 and "headlines" in description
    first = raw.iloc[0]
    assert first["target"] == "Ad sales boost Time Warner profit"
    assert first["text"].startswith("Quarterly profits at US media giant TimeWarner")
    assert first["target"] not in first["text"][:60]  # the title is not in its own prompt
    frame, report = TASK.clean(raw, prep(params, source="data/builtin/bbc_headlines.yaml"), 42)
    assert report["rows_out"] == len(frame) > 2000
    assert report["target_words"]["p50"] == 5.0
    parts = TASK.split(frame, params.split, 42)
    assert sum(map(len, parts.values())) == len(frame)


def test_prompt_response_csv_and_chat_jsonl(params, tmp_path):
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"prompt": ["a b c", "d e"], "response": ["x", "y z"]}).to_csv(csv, index=False)
    raw, _ = TASK.load_source(prep(params, source=str(csv)))
    assert raw[["text", "target"]].values.tolist() == [["a b c", "x"], ["d e", "y z"]]
    chats = tmp_path / "chats.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
             {"role": "assistant", "content": "Hello."}]  # fmt: skip
    chats.write_text(json.dumps({"messages": turns}) + "\n", encoding="utf-8")
    raw, _ = TASK.load_source(prep(params, source=str(chats)))
    assert raw.loc[0, "text"] == "Hi?" and raw.loc[0, "target"] == "Hello."
    assert json.loads(raw.loc[0, "context"]) == turns[:2]


def test_bad_generation_sources_name_the_file_line_and_column(params, tmp_path):
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"prompt": ["a", "b", "c"], "answer": ["x", "", "z"]}).to_csv(csv, index=False)
    with pytest.raises(
        UserError, match=r"prepare.response_column: column 'response' not found in .*pairs.csv"
    ):
        TASK.load_source(prep(params, source=str(csv)))
    raw, _ = TASK.load_source(prep(params, source=str(csv), response_column="answer"))
    with pytest.raises(
        UserError, match=r"row 3 has an empty target"
    ):  # line 3 of the file: its header is line 1
        TASK.clean(raw, prep(params, source=str(csv)), 0)
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"chats.jsonl line 1: messages must end with a user turn"):
        TASK.load_source(prep(params, source=str(chats)))


@pytest.fixture(scope="module")
def tokenizer(tiny_decoder):
    return load_tokenizer(tiny_decoder)


def test_prompts_use_the_chat_template_and_keep_it_whole_when_cut(params, tokenizer):
    frame = pd.DataFrame({"text": ["one two three " * 40, "short"], "target": ["t", "u"], "context": ""})
    cfg = params.generation
    prompts = encode_prompts(tokenizer, frame, cfg, 48, "head")
    assert prompts.truncated == 1 and prompts.cut_tokens > 0
    assert all(len(ids) <= 48 for ids in prompts.ids)
    long, short = (tokenizer.decode(ids) for ids in prompts.ids)
    assert long.startswith("<|im_start|>system") and long.endswith("<|im_start|>assistant\n")
    assert "Write a short headline" in long and "one two three" in long
    assert short.count("short") == 2  # "Write a short headline" and the input
    tail = tokenizer.decode(encode_prompts(tokenizer, frame.head(1), cfg, 48, "tail").ids[0])
    assert tail.endswith("<|im_start|>assistant\n") and "three" in tail  # cut from the left, template kept
    plain = dataclasses.replace(cfg, chat_template="none")
    assert not tokenizer.decode(encode_prompts(tokenizer, frame, plain, 48).ids[1]).startswith("<|im_start|>")


def test_the_loss_is_on_the_target_tokens_only(params, tokenizer):
    frame = pd.DataFrame({"text": ["the article body"], "target": ["The Title"], "context": ""})
    data = TASK.dataset(tokenizer, frame, {}, 64, {"mode": "head"}, params=params)
    item = data[0]
    scored = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != -100]
    assert tokenizer.decode(scored) == "The Title" + tokenizer.eos_token
    batch = data.collator(tokenizer)(
        [item, data[0] | {"input_ids": item["input_ids"][:5], "labels": [-100] * 5}]
    )
    assert (batch["labels"][1, 5:] == -100).all() and batch["attention_mask"][1, 5:].sum() == 0
    ids, cut = encode_targets(tokenizer, ["a b c d e f g h"], 3)
    assert cut == 1 and len(ids[0]) == 3


def test_scores_rouge_exact_match_and_the_paired_ci():
    rows = rouge_rows(
        ["Dollar gains on Greenspan speech", "Ad sales boost"], ["dollar gains!", "Ad sales boost"]
    )
    assert rows.loc[1, "rougeL"] == 1.0 and rows.loc[1, "exact_match"] == 1.0
    assert 0 < rows.loc[0, "rougeL"] < 1 and rows.loc[0, "exact_match"] == 0.0
    assert normalise("  Ad  sales, boost! ") == "ad sales boost"
    rng = np.random.default_rng(0)
    better = paired_ci(rng.uniform(0.4, 0.6, 200), rng.uniform(0.0, 0.2, 200), seed=1)
    assert better["ci95_low"] > 0.3 and better["ci95_low"] <= better["mean"] <= better["ci95_high"]


def test_a_lora_step_then_greedy_generation_on_the_tiny_decoder(params, tiny_decoder, tokenizer, tmp_path):
    from lmpipe.modeling import generation
    from lmpipe.modeling.training import train_model

    frame = pd.DataFrame(
        {"id": list("abcdefgh"), "text": [f"story number {i} about things" for i in range(8)],
         "target": [f"Title {i}" for i in range(8)], "context": ""}
    )  # fmt: skip
    p = dataclasses.replace(
        params, generation=dataclasses.replace(params.generation, val_rows=4, max_new_tokens=4)
    )
    cfg = dataclasses.replace(p.train, epochs=1, batch_size=4, logging_steps=1, patience=0)
    model = load_model(tiny_decoder, {}, task="generation")
    train = TASK.dataset(tokenizer, frame, {}, 32, {"mode": "head"}, True, 0, params=p)
    val = TASK.dataset(tokenizer, frame.head(4), {}, 32, {"mode": "head"}, params=p)
    result = train_model(model, tokenizer, train, val, cfg, 0, show_progress=False)
    assert result.selection_metric == "rougeL" and result.best_epoch == 1
    assert "val_rougeL" in result.history[0] and result.history[0]["val_perplexity"] > 1
    assert result.summary()["best_val_rougeL"] == result.best_val_score
    assert result.trainable_parameters < 10_000  # LoRA (auto for generation) on q_proj, v_proj
    texts = generation.generate(result.model, tokenizer, train.prompts.ids[:3], 4, 2)
    again = generation.generate(result.model, tokenizer, train.prompts.ids[:3], 4, 3)
    assert texts == again  # greedy and left-padded: the batch does not change a row's text
    nll, count = generation.reference_nll(
        result.model, tokenizer, train.prompts.ids[:2], train.targets[:2], 2
    )
    assert (count == [len(t) for t in train.targets[:2]]).all() and (nll > 0).all()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"model": "all-MiniLM-L6-v2"}, "base.model"),
        ({"reading": {"mode": "windows"}}, "base.reading.mode"),
    ],
)
def test_generation_params_that_cannot_work_are_named(params, tmp_path, override, key):
    import yaml

    from lmpipe.errors import ParamsError

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base"].update({"task": "generation", "model": "smollm2-135m"})
    for name, value in override.items():
        data["base"][name] = {**data["base"][name], **value} if isinstance(value, dict) else value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(path)


@pytest.mark.parametrize(
    ("task", "section", "override", "key"),
    [
        ("generation", "export", {"registered_variant": "int8"}, "export.registered_variant"),
        ("generation", "export", {"source": "pruned"}, "export.source"),
        ("classification", "export", {"registered_variant": "int4"}, "export.registered_variant"),
        ("generation", "generation", {"serve_max_new_tokens": 8}, "generation.serve_max_new_tokens"),
        (
            "generation",
            "compress",
            {"int4": {"enabled": True, "max_loss": None, "block_size": 48, "algo": "default"}},
            "compress.int4.block_size",
        ),
    ],
)
def test_export_and_compress_settings_a_task_cannot_serve_are_named(tmp_path, task, section, override, key):
    """A generator is served as fp32 or int4 from the trained model; a classifier has no int4."""
    import yaml

    from lmpipe.errors import ParamsError

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    if task == "generation":
        data["base"].update({"task": "generation", "model": "smollm2-135m"})
    data[section].update(override)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(path)
