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

import re
import string
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lmpipe.params.schema import EMBEDDED_DECODER, EMBEDDED_MODEL
from lmpipe.serve import generator
from lmpipe.serve.generator import Prompts
from lmpipe.tasks import GENERATION
from lmpipe.tasks.base import Task


def encode_prompts(tokenizer, frame: pd.DataFrame, cfg, max_length: int, keep: str = "head") -> Prompts:
    """Each row's prompt as ids, at most ``max_length`` of them (``generation.prompt_template`` in the chat
    template, or the row's own chat ``context``): the template's tokens are kept, a long input is cut
    at the end ``keep`` (``base.reading.mode``) says, and the cuts are counted. The served generator
    makes its prompts with the same function (``lmpipe.serve.generator.encode_prompts``)."""
    return generator.encode_prompts(
        tokenizer, frame["text"].tolist(), frame["context"].tolist(), cfg.prompt_template, cfg.chat_template,
        max_length, keep,
    )  # fmt: skip


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
    supports = frozenset({"robustness", "slices", "compress", "export"})
    own_compression = True  # int8 and int4 weights of a causal LM, judged on val ROUGE-L (export.py)
    served_variants = ("fp32", "int4")
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
        # within reports.MAX_COLUMNS: a wildcard counts 4 columns in dvc exp show
        "compress": (
            "variants.*.val_rougeL",
            "variants.*.tokens_per_s",
            "variants.*.within_budget",
            "latency_reliable",
        ),
        "export": (
            "served.rougeL",
            "served.tokens_per_s",
            "onnx_int4.speedup_tokens_per_s",
            "latency_reliable",
            "gate.passed",
        ),
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
        if params.export.source != "model":
            yield (
                "export.source",
                "a generator is exported from the trained model ('model'): export builds its fp32 and int4 "
                "ONNX Runtime GenAI folders from it",
            )
        if params.base.model == EMBEDDED_MODEL:
            yield (
                "base.model",
                f"{EMBEDDED_MODEL} is an encoder and cannot generate: use {EMBEDDED_DECODER} or a local decoder",
            )

    def compress(self, job):
        return self.part("export").compress(job)

    def evaluate(self, model_dir, train, test, params):
        return self.part("evaluation").evaluate(model_dir, train, test, params)

    def describe(self, labels):
        return "a text generator (a causal language model fine-tuned on prompt/response pairs)"


TASK = Generation()
