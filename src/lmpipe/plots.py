"""Matplotlib figures for MLflow (DVC gets the underlying data as CSV)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_figure(matrix: np.ndarray, names: Sequence[str], title: str):
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.1 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > threshold else "black",
            )
    ax.set_title(title)
    fig.tight_layout()
    return fig


def curves_figure(curves: dict[str, dict], kind: str, title: str):
    """``kind`` is ``roc`` or ``pr``: one line per class, one-vs-rest."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, c in curves.items():
        if kind == "roc":
            ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {c['roc_auc']:.3f})")
        else:
            ax.plot(c["recall"], c["precision"], label=f"{name} (AP {c['pr_auc']:.3f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    else:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def history_figure(history: Sequence[dict]):
    """Train loss and val macro-F1 per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    if any("train_loss" in row for row in history):
        ax.plot(epochs, [row.get("train_loss", np.nan) for row in history], "o-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(
        epochs, [row.get("val_macro_f1", np.nan) for row in history], "s-", color="C1", label="val macro-F1"
    )
    ax2.set_ylabel("val macro-F1")
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def robustness_figure(frame):
    """Macro-F1 against perturbation strength, one panel per perturbation, model against baseline
    (``frame``: perturbation, strength, predictor, macro_f1; strength 0 is the clean text)."""
    kinds = list(dict.fromkeys(frame["perturbation"]))
    cols = min(4, len(kinds)) or 1
    rows = -(-len(kinds) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, kind in zip(axes.flat, kinds, strict=False):
        part = frame[frame["perturbation"] == kind]
        for predictor, style in (("model", "o-"), ("baseline", "s--")):
            line = part[part["predictor"] == predictor].sort_values("strength")
            ax.plot(line["strength"], line["macro_f1"], style, label=predictor)
        ax.set_title(kind)
        ax.set_xlabel("strength")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("test macro-F1")
    axes[0][0].legend()
    fig.suptitle("Robustness: macro-F1 under perturbation (strength 0 = clean)")
    fig.tight_layout()
    return fig


def reliability_figure(tables: dict, eces: dict):
    """Reliability diagram: accuracy against confidence per bin, one line per predictor, with its ECE."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, table in tables.items():
        used = table[table["count"] > 0]
        ax.plot(used["confidence"], used["accuracy"], "o-", label=f"{name} (ECE {eces[name]:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left")
    ax.set_title("Reliability diagram (test)")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


def search_history_figure(history):
    """Val macro-F1 of each completed trial, and the best so far."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["trial"], history["value"], "o", label="trial")
    ax.step(history["trial"], history["best_so_far"], where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("val macro-F1")
    ax.legend(fontsize=8)
    ax.set_title("Optimisation history")
    fig.tight_layout()
    return fig


def importance_figure(importance):
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(importance) + 1.5))
    ax.barh(importance["param"][::-1], importance["importance"][::-1])
    ax.set_xlabel("importance")
    ax.set_title("Hyperparameter importance")
    fig.tight_layout()
    return fig


def comparison_figure(result: dict):
    """``lmpipe compare``: each model's scores with CIs (left), pairwise differences with CIs (right)."""
    metrics = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
    runs, pairs = result["runs"], result["pairs"]
    conf = f"{round(100 * result['confidence'])}% CI"
    height = 1.2 + 0.45 * max(len(runs) * 2, len(pairs) * 2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, height))
    for k, (key, name) in enumerate(metrics):
        ys = np.arange(len(runs)) * 2 + k * 0.6
        vals = np.array([r[key]["value"] for r in runs])
        lo = vals - np.array([r[key]["ci"][0] for r in runs])
        hi = np.array([r[key]["ci"][1] for r in runs]) - vals
        left.errorbar(100 * vals, ys, xerr=100 * np.vstack([lo, hi]), fmt="o", capsize=3, label=name)
    left.set_yticks(np.arange(len(runs)) * 2 + 0.3, [r["label"] for r in runs])
    left.invert_yaxis()
    left.set_xlabel(f"test score, % ({conf})")
    left.legend(fontsize=8)
    left.set_title("Models")
    if not pairs:  # different test sets: no paired differences, show each setting's spread over seeds
        _seed_groups_panel(right, result)
        fig.tight_layout()
        return fig
    labels = []
    for i, pair in enumerate(pairs):
        labels.append(f"{pair['b']}\n- {pair['a']}")
        for k, (key, name) in enumerate(metrics):
            d = pair[key]
            y = i * 2 + k * 0.6
            color = "tab:red" if d["significant"] else "tab:grey"
            right.errorbar(
                100 * d["diff"],
                y,
                xerr=[[100 * (d["diff"] - d["ci"][0])], [100 * (d["ci"][1] - d["diff"])]],
                fmt="o" if key == "accuracy" else "s",
                color=color,
                capsize=3,
                label=name if i == 0 else None,
            )
    right.axvline(0, color="black", linewidth=1)
    right.set_yticks(np.arange(len(pairs)) * 2 + 0.3, labels, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel(f"difference B - A, points ({conf}; red: excludes 0)")
    right.legend(fontsize=8)
    right.set_title("Paired differences (o accuracy, s macro-F1)")
    fig.tight_layout()
    return fig


def _seed_groups_panel(ax, result: dict) -> None:
    groups = result["seed_groups"]
    if not groups:
        ax.axis("off")
        ax.text(0.5, 0.5, "different test sets:\nno paired differences", ha="center", va="center")
        return
    for k, (key, name) in enumerate((("accuracy", "accuracy"), ("macro_f1", "macro-F1"))):
        ys = np.arange(len(groups)) * 2 + k * 0.6
        means = np.array([g[key]["mean"] for g in groups])
        stds = np.array([g[key]["std"] for g in groups])
        ax.errorbar(100 * means, ys, xerr=100 * stds, fmt="o", capsize=3, label=name)
    ax.set_yticks(np.arange(len(groups)) * 2 + 0.3, [" + ".join(g["members"]) for g in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test score, % (mean +- std over seeds)")
    ax.legend(fontsize=8)
    ax.set_title("Settings over seeds")


def top_tokens_figure(frame):
    """``explain.top_tokens``: one panel per predicted class, its words by total attribution (red toward
    the class, blue against, as in the explanations page)."""
    classes = list(dict.fromkeys(frame["class"]))
    ncols = min(3, max(1, len(classes)))
    nrows = max(1, -(-len(classes) // ncols))
    longest = max([int((frame["class"] == name).sum()) for name in classes], default=1)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.2 * ncols, (0.28 * longest + 1.2) * nrows), squeeze=False
    )
    for ax, name in zip(axes.flat, classes, strict=False):
        part = frame[frame["class"] == name]
        values = part["total_attribution"].to_numpy()[::-1]
        ax.barh(part["token"].to_numpy()[::-1], values, color=np.where(values > 0, "tab:red", "tab:blue"))
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("total attribution")
        ax.set_title(name)
    for ax in axes.flat[len(classes) :]:
        ax.axis("off")
    if not classes:
        axes.flat[0].text(0.5, 0.5, "no explained texts", ha="center", va="center")
    fig.suptitle("Top tokens per predicted class")
    fig.tight_layout()
    return fig
