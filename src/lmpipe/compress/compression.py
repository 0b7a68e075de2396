"""Compressing a trained classifier, and measuring the result against the original.

* **Dynamic int8 quantization** (``torch.ao``): every ``nn.Linear`` gets int8 weights (per-tensor affine)
  and quantizes its input per batch at run time. Embeddings and LayerNorms stay fp32: torch.ao's dynamic
  quantization covers Linear layers only. The int8 weights are written to safetensors as plain int8
  tensors with their scale and zero point (no pickle), and rebuilt on load.
* **Global magnitude pruning**: the smallest-|w| share of all Linear weights of the encoder's layers
  (attention, feed-forward; not the pooler or the classifier) is set to zero, made permanent, optionally followed by a recovery fine-tune in the
  shared loop with a callback that keeps the pruned weights at zero.
* **Knowledge distillation**: a student that keeps some of the teacher's layers (by default every other
  one) and its embeddings and head, trained in the shared loop with a ``compute_loss`` hook.
* **Measurements**: parameter and non-zero counts, weight bytes on disk, and CPU latency timed with a fixed
  thread count, warm-up runs and the variants interleaved round by round.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    PreTrainedTokenizerBase,
    TrainerCallback,
)

from lmpipe import io, latency
from lmpipe.errors import UserError
from lmpipe.modeling.models import classifier_class

INT8_WEIGHTS = "int8.safetensors"
INT8_RECIPE = "quantization.json"
INT8_FORMAT = "lmpipe-dynamic-int8-v1"


def load_config(model_dir: str | Path):
    """A model folder's config (label maps, layer count) without loading its weights."""
    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)


# ------------------------------------------------------------------------------------------ quantization
def _torch_ao():
    # torch.ao.quantization warns that it is deprecated in favour of torchao; it still ships and works in
    # torch 2.13, and it is what this stage uses (the warning would otherwise repeat on every call)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
        from torch.ao.quantization import quantize_dynamic
    return quantize_dynamic, QuantizedLinear


def linear_names(model: nn.Module) -> list[str]:
    """The names of every ``nn.Linear`` of ``model``, in module order (what dynamic int8 quantizes)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_dynamic_int8(model: nn.Module, fp32_layers: Collection[str] = ()) -> nn.Module:
    """A dynamic-int8 copy of ``model`` on the CPU (int8 kernels exist for the CPU only): every Linear
    layer but those named in ``fp32_layers``, which stay fp32."""
    quantize_dynamic, _ = _torch_ao()
    keep = set(fp32_layers)
    unknown = keep - set(linear_names(model))
    if unknown:
        raise ValueError(f"fp32_layers: {sorted(unknown)} are not Linear layers of the model")
    source = copy.deepcopy(model).cpu().eval()
    spec: set = {nn.Linear} if not keep else {n for n in linear_names(model) if n not in keep}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(source, spec, dtype=torch.qint8)


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    _, quantized_linear = _torch_ao()
    return {name: m for name, m in model.named_modules() if isinstance(m, quantized_linear)}


def save_int8(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, source: Mapping[str, Any]
) -> None:
    """Write a quantized model as ``int8.safetensors`` (int8 weights, scales, zero points, the fp32 rest),
    ``config.json``, the tokenizer and ``quantization.json`` (the recipe and the fp32 source it came from)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quantized = _quantized_modules(model)
    fp32_layers = linear_names(model)  # the Linear layers left unquantized (named after the float model's)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized.items():
        weight, bias = module._weight_bias()
        if weight.qscheme() != torch.per_tensor_affine:
            raise ValueError(f"{name}: expected a per-tensor affine int8 weight, got {weight.qscheme()}")
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        tensors[f"{name}.weight_scale"] = torch.tensor(weight.q_scale(), dtype=torch.float64)
        tensors[f"{name}.weight_zero_point"] = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous().clone()
    stored: dict[int, str] = {}  # storage -> the key saved for it: a tied tensor (lm_head = embeddings) once
    tied: dict[str, str] = {}
    for key, value in model.state_dict().items():
        if _under(key, quantized) or not isinstance(value, torch.Tensor):
            continue
        if value.numel() and value.data_ptr() in stored:
            tied[key] = stored[value.data_ptr()]
            continue
        stored[value.data_ptr()] = key
        tensors[key] = value.detach().contiguous().clone()  # clone: safetensors refuses shared storage
    save_file(tensors, str(out_dir / INT8_WEIGHTS), metadata={"format": INT8_FORMAT})
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    io.write_json(
        out_dir / INT8_RECIPE,
        {
            "format": INT8_FORMAT,
            "method": "torch.ao.quantization.quantize_dynamic",
            "modules": "every torch.nn.Linear (attention, feed-forward, pooler, classifier) but fp32_layers",
            "weights": "int8, per-tensor affine (int8 values, scale, zero point in int8.safetensors)",
            "activations": "quantized to uint8 per batch at run time",
            "kept_fp32": "embeddings, LayerNorms (torch.ao dynamic quantization covers Linear layers only)",
            "fp32_layers": fp32_layers,
            "tied": tied,  # key -> the stored key it shares its tensor with (tied embeddings): stored once
            "quantized_linear_layers": len(quantized),
            "engine": torch.backends.quantized.engine,
            "torch": torch.__version__,
            "source": dict(source),
            "load_with": "lmpipe.compress.compression.load_int8(folder)",
        },
    )


def load_int8(folder: str | Path) -> nn.Module:
    """Rebuild a model written by ``save_int8``: its architecture from ``config.json``, quantized with the
    same recipe, then the stored int8 weights and fp32 tensors put in place (safetensors only)."""
    folder = Path(folder)
    config = load_config(folder)
    skeleton = classifier_class(config)(config).eval()  # with its soft prompt, if it has one
    tensors = load_file(str(folder / INT8_WEIGHTS))
    recipe = io.read_json(folder / INT8_RECIPE) if (folder / INT8_RECIPE).is_file() else {}
    fp32_layers = list(recipe.get("fp32_layers", []))
    linears = {name for name in linear_names(skeleton) if name not in fp32_layers}
    rest = {k: v for k, v in tensors.items() if not _under(k, linears)}
    # the fp32 tensors go into the float skeleton; its quantized Linear weights are replaced below
    missing, unexpected = skeleton.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not _under(k, linears) and k not in recipe.get("tied", {})]
    if missing or unexpected:
        raise ValueError(f"{folder / INT8_WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = quantize_dynamic_int8(skeleton, fp32_layers)
    quantized = _quantized_modules(model)
    if set(quantized) != linears:
        raise ValueError(f"{folder}: the recipe quantized other layers than the stored ones")
    for name, module in quantized.items():
        weight = torch._make_per_tensor_quantized_tensor(
            tensors[f"{name}.weight_int8"],
            float(tensors[f"{name}.weight_scale"]),
            int(tensors[f"{name}.weight_zero_point"]),
        )
        module.set_weight_bias(weight, tensors.get(f"{name}.bias"))
    return model.eval()


def _under(key: str, prefixes: Mapping[str, Any]) -> bool:
    return any(key.startswith(f"{p}.") for p in prefixes)


# ------------------------------------------------------------------------------------------------ pruning
def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of the encoder's layers (``model.base_model``: attention, feed-forward). The
    embeddings, LayerNorms, biases and the head (the pooler and the classifier) are left dense.

    The pooler is part of the head here: in sentence-transformers checkpoints such as MiniLM it was never
    trained, and fine-tuning leaves its weights ~5x smaller than the encoder's (mean |w| 0.008 against
    0.03-0.07), so *global* magnitude pruning took all of it first: at 50% sparsity 99.96% of the pooler
    was zero, every logit nearly equal, and no recovery fine-tune could help, since the pruned weights
    are held at zero."""
    return {
        f"{model.base_model_prefix}.{name}": m
        for name, m in model.base_model.named_modules()
        if isinstance(m, nn.Linear) and "pooler" not in name.split(".")
    }


def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Global unstructured L1 pruning of the encoder's Linear weights to ``sparsity``, made permanent (the
    zeros are written into the weights, no masks or hooks remain). Returns the keep-masks by weight name,
    for a recovery fine-tune that must not revive pruned weights."""
    from torch.nn.utils import prune

    linears = prunable_linears(model)
    prune.global_unstructured(
        [(m, "weight") for m in linears.values()], pruning_method=prune.L1Unstructured, amount=sparsity
    )
    keep = {}
    for name, module in linears.items():
        keep[f"{name}.weight"] = module.weight_mask.detach().bool().clone()
        prune.remove(module, "weight")
    return keep


def sparsity_of(model: nn.Module) -> float:
    """The measured share of zeros among the encoder's Linear weights (what pruning targets)."""
    weights = [m.weight for m in prunable_linears(model).values()]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


class KeepPruned(TrainerCallback):
    """Puts the pruned weights back to zero after every optimiser step of a recovery fine-tune."""

    def __init__(self, model: nn.Module, keep: Mapping[str, torch.Tensor]):
        self.model = model
        self.keep = dict(keep)

    def apply(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, mask in self.keep.items():
                weight = params[name]
                weight.mul_(mask.to(weight.device, weight.dtype))

    def on_step_end(self, args, state, control, **kwargs):
        self.apply()

    def on_train_end(self, args, state, control, **kwargs):
        self.apply()  # after the best checkpoint is loaded back


# ------------------------------------------------------------------------------------------- distillation
def default_keep_layers(num_layers: int) -> list[int]:
    """Every other layer, ending with the last: 1, 3, 5 of 6 (the last layer feeds the trained head)."""
    return list(range(num_layers - 1, -1, -2))[::-1]


def _layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    n = model.config.num_hidden_layers
    found = [
        (name, m)
        for name, m in model.base_model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and name
    ]
    if len(found) != 1:
        raise UserError(
            f"compress.distill: cannot find the layer stack of a {type(model).__name__} "
            f"(ModuleLists of {n} layers: {[name for name, _ in found]})"
        )
    name, stack = found[0]
    parent_name, _, attr = name.rpartition(".")
    parent = model.base_model.get_submodule(parent_name) if parent_name else model.base_model
    return parent, attr, stack


def student_layers(keep_layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """The teacher layers a student keeps: ``keep_layers``, checked, or every other one by default."""
    keep = list(keep_layers) if keep_layers is not None else default_keep_layers(num_layers)
    wrong = [i for i in keep if not 0 <= i < num_layers]
    if wrong:
        raise UserError(
            f"compress.distill.keep_layers: {wrong} not layers of the teacher, which has "
            f"{num_layers} (0..{num_layers - 1})"
        )
    if len(keep) >= num_layers:
        raise UserError(
            f"compress.distill.keep_layers: keeps {len(keep)} of the teacher's {num_layers} layers; keep fewer"
        )
    return keep


def make_student(teacher: nn.Module, keep_layers: Sequence[int] | None = None) -> nn.Module:
    """A copy of ``teacher`` keeping only the layers ``keep_layers`` (teacher indices, default every
    other one), with the teacher's embeddings, pooler and head. ``config.num_hidden_layers`` follows."""
    keep = student_layers(keep_layers, teacher.config.num_hidden_layers)
    student = copy.deepcopy(teacher)
    parent, attr, stack = _layer_stack(student)
    layers = nn.ModuleList([stack[i] for i in keep])
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    setattr(parent, attr, layers)
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    student.config.distilled_from_layers = keep  # saved in config.json: where each layer came from
    return student


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)`` per example (per
    labelled token, for token classification: ``[batch, positions, tags]`` logits, and the positions whose
    label is -100, other subwords, special tokens and padding, left out of both terms), summed and divided
    by the items in the (accumulated) batch, as the Trainer expects of a loss hook. The T^2 factor keeps
    the soft term's gradients on the scale of the hard term's (Hinton et al.)."""
    t = temperature
    classes = student_logits.shape[-1]
    student_logits, teacher_logits = student_logits.reshape(-1, classes), teacher_logits.reshape(-1, classes)
    labels = labels.reshape(-1)
    labelled = labels != IGNORE_INDEX
    student_logits, teacher_logits, labels = (
        student_logits[labelled],
        teacher_logits[labelled],
        labels[labelled],
    )
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="none",
        log_target=True,
    ).sum(dim=-1) * (t * t)
    hard = F.cross_entropy(student_logits, labels, reduction="none")
    per_item = alpha * soft + (1.0 - alpha) * hard
    denominator = num_items_in_batch if num_items_in_batch is not None else max(per_item.numel(), 1)
    return per_item.sum() / denominator


IGNORE_INDEX = -100  # the label of a position no loss is computed on (transformers' convention)


class DistillationLoss:
    """The ``compute_loss`` hook of ``train_model`` for distillation.

    The Trainer passes the hook the student's outputs and the labels, not the inputs, so a forward
    pre-hook on the student records each batch's inputs and the frozen teacher (eval mode, no grad) is run
    on exactly those. The teacher is deterministic, so its logits are kept per example (keyed by the
    unpadded token ids) and every epoch after the first reuses them instead of running it again. Call
    ``close()`` afterwards to remove the pre-hook.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float, alpha: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_passes = 0
        self._inputs: dict[str, Any] | None = None
        self._cache: dict[bytes, torch.Tensor] = {}
        self._handle = student.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self._inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "num_items_in_batch")}

    @staticmethod
    def _mask(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        return torch.ones_like(ids, dtype=torch.bool).cpu() if mask is None else mask.cpu().bool()

    def _keys(self, inputs: Mapping[str, torch.Tensor]) -> list[bytes]:
        ids = inputs["input_ids"].cpu()
        return [row[keep].numpy().tobytes() for row, keep in zip(ids, self._mask(inputs), strict=True)]

    def teacher_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's fp32 logits for a batch: from the cache when every example is in it. Token
        logits are kept without their padding and padded again to the batch at hand (zeros: padding is
        never labelled), as the same sentence is padded to different lengths in different batches."""
        keys, mask = self._keys(inputs), self._mask(inputs)
        if all(k in self._cache for k in keys):
            rows = [self._cache[k] for k in keys]
            if rows[0].dim() == 1:
                logits = torch.stack(rows)
            else:
                logits = torch.zeros((*mask.shape, rows[0].shape[-1]), dtype=rows[0].dtype)
                for i, row in enumerate(rows):
                    logits[i][mask[i]] = row
            return logits.to(inputs["input_ids"].device)
        with torch.no_grad():
            logits = self.teacher(**inputs).logits.float()
        self.teacher_passes += 1
        for key, row, keep in zip(keys, logits.detach().cpu(), mask, strict=True):
            self._cache[key] = row if row.dim() == 1 else row[keep].clone()
        return logits

    def __call__(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        if self._inputs is None:
            raise RuntimeError("DistillationLoss: no student forward seen before the loss")
        return distillation_loss(
            outputs.logits.float(),
            self.teacher_logits(self._inputs),
            labels,
            self.temperature,
            self.alpha,
            num_items_in_batch,
        )

    def close(self) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------------------- the budget
def fits(loss: float, budget: float) -> bool:
    """Whether a val macro-F1 ``loss`` (original minus variant; negative = the variant did better) is
    within ``budget``. A hair of float slack, so that a loss equal to the budget fits."""
    return loss <= budget + 1e-9


def bootstrap_draws(
    score: Callable[[np.ndarray], np.ndarray], n: int, resamples: int, seed: int
) -> np.ndarray:
    """A loss's paired bootstrap over ``n`` rows: ``score(weights)`` gives, for each row of ``weights``
    (how often each row is drawn; the same draws for both models, as ``lmpipe compare`` resamples), the
    reference's metric minus the candidate's. Returns the ``resamples`` losses."""
    from lmpipe.experiments.compare import bootstrap_weights

    return np.concatenate([score(w) for w in bootstrap_weights(n, resamples, seed)])


def upper_bound(
    draws: np.ndarray, loss: float, confidence: float, rows: int, future_rows: int | None = None
) -> float:
    """The one-sided upper bound at ``confidence`` of a ``loss`` measured on ``rows`` rows, from its
    bootstrap ``draws`` (percentile method).

    With ``future_rows`` None, a bound on the loss itself (on all the data those rows stand for). With
    ``future_rows`` n, a bound on the loss that n new rows will show (a prediction bound, what a held-out
    test split of n rows will measure): the val draws' spread around ``loss`` plus the spread of an
    independent n-row estimate, the same spread scaled by sqrt(rows / n) (paired with a fixed shuffle of
    the draws). It is wider: a test split of a few hundred rows moves the loss by itself."""
    if future_rows is None:
        return float(np.quantile(draws, confidence))
    spread = draws - loss
    other = spread[np.random.default_rng(len(draws)).permutation(len(draws))]
    return float(loss + np.quantile(spread + np.sqrt(rows / future_rows) * other, confidence))


def paired_loss(
    score: Callable[[np.ndarray], np.ndarray],
    n: int,
    resamples: int,
    seed: int,
    confidence: float | None,
    future_rows: int | None = None,
) -> dict[str, Any]:
    """A loss's paired bootstrap over ``n`` rows (``bootstrap_draws``). Returns the one-sided upper
    bound at ``confidence`` (``upper_bound``: on the loss, or with ``future_rows`` on the loss that many
    new rows will show, around the loss on all ``n`` rows, ``score`` of unit weights; None with
    ``confidence`` None) and the two-sided 95% CI."""
    draws = bootstrap_draws(score, n, resamples, seed)
    low, high = (float(x) for x in np.percentile(draws, [2.5, 97.5]))
    loss = 0.0 if future_rows is None else float(score(np.ones((1, n)))[0])
    bound = None if confidence is None else upper_bound(draws, loss, confidence, n, future_rows)
    return {"bound": bound, "ci95": [round(low, 6), round(high, 6)]}


def within(loss: float, bound: float | None, budget: float) -> bool:
    """The budget rule: the loss's upper bound fits the budget (``compress.confidence``); the point loss
    when there is no bound (``compress.confidence: null``, the rule before issue 35)."""
    return fits(loss if bound is None else bound, budget)


def largest_fitting(curve: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The point of a sparsity curve with the largest sparsity whose val loss fits its budget (each point
    has ``sparsity`` and ``within_budget``), or None when none does."""
    fitting = [point for point in curve if point["within_budget"]]
    return max(fitting, key=lambda point: point["sparsity"]) if fitting else None


def next_up(grid: Sequence[float], sparsity: float | None) -> float | None:
    """The smallest grid sparsity above ``sparsity`` (the smallest of all when it is None), or None."""
    above = sorted(s for s in grid if sparsity is None or s > sparsity)
    return above[0] if above else None


def fp32_steps(limit: int, layers: int) -> list[int]:
    """How many of the most sensitive layers to try keeping fp32, in order: 1, 2, 4, ... up to ``limit``
    (and at most ``layers``), so the number of val passes grows with log(limit), not limit."""
    top = min(limit, layers)
    steps, k = [], 1
    while k < top:
        steps.append(k)
        k *= 2
    return [*steps, top] if top > 0 else []


@torch.inference_mode()
def activation_sensitivity(model: nn.Module, run: Callable[[nn.Module], object]) -> list[dict[str, Any]]:
    """Each Linear layer's error under dynamic int8's activations, from one fp32 pass (``run(model)``):
    dynamic quantization maps a layer's whole input to 8 bits with one scale, so a few outlier features
    (the "massive activations" of LLMs) leave the rest a handful of levels. Scored as the relative
    squared error of that quantize-dequantize of the input, summed over the pass; the most sensitive
    first. One forward pass instead of one per layer (``int8_sensitivity``'s way for classifiers)."""
    error: dict[str, float] = {}
    energy: dict[str, float] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().float()
            low, high = float(x.min()), float(x.max())
            scale = max(high - min(low, 0.0), 1e-12) / 255  # uint8, asymmetric, as dynamic int8 does
            zero = round(-min(low, 0.0) / scale)
            back = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
            error[name] = error.get(name, 0.0) + float(((x - back) ** 2).sum())
            energy[name] = energy.get(name, 0.0) + float((x**2).sum())

        return record

    handles = [
        m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    ]
    try:
        run(model)
    finally:
        for handle in handles:
            handle.remove()
    scores = [{"layer": n, "input_error": error[n] / max(energy[n], 1e-30)} for n in error]
    return sorted(scores, key=lambda s: -s["input_error"])


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(reference || candidate) of the softmaxed rows: how far a change moves the predictions."""
    ref = torch.log_softmax(torch.from_numpy(reference_logits).double(), dim=-1)
    cand = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    return float(F.kl_div(cand, ref, reduction="batchmean", log_target=True))


# ------------------------------------------------------------------------------------------- measurement
def parameter_counts(model: nn.Module) -> dict[str, int]:
    """All parameters and the non-zero ones, counting the int8 weights packed inside quantized layers."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    for module in _quantized_modules(model).values():
        weight, bias = module._weight_bias()
        total += weight.numel()
        nonzero += int((weight.int_repr() != weight.q_zero_point()).sum())
        if bias is not None:
            total += bias.numel()
            nonzero += int(torch.count_nonzero(bias))
    return {"parameters": total, "nonzero_parameters": nonzero}


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a model folder; the tokenizer is the same for all."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def fixed_batch(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int, max_length: int
) -> dict[str, torch.Tensor]:
    """``batch_size`` real texts (cycled if there are fewer) padded or truncated to exactly ``max_length``."""
    if not texts:
        raise UserError("compress: the test split is empty, nothing to time")
    chosen = [texts[i % len(texts)] for i in range(batch_size)]
    return dict(
        tokenizer(chosen, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    )


def time_models(
    models: Mapping[str, nn.Module],
    batch: Mapping[str, torch.Tensor],
    warmup: int,
    repeats: int,
    threads: int,
    desc: str = "latency",
) -> latency.Timings:
    """Each model's forward passes on ``batch``, on the CPU with ``threads`` threads, timed round by round
    (``latency.time_interleaved``: wall and CPU seconds per pass, and the other processes' load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls = {name: (lambda m=model: m(**batch)) for name, model in models.items()}
    try:
        with torch.inference_mode():
            return latency.time_interleaved(calls, warmup, repeats, desc)
    finally:
        torch.set_num_threads(previous)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (latency, score) points: True where no other point is at least as fast and as good, and
    strictly better in one of the two."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags
