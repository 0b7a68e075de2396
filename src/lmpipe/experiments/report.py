"""The ``lmpipe compare`` report: the result of ``lmpipe.experiments.compare.compare`` as Markdown tables, then one
plain sentence per pair saying whether the difference is real. Apart from the statistics, so that
rewording the report re-runs no stage (evaluate uses the statistics only)."""

from __future__ import annotations

from typing import Any

from lmpipe import tasks
from lmpipe.experiments.compare import METRICS


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def _p(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def markdown(result: dict[str, Any], figure_name: str | None = "comparison.png") -> str:
    """The report: tables, then one plain sentence per pair saying whether the difference is real."""
    conf = f"{round(100 * result['confidence'])}%"
    if result["paired"]:
        intro = (
            f"{len(result['runs'])} models on the same {result['test_examples']} test examples "
            f"({len(result['classes'])} classes). Confidence intervals: {conf}, percentile bootstrap with "
            f"{result['resamples']} resamples (seed {result['seed']}); differences use the paired bootstrap "
            "(both models scored on the same resampled examples). Scores in percentage points."
        )
    else:
        intro = (
            f"{len(result['runs'])} models on **different test sets** "
            f"({', '.join(map(str, result['test_examples']))} examples; another `base.seed` draws another "
            "split), so no paired test is possible: each model's CI comes from its own test set "
            f"({result['resamples']} bootstrap resamples, seed {result['seed']}), and settings are compared "
            "by their mean over seeds (Welch's t-test). Scores in percentage points."
        )
    lines = ["# Experiment comparison", "", intro, ""]
    note = tasks.get(result.get("task", tasks.CLASSIFICATION)).comparison_note
    if note:
        lines += [note, ""]
    if result["differing_params"]:
        lines += [f"Params that differ: {', '.join(f'`{k}`' for k in result['differing_params'])}.", ""]
    lines += [
        "## Models",
        "",
        f"| model | source | seed | accuracy [{conf} CI] | macro-F1 [{conf} CI] |",
        "|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        cells = [f"{_pct(r[m]['value'])} [{_pct(r[m]['ci'][0])}, {_pct(r[m]['ci'][1])}]" for m in METRICS]
        lines.append(f"| {r['label']} | {r['source']} | {r['seed'] or '?'} | {cells[0]} | {cells[1]} |")
    if result["pairs"]:
        lines += _pairs_markdown(result, conf)
    if result["seed_groups"]:
        lines += [
            "",
            "## Across seeds",
            "",
            "Models whose params differ only by `base.seed`: mean +- standard deviation over the seeds. "
            "The spread is what a seed alone moves the score; a difference between settings smaller "
            "than it is not evidence.",
            "",
            "| models | seeds | accuracy | macro-F1 |",
            "|---|---|---|---|",
        ]
        for g in result["seed_groups"]:
            cells = [f"{_pct(g[m]['mean'])} +- {_pct(g[m]['std'])}" for m in METRICS]
            lines.append(f"| {', '.join(g['members'])} | {', '.join(g['seeds'])} | {cells[0]} | {cells[1]} |")
    if result["between_settings"]:
        lines += [
            "",
            "## Between settings (mean over seeds, B - A)",
            "",
            "| A | B | accuracy diff | Welch p | macro-F1 diff | Welch p |",
            "|---|---|---|---|---|---|",
        ]
        for e in result["between_settings"]:
            cells = [
                f"{_signed(e[m]['diff'])} | {'n/a' if e[m]['p_value'] is None else _p(e[m]['p_value'])}"
                for m in METRICS
            ]
            lines.append(f"| {', '.join(e['a'])} | {', '.join(e['b'])} | {cells[0]} | {cells[1]} |")
        lines.append("")
        for e in result["between_settings"]:
            a, b = " + ".join(e["a"]), " + ".join(e["b"])
            if any(e[m]["significant"] for m in METRICS):
                said = "; ".join(
                    f"{name} {_signed(e[m]['diff'])} pt ({'significant' if e[m]['significant'] else 'not significant'})"
                    for m, name in zip(METRICS, ("accuracy", "macro-F1"), strict=True)
                )
                lines.append(f"- **{b} vs {a}:** {said} at {result['alpha']:g} (Welch's t-test over seeds).")
            else:
                lines.append(
                    f"- **{b} vs {a}: no significant difference** over seeds (accuracy "
                    f"{_signed(e['accuracy']['diff'])} pt, macro-F1 {_signed(e['macro_f1']['diff'])} pt). "
                    "With few seeds per setting this test has little power: more seeds, or one shared split, "
                    "would tell more."
                )
    if figure_name:
        lines += ["", f"![accuracy and macro-F1 differences with {conf} CIs]({figure_name})"]
    if len(result["pairs"]) > 1:
        lines += [
            "",
            f"With {len(result['pairs'])} pairs, some CI will miss 0 by chance; the Holm-adjusted McNemar "
            "p-values account for the number of comparisons.",
        ]
    return "\n".join(lines) + "\n"


def _pairs_markdown(result: dict[str, Any], conf: str) -> list[str]:
    lines = [
        "",
        "## Differences (B - A)",
        "",
        f"| A | B | accuracy diff [{conf} CI] | macro-F1 diff [{conf} CI] | only A right | only B right "
        "| McNemar p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in result["pairs"]:
        mc = e["mcnemar"]
        cells = [
            f"{_signed(e[m]['diff'])} [{_signed(e[m]['ci'][0])}, {_signed(e[m]['ci'][1])}]"
            + (" *" if e[m]["significant"] else "")
            for m in METRICS
        ]
        lines.append(
            f"| {e['a']} | {e['b']} | {cells[0]} | {cells[1]} | {mc['a_only']} | {mc['b_only']} "
            f"| {_p(mc['p_value'])} ({'exact' if mc['statistic'] is None else 'chi2'}) | {_p(mc['p_holm'])} |"
        )
    lines += ["", "`*`: the CI excludes 0.", "", "## Verdict", ""]
    for e in result["pairs"]:
        lines.append(f"- {verdict(e, conf, result['alpha'])}")
    return lines


def verdict(pair: dict[str, Any], conf: str, alpha: float) -> str:
    """One plain sentence on one pair."""
    a, b = pair["a"], pair["b"]
    acc, f1, mc = pair["accuracy"], pair["macro_f1"], pair["mcnemar"]
    if not acc["significant"] and not f1["significant"] and not mc["significant"]:
        return (
            f"**{b} vs {a}: no significant difference.** Accuracy {_signed(acc['diff'])} pt "
            f"({conf} CI {_signed(acc['ci'][0])} to {_signed(acc['ci'][1])}), macro-F1 "
            f"{_signed(f1['diff'])} pt ({_signed(f1['ci'][0])} to {_signed(f1['ci'][1])}); both CIs include 0 "
            f"and McNemar's p = {_p(mc['p_holm'])}. On this test set the two cannot be told apart."
        )
    parts = []
    for name, m in (("accuracy", acc), ("macro-F1", f1)):
        better = b if m["diff"] > 0 else a
        if m["significant"]:
            parts.append(
                f"{name}: {better} is better by {abs(100 * m['diff']):.2f} pt "
                f"({conf} CI {_signed(m['ci'][0])} to {_signed(m['ci'][1])}, significant)"
            )
        else:
            parts.append(f"{name}: {_signed(m['diff'])} pt, not significant (the CI includes 0)")
    test = "significant" if mc["significant"] else "not significant"
    return (
        f"**{b} vs {a}:** {'; '.join(parts)}. McNemar's test on accuracy: p = {_p(mc['p_holm'])}, "
        f"{test} at {alpha:g}."
    )


def splits_markdown(result: dict[str, Any]) -> str:
    """The ``lmpipe splits`` report: one row per split, then the summary over splits and one sentence."""
    conf = f"{round(100 * result['confidence'])}%"
    s = result["summary"]
    lines = [
        "# One setting over several seeded splits",
        "",
        f"{s['splits']} runs of the same params on different `base.seed` (each draws its own split and "
        f"trains its own model and baseline). Per split: the paired difference (model minus baseline) with "
        f"its {conf} bootstrap CI ({result['resamples']} resamples). Across splits: mean +- std, and the "
        f"mean paired difference with a {conf} t-interval over the {s['splits']} per-split differences. "
        "Scores in percentage points.",
        "",
        "| run | seed | test texts | model macro-F1 | baseline macro-F1 | model - baseline | CI | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["per_split"]:
        f1 = row["macro_f1"]
        lines.append(
            f"| {row['run']} | {row['seed']} | {row['test_examples']} | {_pct(f1['model'])} | "
            f"{_pct(f1['baseline'])} | {_signed(f1['diff'])} | [{_signed(f1['ci'][0])}, {_signed(f1['ci'][1])}] "
            f"| {_p(row['mcnemar_p'])} |"
        )
    lines += [
        "",
        "| metric | model mean +- std | baseline mean +- std | mean difference | CI | model ahead on |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for m in METRICS:
        e = s[m]
        d = e["diff"]
        lines.append(
            f"| {m} | {_pct(e['model']['mean'])} +- {_pct(e['model']['std'])} | "
            f"{_pct(e['baseline']['mean'])} +- {_pct(e['baseline']['std'])} | {_signed(d['mean'])} | "
            f"[{_signed(d['ci'][0])}, {_signed(d['ci'][1])}] | {e['model_ahead_on']} of {s['splits']} |"
        )
    d = s["macro_f1"]["diff"]
    verdict = (
        f"the model is {'ahead of' if d['mean'] > 0 else 'behind'} the baseline by {abs(100 * d['mean']):.2f} pt "
        f"macro-F1 on average, and the {conf} interval over splits "
        + (
            "excludes 0: the difference holds across splits."
            if d["significant"]
            else "includes 0: no real difference is shown."
        )
    )
    return "\n".join([*lines, "", f"Over {s['splits']} splits, {verdict}", ""])
