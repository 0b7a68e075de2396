"""prepare: load the source named in params, clean it, remove duplicates, write the label map and a report.

``base.task`` picks what a row is: a text and its label (``lmpipe.data``), or a sentence's words and their
BIO tags (``lmpipe.ner``); the label map is then the tag map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmpipe import data, io, ner, reports
from lmpipe.models import load_tokenizer, resolve_model_dir
from lmpipe.params import Params


@dataclass(frozen=True)
class Paths:
    out: str  # folder for data.parquet and labels.json
    metrics: str  # headline figures (DVC metrics)
    report: str  # the full data report


def run(params: Params, paths: Paths) -> str:
    model_dir = resolve_model_dir(params.base.model)  # a wrong base.model fails before any data is read
    tokenizer = load_tokenizer(model_dir)
    if params.base.task == ner.TASK:
        raw, description = ner.load_source(params.prepare)
        frame, report = ner.prepare_frame(raw, params.prepare, params.base.seed)
        lengths, labels = ner.token_lengths(tokenizer, frame), ner.tag_map(frame["tags"])
    else:
        raw, description = data.load_source(params.prepare)
        frame, report = data.prepare_frame(raw, params.prepare, params.base.seed)
        lengths = np.array(
            [len(ids) for ids in tokenizer(frame["text"].tolist(), verbose=False)["input_ids"]]
        )
        labels = data.label_map(frame["label"])
    report["token_length"] = data.token_length_report(lengths, params.base.max_length)
    report["source"] = description

    io.write_parquet(f"{paths.out}/data.parquet", frame)
    io.write_json(f"{paths.out}/labels.json", labels)
    reports.write("prepare", report, paths.metrics, paths.report)
    what = (
        f"{report['conflicting_texts']} with conflicting tags [{params.prepare.on_conflict}], "
        f"{report['bio_repaired']} I- tags repaired to B-); {report['tokens']} tokens, "
        f"{sum(report['entities_per_type'].values())} entities of {report['classes']} types, {len(labels)} tags"
        if params.base.task == ner.TASK
        else f"{report['conflicting_texts']} texts with conflicting labels [{params.prepare.on_conflict}]); "
        f"{report['classes']} classes"
    )
    return (
        f"prepare: {report['rows_in']} rows in, {report['rows_out']} out "
        f"({report['empty_dropped']} empty, {report['duplicates_removed']} duplicates, {what}; "
        f"{report['token_length']['truncated_fraction']:.0%} of texts "
        f"longer than max_length={params.base.max_length}"
    )
