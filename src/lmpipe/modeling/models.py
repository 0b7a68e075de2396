"""Finding, loading and saving models, and choosing the device. Nothing here reaches a hub."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from lmpipe import distributed, tasks
from lmpipe.errors import UserError
from lmpipe.modeling import embedded, hub


def resolve_model_dir(name: str, revision: str | None = None) -> Path:
    """The folder to load ``base.model`` (at ``base.revision``) from: an embedded model's
    (``lmpipe.modeling.embedded``), a local ``save_pretrained`` folder, or a hub model's snapshot in the
    Hugging Face cache (``lmpipe.modeling.hub``: never downloaded)."""
    source = hub.describe(name, revision)
    return embedded.smollm2_dir() if source.path is None else source.path


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)


# config.json key of a classifier trained with train.strategy prompt_tuning: its soft prompt's length
SOFT_PROMPT_KEY = "soft_prompt_tokens"
# config.json key of the task a model was trained for (base.task); a model without one classifies texts
TASK_KEY = "lmpipe_task"


def model_task(config: PretrainedConfig) -> str:
    """The task (``lmpipe.tasks``) a model's config records; text classification where it records none."""
    return getattr(config, TASK_KEY, None) or tasks.CLASSIFICATION


class SoftPromptMixin:
    """A transformers sequence classifier that reads ``config.soft_prompt_tokens`` learned embeddings
    (``soft_prompt``) before every text, as peft's prompt tuning trains it: the prompt goes before the
    word embeddings, the attention mask and token types get ones and zeros for it, and the positions
    count from the prompt's first token. Everything else (config, weights' names, ``save_pretrained``,
    the Trainer, quantization, pruning, ONNX export) is the classifier's own; the prompt is one more
    tensor in ``model.safetensors``."""

    def __init__(self, config: PretrainedConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        tokens = getattr(config, SOFT_PROMPT_KEY)
        self.soft_prompt = torch.nn.Parameter(torch.zeros(tokens, config.hidden_size))

    # ``labels`` by name: the Trainer finds a model's label arguments in its forward's signature
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, tokens = inputs_embeds.shape[0], self.soft_prompt.shape[0]
        prompt = self.soft_prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, tokens), attention_mask], dim=1)
        if token_type_ids is not None:
            token_type_ids = torch.cat([token_type_ids.new_zeros(batch, tokens), token_type_ids], dim=1)
        # position_ids are dropped, as peft does: positions count from the prompt's first token
        return super().forward(
            inputs_embeds=torch.cat([prompt, inputs_embeds], dim=1),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            labels=labels,
            **kwargs,
        )


_PROMPTED: dict[type, type] = {}


def classifier_class(config: PretrainedConfig) -> type:
    """The transformers model class of ``config`` for the head of its task (``Task.head``), with
    ``SoftPromptMixin`` if it has a soft prompt."""
    cls = tasks.get(model_task(config)).head()._model_mapping[type(config)]
    if not getattr(config, SOFT_PROMPT_KEY, None):
        return cls
    if cls not in _PROMPTED:
        _PROMPTED[cls] = type(f"SoftPrompt{cls.__name__}", (SoftPromptMixin, cls), {})
    return _PROMPTED[cls]


def load_model(
    model_dir: str | Path, label2id: dict[str, int] | None = None, task: str = tasks.CLASSIFICATION
) -> torch.nn.Module:
    """Load a model with the head of its task (``Task.head``) from a local folder.

    With ``label2id`` a fresh head is sized for those labels (fine-tuning a pretrained encoder) for
    ``task``, which a non-default task records in the config (``lmpipe_task``), so that every later load
    builds the same head; without it, the folder must already be a model whose config carries its
    labels, and a classifier trained with a soft prompt comes back as a ``SoftPromptMixin`` model that
    prepends it. Weights come from safetensors only.
    """
    kwargs: dict = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
    if label2id is not None:
        labels = {
            "num_labels": len(label2id),
            "label2id": dict(label2id),
            "id2label": {i: label for label, i in label2id.items()},
        }
        config = AutoConfig.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False, **labels
        )
        if task != model_task(config):  # the default is left unwritten: config.json as transformers writes it
            setattr(config, TASK_KEY, task)
        return tasks.get(task).head().from_pretrained(str(model_dir), config=config, **kwargs)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    return classifier_class(config).from_pretrained(str(model_dir), config=config, **kwargs)


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


def precision_name(precision: str) -> str:
    """What ``precision`` (``train.precision``) trains in here: bf16, fp16 or fp32."""
    flags = precision_flags(precision)
    return "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"


def peak_gpu_memory_mb() -> float | None:
    """The most GPU memory this process's tensors held (MiB, ``torch.cuda.max_memory_allocated``); None on
    the CPU."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


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
