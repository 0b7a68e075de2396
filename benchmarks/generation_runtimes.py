"""Benchmark: what generating costs with the embedded SmolLM2 in each runtime compress and export use.

Builds ONNX Runtime GenAI folders (fp32 and int4) of the untuned ``smollm2-135m`` in a temporary folder
and times, with the stages' own code (``lmpipe.tasks.generation.export``) and the fair interleaved timer:
PyTorch fp32 ``generate``, PyTorch dynamic int8 (``lm_head`` fp32), ONNX Runtime GenAI fp32 and int4.
For each: time to the first token and tokens per second at batch 1, for a ``--tokens``-token prompt and
exactly ``--new`` new tokens; the model size on disk; the build time; and the greedy-token parity of the
ONNX runtimes with PyTorch on ``--prompts`` BBC article prompts.

    .venv/bin/python benchmarks/generation_runtimes.py [--tokens 128 --new 24 --repeats 10 --threads 2 --prompts 20]

About 3 minutes on a 2-core CPU. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from lmpipe.compress import compression
from lmpipe.data import load_bbc_news, title_of
from lmpipe.modeling.models import TASK_KEY, load_tokenizer, resolve_model_dir
from lmpipe.params import EMBEDDED_DECODER
from lmpipe.serve.generator import encode_prompts
from lmpipe.serve.onnx_export import build_genai_folder, folder_mb
from lmpipe.tasks import GENERATION
from lmpipe.tasks.generation.evaluation import load_generator
from lmpipe.tasks.generation.export import GenAIRunner, TorchRunner, time_runners, timing_prompt, token_parity

TEMPLATE = "Write a short headline for this news article.\n\n{text}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--new", type=int, default=24, help="new tokens per timed generation (default 24)")
    parser.add_argument("--repeats", type=int, default=10, help="timed generations per runtime (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, every runtime (default 2)")
    parser.add_argument("--prompts", type=int, default=20, help="article prompts for the parity check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(EMBEDDED_DECODER)
    tokenizer = load_tokenizer(model_dir)
    texts = load_bbc_news()["text"].head(args.prompts)
    articles = [t.strip()[len(title_of(t)) :].strip() for t in texts]  # the body: the title is the target
    prompts = encode_prompts(tokenizer, articles, None, TEMPLATE, "auto", args.tokens).ids
    info = {
        "task": "generation", "prompt_template": TEMPLATE, "chat_template": "auto", "max_length": args.tokens,
        "keep": "head", "max_new_tokens": args.new, "max_new_tokens_limit": 256,
    }  # fmt: skip
    fp32 = load_generator(model_dir).eval()
    setattr(fp32.config, TASK_KEY, GENERATION)  # as a trained generator records it: load_int8 builds its head
    runners = {"pytorch fp32": TorchRunner(fp32, tokenizer, 8)}
    sizes = {"pytorch fp32": round(compression.weights_bytes(model_dir) / 2**20, 1)}
    builds = {}
    with tempfile.TemporaryDirectory() as root:
        keep = [n for n in compression.linear_names(fp32) if n.endswith("lm_head")]
        compression.save_int8(
            compression.quantize_dynamic_int8(fp32, keep), tokenizer, Path(root) / "int8", {}
        )
        runners["pytorch int8"] = TorchRunner(compression.load_int8(Path(root) / "int8"), tokenizer, 8)
        sizes["pytorch int8"] = round(compression.weights_bytes(Path(root) / "int8") / 2**20, 1)
        for precision in ("fp32", "int4"):
            start = time.perf_counter()
            build_genai_folder(model_dir, Path(root) / precision, precision, info)
            builds[precision] = round(time.perf_counter() - start, 1)
            runners[f"genai {precision}"] = GenAIRunner(Path(root) / precision, args.threads)
            sizes[f"genai {precision}"] = round(folder_mb(Path(root) / precision), 1)
        reference = [runners["pytorch fp32"].ids(p, args.new) for p in prompts]
        parity = {
            name: token_parity(reference, [r.ids(p, args.new) for p in prompts], range(len(prompts)))
            for name, r in runners.items()
            if name != "pytorch fp32"
        }
        prompt = timing_prompt(prompts, args.tokens)
        lat = SimpleNamespace(warmup=2, batch_repeats=args.repeats, threads=args.threads, max_other_load=0.25)
        timed, _ = time_runners(runners, prompt, args.new, lat, "benchmark")
    base = timed["pytorch fp32"]
    rows = []
    for name, t in timed.items():
        p = parity.get(name, {})
        rows.append(
            {
                "runtime": name,
                "size_mb": sizes[name],
                "ttft_ms": t["ttft_ms"],
                "tokens_per_s": t["tokens_per_s"],
                "speedup": round(t["tokens_per_s"] / base["tokens_per_s"], 2),
                "identical_prompts": p.get("identical_share", 1.0),
                "token_agreement": p.get("token_agreement", 1.0),
            }
        )
    print(
        f"{args.tokens}-token prompt, {args.new} new tokens, batch 1, {args.threads} threads, {args.repeats} timed"
    )
    print(pd.DataFrame(rows).to_string(index=False))
    print(json.dumps({"build_seconds": builds, "parity_prompts": len(prompts)}))


if __name__ == "__main__":
    main()
