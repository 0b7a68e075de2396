"""Text generation (``base.task: generation``): a prompt in, a text out, with a causal language model.

A row is an input ``text`` and its ``target``. The prompt is ``generation.prompt_template`` with the
text in it, wrapped in the model's chat template where it has one (``generation.chat_template: auto``),
or a chat's own earlier turns (``context``). Training scores the target's tokens only (the prompt is
masked); the best epoch is chosen on val ROUGE-L of greedy generations; evaluate compares the tuned
model with two baselines (the input's first words, and the untuned model with the same prompt).

What is shared by the parts (``data``, ``model``, ``evaluation``, ``analysis``, ``export``) is here:
rendering and truncating prompts, encoding targets, and the scores (ROUGE, exact match).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lmpipe.params.schema import EMBEDDED_DECODER, EMBEDDED_MODEL
from lmpipe.tasks import GENERATION
from lmpipe.tasks.base import Task

_MARK = "\x00TEXT\x00"  # where the input goes in a rendered prompt (split out, never tokenized)


@dataclass
class Prompts:
    """A frame's prompts as token ids, and how many had their input cut to fit ``base.max_length``."""

    ids: list[list[int]]
    truncated: int
    cut_tokens: int


def render_parts(tokenizer, context: str, cfg) -> tuple[str, str]:
    """The prompt's text before and after the input: the template in the chat template (or plain), or a
    chat's own turns with its last user turn's content as the input."""
    if context:
        turns = json.loads(context)
        turns[-1] = {**turns[-1], "content": _MARK}
    else:
        turns = [{"role": "user", "content": cfg.prompt_template.replace("{text}", _MARK)}]
    if cfg.chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    else:
        rendered = "\n\n".join(t["content"] for t in turns) + "\n"
    before, _, after = rendered.partition(_MARK)
    return before, after


def encode_prompts(tokenizer, frame: pd.DataFrame, cfg, max_length: int, keep: str = "head") -> Prompts:
    """Each row's prompt as ids, at most ``max_length`` of them. The template's own tokens are always
    kept; a long input is cut to fit: ``keep: head`` keeps its start (``base.reading.mode: head``),
    ``tail`` its end (cut from the left), ``head_tail`` both ends. The cuts are counted."""
    ids, truncated, cut = [], 0, 0
    cache: dict[str, tuple[list[int], list[int]]] = {}
    texts = tokenizer(frame["text"].tolist(), add_special_tokens=False, verbose=False)["input_ids"]
    for text_ids, context in zip(texts, frame["context"], strict=True):
        if context not in cache:
            before, after = render_parts(tokenizer, context, cfg)
            cache[context] = (
                tokenizer(before, add_special_tokens=False)["input_ids"],
                tokenizer(after, add_special_tokens=False)["input_ids"],
            )
        before, after = cache[context]
        budget = max(max_length - len(before) - len(after), 1)
        if len(text_ids) > budget:
            truncated, cut = truncated + 1, cut + len(text_ids) - budget
            if keep == "tail":
                text_ids = text_ids[-budget:]
            elif keep == "head_tail":
                head = budget // 2
                text_ids = text_ids[:head] + text_ids[len(text_ids) - (budget - head) :]
            else:
                text_ids = text_ids[:budget]
        ids.append(before + list(text_ids) + after)
    return Prompts(ids, truncated, cut)


def encode_targets(tokenizer, targets: Sequence[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Each target's ids with EOS after it (so the model learns to stop), cut to ``max_tokens``; and how
    many were cut."""
    out, cut = [], 0
    eos = tokenizer.eos_token_id
    for ids in tokenizer(list(targets), add_special_tokens=False, verbose=False)["input_ids"]:
        ids = list(ids) + [eos]
        if len(ids) > max_tokens:
            ids, cut = ids[:max_tokens], cut + 1
        out.append(ids)
    return out, cut


# ------------------------------------------------------------------------------------------- scores
_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”")


def normalise(text: str) -> str:
    """Lower case, no punctuation, one space: what exact match compares."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCT)).strip()


def rouge_rows(references: Sequence[str], predictions: Sequence[str]) -> pd.DataFrame:
    """Per row: ROUGE-1, ROUGE-2 and ROUGE-L F1 (``rouge-score``, Porter-stemmed) and exact match."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = []
    for ref, pred in zip(references, predictions, strict=True):
        s = scorer.score(ref, pred)
        rows.append(
            {
                "rouge1": s["rouge1"].fmeasure,
                "rouge2": s["rouge2"].fmeasure,
                "rougeL": s["rougeL"].fmeasure,
                "exact_match": float(normalise(ref) == normalise(pred)),
            }
        )
    return pd.DataFrame(rows, columns=["rouge1", "rouge2", "rougeL", "exact_match"])


def paired_ci(a: np.ndarray, b: np.ndarray, seed: int, resamples: int = 1000) -> dict[str, float]:
    """Mean of ``a - b`` over rows, with a 95% paired bootstrap CI (rows resampled together)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "mean": round(float(diff.mean()), 4),
        "ci95_low": round(float(low), 4),
        "ci95_high": round(float(high), 4),
    }


class Generation(Task):
    name = GENERATION
    unit = "text"
    row = "prompt"
    supports = frozenset({"robustness", "slices"})
    refusals = {
        "augment": "the augmentation is for class-labelled texts: use 0 with generation",
        "prompt_tuning": "prompt_tuning trains a classifier's soft prompt: use lora or full with generation",
        "folds": "k-fold search stratifies by class label: use 1 (the val split) with generation",
    }
    peft_task_type = "CAUSAL_LM"
    selection_metric = "rougeL"
    default_strategy = "lora"
    headline = {
        "prepare": ("rows_out", "target_words.p50", "token_length.truncated_fraction"),
        "train": ("best_val_rougeL", "best_epoch", "train_seconds"),
        "evaluate": (
            "model.rougeL",
            "model.perplexity",
            "model.exact_match",
            "baseline.rougeL",
            "zero_shot.rougeL",
            "model_minus_baseline.rougeL",
            "model_minus_baseline.rougeL_ci95_low",
            "model_minus_zero_shot.rougeL",
            "model_minus_zero_shot.rougeL_ci95_low",
        ),
        "analyze": ("robustness.model_mean_drop", "robustness.model_mean_changed"),
    }
    comparison_note = "a prompt and its generation; scores are ROUGE-L F1 per row"

    def label_map(self, frame):
        return {}  # no labels: labels.json is empty

    def prepare_summary(self, report, labels, prep):
        return f"{report['conflicting_texts']} inputs with different targets [{prep.on_conflict}]); median target {report['target_words']['p50']:g} words"

    def head(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def dataset(self, tokenizer, frame, label2id, max_length, reading=None, train=False, seed=0, params=None):
        return self.part("model").dataset(tokenizer, frame, max_length, reading, train, params)

    def param_problems(self, params):
        if params.base.reading.mode == "windows":
            yield (
                "base.reading.mode",
                "windows pools a classifier's logits; for generation use head, tail or head_tail",
            )
        yield from super().param_problems(params)  # augmentation, prompt tuning, folds: see refusals
        if params.base.model == EMBEDDED_MODEL:
            yield (
                "base.model",
                f"{EMBEDDED_MODEL} is an encoder and cannot generate: use {EMBEDDED_DECODER} or a local decoder",
            )

    def evaluate(self, model_dir, train, test, params):
        return self.part("evaluation").evaluate(model_dir, train, test, params)

    def describe(self, labels):
        return "a text generator (a causal language model fine-tuned on prompt/response pairs)"


TASK = Generation()
