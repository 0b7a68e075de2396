"""``lmpipe compare`` statistics on synthetic predictions whose differences are known."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from lmpipe.errors import UserError
from lmpipe.experiments.compare import Candidate, compare, holm, mcnemar, seed_groups, weighted_scores
from lmpipe.experiments.report import markdown
from tests.conftest import BIN, ROOT, git_commit, run

CLASSES = ["business", "sport", "tech", "politics"]


def truth(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(CLASSES), n)


def with_accuracy(y: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Predictions right on a random ``accuracy`` share of ``y``, wrong (another class) elsewhere."""
    rng = np.random.default_rng(seed)
    wrong = rng.permutation(len(y))[: round((1 - accuracy) * len(y))]
    pred = y.copy()
    pred[wrong] = (y[wrong] + rng.integers(1, len(CLASSES), len(wrong))) % len(CLASSES)
    return pred


def candidate(label: str, y: np.ndarray, pred: np.ndarray, **params) -> Candidate:
    frame = pd.DataFrame(
        {"id": [f"ex{i:04d}" for i in range(len(y))], "actual": [CLASSES[i] for i in y]}
        | {"predicted": [CLASSES[i] for i in pred]}
    )
    flat = {
        "base.seed": str(params.pop("seed", 42)),
        "train.learning_rate": "0.0001",
        "mlflow.experiment": label,
    }
    flat.update({k.replace("__", "."): str(v) for k, v in params.items()})
    # shuffled rows: compare must align the candidates by example id, not by row order
    return Candidate(label, "synthetic", frame.sample(frac=1, random_state=len(label)), flat)


def test_weighted_scores_match_sklearn():
    y = truth(300, seed=1)
    pred = with_accuracy(y, 0.7, seed=2)
    pred[pred == 3] = 0  # a class never predicted: zero_division=0
    scores = weighted_scores(np.ones(len(y)), y, pred, len(CLASSES))
    assert scores["accuracy"][0] == pytest.approx(accuracy_score(y, pred))
    assert scores["macro_f1"][0] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    # a resample is the same as scoring the repeated examples
    idx = np.random.default_rng(3).integers(0, len(y), len(y))
    counts = np.bincount(idx, minlength=len(y))
    resampled = weighted_scores(counts, y, pred, len(CLASSES))
    assert resampled["macro_f1"][0] == pytest.approx(
        f1_score(y[idx], pred[idx], average="macro", zero_division=0)
    )
    assert resampled["accuracy"][0] == pytest.approx(accuracy_score(y[idx], pred[idx]))


def test_mcnemar_exact_and_chi_square():
    a = np.array([True] * 1 + [False] * 9 + [True] * 20)
    b = np.array([False] * 1 + [True] * 9 + [True] * 20)
    exact = mcnemar(a, b)
    assert (exact["a_only"], exact["b_only"], exact["method"]) == (1, 9, "exact binomial")
    assert exact["p_value"] == pytest.approx(2 * (1 + 10) / 2**10)
    a = np.array([True] * 10 + [False] * 30)
    chi = mcnemar(a, ~a)
    assert chi["statistic"] == pytest.approx((20 - 1) ** 2 / 40)
    assert chi["p_value"] == pytest.approx(0.0026635, rel=1e-3)
    assert mcnemar(a, a)["p_value"] == 1.0


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


def test_a_real_difference_is_significant():
    y = truth(400)
    good, bad = (
        candidate("good", y, with_accuracy(y, 0.90, 1)),
        candidate("bad", y, with_accuracy(y, 0.70, 2)),
    )
    result = compare([bad, good], resamples=1000, seed=0)
    pair = result["pairs"][0]
    assert pair["accuracy"]["diff"] == pytest.approx(0.20)
    lo, hi = pair["accuracy"]["ci"]
    assert 0.13 < lo < 0.20 < hi < 0.27  # about +-1.96 * sqrt(var of paired differences / n)
    assert pair["accuracy"]["significant"] and pair["macro_f1"]["significant"]
    assert pair["mcnemar"]["method"].startswith("chi-square") and pair["mcnemar"]["p_value"] < 1e-6
    report = markdown(result)
    assert "good is better by 20.00 pt" in report and "no significant difference" not in report


def test_an_identical_pair_is_not_significant():
    y = truth(200)
    pred = with_accuracy(y, 0.8, 5)
    result = compare([candidate("a", y, pred), candidate("b", y, pred.copy())], resamples=500, seed=0)
    pair = result["pairs"][0]
    assert pair["accuracy"] == {"diff": 0.0, "ci": [0.0, 0.0], "significant": False}
    assert pair["mcnemar"]["p_value"] == 1.0 and not pair["mcnemar"]["significant"]
    assert "**b vs a: no significant difference.**" in markdown(result)


def test_same_accuracy_different_errors_is_not_significant():
    y = truth(200)
    a, b = with_accuracy(y, 0.85, 7), with_accuracy(y, 0.85, 8)  # same score, different mistakes
    pair = compare([candidate("a", y, a), candidate("b", y, b)], resamples=1000, seed=0)["pairs"][0]
    lo, hi = pair["accuracy"]["ci"]
    assert lo < 0 < hi and not pair["accuracy"]["significant"]
    assert pair["mcnemar"]["p_value"] > 0.5


def test_seeded_bootstrap_is_reproducible():
    y = truth(150)
    cands = [candidate("a", y, with_accuracy(y, 0.8, 1)), candidate("b", y, with_accuracy(y, 0.75, 2))]
    first, again = compare(cands, resamples=300, seed=3), compare(cands, resamples=300, seed=3)
    assert json.dumps(first) == json.dumps(again)
    other = compare(cands, resamples=300, seed=4)
    assert other["pairs"][0]["accuracy"]["ci"] != first["pairs"][0]["accuracy"]["ci"]


def test_seed_groups_mean_and_std():
    y = truth(100)
    accs = [0.80, 0.84, 0.88]
    cands = [
        candidate(f"s{s}", y, with_accuracy(y, a, s), seed=s) for s, a in zip((1, 2, 3), accs, strict=True)
    ]
    cands.append(candidate("lr", y, with_accuracy(y, 0.9, 9), train__learning_rate=5e-5))
    assert seed_groups(cands) == [[0, 1, 2]]
    result = compare(cands, resamples=200, seed=0)
    (group,) = result["seed_groups"]
    assert group["members"] == ["s1", "s2", "s3"] and group["seeds"] == ["1", "2", "3"]
    assert group["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert group["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert result["differing_params"] == ["base.seed", "train.learning_rate"]
    assert len(result["pairs"]) == 6
    assert "## Across seeds" in markdown(result)


def test_bad_inputs_are_user_errors():
    y = truth(50)
    pred = with_accuracy(y, 0.8, 1)
    with pytest.raises(UserError, match="at least two"):
        compare([candidate("a", y, pred)])
    shorter = candidate("b", y[:40], pred[:40])
    with pytest.raises(UserError, match="different test sets: a has 50 examples, b has 40"):
        compare([candidate("a", y, pred), shorter])
    relabelled = candidate("c", (y + 1) % 4, pred)
    with pytest.raises(UserError, match="different true labels"):
        compare([candidate("a", y, pred), relabelled])
    with pytest.raises(UserError, match="given more than once"):
        compare([candidate("a", y, pred), candidate("a", y, pred)])


def lmpipe(*args: str, cwd) -> subprocess.CompletedProcess:
    return run([str(BIN / "lmpipe"), *args], cwd, check=False)


def test_cli_compares_git_revisions_and_rejects_bad_input(tmp_path):
    """The real console script on a git repo holding two committed evaluations."""
    repo = tmp_path / "repo"
    (repo / "reports/evaluate").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    run(["git", "init", "-q"], repo)
    y = truth(300)
    for tag, acc, seed in (("weak", 0.70, 1), ("strong", 0.92, 2)):
        candidate(tag, y, with_accuracy(y, acc, seed)).predictions.to_csv(
            repo / "reports/evaluate/predictions.csv", index=False
        )
        git_commit(repo, tag)
        run(["git", "tag", tag], repo)

    result = lmpipe("compare", "weak", "strong", "--resamples", "500", "--out", "cmp", cwd=repo)
    assert result.returncode == 0, result.stderr
    assert "strong - weak: accuracy +22.00 pt" in result.stdout and ": significant" in result.stdout
    data = json.loads((repo / "cmp/comparison.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["weak", "strong"]
    assert data["runs"][0]["accuracy"]["value"] == pytest.approx(0.70)
    assert data["runs"][0]["source"].startswith("git revision")
    assert data["runs"][0]["seed"] == "42"
    report = (repo / "cmp/report.md").read_text()
    assert "strong is better by 22.00 pt" in report and "(comparison.png)" in report
    assert (repo / "cmp/comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the identical pair: HEAD is the tag "strong"
    same = lmpipe("compare", "strong", "HEAD", "--resamples", "200", "--out", "same", cwd=repo)
    assert same.returncode == 0, same.stderr
    assert "not significant" in same.stdout
    assert "no significant difference" in (repo / "same/report.md").read_text()

    for args, message in (
        (["weak"], "error: compare needs at least two experiments or runs, got 1"),
        (["weak", "nosuch"], "error: unknown experiment or run 'nosuch'"),
        (["weak", "0123456789abcdef0123456789abcdef"], "error: unknown experiment or run '0123456789abc"),
    ):
        bad = lmpipe("compare", *args, "--out", "bad", cwd=repo)
        assert bad.returncode == 2
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert bad.stderr.startswith(message) and "Traceback" not in bad.stderr
        assert not (repo / "bad").exists()


def test_different_splits_per_seed_need_unpaired_and_get_means_over_seeds():
    """Another base.seed draws another split: no shared examples, so the paired tests are refused (with a
    hint), and --unpaired compares the settings by their mean over seeds."""
    from scipy.stats import ttest_ind

    cands, accs = [], {}
    for lr, acc_by_seed in (("0.0001", (0.60, 0.64, 0.62)), ("0.0003", (0.80, 0.86, 0.83))):
        for seed, acc in zip((1, 2, 3), acc_by_seed, strict=True):
            y = truth(100, seed=seed)  # a different test set per seed
            c = candidate(f"lr{lr}-s{seed}", y, with_accuracy(y, acc, seed), seed=seed)
            c.params["train.learning_rate"] = lr
            c.predictions["id"] = c.predictions["id"] + f"-{seed}"
            cands.append(c)
            accs.setdefault(lr, []).append(acc)
    with pytest.raises(UserError, match="different test sets.*add --unpaired"):
        compare(cands, resamples=200)
    result = compare(cands, resamples=200, seed=0, unpaired=True)
    assert result["paired"] is False and result["pairs"] == []
    assert result["test_examples"] == [100] * 6
    assert [g["members"] for g in result["seed_groups"]] == [
        [c.label for c in cands[:3]],
        [c.label for c in cands[3:]],
    ]
    (between,) = result["between_settings"]
    assert between["accuracy"]["diff"] == pytest.approx(np.mean(accs["0.0003"]) - np.mean(accs["0.0001"]))
    expected_p = ttest_ind(accs["0.0003"], accs["0.0001"], equal_var=False).pvalue
    assert between["accuracy"]["p_value"] == pytest.approx(expected_p)
    assert between["accuracy"]["significant"]
    report = markdown(result)
    assert "**different test sets**" in report and "## Differences" not in report
    assert "## Between settings" in report


def test_across_splits_pairs_each_model_with_its_own_baseline():
    """Three seeded splits: the model is 2-6 pt ahead on each, so the t-interval over splits sits
    above 0; per split, the paired CI comes from compare on that split alone."""
    from lmpipe.experiments.compare import across_splits
    from lmpipe.experiments.report import splits_markdown

    models, baselines = [], []
    for seed, (acc_model, acc_base) in zip(
        (1, 2, 3), ((0.92, 0.88), (0.90, 0.86), (0.94, 0.88)), strict=True
    ):
        y = truth(400, seed)
        models.append(candidate(f"split-{seed}", y, with_accuracy(y, acc_model, seed), seed=seed))
        baselines.append(candidate(f"split-{seed}", y, with_accuracy(y, acc_base, seed + 10), seed=seed))
    result = across_splits(models, baselines, resamples=300)
    diffs = [s["accuracy"]["diff"] for s in result["per_split"]]
    assert diffs == pytest.approx([0.04, 0.04, 0.06])
    summary = result["summary"]["accuracy"]
    assert summary["model"]["mean"] == pytest.approx(0.92) and summary["baseline"]["mean"] == pytest.approx(
        (0.88 + 0.86 + 0.88) / 3
    )
    assert summary["diff"]["mean"] == pytest.approx(np.mean(diffs))
    low, high = summary["diff"]["ci"]
    assert 0 < low < np.mean(diffs) < high and summary["diff"]["significant"]
    assert summary["model_ahead_on"] == 3
    assert result["summary"]["seeds"] == ["1", "2", "3"]
    report = splits_markdown(result)
    assert "| split-2 | 2 | 400 |" in report and "the difference holds across splits" in report

    # flip one split: the interval over splits now spans 0, and the report says so
    flipped = across_splits(
        [models[0], models[1], baselines[2]], [baselines[0], baselines[1], models[2]], 300
    )
    assert not flipped["summary"]["accuracy"]["diff"]["significant"]
    assert "no real difference is shown" in splits_markdown(flipped)


def test_across_splits_needs_one_setting_on_distinct_seeds():
    from lmpipe.experiments.compare import across_splits

    y = truth(50)
    a = candidate("a", y, y, seed=1)
    with pytest.raises(UserError, match="differ in base.seed"):
        across_splits([a, candidate("b", y, y, seed=1)], [a, a])
    with pytest.raises(UserError, match="also differ in train.learning_rate"):
        across_splits([a, candidate("b", y, y, seed=2, train__learning_rate=0.1)], [a, a])


def test_token_classification_compares_entities_over_sentences():
    from lmpipe.tasks import token_classification as ner

    rng = np.random.default_rng(1)
    vocabulary = ["O", "O", "O", "B-per", "I-per", "B-loc"]
    true = [list(rng.choice(vocabulary, size=int(rng.integers(3, 9)))) for _ in range(60)]
    better = [list(t) for t in true]
    for seq in better[:10]:  # errors in 10 sentences
        seq[0] = "O" if seq[0] != "O" else "B-loc"
    worse = [["O"] * len(t) for t in true]  # finds nothing

    def words(pred: list[list[str]]) -> pd.DataFrame:
        rows = [
            {"id": f"s{i:03d}", "position": j, "token": "w", "actual": a, "predicted": p}
            for i, (t, q) in enumerate(zip(true, pred, strict=True))
            for j, (a, p) in enumerate(zip(t, q, strict=True))
        ]
        return pd.DataFrame(rows).sample(frac=1, random_state=0)  # the file's order is not the sentences'

    result = compare(
        [
            Candidate("worse", "synthetic", words(worse), task="token_classification"),
            Candidate("better", "synthetic", words(better), task="token_classification"),
        ],
        resamples=500,
    )
    assert result["task"] == "token_classification" and result["test_examples"] == 60
    for run_, pred in zip(result["runs"], (worse, better), strict=True):
        expected = ner.entity_scores(true, pred)["metrics"]
        assert run_["macro_f1"]["value"] == pytest.approx(expected["macro_f1"])
        assert run_["accuracy"]["value"] == pytest.approx(expected["accuracy"])  # token accuracy
    pair = result["pairs"][0]
    assert pair["macro_f1"]["significant"] and pair["macro_f1"]["diff"] > 0.5
    # McNemar counts whole sentences: the better model is wholly right on the 50 it did not touch
    wholly = sum(all(a == b for a, b in zip(t, p, strict=True)) for t, p in zip(true, worse, strict=True))
    assert pair["mcnemar"]["b_only"] + pair["mcnemar"]["a_only"] == 50 - wholly
    assert "Token classification: an example is a test sentence" in markdown(result)
