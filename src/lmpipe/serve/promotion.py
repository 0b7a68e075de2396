"""The promotion gate: criteria from ``export.gate``, decisions as registry aliases (not stages).

A version that passes every criterion (by default relative ones: it beats the TF-IDF baseline on the same
test rows with the paired bootstrap CI above 0) becomes ``challenger``. It also becomes ``champion`` when there is
no champion yet, or when it scores a strictly higher macro-F1 than the current champion *on the same test
split* (the export stage re-scores the champion's own ONNX model on today's test split, so the numbers
compare). A failing version stays registered, with no alias, and the reasons say why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lmpipe.params import GateParams

CHALLENGER = "challenger"
CHAMPION = "champion"


@dataclass
class Decision:
    passed: bool
    aliases: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


METRIC_NAMES = {"macro_f1": "macro-F1", "rougeL": "ROUGE-L"}


def decide(
    macro_f1: float,
    versus_baseline: dict,
    gate: GateParams,
    champion_macro_f1: float | None = None,
    champion_version: str | None = None,
    checks: list[tuple[bool, str]] | None = None,
    metric: str = "macro_f1",
) -> Decision:
    """Apply the gate to a candidate's test macro-F1. ``versus_baseline`` is the candidate-minus-baseline
    macro-F1 difference on the same test rows (``macro_f1``, ``macro_f1_ci95_low``, ``macro_f1_ci95_high``,
    as ``lmpipe.experiments.compare.versus_baseline`` gives it) with ``baseline_macro_f1``. ``checks`` are extra
    (ok, reason) conditions, e.g. the int8 label agreement when the int8 model is the served one.

    The default criteria are relative, so they hold on any data: beat the baseline (``gate.baseline``:
    ``ci`` = the paired bootstrap 95% CI of the difference lies above 0, ``point`` = a higher point
    estimate), and beat the champion for that alias. ``gate.min_macro_f1`` adds an absolute floor.

    ``metric`` names the score when it is not macro-F1 (generation: ``rougeL``; ``versus_baseline`` then
    has ``rougeL``, ``rougeL_ci95_low``, ... and ``baseline_rougeL``); the macro-F1 floor is not applied."""
    label = METRIC_NAMES.get(metric, metric)
    reasons: list[str] = []
    passed = True
    if gate.min_macro_f1 is not None and metric == "macro_f1":
        if macro_f1 >= gate.min_macro_f1:
            reasons.append(f"macro-F1 {macro_f1:.4f} >= min_macro_f1 {gate.min_macro_f1:.4f}")
        else:
            passed = False
            reasons.append(f"FAIL: macro-F1 {macro_f1:.4f} < min_macro_f1 {gate.min_macro_f1:.4f}")
    base = versus_baseline[f"baseline_{metric}"]
    diff, low, high = (versus_baseline[k] for k in (metric, f"{metric}_ci95_low", f"{metric}_ci95_high"))
    versus = (
        f"{100 * diff:+.2f} pt vs the baseline's {base:.4f}, 95% CI [{100 * low:+.2f}, {100 * high:+.2f}]"
    )
    baseline_checks = {  # gate.baseline: (passes, reason if it does, reason if it does not)
        "ci": (
            low > 0,
            "beats the baseline beyond test noise",
            "does not beat the baseline beyond test noise (CI low <= 0)",
        ),
        "point": (diff > 0, "beats the baseline", "does not beat the baseline"),
    }
    if gate.baseline in baseline_checks:
        ok, yes, no = baseline_checks[gate.baseline]
        passed = passed and ok
        reasons.append(f"{yes}: {versus}" if ok else f"FAIL: {no}: {versus}")
    for ok, reason in checks or []:
        passed = passed and ok
        reasons.append(reason if ok else f"FAIL: {reason}")
    if not passed:
        return Decision(False, [], reasons)
    aliases = [CHALLENGER]
    if champion_version is None:
        aliases.append(CHAMPION)
        reasons.append("no champion yet: becomes champion")
    elif champion_macro_f1 is None:
        reasons.append(f"champion v{champion_version} cannot be scored on this test split: stays challenger")
    elif macro_f1 > champion_macro_f1:
        aliases.append(CHAMPION)
        reasons.append(
            f"beats champion v{champion_version} on the same test split "
            f"({label} {macro_f1:.4f} > {champion_macro_f1:.4f}): becomes champion"
        )
    else:
        reasons.append(
            f"does not beat champion v{champion_version} on the same test split "
            f"({label} {macro_f1:.4f} <= {champion_macro_f1:.4f}): stays challenger"
        )
    return Decision(True, aliases, reasons)
