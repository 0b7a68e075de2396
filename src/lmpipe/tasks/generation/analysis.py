"""Generation's analysis (analyze), on the first ``generation.analyze_rows`` test rows (each pass is a
generation): the tuned model and the lead baseline under the perturbations of
``analyze.robustness.perturbations`` applied to the input (the template is left alone), with the mean
ROUGE-L drop and the share of outputs that change; and ROUGE-L by the input's length. Calibration, the
attack and the attributions explain one label per text, and say so in one line."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmpipe.analysis.robustness import perturb
from lmpipe.modeling import generation
from lmpipe.tasks.base import Analysis, Part, Pass
from lmpipe.tasks.generation import encode_prompts, paired_ci, rouge_rows
from lmpipe.tasks.generation.evaluation import Generated, length_buckets


def analysis_pass(model, tokenizer, frame, max_length, batch_size, desc=None) -> Pass:
    """Nothing is computed here: the parts generate on the rows they study (``rows``), once each."""
    empty = np.zeros(0, dtype=int)
    return Pass(logits=np.zeros((0, 0)), y=empty, read=empty.astype(bool), predicted=[])


def _rows(analysis: Analysis) -> pd.DataFrame:
    n = analysis.params.generation.analyze_rows
    return analysis.test if n is None else analysis.test.head(n)


def _generate(analysis: Analysis, frame: pd.DataFrame, desc: str | None) -> list[str]:
    p = analysis.params
    prompts = encode_prompts(analysis.tokenizer, frame, p.generation, p.base.max_length, p.base.reading.mode)
    return generation.generate(
        analysis.model,
        analysis.tokenizer,
        prompts.ids,
        p.generation.max_new_tokens,
        p.generation.batch_size,
        desc,
    )


def _clean(analysis: Analysis) -> tuple[pd.DataFrame, dict[str, Generated]]:
    """The studied rows, and the model's and the lead baseline's outputs and scores on them (the
    baseline's from the stage's clean pass), computed once per stage."""
    if "clean" not in analysis.clean.extra:
        frame = _rows(analysis)
        refs = frame["target"].tolist()
        outputs = {
            "model": _generate(analysis, frame, "clean"),
            "baseline": analysis.baseline_clean.predicted[: len(frame)],
        }
        studied = {who: Generated(texts, rouge_rows(refs, texts)) for who, texts in outputs.items()}
        analysis.clean.extra["clean"] = (frame, studied)
    return analysis.clean.extra["clean"]


def _mean_ci(values: np.ndarray, resamples: int, seed: int) -> list[float]:
    ci = paired_ci(values, np.zeros_like(values), seed, resamples)
    return [ci["ci95_low"], ci["ci95_high"]]


def robustness(analysis: Analysis) -> Part:
    cfg, seed = analysis.params.analyze.robustness, analysis.params.base.seed
    frame, clean = _clean(analysis)
    refs = frame["target"].tolist()
    clean_scores = {who: g.rows["rougeL"].to_numpy() for who, g in clean.items()}
    rows = [{"perturbation": "clean", "strength": 0.0, "predictor": name, "rougeL": round(float(s.mean()), 4),
             "rougeL_drop": 0.0, "changed": 0.0} for name, s in clean_scores.items()]  # fmt: skip
    fragile, report = [], {}
    for name, strengths in cfg.perturbations.items():
        for strength in strengths:
            noisy = frame.assign(text=perturb(frame["text"].tolist(), name, strength, seed))
            outputs = {
                "model": _generate(analysis, noisy, None),
                "baseline": analysis.baseline.predict(noisy).predicted,
            }
            entry = {}
            for who, out in outputs.items():
                scores = rouge_rows(refs, out)["rougeL"].to_numpy()
                drop = clean_scores[who] - scores
                changed = np.array([a != b for a, b in zip(out, clean[who].texts, strict=True)], dtype=float)
                low, high = _mean_ci(drop, cfg.resamples, seed)
                rows.append({"perturbation": name, "strength": strength, "predictor": who,
                             "rougeL": round(float(scores.mean()), 4), "rougeL_drop": round(float(drop.mean()), 4),
                             "changed": round(float(changed.mean()), 4)})  # fmt: skip
                entry.update({f"{who}_rougeL": round(float(scores.mean()), 4), f"{who}_drop": round(float(drop.mean()), 4),
                              f"{who}_drop_ci95": [low, high], f"{who}_changed": round(float(changed.mean()), 4)})  # fmt: skip
                if who == "model":
                    for i in np.flatnonzero(changed):
                        fragile.append({"id": frame["id"].iloc[i], "perturbation": name, "strength": strength,
                                        "clean": clean["model"].texts[i], "perturbed": out[i], "rougeL_drop": round(float(drop[i]), 4)})  # fmt: skip
            report[f"{name}@{strength:g}"] = entry
    table = pd.DataFrame(rows)
    noisy = table[table["perturbation"] != "clean"]
    summary = {
        "rows": len(frame),
        "perturbations": report,
        "model_mean_drop": round(float(noisy.loc[noisy.predictor == "model", "rougeL_drop"].mean()), 4)
        if len(noisy)
        else 0.0,
        "model_mean_changed": round(float(noisy.loc[noisy.predictor == "model", "changed"].mean()), 4)
        if len(noisy)
        else 0.0,
    }
    fragile_frame = pd.DataFrame(
        fragile, columns=["id", "perturbation", "strength", "clean", "perturbed", "rougeL_drop"]
    )
    return Part(report={"robustness": summary}, tables={"robustness": table, "fragile": fragile_frame})


def slices(analysis: Analysis) -> Part:
    """ROUGE-L of the model and the lead baseline by the input's length (quartiles), with bootstrap CIs."""
    frame, clean = _clean(analysis)
    table = length_buckets(frame["text"], clean, analysis.params.base.seed)
    note = pd.DataFrame({"note": ["not for generation: slices by class need classes"]})
    return Part(report={"slices": {"rows": len(frame), "buckets": len(table)}},
                tables={"slices_length": table, "slices_class": note})  # fmt: skip
