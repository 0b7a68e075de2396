"""Benchmark: what a decoder costs on this machine, beside MiniLM.

Prints, for the embedded encoder (all-MiniLM-L6-v2) and the embedded decoder (smollm2-135m):
* the parameters and the seconds to load the model folder (SmolLM2's one-off GGUF conversion is in
  its ``conversion.json``, printed too);
* one optimiser step (forward, backward, AdamW) of full fine-tuning and of LoRA (r 8, the family's
  ``auto`` targets), a sequence-classification head, batch ``--batch`` x ``--tokens`` tokens, median
  of ``--repeats`` after one warm-up step;
* for the decoder, greedy generation: ``--new`` new tokens after a ``--tokens``-token prompt, batch
  ``--batch``, in tokens per second.

    .venv/bin/python benchmarks/decoder_cost.py [--batch 8 --tokens 128 --new 24 --repeats 3 --threads 2]

About 3 minutes on a 2-core CPU. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmpipe.modeling import embedded, families, generation
from lmpipe.modeling.models import load_model, load_tokenizer, resolve_model_dir


def step_seconds(model, batch: dict, repeats: int) -> float:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        if i:  # the first step warms up (allocations, kernels)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch} x {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    for name in ("all-MiniLM-L6-v2", "smollm2-135m"):
        folder = resolve_model_dir(name)
        if embedded.conversion(folder):
            print(f"{name}: conversion {json.dumps(embedded.conversion(folder))}")
        tokenizer = load_tokenizer(folder)
        ids = torch.randint(1000, 20000, (args.batch, args.tokens))
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.zeros(args.batch, dtype=torch.long),
        }
        start = time.perf_counter()
        model = load_model(folder, {"a": 0, "b": 1})
        load = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        full = step_seconds(model, batch, args.repeats)
        from peft import LoraConfig, get_peft_model

        targets = families.lora_targets(model.config, "auto")
        lora = get_peft_model(
            model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=targets)
        )
        lora_step = step_seconds(lora, batch, args.repeats)
        print(
            f"{name}: {params / 1e6:.1f}M parameters, loaded in {load:.1f} s; full step {full:.2f} s, "
            f"LoRA step {lora_step:.2f} s ({families.family(model.config)}, LoRA on {targets})"
        )
        if families.is_decoder(model.config):
            lm = load_model(folder, {}, task="generation").eval()
            prompts = [list(row) for row in ids.tolist()]
            start = time.perf_counter()
            generation.generate(lm, tokenizer, prompts, args.new, args.batch)
            seconds = time.perf_counter() - start
            print(
                f"{name}: greedy generation of {args.new} tokens for {args.batch} prompts: {seconds:.1f} s "
                f"({args.batch * args.new / seconds:.1f} new tokens/s, EOS aside)"
            )


if __name__ == "__main__":
    main()
