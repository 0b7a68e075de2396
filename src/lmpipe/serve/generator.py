"""The deployable text generator: a causal LM as an ONNX Runtime GenAI folder (a KV-cache graph built
by its model builder), its tokenizer and how prompts are made, in one folder.

This file is self-contained on purpose (numpy, pandas, pydantic, onnxruntime-genai, transformers and
mlflow only, no ``lmpipe`` imports): it is logged as the code of the MLflow pyfunc model ("models from
code"), so a registered generator runs wherever those packages are installed, without this repository.
lmpipe uses the same code: ``encode_prompts`` is how training, evaluation and serving turn an input
into prompt ids (one implementation), and ``GenAIGenerator`` is what the compress and export stages
time and score, and what ``lmpipe predict`` runs.

The folder holds ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json`` (the builder's),
the tokenizer's own files, and ``generator.json``: the prompt template, whether the chat template wraps
it, ``max_length`` (prompt tokens; a longer input is cut in its input, never in its template, at the
end ``keep`` says) and the bounds a request's ``max_new_tokens`` must respect.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydantic

GENERATOR_FILE = "generator.json"
TEXT_COLUMN = "text"
_MARK = "\x00TEXT\x00"  # where the input goes in a rendered prompt (split out, never tokenized)
# inference params a request may set (MLflow's params), with their defaults; the served model's
# generator.json gives max_new_tokens' default and its upper bound
REQUEST_DEFAULTS = {"max_new_tokens": 24, "do_sample": False, "temperature": 1.0, "seed": 0}


class InputError(ValueError):
    """A request or input file the generator cannot answer: the message names the row or the param."""


@dataclass
class Prompts:
    """Prompts as token ids, and how many had their input cut to fit ``max_length``."""

    ids: list[list[int]]
    truncated: int
    cut_tokens: int
    cut: list[bool]  # per prompt: was its input cut


def render_parts(tokenizer: Any, context: str, template: str, chat_template: str) -> tuple[str, str]:
    """The prompt's text before and after the input: ``template`` (with ``{text}``) in the model's chat
    template (``chat_template: auto``, where it has one) or plain, or a chat's own turns (``context``, a
    JSON list of messages) with its last user turn's content as the input."""
    if context:
        turns = json.loads(context)
        turns[-1] = {**turns[-1], "content": _MARK}
    else:
        turns = [{"role": "user", "content": template.replace("{text}", _MARK)}]
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    else:
        rendered = "\n\n".join(t["content"] for t in turns) + "\n"
    before, _, after = rendered.partition(_MARK)
    return before, after


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    contexts: Sequence[str] | None,
    template: str,
    chat_template: str,
    max_length: int,
    keep: str = "head",
) -> Prompts:
    """Each input's prompt as ids, at most ``max_length`` of them. The template's own tokens are always
    kept; a long input is cut to fit: ``keep: head`` keeps its start, ``tail`` its end (cut from the
    left), ``head_tail`` both ends. The cuts are counted."""
    ids, truncated, cut, flags = [], 0, 0, []
    cache: dict[str, tuple[list[int], list[int]]] = {}
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    for text_ids, context in zip(
        encoded, contexts if contexts is not None else [""] * len(texts), strict=True
    ):
        if context not in cache:
            before, after = render_parts(tokenizer, context, template, chat_template)
            cache[context] = (
                tokenizer(before, add_special_tokens=False)["input_ids"],
                tokenizer(after, add_special_tokens=False)["input_ids"],
            )
        before, after = cache[context]
        budget = max(max_length - len(before) - len(after), 1)
        flags.append(len(text_ids) > budget)
        if len(text_ids) > budget:
            truncated, cut = truncated + 1, cut + len(text_ids) - budget
            if keep == "tail":
                text_ids = text_ids[-budget:]
            elif keep == "head_tail":
                head = budget // 2
                text_ids = text_ids[:head] + text_ids[len(text_ids) - (budget - head) :]
            else:
                text_ids = text_ids[:budget]
        ids.append(before + list(text_ids) + after)
    return Prompts(ids, truncated, cut, flags)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class GenAIGenerator:
    """An ONNX Runtime GenAI folder, one prompt at a time (batch 1: the online case, and the KV cache
    makes each new token one short step). Greedy unless a call asks to sample."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.info = json.loads((self.folder / GENERATOR_FILE).read_text())
        config = og.Config(str(self.folder))
        if threads is not None:  # intra-op threads, as the stages set torch's, so the figures compare
            options = {"intra_op_num_threads": int(threads), "session.intra_op.allow_spinning": "0"}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._og = og
        self.model = og.Model(config)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self.eos = self.tokenizer.eos_token_id

    @property
    def max_new_tokens(self) -> int:
        return int(self.info["max_new_tokens"])

    @property
    def max_new_tokens_limit(self) -> int:
        return int(self.info["max_new_tokens_limit"])

    def prompts(self, texts: Sequence[str]) -> Prompts:
        info = self.info
        return encode_prompts(
            self.tokenizer, texts, None, info["prompt_template"], info["chat_template"], info["max_length"],
            info.get("keep", "head"),
        )  # fmt: skip

    def _generator(self, total: int, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                   min_length: int = 0):  # fmt: skip
        params = self._og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": total, "do_sample": do_sample, "min_length": min_length}
        if do_sample:
            options.update(temperature=float(temperature), random_seed=int(seed))
        params.set_search_options(**options)
        return self._og.Generator(self.model, params)

    def generate_ids(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> list[int]:
        """The new token ids after ``prompt`` (EOS dropped): up to ``max_new_tokens``, stopping at EOS."""
        total = len(prompt) + max_new_tokens
        generator = self._generator(total, do_sample, temperature, seed)
        generator.append_tokens([list(prompt)])
        while not generator.is_done():
            generator.generate_next_token()
        new = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
        return new[:-1] if new and new[-1] == self.eos else new

    def timed_ids(self, prompt: Sequence[int], new_tokens: int) -> float:
        """Generate exactly ``new_tokens`` after ``prompt``; returns the seconds to the first of them
        (prefill and one step), measured inside the call (its caller times the whole)."""
        start = time.perf_counter()
        total = len(prompt) + new_tokens
        generator = self._generator(total, min_length=total)
        generator.append_tokens([list(prompt)])
        generator.generate_next_token()
        first = time.perf_counter() - start
        while not generator.is_done():
            generator.generate_next_token()
        return first

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def reference_nll(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]):
        """Each reference's summed NLL (nats) given its prompt, and its token count (perplexity =
        exp(sum nll / sum tokens)): one prefill of prompt + target, scored from the returned logits."""
        nll, count = np.zeros(len(prompts)), np.zeros(len(prompts), dtype=int)
        for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            seq = list(prompt) + list(target)
            generator = self._generator(len(seq) + 1)
            generator.append_tokens([seq])
            logits = np.asarray(generator.get_output("logits"))[0].astype(np.float64)
            scored = log_softmax(logits[len(prompt) - 1 : len(seq) - 1])
            nll[i] = -scored[np.arange(len(target)), np.asarray(target)].sum()
            count[i] = len(target)
        return nll, count


def time_generation(first: Any, total: Any, new_tokens: int) -> dict[str, float]:
    """Time to the first token and decoding speed from timed generations of exactly ``new_tokens``
    tokens: ``first`` and ``total`` are each call's seconds to its first token and to its end. Tokens per
    second counts the tokens after the first over the time after it, call by call (the median)."""
    first, total = np.asarray(first, dtype=float), np.asarray(total, dtype=float)
    decode = np.maximum(total - first, 1e-9)
    return {
        "ttft_ms": round(1000 * float(np.median(first)), 2),
        "ttft_p95_ms": round(1000 * float(np.percentile(first, 95)), 2),
        "generate_ms": round(1000 * float(np.median(total)), 2),
        "tokens_per_s": round(float(np.median((new_tokens - 1) / decode)), 2),
    }


# ------------------------------------------------------------------------------------------ serving
def texts_from_input(model_input: Any) -> list[str]:
    """A list, Series, ndarray or DataFrame (a ``text`` column, or a single one) of input texts, each a
    non-empty string. (``lmpipe.serve.serving`` reads a classifier's request alike: each file is logged
    alone as its model's code, so neither may import the other.)"""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            values = model_input[TEXT_COLUMN].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise InputError(
                f"input needs a '{TEXT_COLUMN}' column (got columns: {', '.join(map(str, model_input.columns))})"
            )
    elif isinstance(model_input, pd.Series | np.ndarray):
        values = list(model_input.reshape(-1) if isinstance(model_input, np.ndarray) else model_input)
    elif isinstance(model_input, list | tuple):
        values = list(model_input)
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        raise InputError(f"input must be a list of prompts, got {type(model_input).__name__}")
    if not values:
        raise InputError("input holds no prompt")
    for i, value in enumerate(values, start=1):
        if not isinstance(value, str):
            raise InputError(f"prompt {i}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise InputError(f"prompt {i}: empty prompt")
    return values


def request_options(params: dict[str, Any] | None, default_new: int, limit: int) -> dict[str, Any]:
    """A request's inference params, checked: ``max_new_tokens`` in [1, limit], ``temperature`` > 0,
    ``do_sample`` a bool, ``seed`` an int >= 0. Unknown params are refused by name."""
    given = dict(params or {})
    unknown = set(given) - set(REQUEST_DEFAULTS)
    if unknown:
        raise InputError(f"unknown params {sorted(unknown)}; known: {sorted(REQUEST_DEFAULTS)}")
    options = {**REQUEST_DEFAULTS, "max_new_tokens": default_new, **given}
    n, temperature = options["max_new_tokens"], options["temperature"]
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= int(n) <= limit:
        raise InputError(f"max_new_tokens: expected an integer from 1 to {limit}, got {n!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise InputError(f"temperature: expected a number > 0, got {temperature!r}")
    if not isinstance(options["do_sample"], bool | np.bool_):
        raise InputError(f"do_sample: expected true or false, got {options['do_sample']!r}")
    seed = options["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed: expected an integer >= 0, got {seed!r}")
    return {
        "max_new_tokens": int(n),
        "do_sample": bool(options["do_sample"]),
        "temperature": float(temperature),
        "seed": int(seed),
    }


class Generation(pydantic.BaseModel):
    """One prompt's answer: the generated text, its length in tokens, and whether the input was cut to
    fit the model's ``max_length``."""

    generation: str
    new_tokens: int
    prompt_tokens: int
    truncated: bool


def pyfunc_model():
    """The MLflow pyfunc (``TextGeneratorModel``): a list of input texts in, one ``Generation`` each.
    Inference params (MLflow's ``params``): ``max_new_tokens``, ``do_sample`` (false = greedy),
    ``temperature`` and ``seed`` (for sampling: the same seed gives the same text). A bad request is a
    400 naming the row or the param. Built on call, so that importing this module does not import
    mlflow (the generation task imports ``encode_prompts`` from here)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class TextGeneratorModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.generator = GenAIGenerator(context.artifacts["generator"])

        def predict(
            self, context, model_input: list[str], params: dict[str, Any] | None = None
        ) -> list[Generation]:
            g = self.generator
            try:
                texts = texts_from_input(model_input)
                options = request_options(params, g.max_new_tokens, g.max_new_tokens_limit)
            except InputError as err:
                # MLflow's scoring server turns this into a 400 with the message, not a 500
                raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
            prompts = g.prompts(texts)
            n = options.pop("max_new_tokens")
            out = []
            for ids, cut in zip(prompts.ids, prompts.cut, strict=True):
                new = g.generate_ids(ids, n, **options)
                out.append(
                    Generation(
                        generation=g.decode(new), new_tokens=len(new), prompt_tokens=len(ids), truncated=cut
                    )
                )
            return out

    return TextGeneratorModel()


# MLflow executes this file under a module name starting with "code_model_" when it loads the model:
# only then is the model object set. Importing lmpipe.serve.generator has no side effect.
if __name__.startswith("code_model_"):
    import mlflow.models

    mlflow.models.set_model(pyfunc_model())
