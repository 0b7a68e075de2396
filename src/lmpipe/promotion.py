"""The promotion gate: criteria from ``export.gate``, decisions as registry aliases (not stages).

A version that passes every criterion becomes ``challenger``. It also becomes ``champion`` when there is
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


def decide(
    macro_f1: float,
    baseline_macro_f1: float,
    gate: GateParams,
    champion_macro_f1: float | None = None,
    champion_version: str | None = None,
    checks: list[tuple[bool, str]] | None = None,
) -> Decision:
    """Apply the gate to a candidate's test macro-F1. ``checks`` are extra (ok, reason) conditions,
    e.g. the int8 label agreement when the int8 model is the served one."""
    reasons: list[str] = []
    passed = True
    if macro_f1 >= gate.min_macro_f1:
        reasons.append(f"macro-F1 {macro_f1:.4f} >= min_macro_f1 {gate.min_macro_f1:.4f}")
    else:
        passed = False
        reasons.append(f"FAIL: macro-F1 {macro_f1:.4f} < min_macro_f1 {gate.min_macro_f1:.4f}")
    if gate.must_beat_baseline:
        if macro_f1 > baseline_macro_f1:
            reasons.append(f"macro-F1 {macro_f1:.4f} beats the baseline's {baseline_macro_f1:.4f}")
        else:
            passed = False
            reasons.append(
                f"FAIL: macro-F1 {macro_f1:.4f} does not beat the baseline's {baseline_macro_f1:.4f}"
            )
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
            f"({macro_f1:.4f} > {champion_macro_f1:.4f}): becomes champion"
        )
    else:
        reasons.append(
            f"does not beat champion v{champion_version} on the same test split "
            f"({macro_f1:.4f} <= {champion_macro_f1:.4f}): stays challenger"
        )
    return Decision(True, aliases, reasons)
