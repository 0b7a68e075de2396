"""Generation's compress and export: what a causal LM costs to run, and the model shipped.

* **compress** (``compress``): the trained model (train merged its LoRA adapter into it) against two
  smaller copies of its weights: dynamic int8 of the Linear layers in PyTorch, and group-wise 4-bit
  weights run by ONNX Runtime GenAI with its KV cache (its model builder). Each is scored on val and
  test (ROUGE-L, the references' perplexity), judged on val ROUGE-L against ``compress.max_loss``, and
  timed at batch 1 on one fixed prompt: time to the first token, and tokens per second after it.
  Pruning and distillation are skipped, each with a line saying why (``SKIPPED``).
* **export** (``export``): ONNX Runtime GenAI folders in fp32 and int4, each checked token by token
  against PyTorch's greedy generation on every test prompt (fp32 must match on ``export.min_token_match``
  of them; the divergences are reported), timed like compress's variants, and the
  ``export.registered_variant`` registered as an MLflow pyfunc that generates
  (``lmpipe.serve.generator``), behind the gate: beat the lead baseline on test ROUGE-L beyond noise,
  then the champion.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmpipe import latency, tracking
from lmpipe.errors import UserError
from lmpipe.tasks.base import Compressed, Exported, Package
from lmpipe.tasks.generation import encode_prompts, encode_targets, paired_ci, rouge_rows

SKIPPED = {
    "pruned": "pruning is skipped for a causal LM: unstructured zeros speed up neither PyTorch's nor ONNX "
    "Runtime GenAI's dense CPU kernels, and its recovery fine-tune is a classifier's",
    "student": "distillation is skipped for a causal LM: a shallower student needs a language-modelling "
    "distillation loop over generated text, which is not built (the classifier's matches logits)",
}
RUNTIMES = {"original": "pytorch", "int8": "pytorch", "int4": "onnxruntime-genai"}


class Runner:
    """One way of running a causal LM: generations, references' NLL, and the two timed calls."""

    def texts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, desc: str) -> list[str]:
        """Greedy generations (a progress bar named ``desc``)."""
        raise NotImplementedError

    def nll(self, prompts, targets, desc: str) -> tuple[np.ndarray, np.ndarray]:
        """Each reference's summed NLL given its prompt, and its token count."""
        raise NotImplementedError

    def ids(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """One prompt's greedy new tokens at batch 1, EOS dropped."""
        raise NotImplementedError

    def timed(self, prompt: Sequence[int], new_tokens: int) -> float:
        """Exactly ``new_tokens`` new tokens; returns the seconds to the first (measured inside)."""
        raise NotImplementedError

    def threaded(self, threads: int) -> Runner:
        """The same model on ``threads`` intra-op threads, for timing (PyTorch's are set process-wide)."""
        return self


class TorchRunner(Runner):
    """A PyTorch causal LM: batched greedy generation (``lmpipe.modeling.generation``), batch 1 to time."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    def texts(self, prompts, max_new_tokens, desc):
        from lmpipe.modeling import generation

        return generation.generate(self.model, self.tokenizer, prompts, max_new_tokens, self.batch_size, desc)

    def nll(self, prompts, targets, desc):
        from lmpipe.modeling import generation

        return generation.reference_nll(self.model, self.tokenizer, prompts, targets, self.batch_size, desc)

    def ids(self, prompt, max_new_tokens):
        from lmpipe.modeling import generation

        return generation.greedy_ids(self.model, self.tokenizer, prompt, max_new_tokens)

    def timed(self, prompt, new_tokens):
        from lmpipe.modeling import generation

        return generation.timed_generation(self.model, self.tokenizer, prompt, new_tokens)


class GenAIRunner(Runner):
    """An ONNX Runtime GenAI folder (``lmpipe.serve.generator.GenAIGenerator``), one prompt at a time."""

    def __init__(self, folder, threads: int | None = None):
        from lmpipe.serve.generator import GenAIGenerator

        self.folder, self.generator = folder, GenAIGenerator(folder, threads)

    def threaded(self, threads):
        return GenAIRunner(self.folder, threads)

    def texts(self, prompts, max_new_tokens, desc):
        from tqdm.auto import tqdm

        g = self.generator
        return [g.decode(g.generate_ids(p, max_new_tokens)) for p in tqdm(prompts, desc=f"generate {desc}")]

    def nll(self, prompts, targets, desc):
        return self.generator.reference_nll(prompts, targets)

    def ids(self, prompt, max_new_tokens):
        return self.generator.generate_ids(prompt, max_new_tokens)

    def timed(self, prompt, new_tokens):
        return self.generator.timed_ids(prompt, new_tokens)


def score(runner: Runner, frame: pd.DataFrame, prompts, targets, max_new_tokens: int, desc: str):
    """``runner``'s generations on a split, scored as evaluate scores them (``Generated``)."""
    from lmpipe.tasks.generation.evaluation import Generated

    texts = runner.texts(prompts, max_new_tokens, desc)
    nll, count = runner.nll(prompts, targets, desc)
    perplexity = math.exp(nll.sum() / max(count.sum(), 1))
    return Generated(texts, rouge_rows(frame["target"].tolist(), texts), perplexity)


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def latency_setup(threads: int, prompt: list[int], new_tokens: int, lat) -> dict[str, Any]:
    """How compress and export time a generator, for their reports."""
    return {
        "device": "cpu",
        "threads": threads,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "warmup": lat.warmup,
        "repeats": lat.batch_repeats,
        "batch_size": 1,
        "max_other_load": lat.max_other_load,
    }


def timing_prompt(prompts: Sequence[Sequence[int]], length: int) -> list[int]:
    """One fixed prompt of ``length`` tokens for every timed call: the longest prompt, cut or repeated."""
    longest = list(max(prompts, key=len))
    return (longest * (length // len(longest) + 1))[:length]


def time_runners(
    runners: dict[str, Runner], prompt: list[int], new_tokens: int, lat, where: str
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Time to the first token, tokens per second and CPU cost per generation (``cpu_generate_ms``) of
    each runner, interleaved (``lmpipe.latency``) on ``lat.threads`` threads: ``lat.batch_repeats``
    generations of exactly ``new_tokens`` tokens per runner, each timed whole and to its first token.
    Returns the rows and the busy check's verdict (``latency.reliability``); a disturbed timing on more
    than one thread measures the CPU cost again on one (``onnx_export.latency_benchmark`` says why)."""
    import torch

    from lmpipe.serve.generator import time_generation

    def timed(threads: int) -> latency.Timings:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        threaded = {name: runner.threaded(threads) for name, runner in runners.items()}
        calls: dict[str, Callable[[], object]] = {
            name: (lambda r=runner: r.timed(prompt, new_tokens)) for name, runner in threaded.items()
        }
        try:
            return latency.time_interleaved(
                calls, lat.warmup, lat.batch_repeats, f"generation, {threads} thread(s)"
            )
        finally:
            torch.set_num_threads(previous)

    first = timed(lat.threads)
    cpu = dict(first.cpu)  # replaced by one thread's when the timing was disturbed
    verdict = latency.reliability(
        list(first.other_load.values()),
        lat.max_other_load,
        where,
        lat.threads,
        lambda: cpu.update(timed(1).cpu),
    )
    rows = {
        n: {
            **time_generation(first.returned[n], first.wall[n], new_tokens),
            "cpu_generate_ms": round(1000 * float(np.mean(cpu[n])), 2),
        }
        for n in runners
    }
    return rows, verdict


def with_speedups(rows: dict[str, dict], reference: str, basis: str) -> None:
    """Each row's speed-up over ``reference``: decoding (tokens per second, or with ``basis`` cpu the CPU
    cost of a generation of the same length) and the time to the first token (wall-clock only)."""
    ref = rows[reference]
    for row in rows.values():
        row["wall_speedup_tokens_per_s"] = round(row["tokens_per_s"] / ref["tokens_per_s"], 3)
        row["cpu_speedup_generate"] = round(ref["cpu_generate_ms"] / row["cpu_generate_ms"], 3)
        row["speedup_tokens_per_s"] = row[
            "wall_speedup_tokens_per_s" if basis == "wall" else "cpu_speedup_generate"
        ]
        row["speedup_ttft"] = round(ref["ttft_ms"] / row["ttft_ms"], 3)


def generator_info(params) -> dict[str, Any]:
    """``generator.json``: how the served model makes its prompts, and a request's bounds."""
    g, base = params.generation, params.base
    return {
        "task": "generation",
        "prompt_template": g.prompt_template,
        "chat_template": g.chat_template,
        "max_length": base.max_length,
        "keep": base.reading.mode,
        "max_new_tokens": g.max_new_tokens,
        "max_new_tokens_limit": g.serve_max_new_tokens,
    }


# -------------------------------------------------------------------------------------------- compress
# int8's fp32 layers are chosen on val perplexity (one teacher-forced pass per trial: no generation):
# the fewest of the most sensitive layers that bring it within this share of the original's
PERPLEXITY_TOLERANCE = 0.05


def int8_variant(fp32, tokenizer, folder: Path, job, prompts, targets, params) -> dict[str, Any]:
    """Dynamic int8 of every Linear layer but ``lm_head`` (tied to the embeddings: int8 would store a
    second copy, and the next-token distribution is where int8's error shows first), written to
    ``folder``. When its val perplexity is more than ``PERPLEXITY_TOLERANCE`` above the original's, the
    layers whose inputs int8 distorts most (``compression.activation_sensitivity``) stay fp32: 1, 2,
    4, ... up to ``compress.quantize.max_fp32_layers``, until it is within. Returns the recipe."""
    from lmpipe.compress import compression
    from lmpipe.modeling import generation

    batch = params.generation.batch_size

    def perplexity(model) -> float:
        nll, count = generation.reference_nll(model, tokenizer, prompts, targets, batch)
        return round(math.exp(nll.sum() / max(count.sum(), 1)), 4)

    keep = [n for n in compression.linear_names(fp32) if n.endswith("lm_head")]
    reference = perplexity(fp32)
    chosen = compression.quantize_dynamic_int8(fp32, keep)
    trials = [{"fp32_layers": 0, "val_perplexity": perplexity(chosen)}]
    limit = reference * (1 + PERPLEXITY_TOLERANCE)
    steps = compression.fp32_steps(
        params.compress.quantize.max_fp32_layers, len(compression.linear_names(fp32))
    )
    ranked: list[dict[str, Any]] = []
    if trials[0]["val_perplexity"] > limit and steps:

        def run(model):
            return generation.reference_nll(
                model, tokenizer, prompts, targets, batch, desc="int8 sensitivity"
            )

        ranked = [r for r in compression.activation_sensitivity(fp32, run) if r["layer"] not in keep]
        for k in steps:
            chosen = compression.quantize_dynamic_int8(fp32, keep + [r["layer"] for r in ranked[:k]])
            trials.append({"fp32_layers": k, "val_perplexity": perplexity(chosen)})
            if trials[-1]["val_perplexity"] <= limit:
                break
    compression.save_int8(chosen, tokenizer, folder, job.source)
    kept = keep + [r["layer"] for r in ranked[: trials[-1]["fp32_layers"]]]
    return {
        "fp32_layers": kept,
        "fp32_layer_count": len(kept),
        "original_val_perplexity": reference,
        "fp32_trials": trials,
        **({"sensitivity": ranked[: max(params.compress.quantize.max_fp32_layers, 1)]} if ranked else {}),
    }


def compress(job) -> Compressed:
    from lmpipe.compress import compression
    from lmpipe.modeling import models
    from lmpipe.serve import onnx_export
    from lmpipe.tasks.generation.evaluation import load_generator

    params, cfg, g = job.params, job.params.compress, job.params.generation
    base, out = params.base, Path(job.folder)
    tokenizer = models.load_tokenizer(job.model_dir)
    encoded = {}
    # val: the rows train's epoch selection generates for (generation.val_rows), each variant alike
    val = job.val if g.val_rows is None else job.val.head(g.val_rows)
    for split, frame in (("val", val), ("test", job.test)):
        prompts = encode_prompts(tokenizer, frame, g, base.max_length, base.reading.mode).ids
        encoded[split] = (frame, prompts, encode_targets(tokenizer, frame["target"], g.max_target_tokens)[0])
    fp32 = load_generator(job.model_dir).cpu().eval()
    runners: dict[str, Runner] = {"original": TorchRunner(fp32, tokenizer, g.batch_size)}
    sizes = {"original": round(compression.weights_bytes(job.model_dir) / 2**20, 3)}
    recipes: dict[str, Any] = {}
    if cfg.quantize.enabled:
        recipes["int8"] = int8_variant(fp32, tokenizer, out / "int8", job, *encoded["val"][1:], params)
        # batch 1: torch's dynamic int8 Linear runs a 16-row decoding step ~5x slower than one row here
        # (1.9 s a row at batch 16, 0.8 s at batch 1, SmolLM2, 2 cores); fp32 is the other way round
        runners["int8"] = TorchRunner(compression.load_int8(out / "int8"), tokenizer, 1)
        sizes["int8"] = round(compression.weights_bytes(out / "int8") / 2**20, 3)
    if cfg.int4.enabled:
        recipes["int4"] = onnx_export.build_genai_folder(
            job.model_dir, out / "int4", "int4", generator_info(params), cfg.int4.block_size, cfg.int4.algo
        )
        runners["int4"] = GenAIRunner(out / "int4")
        sizes["int4"] = onnx_export.folder_mb(out / "int4")
    rows, warnings, scored = {}, [], {}
    for name, runner in runners.items():
        with tracking.child_run(
            params, name, {"variant": name}, "compress-variant", {"variant": name}
        ) as child:
            scored[name] = {
                s: score(runner, *encoded[s], g.max_new_tokens, f"{s} ({name})") for s in ("val", "test")
            }
            rows[name] = {
                "runtime": RUNTIMES[name],
                "size_mb": sizes[name],
                **prefixed(scored[name]["val"].metrics(), "val"),
                **prefixed(scored[name]["test"].metrics(), "test"),
                **recipes.get(name, {}),
            }
            rows[name]["run_id"] = child.info.run_id
    reference = rows["original"]["val_rougeL"]
    for name, row in rows.items():
        if name == "original":
            continue
        budget, loss = cfg.budget(name), round(reference - row["val_rougeL"], 4)
        # the budget rule (compression.within): the loss's one-sided upper bound, paired over val rows (with
        # compress.bound: prediction, on the loss a new split as large as test will show)
        diff = np.asarray(scored["original"]["val"].rows["rougeL"], float) - np.asarray(
            scored[name]["val"].rows["rougeL"], float
        )
        paired = compression.paired_loss(
            lambda w, d=diff: (w @ d) / w.sum(axis=1),
            len(diff),
            cfg.resamples,
            base.seed,
            cfg.confidence,
            cfg.future_rows(len(job.test)),
        )
        ci = paired_ci(
            scored[name]["test"].rows["rougeL"], scored["original"]["test"].rows["rougeL"], base.seed
        )
        row.update(
            val_rougeL_loss=loss,
            val_rougeL_loss_bound=None if paired["bound"] is None else round(paired["bound"], 4),
            max_loss=budget,
            within_budget=compression.within(loss, paired["bound"], budget),
            test_rougeL_delta=ci["mean"],
            test_rougeL_delta_ci95=[ci["ci95_low"], ci["ci95_high"]],
        )
        if not row["within_budget"]:
            bound = "" if paired["bound"] is None else f" (upper bound {100 * paired['bound']:.2f} pt)"
            warnings.append(
                f"{name} loses {100 * loss:.2f} pt of val ROUGE-L{bound} against the trained model, over its "
                f"budget of {100 * budget:g} pt"
            )
    prompt = timing_prompt(encoded["val"][1], base.max_length)
    timed, timing = time_runners(runners, prompt, g.max_new_tokens, cfg.latency, "compress")
    for name, row in rows.items():
        row.update(timed[name])
    with_speedups(rows, "original", timing["speedup_basis"])
    for row in rows.values():
        tracking.log_metrics_to(row.pop("run_id"), row)
    points = pd.DataFrame(
        {
            "variant": list(rows),
            "ttft_ms": [r["ttft_ms"] for r in rows.values()],
            "tokens_per_s": [r["tokens_per_s"] for r in rows.values()],
            "val_rougeL": [r["val_rougeL"] for r in rows.values()],
            "size_mb": [r["size_mb"] for r in rows.values()],
        }
    )
    report = {
        "task": "generation",
        "variants": rows,
        "max_loss": cfg.max_loss,
        "confidence": cfg.confidence,
        "bound": cfg.bound,
        "skipped": {
            k: SKIPPED[k] for k, on in (("pruned", cfg.prune.enabled), ("student", cfg.distill.enabled)) if on
        },
        **timing,
        "latency_setup": latency_setup(cfg.latency.threads, prompt, g.max_new_tokens, cfg.latency),
        "val_rows": len(val),
        "test_rows": len(job.test),
        "source_model": str(job.model_dir),
    }
    return Compressed(report, points, compress_summary(report, warnings), warnings)


def compress_summary(report: dict, warnings: list[str]) -> str:
    rows = report["variants"]
    lines = [
        f"compress: budget {100 * report['max_loss']:g} pt of val ROUGE-L; batch 1, "
        f"{report['latency_setup']['prompt_tokens']}-token prompt, {report['latency_setup']['new_tokens']} new tokens",
        "compress: variant   runtime            size MB  val R-L  test R-L  test ppl  val loss  budget  TTFT ms  tok/s  speed-up",
    ]
    for name, r in rows.items():
        verdict = "" if name == "original" else ("ok" if r["within_budget"] else "MISSED")
        loss = f"{100 * r['val_rougeL_loss']:+6.2f} pt" if "val_rougeL_loss" in r else " " * 9
        lines.append(
            f"compress: {name:<9} {r['runtime']:<18} {r['size_mb']:7.1f}  {r['val_rougeL']:.4f}   {r['test_rougeL']:.4f}  "
            f"{r['test_perplexity']:8.2f}  {loss}  {verdict:<6}  {r['ttft_ms']:7.1f}  {r['tokens_per_s']:5.1f}  "
            f"{r['speedup_tokens_per_s']:.2f}x"
        )
    lines += [f"compress: {note}" for note in report["skipped"].values()]
    lines += [f"compress: WARNING: {w}" for w in warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- export
def token_parity(reference: list[list[int]], other: list[list[int]], ids: Sequence[Any]) -> dict[str, Any]:
    """How far ``other``'s greedy tokens follow ``reference``'s, prompt by prompt: the share of prompts
    with identical tokens, the share of reference tokens reproduced at their position, and each
    divergence (row id, first differing position, the two tokens there)."""
    divergences, same_tokens, total = [], 0, 0
    for row, a, b in zip(ids, reference, other, strict=True):
        same = sum(x == y for x, y in zip(a, b, strict=False))
        same_tokens, total = same_tokens + same, total + max(len(a), 1)
        if a != b:
            pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            divergences.append(
                {"id": str(row), "position": pos, "pytorch": a[pos] if pos < len(a) else None,
                 "onnx": b[pos] if pos < len(b) else None}
            )  # fmt: skip
    n = len(reference)
    return {
        "identical_share": round(1 - len(divergences) / max(n, 1), 4),
        "token_agreement": round(same_tokens / max(total, 1), 4),
        "divergent_prompts": len(divergences),
        "divergences": divergences[:20],
    }


def export(job) -> Exported:
    from lmpipe.compress import compression
    from lmpipe.modeling import models
    from lmpipe.serve import onnx_export
    from lmpipe.tasks.generation.evaluation import load_generator

    params, folder, test, cfg = job.params, Path(job.folder), job.test, job.params.export
    g, base = params.generation, params.base
    info = generator_info(params)
    builds = {
        p: onnx_export.build_genai_folder(
            job.model_dir, folder / p, p, info, params.compress.int4.block_size, params.compress.int4.algo
        )
        for p in ("fp32", "int4")
    }
    tokenizer = models.load_tokenizer(job.model_dir)
    prompts = encode_prompts(tokenizer, test, g, base.max_length, base.reading.mode).ids
    runners: dict[str, Runner] = {
        "pytorch": TorchRunner(load_generator(job.model_dir).cpu().eval(), tokenizer, g.batch_size),
        "fp32": GenAIRunner(folder / "fp32"),
        "int4": GenAIRunner(folder / "int4"),
    }
    from tqdm.auto import tqdm

    tokens = {
        name: [r.ids(p, g.max_new_tokens) for p in tqdm(prompts, desc=f"greedy {name}", unit="prompt")]
        for name, r in runners.items()
    }
    targets = test["target"].tolist()
    rows = {
        name: rouge_rows(
            targets, [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens[name]]
        )
        for name in runners
    }
    parity = {n: token_parity(tokens["pytorch"], tokens[n], test["id"]) for n in ("fp32", "int4")}
    fp32 = parity["fp32"]
    if fp32["identical_share"] < cfg.min_token_match:
        first = fp32["divergences"][0]
        raise UserError(
            f"export: fp32 ONNX gives PyTorch's greedy tokens on {100 * fp32['identical_share']:.1f}% of test "
            f"prompts, under export.min_token_match {cfg.min_token_match:g}; first divergence: row "
            f"{first['id']}, token {first['position']} (PyTorch {first['pytorch']}, ONNX {first['onnx']})"
        )
    scores = {n: {k: round(float(v), 4) for k, v in r.mean().items()} for n, r in rows.items()}
    budget = params.compress.budget("int4")
    int4_loss = round(scores["pytorch"]["rougeL"] - scores["int4"]["rougeL"], 4)
    int4_within = compression.fits(int4_loss, budget)
    prompt = timing_prompt(prompts, base.max_length)
    timed, timing = time_runners(runners, prompt, g.max_new_tokens, cfg.latency, "export")
    with_speedups(timed, "pytorch", timing["speedup_basis"])
    variant = cfg.registered_variant
    served_rows = rows[variant]
    lead = pd.read_csv(job.baseline_predictions, keep_default_na=False)
    lead_rouge = lead.set_index(lead["id"].astype(str)).loc[test["id"].astype(str), "lead_rougeL"].to_numpy()
    ci = paired_ci(served_rows["rougeL"].to_numpy(), lead_rouge, base.seed)
    versus = {
        "rougeL": ci["mean"],
        "rougeL_ci95_low": ci["ci95_low"],
        "rougeL_ci95_high": ci["ci95_high"],
        "baseline_rougeL": round(float(np.mean(lead_rouge)), 4),
    }
    size = {n: onnx_export.folder_mb(folder / n) for n in ("fp32", "int4")}
    served = {**scores[variant], **timed[variant], "size_mb": size[variant], "variant": variant}
    checks = []
    if variant == "int4":
        checks.append(
            (
                int4_within,
                f"int4 test ROUGE-L loss vs PyTorch {100 * int4_loss:+.2f} pt within the budget of {100 * budget:g} pt",
            )
        )
    report = {
        "test_rows": len(test),
        "max_new_tokens": g.max_new_tokens,
        "pytorch": {**scores["pytorch"], **timed["pytorch"]},
        "onnx_fp32": {**scores["fp32"], **timed["fp32"], **parity["fp32"]},
        "onnx_int4": {
            **scores["int4"],
            **timed["int4"],
            **parity["int4"],
            "rougeL_loss_vs_pytorch": int4_loss,
            "max_loss": budget,
            "within_budget": int4_within,
        },
        "served": served,
        "size_mb": size,
        "builds": builds,
        **timing,
        "latency_setup": latency_setup(cfg.latency.threads, prompt, g.max_new_tokens, cfg.latency),
    }
    texts = test["text"].tolist()

    def package(staging_root: Path, exported, folder_, test_, task) -> Package:
        from lmpipe.serve import generator

        staging = staging_root / "generator"
        shutil.copytree(folder / variant, staging)
        example = (
            [texts[0][:300]],
            {"max_new_tokens": g.max_new_tokens, "do_sample": False, "temperature": 1.0, "seed": 0},
        )
        return Package(
            generator.__file__, {"generator": staging}, example, pip_requirements(), {"task": "generation"}
        )

    def score_registered(uri: str) -> float | None:
        return score_registered_generator(uri, texts, targets)

    logged = ("test_rows", "pytorch", "onnx_fp32", "onnx_int4", "served", "size_mb")
    return Exported(
        report=report,
        variant=variant,
        served=served,
        versus=versus,
        score_registered=score_registered,
        logged=logged,
        subfolders=["fp32", "int4"],
        metric="rougeL",
        package=package,
        checks=checks,
        tags={"prompt_max_length": base.max_length, "max_new_tokens_limit": g.serve_max_new_tokens},
    )


def pip_requirements() -> list[str]:
    """What the registered generator needs where it is served: pinned to this environment's versions."""
    from importlib import metadata

    names = (
        "mlflow",
        "numpy",
        "pandas",
        "pydantic",
        "onnxruntime",
        "onnxruntime-genai",
        "transformers",
        "tokenizers",
        "jinja2",
    )
    return [f"{n}=={metadata.version(n)}" for n in names]


def score_registered_generator(uri: str, texts: list[str], targets: list[str]) -> float | None:
    """A registered generator's test ROUGE-L on this split (the gate's champion), or None if it cannot be
    loaded or run here (another task's model, a missing artifact)."""
    import mlflow.pyfunc

    try:
        model = mlflow.pyfunc.load_model(uri)
        answers = model.predict(texts)
        generations = [a.generation if hasattr(a, "generation") else a["generation"] for a in answers]
    except Exception as err:  # noqa: BLE001 - any failure means: cannot compare on this split
        print(f"export: the champion {uri} cannot be scored on this test split ({type(err).__name__}: {err})")
        return None
    return round(float(rouge_rows(targets, generations)["rougeL"].mean()), 4)


def export_summary(report) -> str:
    p, f, q = report["pytorch"], report["onnx_fp32"], report["onnx_int4"]
    return (
        f"export: test ROUGE-L PyTorch {p['rougeL']:.4f}, ONNX fp32 {f['rougeL']:.4f} (identical greedy tokens on "
        f"{100 * f['identical_share']:.1f}% of prompts), int4 {q['rougeL']:.4f} (token agreement {q['token_agreement']:.3f}, "
        f"{'within' if q['within_budget'] else 'OVER'} budget) | TTFT ms {p['ttft_ms']:.0f} / {f['ttft_ms']:.0f} / "
        f"{q['ttft_ms']:.0f}, tokens/s {p['tokens_per_s']:.1f} / {f['tokens_per_s']:.1f} / {q['tokens_per_s']:.1f} "
        f"(int4 {q['speedup_tokens_per_s']:.2f}x) | size MB fp32 {report['size_mb']['fp32']:.0f}, int4 {report['size_mb']['int4']:.0f}"
    )


def model_card(params, records: dict, export: dict) -> str:
    from lmpipe.serve import modelcard as card
    from lmpipe.serve.modelcard import fmt, timing_note

    basis = "CPU cost" if export.get("speedup_basis") == "cpu" else "tokens/s"
    evaluate, train = records["evaluate"], records["train"]
    p, f, q = export["pytorch"], export["onnx_fp32"], export["onnx_int4"]
    gate = export.get("gate", {})
    versus = evaluate.get("model_minus_baseline", {})
    lines = [
        f"# {params.export.registered_model}: headline generator",
        "",
        "A causal language model fine-tuned to write a short text from an input (here: a headline for a news "
        f"article), from {card.base_model(params)}, served by ONNX Runtime GenAI ({export['served']['variant']}).",
        "",
        "## Data and training",
        "",
        f"- Source: {records['prepare'].get('source') or params.prepare.source}; split sizes {records['split'].get('sizes', {})}.",
        f"- Prompt: `{params.generation.prompt_template!r}`, chat template {params.generation.chat_template}; "
        f"inputs cut to {params.base.max_length} prompt tokens (keep: {params.base.reading.mode}).",
        f"- Strategy {train.get('strategy', 'n/a')}; best val ROUGE-L {fmt(train.get('best_val_rougeL'))} at epoch "
        f"{train.get('best_epoch', 'n/a')}; MLflow run `{train.get('mlflow_run_id', 'n/a')}`; git commit `{export.get('git_commit', 'n/a')}`.",
        "",
        "## Test scores",
        "",
        "| predictor | ROUGE-L | ROUGE-1 | exact match |",
        "|---|---|---|---|",
        f"| PyTorch (evaluate) | {fmt(evaluate['model'].get('rougeL'))} | {fmt(evaluate['model'].get('rouge1'))} | {fmt(evaluate['model'].get('exact_match'))} |",
        f"| ONNX fp32 | {fmt(f['rougeL'])} | {fmt(f['rouge1'])} | {fmt(f['exact_match'])} |",
        f"| ONNX int4 | {fmt(q['rougeL'])} | {fmt(q['rouge1'])} | {fmt(q['exact_match'])} |",
        f"| lead baseline | {fmt(evaluate['baseline'].get('rougeL'))} | {fmt(evaluate['baseline'].get('rouge1'))} | {fmt(evaluate['baseline'].get('exact_match'))} |",
        f"| zero-shot base model | {fmt(evaluate.get('zero_shot', {}).get('rougeL'))} | {fmt(evaluate.get('zero_shot', {}).get('rouge1'))} | {fmt(evaluate.get('zero_shot', {}).get('exact_match'))} |",
        "",
        f"Tuned minus lead (evaluate, paired bootstrap 95% CI): {fmt(versus.get('rougeL'))} "
        f"[{fmt(versus.get('rougeL_ci95_low'))}, {fmt(versus.get('rougeL_ci95_high'))}]. Gate: "
        + ("; ".join(gate.get("reasons", [])) or "n/a")
        + ".",
        "",
        "## Export and cost (CPU, batch 1)",
        "",
        f"- fp32 ONNX gives PyTorch's greedy tokens on {fmt(100 * f['identical_share'], 1)}% of {export['test_rows']} test "
        f"prompts; int4 reproduces {fmt(100 * q['token_agreement'], 1)}% of PyTorch's tokens, test ROUGE-L "
        f"{fmt(q['rougeL_loss_vs_pytorch'])} below PyTorch (budget {fmt(q['max_loss'])}: "
        f"{'within' if q['within_budget'] else 'over'}).",
        f"- {export['latency_setup']['prompt_tokens']}-token prompt, {export['latency_setup']['new_tokens']} new tokens, "
        f"{export['latency_setup']['threads']} thread(s). {timing_note(export)}",
        "",
        f"| runtime | time to first token (ms) | tokens/s | CPU ms per generation | speed-up ({basis}) | size (MB) |",
        "|---|---|---|---|---|---|",
        f"| PyTorch fp32 | {fmt(p['ttft_ms'], 1)} | {fmt(p['tokens_per_s'], 1)} | {fmt(p.get('cpu_generate_ms'), 0)} | 1.00x | |",
        f"| ONNX Runtime GenAI fp32 | {fmt(f['ttft_ms'], 1)} | {fmt(f['tokens_per_s'], 1)} | {fmt(f.get('cpu_generate_ms'), 0)} | {fmt(f['speedup_tokens_per_s'], 2)}x | {fmt(export['size_mb']['fp32'], 0)} |",
        f"| ONNX Runtime GenAI int4 | {fmt(q['ttft_ms'], 1)} | {fmt(q['tokens_per_s'], 1)} | {fmt(q.get('cpu_generate_ms'), 0)} | {fmt(q['speedup_tokens_per_s'], 2)}x | {fmt(export['size_mb']['int4'], 0)} |",
        "",
        "## Use and limits",
        "",
        "- Request params: `max_new_tokens` (1 to "
        f"{params.generation.serve_max_new_tokens}), `do_sample` (false = greedy), `temperature`, `seed`.",
        "- A small model trained on one corpus: generations can state facts the input does not hold "
        "(see evaluate's predictions.csv). Review before publishing any text it writes.",
        f"- Only the first {params.base.max_length} prompt tokens are read; a longer input is cut (the answer's `truncated`).",
        "",
    ]
    return "\n".join(lines)
