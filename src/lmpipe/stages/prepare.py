"""prepare: load the source named in params, clean it, remove duplicates, write the label map and a report.

``base.task`` picks what a row is (``lmpipe.tasks``): a text and its label, or a sentence's words and
their BIO tags; the label map is then the tag map."""

from __future__ import annotations

from dataclasses import dataclass

from lmpipe import data, io, reports, tasks
from lmpipe.modeling import embedded, hub
from lmpipe.modeling.models import load_tokenizer, resolve_model_dir
from lmpipe.params import Params

# the modules of the task's package this stage uses (dvc.yaml: src/lmpipe/tasks/${base.task}/<part>.py)
TASK_PARTS = ("data",)


@dataclass(frozen=True)
class Paths:
    out: str  # folder for data.parquet and labels.json
    metrics: str  # headline figures (DVC metrics)
    report: str  # the full data report


def run(params: Params, paths: Paths) -> str:
    # a wrong base.model or base.revision fails before any data is read
    model_dir = resolve_model_dir(params.base.model, params.base.revision)
    tokenizer = load_tokenizer(model_dir)
    task = tasks.for_stage(params.base.task, "prepare", TASK_PARTS)
    raw, description = task.load_source(params.prepare)
    frame, report = task.clean(raw, params.prepare, params.base.seed)
    lengths, labels = task.token_lengths(tokenizer, frame), task.label_map(frame)
    report["token_length"] = data.token_length_report(lengths, params.base.max_length)
    report["source"] = description
    converted = embedded.conversion(model_dir)
    if converted is not None:  # the embedded decoder: its one-off conversion from GGUF, once per machine
        report["model_conversion"] = converted

    io.write_parquet(f"{paths.out}/data.parquet", frame)
    io.write_json(f"{paths.out}/labels.json", labels)
    reports.write("prepare", report, paths.metrics, paths.report, model=hub.record_of(params.base))
    what = task.prepare_summary(report, labels, params.prepare)
    return (
        f"prepare: {report['rows_in']} rows in, {report['rows_out']} out "
        f"({report['empty_dropped']} empty, {report['duplicates_removed']} duplicates, {what}; "
        f"{report['token_length']['truncated_fraction']:.0%} of texts "
        f"longer than max_length={params.base.max_length}"
    )
