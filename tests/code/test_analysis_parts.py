"""The parts of the analyze stage that need no model: perturbations, flip rates, the attack's search,
calibration measures and temperature scaling, slices, and the params checks."""

from __future__ import annotations

import numpy as np
import pytest

from lmpipe.analysis import calibration, robustness, slices
from lmpipe.errors import ParamsError
from lmpipe.params import load_params, write_params
from tests.conftest import ROOT

TEXT = "The Bank of England raised rates, again.\nShares fell 3% in London; traders sold."


@pytest.mark.parametrize("name", sorted(robustness.PERTURBATIONS))
def test_perturbations_are_seeded_and_change_the_text(name):
    a = robustness.perturb([TEXT] * 3, name, 1.0 if name != "window_shift" else 0.5, seed=1)
    b = robustness.perturb([TEXT] * 3, name, 1.0 if name != "window_shift" else 0.5, seed=1)
    assert a == b
    assert all(t != TEXT and t.strip() for t in a)


def test_each_perturbation_does_what_it_names():
    assert robustness.perturb([TEXT], "lowercase", 1.0, 0)[0] == TEXT.lower()
    assert robustness.perturb([TEXT], "uppercase", 1.0, 0)[0] == TEXT.upper()
    stripped = robustness.perturb([TEXT], "strip_punctuation", 1.0, 0)[0]
    assert stripped == "The Bank of England raised rates again\nShares fell 3 in London traders sold"
    spaced = robustness.perturb([TEXT], "whitespace", 1.0, 0)[0]
    assert spaced.split() == TEXT.split() and spaced != TEXT
    words = TEXT.split()
    shifted = robustness.perturb([TEXT], "window_shift", 0.5, 0)[0]
    assert shifted.split() == words[len(words) // 2 :]
    dropped = robustness.perturb([TEXT], "word_dropout", 0.5, 0)[0].split()
    assert 0 < len(dropped) < len(words) and all(w in words for w in dropped)
    assert "\n" in robustness.perturb([TEXT], "word_dropout", 0.1, 3)[0]  # untouched gaps stay as they were
    noisy = robustness.perturb([TEXT], "char_noise", 1.0, 0)[0].split()
    assert (
        len(noisy) == len(words) and sum(a != b for a, b in zip(noisy, words, strict=True)) >= len(words) // 2
    )


def test_strength_is_a_dose():
    texts = [TEXT] * 50
    few = robustness.perturb(texts, "word_dropout", 0.1, 0)
    many = robustness.perturb(texts, "word_dropout", 0.6, 0)
    assert np.mean([len(t.split()) for t in many]) < np.mean([len(t.split()) for t in few])


def test_flip_rate_and_its_ci():
    clean = np.zeros(200, dtype=int)
    flipped = clean.copy()
    flipped[:20] = 1
    out = robustness.flip_rate(clean, flipped, 500, seed=0)
    assert out["flip_rate"] == pytest.approx(0.1)
    assert out["flip_rate_ci95_low"] < 0.1 < out["flip_rate_ci95_high"] < 0.2
    assert robustness.flip_rate(clean, clean, 200, 0)["flip_rate_ci95_high"] == 0


def test_attack_deletes_the_words_the_predictor_leans_on_first():
    # a keyword predictor: each "goal" or "match" adds evidence for class 1; both must go to flip it
    def proba(texts):
        score = np.array([2.0 * sum(w in ("goal", "match") for w in t.split()) - 1.0 for t in texts])
        p1 = 1 / (1 + np.exp(-score))
        return np.column_stack([1 - p1, p1])

    text = "the late goal won the match for the home side on a cold night in town"
    result = robustness.attack(text, 1, proba, max_edit_share=0.2)
    assert result.success and result.edits == 2 and result.budget == 3
    assert "goal" not in result.text_after.split() and "match" not in result.text_after.split()
    # the budget binds: one deletion cannot remove both keywords
    assert not robustness.attack(text, 1, proba, max_edit_share=0.07).success
    # only the words the predictor reads are candidates: "match" lies beyond the first 3 words
    assert not robustness.attack(text, 1, proba, max_edit_share=0.9, read_words=3).success
    frame, summary = robustness.attack_many([text, text], [1, 1], proba, 0.2)
    assert summary["success_rate"] == 1.0 and summary["mean_edits"] == 2 and len(frame) == 2


def test_temperature_scaling_fixes_an_overconfident_predictor():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    true_logits = rng.normal(size=(2000, 3))
    true_logits[np.arange(2000), y] += 1.5
    # draw labels from softmax(true_logits): those logits are calibrated; x4 makes them overconfident
    probs = calibration.softmax(true_logits)
    y = np.array([rng.choice(3, p=p) for p in probs])
    over = true_logits * 4
    t = calibration.fit_temperature(over, y)
    assert 3.3 < t < 4.8
    before = calibration.ece(calibration.softmax(over), y, 15)
    after = calibration.ece(calibration.softmax(over, t), y, 15)
    assert after < before / 3
    assert calibration.nll(over, y, t) < calibration.nll(over, y)
    # the same logits, the same temperature, to the byte
    assert calibration.fit_temperature(over, y) == t
    # scaling never changes a prediction
    assert (calibration.softmax(over, t).argmax(1) == over.argmax(1)).all()


def test_ece_brier_and_reliability_by_hand():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    table = calibration.reliability(proba, y, bins=2)  # bins [0, .5], (.5, 1]: all in the upper one
    assert table["count"].tolist() == [0, 4]
    assert table.loc[1, "confidence"] == pytest.approx(0.75) and table.loc[1, "accuracy"] == pytest.approx(
        0.75
    )
    assert calibration.ece(proba, y, 2) == pytest.approx(0.0)
    assert calibration.ece(proba, y, 10) == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4)
    expected = np.mean([2 * 0.1**2, 2 * 0.8**2, 2 * 0.3**2, 2 * 0.4**2])
    assert calibration.brier(proba, y) == pytest.approx(expected)


def test_slices_by_length_and_class():
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    model = np.array([0, 1, 0, 1, 1, 0, 1, 0])  # right on the short half, wrong on the long half
    base = y.copy()
    lengths = np.array([10, 20, 30, 40, 200, 300, 400, 500])
    table = slices.by_length(lengths, y, {"model": model, "baseline": base}, 2, 64, [1.0, 4.0], 200, 0)
    short = table[(table["bucket"] == "<= 64") & (table["predictor"] == "model")].iloc[0]
    long = table[(table["bucket"] == "> 256") & (table["predictor"] == "model")].iloc[0]
    assert short["texts"] == 4 and short["macro_f1"] == 1.0
    assert long["texts"] == 3 and long["macro_f1"] == 0.0
    assert set(table["bucket"]) == {"<= 64", "65-256", "> 256"}
    per_class = slices.by_class(y, {"model": model}, ["a", "b"], 200, 0)
    assert per_class["f1"].tolist() == pytest.approx([0.5, 0.5])
    assert (per_class["ci95_low"] <= per_class["f1"]).all() and (
        per_class["f1"] <= per_class["ci95_high"]
    ).all()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"robustness": {"perturbations": {"typos": [0.1]}}}, "analyze.robustness.perturbations.typos"),
        (
            {"robustness": {"perturbations": {"char_noise": [1.5]}}},
            "analyze.robustness.perturbations.char_noise[0]",
        ),
        (
            {"robustness": {"perturbations": {"window_shift": [1.0]}}},
            "analyze.robustness.perturbations.window_shift[0]",
        ),
        ({"calibration": {"bins": 1}}, "analyze.calibration.bins"),
        ({"explain": {"top_k_share": 0}}, "analyze.explain.top_k_share"),
        ({"attack": {"max_edit_share": 1}}, "analyze.attack.max_edit_share"),
    ],
)
def test_bad_analyze_params_name_the_key(tmp_path, override, key):
    write_params(tmp_path / "params.yaml", {"analyze": override}, ROOT / "params.yaml", allow_new=True)
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    assert err.value.key == key, str(err.value)
