"""Text classification (``base.task: classification``): a label per text.

The task object (``TASK``, below) and one module per group of stages (``data``, ``model``,
``evaluation``, ``analysis``, ``export``), loaded when a stage asks for them. The text datasets and the
one inference loop are the core's (``lmpipe.modeling.encoding``, ``lmpipe.modeling.inference``), shared with every tool
that reads texts.
"""

from __future__ import annotations

import numpy as np

from lmpipe.tasks import CLASSIFICATION
from lmpipe.tasks.base import Task


class Classification(Task):
    name = CLASSIFICATION
    unit = "text"
    row = "text"
    supports = frozenset({"augment", "prompt_tuning", "folds", "windows", "attack", "explain"})
    peft_task_type = "SEQ_CLS"

    # ------------------------------------------------------------------------------------ prepare, split
    def load_source(self, prep):
        return self.part("data").load_source(prep)

    def clean(self, raw, prep, seed):
        return self.part("data").prepare_frame(raw, prep, seed)

    def label_map(self, frame):
        return self.part("data").label_map(frame["label"])

    def token_lengths(self, tokenizer, frame):
        return np.array([len(ids) for ids in tokenizer(frame["text"].tolist(), verbose=False)["input_ids"]])

    def prepare_summary(self, report, labels, prep):
        return (
            f"{report['conflicting_texts']} texts with conflicting labels [{prep.on_conflict}]); "
            f"{report['classes']} classes"
        )

    def split(self, frame, cfg, seed):
        return self.part("data").split_frame(frame, cfg, seed)

    def split_report(self, parts):
        return self.part("data").split_report(dict(parts))

    # -------------------------------------------------------------------------- search, train, compress
    def head(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def dataset(self, tokenizer, frame, label2id, max_length, reading=None, train=False, seed=0):
        return self.part("model").dataset(tokenizer, frame, label2id, max_length, reading, train, seed)

    def val_outputs(self, model, tokenizer, frame, max_length, batch_size, desc=None):
        return self.part("model").val_outputs(model, tokenizer, frame, max_length, batch_size, desc)

    # ------------------------------------------------------------------------------------------ evaluate
    def predict(self, model_dir, frame, max_length, batch_size, desc=None):
        return self.part("evaluation").predict(model_dir, frame, max_length, batch_size, desc)

    def fit_baseline(self, train, params, labels):
        return self.part("evaluation").fit_baseline(train, params, labels)

    def score(self, frame, pred):
        return self.part("evaluation").score(frame, pred)

    def versus_baseline(self, frame, model, baseline, seed):
        return self.part("evaluation").versus_baseline(frame, model, baseline, seed)

    def tables(self, frame, model, baseline):
        return self.part("evaluation").tables(frame, model, baseline)

    def plots(self, frame, model, baseline, scores):
        return self.part("evaluation").plots(frame, model, baseline, scores)

    def evaluate_summary(self, scores):
        return self.part("evaluation").evaluate_summary(scores)

    def bootstrap_scorer(self, truths, preds, classes, metrics):
        return self.part("evaluation").bootstrap_scorer(truths, preds, classes, metrics)

    # ------------------------------------------------------------------------------------------- analyze
    def analysis_pass(self, model, tokenizer, frame, max_length, batch_size, desc=None):
        return self.part("analysis").analysis_pass(model, tokenizer, frame, max_length, batch_size, desc)

    def robustness(self, analysis):
        return self.part("analysis").robustness(analysis)

    def attack(self, analysis):
        return self.part("analysis").attack(analysis)

    def explain(self, analysis):
        return self.part("analysis").explain(analysis)

    def slices(self, analysis):
        return self.part("analysis").slices(analysis)

    # -------------------------------------------------------------------------------------------- export
    def export(self, job):
        return self.part("export").export(job)

    def export_summary(self, report):
        return self.part("export").export_summary(report)

    def describe(self, labels):
        return f"a {len(labels)}-class text classifier ({', '.join(labels)})"

    def model_card(self, params, records, export):
        return self.part("export").model_card(self, params, records, export)


TASK = Classification()
