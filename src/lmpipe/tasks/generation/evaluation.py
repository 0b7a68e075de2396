"""Generation's evaluation (evaluate): greedy generations on the test split, scored with ROUGE-1/2/L and
exact match, the references' perplexity, and two baselines with the paired bootstrap CI of each
ROUGE-L difference over test rows:
* **lead**: the input's first k words (k = the train targets' median length, or ``generation.lead_words``);
* **zero-shot**: the untuned ``base.model`` with the same prompts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lmpipe.modeling import generation, models
from lmpipe.tasks import get
from lmpipe.tasks.base import Baseline, Evaluation, Predictions
from lmpipe.tasks.generation import GENERATION, encode_prompts, encode_targets, paired_ci, rouge_rows

SCORES = ("rouge1", "rouge2", "rougeL", "exact_match")


@dataclass
class Generated:
    """One predictor's texts on a frame, its per-row scores, and its perplexity of the references."""

    texts: list[str]
    rows: pd.DataFrame  # rouge1, rouge2, rougeL, exact_match per row
    perplexity: float | None = None

    def metrics(self) -> dict[str, float]:
        out = {k: round(float(v), 4) for k, v in self.rows.mean().items()}
        if self.perplexity is not None:
            out["perplexity"] = round(self.perplexity, 4)
        return out


def lead_words(train: pd.DataFrame, params) -> int:
    """The lead baseline's k: ``generation.lead_words``, else the train targets' median length in words."""
    k = params.generation.lead_words
    return k if k is not None else max(int(statistics.median(train["target"].str.split().str.len())), 1)


class LeadBaseline(Baseline):
    """The input's first k words."""

    def __init__(self, k: int):
        self.k = k
        self.title = f"lead-{k}"

    def predict(self, frame: pd.DataFrame) -> Predictions:
        texts = [" ".join(t.split()[: self.k]) for t in frame["text"]]
        return Predictions(labels=[], predicted=texts, confidence=[None] * len(texts))

    def generated(self, frame: pd.DataFrame) -> Generated:
        """Its texts on ``frame`` and their scores against the targets."""
        texts = self.predict(frame).predicted
        return Generated(texts, rouge_rows(frame["target"].tolist(), texts))

    def unit_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return np.zeros((len(frame), 0))


def fit_baseline(train, params, labels) -> LeadBaseline:
    return LeadBaseline(lead_words(train, params))


def load_generator(model_dir):
    """A causal LM from a folder: a model trained here (its config records the task), or an untuned one."""
    return (
        get(GENERATION)
        .head()
        .from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False, use_safetensors=True)
    )


def run_model(model, tokenizer, frame: pd.DataFrame, prompts, targets, params, desc: str) -> Generated:
    """``model``'s greedy generations from ``prompts`` (ids) and its perplexity of ``targets`` (ids)."""
    cfg = params.generation
    texts = generation.generate(model, tokenizer, prompts.ids, cfg.max_new_tokens, cfg.batch_size, desc=desc)
    nll, count = generation.reference_nll(model, tokenizer, prompts.ids, targets, cfg.batch_size)
    perplexity = math.exp(nll.sum() / max(count.sum(), 1))
    return Generated(texts, rouge_rows(frame["target"].tolist(), texts), perplexity)


def rouge_versus(ours: Generated, other: Generated, seed: int) -> dict[str, float]:
    """The mean per-row ROUGE-L difference, with its 95% paired bootstrap CI."""
    ci = paired_ci(ours.rows["rougeL"], other.rows["rougeL"], seed)
    return {"rougeL": ci["mean"], "rougeL_ci95_low": ci["ci95_low"], "rougeL_ci95_high": ci["ci95_high"]}


def evaluate(model_dir, train: pd.DataFrame, test: pd.DataFrame, params) -> Evaluation:
    seed, cfg, base = params.base.seed, params.generation, params.base
    tokenizer = models.load_tokenizer(model_dir)
    # both models read the same prompts and are scored on the same targets (one tokenizer)
    prompts = encode_prompts(tokenizer, test, cfg, base.max_length, base.reading.mode)
    targets, _ = encode_targets(tokenizer, test["target"], cfg.max_target_tokens)
    tuned = load_generator(model_dir).to(models.device())
    ours = run_model(tuned, tokenizer, test, prompts, targets, params, "test (tuned)")
    del tuned
    untuned = load_generator(models.resolve_model_dir(base.model, base.revision)).to(models.device())
    zero = run_model(untuned, tokenizer, test, prompts, targets, params, "test (zero-shot)")
    del untuned
    lead = fit_baseline(train, params, [])
    first = lead.generated(test)
    versus = {"lead": rouge_versus(ours, first, seed), "zero_shot": rouge_versus(ours, zero, seed)}
    scores = {
        "task": GENERATION,
        "model": ours.metrics(),
        "baseline": first.metrics(),  # the lead baseline: what export's gate and lmpipe compare read
        "zero_shot": zero.metrics(),
        "model_minus_baseline": versus["lead"],
        "model_minus_zero_shot": versus["zero_shot"],
        "lead_words": lead.k,
        "max_new_tokens": params.generation.max_new_tokens,
        "prompts_truncated": prompts.truncated,
        "test_rows": len(test),
    }
    table = pd.DataFrame(
        {
            "id": test["id"],
            "prompt": [tokenizer.decode(ids) for ids in prompts.ids],
            "reference": test["target"],
            "generation": ours.texts,
            **{k: ours.rows[k].round(4) for k in SCORES},
        }
    )
    baselines = pd.DataFrame(
        {
            "id": test["id"],
            "reference": test["target"],
            "lead": first.texts,
            "lead_rougeL": first.rows["rougeL"].round(4),
            "zero_shot": zero.texts,
            "zero_shot_rougeL": zero.rows["rougeL"].round(4),
        }
    )
    # the rows where the tuned model does worse than the input's first words, worst first
    worse = table.assign(lead=first.texts, lead_rougeL=first.rows["rougeL"].round(4))
    worse = worse[worse["rougeL"] < worse["lead_rougeL"]].sort_values("rougeL", kind="stable")
    by_length = length_buckets(test["text"], {"model": ours, "lead": first, "zero_shot": zero}, seed)
    return Evaluation(
        scores=scores,
        per_class={"model": {}, "baseline": {}},  # no classes
        tables={
            "predictions.csv": table,
            "baseline_predictions.csv": baselines,
            "misclassified.csv": worse.drop(columns=["prompt"]),
        },
        plots={"rougeL_by_prompt_length": by_length},
        logged={"zero_shot_test_": zero.metrics(), "model_minus_zero_shot_": versus["zero_shot"]},
    )


def length_buckets(texts, predictors: dict[str, Generated], seed: int, buckets: int = 4) -> pd.DataFrame:
    """Mean ROUGE-L by the input's length in words (quartiles; the prompt itself is often cut to
    ``base.max_length``, so its own length says little), per predictor, with a 95% bootstrap CI."""
    lengths = np.array([len(str(t).split()) for t in texts])
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, buckets + 1)))
    if len(edges) < 2:  # every input the same length: one bucket
        edges = np.array([lengths.min(), lengths.max() + 1])
    which = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        mask = which == b
        if not mask.any():
            continue
        row = {"bucket": b, "max_input_words": int(lengths[mask].max()), "rows": int(mask.sum())}
        for name, g in predictors.items():
            values = g.rows["rougeL"].to_numpy()[mask]
            ci = paired_ci(values, np.zeros_like(values), seed)
            row.update(
                {
                    f"{name}_rougeL": ci["mean"],
                    f"{name}_ci95_low": ci["ci95_low"],
                    f"{name}_ci95_high": ci["ci95_high"],
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_summary(scores) -> str:
    m, z, b = scores["model"], scores["zero_shot"], scores["baseline"]
    lead_ci, zero_ci = scores["model_minus_baseline"], scores["model_minus_zero_shot"]
    return (
        f"evaluate: ROUGE-L {m['rougeL']:.4f} (R1 {m['rouge1']:.4f}, R2 {m['rouge2']:.4f}, exact {m['exact_match']:.3f}, "
        f"perplexity {m['perplexity']:.2f}) | lead-{scores['lead_words']} {b['rougeL']:.4f}, "
        f"tuned - lead {lead_ci['rougeL']:+.4f} [{lead_ci['rougeL_ci95_low']:+.4f}, {lead_ci['rougeL_ci95_high']:+.4f}] | "
        f"zero-shot {z['rougeL']:.4f} (perplexity {z['perplexity']:.2f}), tuned - zero-shot {zero_ci['rougeL']:+.4f} "
        f"[{zero_ci['rougeL_ci95_low']:+.4f}, {zero_ci['rougeL_ci95_high']:+.4f}]; {scores['prompts_truncated']} of "
        f"{scores['test_rows']} prompts cut to base.max_length"
    )
