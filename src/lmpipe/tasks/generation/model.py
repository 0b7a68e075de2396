"""Generation's model side (search, train): prompt/target datasets for the one training loop, with the
loss on the target's tokens only, and val scores from greedy generations (ROUGE-L picks the epoch)."""

from __future__ import annotations

import math

import numpy as np
import torch

from lmpipe.tasks.generation import encode_prompts, encode_targets, rouge_rows

GENERATION_KEY = "lmpipe_generation"  # config.json: how the model was prompted (the template, its bounds)


class GenerationDataset(torch.utils.data.Dataset):
    """Prompt + target (+ EOS) per row; labels are -100 over the prompt and the padding, so the loss is
    the target's. As a val set it also generates for its first ``generation.val_rows`` rows after each
    epoch (``bind`` gives it the model being trained) and reports ROUGE-L, the selection metric, with
    the references' perplexity."""

    selection_metric = "rougeL"

    def __init__(self, tokenizer, frame, max_length: int, reading, params):
        cfg = params.generation
        keep = (reading or {}).get("mode", "head")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = encode_prompts(tokenizer, frame, cfg, max_length, keep)
        self.targets, self.targets_cut = encode_targets(tokenizer, frame["target"], cfg.max_target_tokens)
        self.references = frame["target"].tolist()
        self.reading = dict(reading or {})
        self.model = None

    @property
    def cuts(self) -> dict[str, int]:
        """What fitting the rows cost: prompts whose input was cut to ``base.max_length`` (and the tokens
        cut), targets cut to ``generation.max_target_tokens`` (the train report records these)."""
        return {
            "prompts_truncated": self.prompts.truncated,
            "prompt_tokens_cut": self.prompts.cut_tokens,
            "targets_cut": self.targets_cut,
        }

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        prompt, target = self.prompts.ids[i], self.targets[i]
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}

    def collator(self, tokenizer):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def collate(items):
            width = max(len(x["input_ids"]) for x in items)
            ids = torch.full((len(items), width), pad, dtype=torch.long)
            labels = torch.full((len(items), width), -100, dtype=torch.long)
            mask = torch.zeros((len(items), width), dtype=torch.long)
            for j, x in enumerate(items):
                n = len(x["input_ids"])
                ids[j, :n] = torch.tensor(x["input_ids"])
                labels[j, :n] = torch.tensor(x["labels"])
                mask[j, :n] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        return collate

    # ------------------------------------------------------------------------- as the val set
    def bind(self, model) -> None:
        """The model being trained, for the val generations; its config records how it is prompted."""
        self.model = model
        config = model.config
        setattr(config, GENERATION_KEY, {
            "prompt_template": self.cfg.prompt_template,
            "chat_template": self.cfg.chat_template,
            "max_new_tokens": self.cfg.max_new_tokens,
        })  # fmt: skip

    @staticmethod
    def preprocess_logits(logits, labels):
        """The references' summed NLL and token count per row: all the scores need of the logits."""
        from lmpipe.modeling.generation import token_nll

        if isinstance(logits, tuple):
            logits = logits[0]
        nll, count = token_nll(logits.float(), labels)
        return torch.stack([nll, count.float()], dim=1)

    def compute_metrics(self, prediction) -> dict[str, float]:
        from lmpipe.modeling.generation import generate

        stats = np.asarray(prediction.predictions).reshape(-1, 2)
        perplexity = math.exp(stats[:, 0].sum() / max(stats[:, 1].sum(), 1))
        rows = len(self) if self.cfg.val_rows is None else min(self.cfg.val_rows, len(self))
        metrics = {"perplexity": round(perplexity, 4), "rows": len(stats)}
        if self.model is not None and rows:
            texts = generate(
                self.model,
                self.tokenizer,
                self.prompts.ids[:rows],
                self.cfg.max_new_tokens,
                self.cfg.batch_size,
            )
            scores = rouge_rows(self.references[:rows], texts)
            metrics.update({k: round(float(v), 4) for k, v in scores.mean().items()})
        return metrics


def dataset(tokenizer, frame, max_length, reading=None, train=False, params=None):
    return GenerationDataset(tokenizer, frame, max_length, reading, params)
