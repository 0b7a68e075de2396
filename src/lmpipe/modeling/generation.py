"""The one generation loop, and the one scoring of references, for causal language models.

Prompts arrive as token ids (a task renders and truncates them: ``lmpipe.tasks.generation``). Batches are
left-padded, so that every row's next token follows its own last prompt token; decoding is greedy (the
same prompt gives the same text on the same machine), bounded by ``max_new_tokens`` and stopped at EOS.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def _order(prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Longest first: rows of like length share a batch (less padding), and a memory problem shows early."""
    return np.argsort([-len(p) for p in prompts], kind="stable")


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids), decoded without special tokens and stripped."""
    model.eval()
    device = next(model.parameters()).device
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    out: list[str] = [""] * len(prompts)
    order = _order(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc=f"generate {desc}" if desc else "generate", disable=desc is None):
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            n = len(prompts[i])
            ids[j, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
            mask[j, width - n :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for j, i in enumerate(rows):
            out[i] = tokenizer.decode(generated[j, width:], skip_special_tokens=True).strip()
    return out


@torch.inference_mode()
def reference_nll(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each reference's summed negative log-likelihood (nats) given its prompt, and its token count: the
    model's perplexity of the references is ``exp(sum(nll) / sum(tokens))``."""
    model.eval()
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    nll, count = np.zeros(len(prompts)), np.zeros(len(prompts), dtype=int)
    order = _order([list(p) + list(t) for p, t in zip(prompts, targets, strict=True)])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc=f"perplexity {desc}" if desc else "perplexity", disable=desc is None):
        seqs = [list(prompts[i]) + list(targets[i]) for i in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, i in enumerate(rows):
            n, p = len(seqs[j]), len(prompts[i])
            ids[j, :n] = torch.tensor(seqs[j], dtype=torch.long)
            mask[j, :n] = 1
            labels[j, p:n] = ids[j, p:n]
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        nll_rows, n_rows = token_nll(logits, labels.to(device))
        nll[rows], count[rows] = nll_rows.cpu().numpy(), n_rows.cpu().numpy()
    return nll, count


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed NLL of the labelled tokens (each predicted from the one before it) and their
    count; -100 labels are not scored. Shapes: logits [rows, tokens, vocab], labels [rows, tokens]."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    mask = shift_labels != -100
    losses = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).view(shift_labels.shape)
    return (losses * mask).sum(dim=1), mask.sum(dim=1)


@torch.inference_mode()
def greedy_ids(model, tokenizer, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """One prompt's greedy new token ids at batch 1 (no padding: the reference an exported generator is
    checked against, token by token), EOS dropped."""
    out = _generate_one(model, tokenizer, prompt, max_new_tokens, 0)
    eos = tokenizer.eos_token_id
    return out[:-1] if out and out[-1] == eos else out


class _FirstToken:
    """A ``generate`` streamer that notes when the first new token arrives (its second ``put``: the
    first is the prompt)."""

    def __init__(self):
        self.puts, self.at = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self):
        pass


@torch.inference_mode()
def timed_generation(model, tokenizer, prompt: Sequence[int], new_tokens: int) -> float:
    """Greedy generation of exactly ``new_tokens`` tokens (EOS or not) at batch 1; returns the seconds to
    the first of them, measured inside the call (its caller times the whole)."""
    streamer = _FirstToken()
    start = time.perf_counter()
    _generate_one(model, tokenizer, prompt, new_tokens, new_tokens, streamer)
    return (streamer.at or time.perf_counter()) - start


def _generate_one(
    model, tokenizer, prompt, max_new_tokens: int, min_new_tokens: int, streamer=None
) -> list[int]:
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
        streamer=streamer,
    )
    return out[0, len(prompt) :].tolist()
