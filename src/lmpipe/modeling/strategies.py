"""Fine-tuning strategies and training options, applied around the one loop in ``training.py``.

* ``full``: every weight trains (the Trainer's own optimizer and schedule, unchanged).
* ``linear_probe``: the encoder (embeddings and transformer layers) is frozen; the head trains.
* ``lora``: peft low-rank adapters on ``train.lora.target_modules``; the head trains in full.
* ``gradual_unfreezing``: ``train.phases`` run in order in one Trainer run; phase k trains the head
  plus the top ``layers`` encoder layers (all layers and the embeddings once ``layers`` reaches the
  model's depth), with its own epochs, peak learning rate and optional layer-wise decay.
* ``prompt_tuning``: peft soft prompts, ``train.prompt_tuning.virtual_tokens`` learned embeddings read
  before every text at their own learning rate; the encoder is frozen, the head (new) trains in full.
  At save time the prompt becomes the ``soft_prompt`` of a plain classifier (``models.SoftPromptMixin``).

"Head" means every weight outside the embeddings and the transformer layers: the classifier, and the
pooler where the model has one. Options for any strategy: a dropout override, and FGM adversarial
training (``FGM``). Nothing here runs a training loop.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lmpipe import tasks
from lmpipe.errors import UserError
from lmpipe.modeling import families
from lmpipe.modeling.models import SOFT_PROMPT_KEY, classifier_class, model_task
from lmpipe.params import PhaseParams, TrainParams

DROPOUT_CONFIG_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "attention_dropout",
    "classifier_dropout",
)


# ------------------------------------------------------------------------------------------- anatomy
@dataclass
class Anatomy:
    """Where the parts of a sequence classifier are: parameter names by part."""

    embeddings: list[str]
    layers: list[list[str]]  # bottom to top
    head: list[str]

    @property
    def depth(self) -> int:
        return len(self.layers)


def anatomy(model: nn.Module) -> Anatomy:
    """Split a transformers sequence classifier into embeddings, encoder layers and head."""
    base = getattr(model, "base_model", model)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    base_prefix = next((name for name, module in model.named_modules() if module is base), "")
    layer_list, layer_prefix = None, ""
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            layer_list, layer_prefix = module, name
            break
    if layer_list is None:
        raise UserError(
            f"train.strategy: cannot find the {n_layers} transformer layers of {type(model).__name__}; "
            "use strategy full or lora with this model"
        )
    embeddings_module = getattr(base, "embeddings", None) or base.get_input_embeddings()
    emb_prefix = next(name for name, module in base.named_modules() if module is embeddings_module)

    def full(prefix: str) -> str:
        return ".".join(p for p in (base_prefix, prefix) if p)

    names = [name for name, _ in model.named_parameters()]
    emb_names = [n for n in names if n.startswith(full(emb_prefix) + ".")]
    layers = [
        [n for n in names if n.startswith(f"{full(layer_prefix)}.{i}.")] for i in range(len(layer_list))
    ]
    taken = set(emb_names).union(*map(set, layers))
    return Anatomy(emb_names, layers, [n for n in names if n not in taken])


def layer_depths(parts: Anatomy) -> dict[str, int]:
    """How far below the top each parameter sits: head and top layer 0, the embeddings deepest.
    A phase's ``layer_lr_decay ** depth`` scales its learning rate."""
    depths = dict.fromkeys(parts.head, 0)
    for i, names in enumerate(parts.layers):
        depths.update(dict.fromkeys(names, parts.depth - 1 - i))
    depths.update(dict.fromkeys(parts.embeddings, parts.depth))
    return depths


def trainable_names(parts: Anatomy, layers: int) -> set[str]:
    """The head plus the top ``layers`` encoder layers; all layers and the embeddings at full depth."""
    names = set(parts.head)
    for block in parts.layers[max(parts.depth - layers, 0) :]:
        names.update(block)
    if layers >= parts.depth:
        names.update(parts.embeddings)
    return names


def set_trainable(model: nn.Module, names: set[str]) -> int:
    """Freeze every parameter not in ``names``; return the trainable count."""
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        count += param.numel() if name in names else 0
    return count


# ----------------------------------------------------------------------------------------- set-up
def override_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout layer (and the config's dropout keys, so the saved model says so) to ``p``."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    config = getattr(model, "config", None)
    for key in DROPOUT_CONFIG_KEYS:
        if config is not None and getattr(config, key, None) is not None:
            setattr(config, key, p)


def check_phases(model: nn.Module, phases: list[PhaseParams]) -> Anatomy:
    parts = anatomy(model)
    for i, phase in enumerate(phases):
        if phase.layers > parts.depth:
            raise UserError(
                f"train.phases[{i}].layers: {phase.layers} is more than the model's {parts.depth} layers "
                f"(use {parts.depth} to unfreeze everything)"
            )
    return parts


def wrap_lora(model: nn.Module, cfg: TrainParams) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters; only adapters and the classification head train."""
    from peft import LoraConfig, TaskType, get_peft_model

    problem = lora_targets_problem(model, cfg.lora.target_modules)
    if problem:
        raise UserError(problem)
    config = LoraConfig(
        task_type=TaskType[tasks.get(model_task(model.config)).peft_task_type],
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
    )
    return get_peft_model(model, config)


def head_modules(model: nn.Module) -> list[str]:
    """The modules holding the head's weights (``anatomy``), e.g. ``bert.pooler.dense`` and ``classifier``."""
    return sorted({name.rsplit(".", 1)[0] for name in anatomy(model).head})


def wrap_prompt(model: nn.Module, cfg: TrainParams) -> nn.Module:
    """Wrap ``model`` in peft prompt tuning: only the soft prompt and the head (classifier, pooler) train."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    init = {"vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=cfg.prompt_tuning.virtual_tokens,
        prompt_tuning_init=init[cfg.prompt_tuning.init],
        modules_to_save=head_modules(model),
    )
    return get_peft_model(model, config)


def prompt_length_problem(model: nn.Module, cfg: TrainParams, max_length: int) -> str | None:
    """The soft prompt adds to the text's ``max_length`` tokens: both must fit the model's positions."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    tokens = cfg.prompt_tuning.virtual_tokens
    if positions is not None and max_length + tokens > positions:
        return (
            f"train.prompt_tuning.virtual_tokens: {tokens} + base.max_length {max_length} is more than "
            f"the model's {positions} positions"
        )
    return None


def lora_targets_problem(model: nn.Module, targets: list[str]) -> str | None:
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in linear):
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
            return (
                f"train.lora.target_modules: '{target}' matches no linear layer of the model "
                f"(its linear layers: {', '.join(suffixes)})"
            )
    return None


def resolve(cfg: TrainParams, model: nn.Module) -> TrainParams:
    """``cfg`` with its ``auto`` values made concrete for ``model`` (``families``): the strategy (the
    model's task's default, else its family's) and LoRA's target modules."""
    config = model.config
    chosen = families.strategy(config, cfg.strategy, tasks.get(model_task(config)).default_strategy)
    targets = families.lora_targets(config, cfg.lora.target_modules)
    if chosen == cfg.strategy and targets == cfg.lora.target_modules:
        return cfg
    return dataclasses.replace(
        cfg, strategy=chosen, lora=dataclasses.replace(cfg.lora, target_modules=targets)
    )


# below this, LoRA's adapters (which start at zero) learn slowly: every LoRA run in docs/figures.md that
# did well used 3e-4 to 1e-3 (MiniLM on BBC, SmolLM2 on BBC titles and on headline generation)
LORA_LOW_RATE = 3.0e-4


def advice(cfg: TrainParams) -> list[str]:
    """Settings that run but are likely to disappoint with this (resolved) strategy, one line each."""
    if cfg.strategy == "lora" and cfg.learning_rate < LORA_LOW_RATE:
        return [
            f"train: warning: train.learning_rate {cfg.learning_rate:g} is low for LoRA (its adapters start at "
            f"zero); 3e-4 to 1e-3 did better in docs/figures.md (the default 1e-4 suits full fine-tuning)"
        ]
    return []


def validate(model: nn.Module, cfg: TrainParams, max_length: int | None = None) -> None:
    """Check the strategy against the model before anything runs (a ``UserError`` naming the key);
    ``max_length`` is ``base.max_length``, which a soft prompt adds to."""
    cfg = resolve(cfg, model)
    if cfg.strategy == "prompt_tuning":
        families.require(model.config, "prompt_tuning", "train.strategy")
        anatomy(model)
        problem = prompt_length_problem(model, cfg, max_length) if max_length is not None else None
        if problem:
            raise UserError(problem)
    elif cfg.strategy == "lora":
        problem = lora_targets_problem(model, cfg.lora.target_modules)
        if problem:
            raise UserError(problem)
    elif cfg.strategy == "gradual_unfreezing":
        check_phases(model, cfg.phases)
    elif cfg.strategy == "linear_probe":
        anatomy(model)


def prepare_model(model: nn.Module, cfg: TrainParams) -> nn.Module:
    """Apply the dropout override and the strategy; return the model to train (a peft wrapper for lora
    and prompt tuning)."""
    cfg = resolve(cfg, model)
    if cfg.dropout is not None:
        override_dropout(model, cfg.dropout)
    if cfg.strategy == "linear_probe":
        set_trainable(model, set(anatomy(model).head))
    elif cfg.strategy == "lora":
        model = wrap_lora(model, cfg)
    elif cfg.strategy == "prompt_tuning":
        model = wrap_prompt(model, cfg)
    elif cfg.strategy == "gradual_unfreezing":
        parts = check_phases(model, cfg.phases)
        set_trainable(model, trainable_names(parts, cfg.phases[0].layers))
    return model


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def is_prompt_tuned(model: nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def unprompt(model: nn.Module) -> nn.Module:
    """A peft prompt-tuning model as the plain classifier that ``models.load_model`` loads: the
    trained head copies put back in place, the prompt as ``soft_prompt`` (``models.SoftPromptMixin``)."""
    from peft.utils import ModulesToSaveWrapper

    prompt = model.get_prompt_embedding_to_save(adapter_name=model.active_adapter).detach()
    inner = model.base_model
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, attr = name.rpartition(".")
            setattr(inner.get_submodule(parent), attr, module.modules_to_save[model.active_adapter])
    config = copy.deepcopy(inner.config)
    setattr(config, SOFT_PROMPT_KEY, prompt.shape[0])
    plain = classifier_class(config)(config).to(prompt.device)
    plain.load_state_dict({**inner.state_dict(), "soft_prompt": prompt})
    return plain


def finalize_model(model: nn.Module, adapter_dir=None) -> nn.Module:
    """The plain model to save: for lora, save the adapter to ``adapter_dir`` (if given), then merge it
    into the base weights; for prompt tuning, the classifier with its ``soft_prompt`` (``unprompt``);
    every other strategy's model is returned as it is, all weights trainable."""
    if is_prompt_tuned(model):
        model = unprompt(model)
    elif is_peft(model):
        if adapter_dir is not None:
            model.save_pretrained(adapter_dir)
        model = model.merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------- phases
@dataclass
class PhasePlan:
    """Gradual unfreezing as a function of the optimiser step: which phase, which weights, which rate."""

    phases: list[PhaseParams]
    steps_per_epoch: int
    warmup_ratio: float

    @property
    def start_steps(self) -> list[int]:
        starts, step = [], 0
        for phase in self.phases:
            starts.append(step)
            step += phase.epochs * self.steps_per_epoch
        return starts

    @property
    def start_epochs(self) -> list[int]:
        return [s // self.steps_per_epoch for s in self.start_steps]

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def phase_at(self, step: int) -> int:
        """The phase that optimiser step ``step`` (0-based: steps done so far) belongs to."""
        current = 0
        for i, start in enumerate(self.start_steps):
            if step >= start:
                current = i
        return current

    def phase_of_epoch(self, epoch: int) -> int:
        """The phase that the 1-based ``epoch`` belongs to."""
        return self.phase_at((epoch - 1) * self.steps_per_epoch)

    def lr_lambda(self, depth: int) -> Callable[[int], float]:
        """Absolute learning rate at ``step`` for a parameter ``depth`` layers below the top: each phase
        warms up linearly over ``warmup_ratio`` of its steps to its peak, then decays linearly to 0."""
        starts = self.start_steps

        def rate(step: int) -> float:
            i = self.phase_at(step)
            phase = self.phases[i]
            n = phase.epochs * self.steps_per_epoch
            local = step - starts[i]
            warm = math.ceil(self.warmup_ratio * n)
            factor = (local + 1) / (warm + 1) if local < warm else max(0.0, (n - local) / max(1, n - warm))
            return phase.learning_rate * phase.layer_lr_decay**depth * factor

        return rate


def phase_optimizer(
    model: nn.Module, parts: Anatomy, decay_names: set[str], weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over every weight (frozen ones get no gradient, so no update and no decay), in groups by
    depth so that each can follow its own layer-decayed rate. Group 0 holds the head: its rate is the
    one the Trainer logs."""
    depths = layer_depths(parts)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault((depths[name], name not in decay_names), []).append(param)
    return torch.optim.AdamW(
        [
            {"params": groups[k], "lr": 1.0, "weight_decay": 0.0 if k[1] else weight_decay, "depth": k[0]}
            for k in sorted(groups)
        ],
        lr=1.0,
    )


def phase_scheduler(optimizer: torch.optim.Optimizer, plan: PhasePlan) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's rate follows ``plan.lr_lambda`` for its depth (the groups' base rate is 1)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [plan.lr_lambda(group["depth"]) for group in optimizer.param_groups]
    )


# -------------------------------------------------------------------------------------------- FGM
class FGM:
    """Fast Gradient Method (Miyato et al.) on the word embeddings.

    ``capture()`` wraps the clean forward/backward and keeps the gradient of the loss with respect to
    the word-embedding output; ``perturb()`` wraps a second forward pass in which each example's word
    embeddings move by an L2 norm of ``epsilon`` along that gradient. Works whether the embeddings are
    trainable or frozen (linear probe, lora): a frozen output is swapped for a leaf that takes a grad.
    """

    def __init__(self, model: nn.Module, epsilon: float):
        self.embeddings = model.get_input_embeddings()
        self.epsilon = epsilon
        self._output: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        def hook(module, args, output):
            if output.requires_grad:
                output.retain_grad()
            else:
                output = output.detach().requires_grad_(True)
            self._output = output
            return output

        handle = self.embeddings.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def delta(self) -> torch.Tensor | None:
        output, self._output = self._output, None
        grad = None if output is None else output.grad
        if grad is None:
            return None
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
        return (self.epsilon * grad / norm).detach()

    @contextlib.contextmanager
    def perturb(self, delta: torch.Tensor) -> Iterator[None]:
        handle = self.embeddings.register_forward_hook(lambda module, args, output: output + delta)
        try:
            yield
        finally:
            handle.remove()
