"""Does the model still work on the text people actually type? Seeded perturbations of test texts, the flip
rate they cause, and a black-box word-deletion attack: the same code for the model and the baseline.

Every perturbation is a function ``(text, strength, rng) -> text`` with ``strength`` a share in (0, 1], so
several strengths of one kind draw a curve. They edit words and the gaps between them in place, so a
perturbation changes only what it names (the clean text's newlines survive a word dropout).
"""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lmpipe.experiments.compare import bootstrap_weights

# words and the whitespace between them, alternating: "a  b\nc" -> ["a", "  ", "b", "\n", "c"]
_PIECES = re.compile(r"(\s+)")
_PUNCTUATION = set(string.punctuation) | set("“”‘’–—…«»")
_GAPS = ("  ", "\t", "\n", " \n  ", "   ")


def _pieces(text: str) -> list[str]:
    return [p for p in _PIECES.split(text) if p]


def _is_word(piece: str) -> bool:
    return not piece.isspace()


def _join(pieces: list[str]) -> str:
    """Pieces back into a text, where a deleted word leaves one gap (the later one) instead of two."""
    return re.sub(r"\s+(\s)", r"\1", "".join(pieces)).strip()


def _map_words(text: str, rate: float, rng: np.random.Generator, edit: Callable[[str], str]) -> str:
    pieces = _pieces(text)
    return "".join(edit(p) if _is_word(p) and rng.random() < rate else p for p in pieces)


def _typo(word: str, rng: np.random.Generator) -> str:
    """One letter swapped with its neighbour, dropped, or a random letter inserted."""
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if len(letters) < 2:
        return word
    i = letters[int(rng.integers(len(letters) - 1))]
    kind = int(rng.integers(3))
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    return word[:i] + string.ascii_lowercase[int(rng.integers(26))] + word[i:]


def char_noise(text: str, strength: float, rng: np.random.Generator) -> str:
    return _map_words(text, strength, rng, lambda w: _typo(w, rng))


def word_dropout(text: str, strength: float, rng: np.random.Generator) -> str:
    pieces = _pieces(text)
    words = [i for i, p in enumerate(pieces) if _is_word(p)]
    drop = {i for i in words if rng.random() < strength}
    if len(drop) == len(words):  # keep one word: an empty text is not a perturbation, it is no input
        drop.discard(words[int(rng.integers(len(words)))])
    return _join([p for i, p in enumerate(pieces) if i not in drop])


def lowercase(text: str, strength: float, rng: np.random.Generator) -> str:
    return _map_words(text, strength, rng, str.lower)


def uppercase(text: str, strength: float, rng: np.random.Generator) -> str:
    return _map_words(text, strength, rng, str.upper)


def strip_punctuation(text: str, strength: float, rng: np.random.Generator) -> str:
    return "".join(ch for ch in text if ch not in _PUNCTUATION or rng.random() >= strength)


def whitespace(text: str, strength: float, rng: np.random.Generator) -> str:
    return "".join(
        _GAPS[int(rng.integers(len(_GAPS)))] if p.isspace() and rng.random() < strength else p
        for p in _pieces(text)
    )


def window_shift(text: str, strength: float, rng: np.random.Generator) -> str:
    """The text without its first ``strength`` share of words: a model that reads only ``max_length``
    tokens then reads a later window of a long text (the baseline, which reads it all, loses the head)."""
    pieces = _pieces(text)
    words = [i for i, p in enumerate(pieces) if _is_word(p)]
    cut = min(int(round(strength * len(words))), len(words) - 1)
    return "".join(pieces[words[cut] :]) if words else text


PERTURBATIONS: dict[str, Callable[[str, float, np.random.Generator], str]] = {
    "char_noise": char_noise,
    "word_dropout": word_dropout,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "strip_punctuation": strip_punctuation,
    "whitespace": whitespace,
    "window_shift": window_shift,
}


def perturb(texts: Sequence[str], name: str, strength: float, seed: int) -> list[str]:
    """``texts`` under one perturbation; the same (seed, name, strength) gives the same texts."""
    fn = PERTURBATIONS[name]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), int(round(strength * 1e6))])
    return [fn(text, strength, rng) for text in texts]


# perturbations that edit words in place (one token in, one token out), so the tags stay aligned; the
# others (word_dropout, strip_punctuation, whitespace, window_shift) change the words themselves
WORD_PERTURBATIONS = ("char_noise", "lowercase", "uppercase")


def perturb_sentences(
    sentences: Sequence[Sequence[str]], name: str, strength: float, seed: int
) -> list[list[str]]:
    """``sentences`` with ``name`` applied to each word (a ``WORD_PERTURBATIONS`` one), as ``perturb`` applies it to
    a text's words (token classification); the same (seed, name, strength) gives the same words."""
    edit = PERTURBATIONS[name]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), int(round(strength * 1e6))])
    return [[edit(word, strength, rng) or word for word in sentence] for sentence in sentences]


def flip_rate(clean: np.ndarray, perturbed: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    """Share of predictions that changed, with a 95% bootstrap CI over the texts."""
    flips = (np.asarray(clean) != np.asarray(perturbed)).astype(np.float64)
    rates = np.concatenate([w @ flips / len(flips) for w in bootstrap_weights(len(flips), resamples, seed)])
    low, high = np.percentile(rates, [2.5, 97.5])
    return {
        "flip_rate": float(flips.mean()),
        "flip_rate_ci95_low": float(low),
        "flip_rate_ci95_high": float(high),
    }


# --------------------------------------------------------------------------------------------- the attack
@dataclass(frozen=True)
class AttackResult:
    success: bool  # the prediction left the true class within the budget
    edits: int  # words deleted when it did, the whole budget when it did not
    budget: int  # deletions allowed: max_edit_share of the words read
    p_true_before: float
    p_true_after: float
    text_after: str


def attack(
    text: str,
    true_id: int,
    proba: Callable[[list[str]], np.ndarray],
    max_edit_share: float,
    read_words: int | None = None,
) -> AttackResult:
    """Greedy black-box word deletion. Every word the predictor reads (the first ``read_words``, or all)
    is scored by how much deleting it alone lowers the probability of the true class; the words are then
    deleted in that order, one more at a time, until the prediction changes or the budget is spent: a
    ``max_edit_share`` of the words read, so a model that reads 90 words and a baseline that reads 400
    each get the same share. The predictor is only queried for probabilities, no gradients: one batch of
    leave-one-out texts, and one of the budget's prefixes. The ranking is not redone after each deletion
    (that would cost a pass per deletion): cues that stand in for each other, where any one suffices,
    each look unimportant alone and hide from it, so this is a lower bound on what an attacker can do."""
    pieces = _pieces(text)
    words = [i for i, p in enumerate(pieces) if _is_word(p)]
    candidates = words[:read_words] if read_words is not None else words

    def without(drop: set[int]) -> str:
        return _join([p for i, p in enumerate(pieces) if i not in drop])

    p_before = float(proba([text])[0, true_id])
    loo = proba([without({i}) for i in candidates])[:, true_id]
    order = [candidates[j] for j in np.argsort(loo, kind="stable")]  # lowest p_true first
    budget = min(max(1, int(round(max_edit_share * len(candidates)))), len(words) - 1)
    steps = [without(set(order[: k + 1])) for k in range(budget)]
    if not steps:
        return AttackResult(False, 0, 0, p_before, p_before, text)
    probs = proba(steps)
    flipped = np.flatnonzero(probs.argmax(axis=1) != true_id)
    if len(flipped):
        k = int(flipped[0])
        return AttackResult(True, k + 1, budget, p_before, float(probs[k, true_id]), steps[k])
    return AttackResult(False, budget, budget, p_before, float(probs[-1, true_id]), steps[-1])


def attack_many(
    texts: Sequence[str],
    true_ids: Sequence[int],
    proba: Callable[[list[str]], np.ndarray],
    max_edit_share: float,
    read_words: Callable[[str], int | None] = lambda text: None,
    desc: str = "attack",
) -> tuple[pd.DataFrame, dict[str, float]]:
    """``attack`` on each text: the per-text table and the summary (success rate, mean edits of the
    successes, mean drop in the true class's probability)."""
    results = [
        attack(text, int(y), proba, max_edit_share, read_words(text))
        for text, y in tqdm(list(zip(texts, true_ids, strict=True)), desc=desc, unit="text")
    ]
    frame = pd.DataFrame([r.__dict__ for r in results], columns=list(AttackResult.__dataclass_fields__))
    wins = frame[frame["success"].astype(bool)]
    summary = {
        "texts": len(frame),
        "success_rate": float(frame["success"].mean()) if len(frame) else None,
        "mean_edits": float(wins["edits"].mean()) if len(wins) else None,
        "mean_edit_share": float((wins["edits"] / wins["budget"]).mean() * max_edit_share)
        if len(wins)
        else None,
        "mean_p_true_drop": float((frame["p_true_before"] - frame["p_true_after"]).mean())
        if len(frame)
        else None,
    }
    return frame, summary


def words_read(tokenizer, max_length: int) -> Callable[[str], int]:
    """How many of a text's words (as ``attack`` splits them) fit in the model's ``max_length`` tokens."""
    from lmpipe.serve.serving import encode_words

    def count(text: str) -> int:
        words = [p for p in _pieces(text) if _is_word(p)]
        enc = encode_words(tokenizer, [words], truncation=True, max_length=max_length)
        ids = [w for w in enc.word_ids(0) if w is not None]
        return (max(ids) + 1) if ids else 0

    return count


def summary(table: pd.DataFrame) -> dict:
    """Per perturbation and strength: both predictors' macro-F1, drop from clean and flip rate; and the
    mean drop over them all (a headline metric)."""
    out: dict = {"perturbations": {}}
    perturbed = table[table["strength"] > 0]
    for (kind, strength), part in perturbed.groupby(["perturbation", "strength"], sort=False):
        entry = {}
        for r in part.itertuples():
            entry.update({f"{r.predictor}_{k}": getattr(r, k) for k in ("macro_f1", "drop", "flip_rate")})
        out["perturbations"][f"{kind}@{strength:g}"] = entry
    for who in ("model", "baseline"):
        rows = perturbed[perturbed["predictor"] == who]
        out[f"{who}_mean_drop"] = float(rows["drop"].mean()) if len(rows) else 0.0
        out[f"{who}_mean_flip_rate"] = float(rows["flip_rate"].mean()) if len(rows) else 0.0
    return out
