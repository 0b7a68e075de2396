"""Model families: what differs between a bidirectional encoder (BERT, MiniLM) and a decoder (Llama,
SmolLM2), decided here and nowhere else. A task never asks which family a model is; the model layer
(strategies, encoding, compress, export) asks this module what the model can do.

* **encoder**: reads the whole text at once; a classifier pools the first token; ONNX Runtime's BERT
  fusions (``export.optimize``) apply.
* **decoder**: reads left to right; a classifier pools the last real token (transformers does it from
  ``config.pad_token_id``, which must be set); the tokenizer is byte-level BPE and cased; it has no token
  types; LoRA goes on ``q_proj``/``v_proj``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from lmpipe.errors import UserError

ENCODER = "encoder"
DECODER = "decoder"

# model_types read bidirectionally (every other type transformers can load as a causal LM is a decoder)
ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet"}
)

# train.lora.target_modules: auto -> the attention projections LoRA usually adapts, per family
LORA_TARGETS = {ENCODER: ["query", "value"], DECODER: ["q_proj", "v_proj"]}

# train.strategy: auto -> full fine-tuning for a small encoder, LoRA for a decoder (a full step of the
# 135M SmolLM2 costs ~2x a LoRA step and 4x its optimiser memory)
DEFAULT_STRATEGY = {ENCODER: "full", DECODER: "lora"}

# what a family cannot do, by key: the one place that decides it, each with the reason given. What is
# not here works for both families (checked on a tiny Llama: tests/code/test_decoders.py and the decoder
# pipeline in tests/e2e/test_decoder_pipeline.py): LoRA and full fine-tuning, int8, magnitude pruning,
# the distilled student (the layer stack is found by shape, each kept layer renumbered), integrated
# gradients on the word embeddings, and the plain ONNX export with its parity check
UNSUPPORTED = {
    DECODER: {
        "prompt_tuning": "the soft prompt is wired for BERT-style inputs (token types, a pooled first token)",
        "onnx_fusions": "ONNX Runtime's transformer fusions here are the BERT ones; the plain graph is served",
    },
    ENCODER: {},
}


def family(config: PretrainedConfig) -> str:
    """``encoder`` or ``decoder``."""
    if config.model_type in ENCODER_TYPES or getattr(config, "is_encoder_decoder", False):
        return ENCODER
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return DECODER if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else ENCODER


def is_decoder(config: PretrainedConfig) -> bool:
    return family(config) == DECODER


def supports(config: PretrainedConfig, what: str) -> bool:
    return what not in UNSUPPORTED[family(config)]


def unsupported(config: PretrainedConfig, what: str, key: str) -> str | None:
    """The one line saying that ``key`` is not available for the model's family, and why; None when it is.
    A step that can be left out (``export.optimize``) records the line and goes on; ``require`` refuses."""
    reason = UNSUPPORTED[family(config)].get(what)
    if not reason:
        return None
    return f"{key}: not available for a {family(config)} model ({config.model_type}): {reason}"


def require(config: PretrainedConfig, what: str, key: str) -> None:
    """A ``UserError`` naming ``key`` when the model's family cannot do ``what``."""
    line = unsupported(config, what, key)
    if line:
        raise UserError(line)


def lora_targets(config: PretrainedConfig, targets: list[str] | str) -> list[str]:
    """``train.lora.target_modules`` as a list: ``auto`` is the family's usual pair."""
    return list(LORA_TARGETS[family(config)]) if targets == "auto" else list(targets)


def strategy(config: PretrainedConfig, chosen: str, task_default: str | None = None) -> str:
    """``train.strategy`` resolved: ``auto`` is the task's default where it has one (generation: lora),
    else the family's."""
    if chosen != "auto":
        return chosen
    return task_default or DEFAULT_STRATEGY[family(config)]
