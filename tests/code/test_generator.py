"""The served generator (``lmpipe.serve.generator``): a request's checks, the token-parity measure, and an
ONNX Runtime GenAI build of the tiny decoder that gives PyTorch's greedy tokens and reference NLL."""

from __future__ import annotations

import numpy as np
import pytest

from lmpipe.serve.generator import InputError, request_options, texts_from_input
from lmpipe.tasks.generation.export import time_runners, timing_prompt, token_parity


def test_request_options_default_and_bounds():
    assert request_options(None, 24, 64) == {
        "max_new_tokens": 24,
        "do_sample": False,
        "temperature": 1.0,
        "seed": 0,
    }
    assert (
        request_options({"max_new_tokens": 64, "do_sample": True, "seed": 3}, 24, 64)["max_new_tokens"] == 64
    )
    bad = [
        ({"max_new_tokens": 65}, "max_new_tokens: expected an integer from 1 to 64"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": 0}, "temperature: expected a number > 0"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"seed": -1}, "seed"),
        ({"top_k": 5}, "unknown params ['top_k']"),
    ]
    for params, message in bad:
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            request_options(params, 24, 64)


def test_texts_from_input_names_the_bad_prompt():
    assert texts_from_input(["a", "b"]) == ["a", "b"]
    for value, message in (
        ([], "holds no prompt"),
        (["ok", "  "], "prompt 2: empty"),
        ([1], "prompt 1: expected a string"),
    ):
        with pytest.raises(InputError, match=message):
            texts_from_input(value)


def test_token_parity_counts_prompts_tokens_and_first_divergence():
    reference = [[1, 2, 3], [4, 5, 6], [7, 8]]
    other = [[1, 2, 3], [4, 9, 6], [7, 8, 10]]
    parity = token_parity(reference, other, ["a", "b", "c"])
    assert parity["identical_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert parity["token_agreement"] == pytest.approx(7 / 8)  # the reference's tokens at their place
    assert parity["divergences"] == [
        {"id": "b", "position": 1, "pytorch": 5, "onnx": 9},
        {"id": "c", "position": 2, "pytorch": None, "onnx": 10},
    ]


def test_timing_prompt_has_the_fixed_length():
    assert timing_prompt([[1, 2], [3, 4, 5]], 7) == [3, 4, 5, 3, 4, 5, 3]
    assert timing_prompt([[1, 2, 3, 4]], 2) == [1, 2]


def test_genai_fp32_build_of_the_tiny_decoder_matches_pytorch(tiny_decoder, tmp_path):
    """The model builder's fp32 graph with its KV cache: PyTorch's greedy tokens and reference NLL, and
    the timing of both runtimes in the shape compress and export report."""
    from types import SimpleNamespace

    from lmpipe.modeling import generation
    from lmpipe.modeling.models import load_tokenizer
    from lmpipe.serve.onnx_export import build_genai_folder
    from lmpipe.tasks.generation.evaluation import load_generator
    from lmpipe.tasks.generation.export import GenAIRunner, TorchRunner

    info = {
        "task": "generation", "prompt_template": "Headline: {text}", "chat_template": "auto", "max_length": 48,
        "keep": "head", "max_new_tokens": 6, "max_new_tokens_limit": 16,
    }  # fmt: skip
    recipe = build_genai_folder(tiny_decoder, tmp_path / "fp32", "fp32", info)
    assert recipe["precision"] == "fp32" and (tmp_path / "fp32" / "genai_config.json").is_file()
    onnx = GenAIRunner(tmp_path / "fp32", threads=1)
    tokenizer = load_tokenizer(tiny_decoder)
    model = load_generator(tiny_decoder).eval()
    prompts = onnx.generator.prompts(["Markets fell sharply in Tokyo today.", "A long " * 40]).ids
    assert len(prompts[1]) == 48  # cut to max_length in its input
    for prompt in prompts:
        assert onnx.ids(prompt, 6) == generation.greedy_ids(model, tokenizer, prompt, 6)
        assert 0 < onnx.timed(prompt, 6) < 5
    targets = [[504, 7749, 2], [282, 2]]
    ours, theirs = (
        onnx.nll(prompts, targets, "test"),
        generation.reference_nll(model, tokenizer, prompts, targets, 2),
    )
    assert np.allclose(ours[0], theirs[0], rtol=1e-4) and list(ours[1]) == list(theirs[1]) == [3, 2]
    lat = SimpleNamespace(warmup=1, batch_repeats=2, threads=1, max_other_load=1.0)
    runners = {"pytorch": TorchRunner(model, tokenizer, 2), "fp32": onnx}
    timed, timing = time_runners(runners, prompts[0], 4, lat, "test")
    for row in timed.values():
        assert row["ttft_ms"] > 0 and row["tokens_per_s"] > 0 and row["generate_ms"] >= row["ttft_ms"]
        assert row["cpu_generate_ms"] > 0
    assert timing["latency_reliable"] is True and timing["speedup_basis"] == "wall"  # nothing is over 100%
