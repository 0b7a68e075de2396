"""Running a PyTorch classifier on texts: the one inference loop, used by evaluate, compress, export (as the
reference its ONNX files are checked against), ``lmpipe predict`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lmpipe.modeling.encoding import TextDataset, model_reading
from lmpipe.modeling.models import device, load_model, load_tokenizer


def predict_proba(
    model_dir: str | Path, texts: Sequence[str], max_length: int, batch_size: int, desc: str = "predict"
) -> tuple[np.ndarray, list[str]]:
    """Class probabilities for ``texts`` from a saved classifier, and its class names in id order."""
    model = load_model(model_dir).to(device())
    return predict_proba_model(model, load_tokenizer(model_dir), texts, max_length, batch_size, desc)


def predict_proba_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    desc: str = "predict",
) -> tuple[np.ndarray, list[str]]:
    """``predict_proba`` for a model already in memory (e.g. a quantized one), on the device it is on."""
    logits, names = predict_logits_model(model, tokenizer, texts, max_length, batch_size, desc)
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy(), names


def predict_logits_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    desc: str | None = "predict",
) -> tuple[np.ndarray, list[str]]:
    """fp32 logits for ``texts`` from a model in memory, and its class names in id order (``desc=None``:
    no progress bar, for the many small calls of an attack). The model reads each text as it was
    trained to (its config's reading: a ``windows`` model's windows are pooled into one row per text)."""
    model = model.eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    dataset = TextDataset(tokenizer, texts, None, max_length, model_reading(model))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=DataCollatorWithPadding(tokenizer)
    )
    logits = batches_logits(model, tqdm(loader, desc=desc, unit="batch", disable=desc is None))
    return dataset.pool(logits), names


def batches_logits(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """fp32 logits, row by row, of batches of encoded inputs (torch tensors or numpy arrays), run on the
    model's device: the one PyTorch inference loop (evaluate, compress, export's reference, benchmarks)."""
    model_device = next(model.parameters()).device
    chunks = []
    with torch.inference_mode():
        for batch in batches:
            inputs = {k: torch.as_tensor(v).to(model_device) for k, v in batch.items()}
            chunks.append(model(**inputs).logits.float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, model.config.num_labels), dtype=np.float32)


def batches_proba(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """Softmax class probabilities of ``batches_logits``."""
    return torch.softmax(torch.from_numpy(batches_logits(model, batches)), dim=-1).numpy()
