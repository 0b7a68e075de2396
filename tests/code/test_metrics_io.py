import numpy as np
import pytest

from lmpipe import io
from lmpipe.metrics import classification_metrics, one_vs_rest_curves, per_class_report


def test_classification_metrics_known_values():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: c0 p=1/2 r=1/2 -> .5 ; c1 p=2/3 r=1 -> .8 ; c2 p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx(m["macro_f1"])  # balanced classes


def test_per_class_and_curves():
    y_true = np.array([0, 1, 1, 0])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    report = per_class_report(y_true, proba.argmax(1), ["neg", "pos"])
    assert report["pos"]["recall"] == pytest.approx(0.5)
    curves = one_vs_rest_curves(y_true, proba, ["neg", "pos"])
    assert curves["pos"]["roc_auc"] == pytest.approx(1.0)


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), io.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_staged_outputs_all_or_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), io.staged_outputs(tmp_path) as out:
        (out / "metrics.json").write_text("{}")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with io.staged_outputs(tmp_path) as out:
        (out / "metrics.json").write_text("{}")
        (out / "plots").mkdir()
        (out / "plots" / "a.csv").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "metrics.json", "plots"]


def _onehot(pred: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[pred]


def test_versus_baseline_tells_a_real_gap_from_noise():
    import pandas as pd

    from lmpipe.experiments.compare import predictions_frame, versus_baseline

    def gap_of(model, baseline):
        frames = [predictions_frame(test, _onehot(pred, 3), names) for pred in (model, baseline)]
        return versus_baseline(*frames, seed=0)

    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    y = rng.integers(0, 3, size=200)
    test = pd.DataFrame({"id": [f"t{i}" for i in range(200)], "label": [names[i] for i in y]})
    model = y.copy()
    model[:4] = (y[:4] + 1) % 3  # 4 errors
    baseline = y.copy()
    baseline[150:190] = (y[150:190] + 1) % 3  # 40 other errors

    gap = gap_of(model, baseline)
    assert gap["accuracy"] == pytest.approx((196 - 160) / 200)
    assert gap["model_only_right"] == 40 and gap["baseline_only_right"] == 4
    assert gap["mcnemar_p"] < 1e-6 and gap["macro_f1_significant"]
    assert 0 < gap["macro_f1_ci95_low"] < gap["macro_f1"] < gap["macro_f1_ci95_high"]

    baseline = y.copy()
    baseline[150:154] = (y[150:154] + 1) % 3  # as many errors, on other texts
    tie = gap_of(model, baseline)
    assert tie["accuracy"] == 0 and tie["model_only_right"] == tie["baseline_only_right"] == 4
    assert tie["mcnemar_p"] == pytest.approx(1.0) and not tie["macro_f1_significant"]
    assert tie["macro_f1_ci95_low"] < 0 < tie["macro_f1_ci95_high"]
