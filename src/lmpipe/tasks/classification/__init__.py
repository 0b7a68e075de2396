"""Text classification (``base.task: classification``): a label per text.

The task object (``TASK``, below) and one module per group of stages (``data``, ``model``,
``evaluation``, ``analysis``, ``export``), loaded when a stage asks for them. The text datasets and the
one inference loop are the core's (``lmpipe.modeling.encoding``, ``lmpipe.modeling.inference``), shared with every tool
that reads texts.
"""

from __future__ import annotations

from lmpipe.tasks import CLASSIFICATION
from lmpipe.tasks.base import Task


class Classification(Task):
    name = CLASSIFICATION
    unit = "text"
    row = "text"
    supports = frozenset(
        {
            "augment",
            "prompt_tuning",
            "folds",
            "windows",
            "calibration",
            "robustness",
            "slices",
            "compress",
            "export",
            "compare",
            "attack",
            "explain",
        }
    )
    peft_task_type = "SEQ_CLS"

    # prepare, split, search, train, compress, evaluate, analyze and export call the Task defaults,
    # which run this package's parts: data, model, evaluation, analysis, export
    def label_map(self, frame):
        return self.part("data").label_map(frame["label"])

    def prepare_summary(self, report, labels, prep):
        return (
            f"{report['conflicting_texts']} texts with conflicting labels [{prep.on_conflict}]); "
            f"{report['classes']} classes"
        )

    def head(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def describe(self, labels):
        return f"a {len(labels)}-class text classifier ({', '.join(labels)})"


TASK = Classification()
