"""prepare: load the source named in params, clean it, remove duplicates, write the label map and a report.

Reads:  params.yaml (base, prepare), the source data (the built-in corpus or a user file)
Writes: <out>/data.parquet (id, text, label), <out>/labels.json, <report> (DVC metrics)
"""

from lmpipe.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="folder for data.parquet and labels.json")
    parser.add_argument("--report", required=True, help="data report (JSON metrics)")
    args = parser.parse_args()

    import numpy as np

    from lmpipe import data, io
    from lmpipe.models import load_tokenizer, resolve_model_dir
    from lmpipe.params import load_params

    params = load_params(args.params)
    model_dir = resolve_model_dir(params.base.model)
    frame, report = data.prepare_frame(data.load_source(params.prepare), params.prepare, params.base.seed)
    tokenizer = load_tokenizer(model_dir)
    lengths = np.array([len(ids) for ids in tokenizer(frame["text"].tolist(), verbose=False)["input_ids"]])
    report["token_length"] = data.token_length_report(lengths, params.base.max_length)

    io.write_parquet(f"{args.out}/data.parquet", frame)
    io.write_json(f"{args.out}/labels.json", data.label_map(frame["label"]))
    io.write_json(args.report, report)
    print(
        f"prepare: {report['rows_in']} rows in, {report['rows_out']} out "
        f"({report['empty_dropped']} empty, {report['duplicates_removed']} duplicates, "
        f"{report['conflicting_texts']} texts with conflicting labels [{params.prepare.on_conflict}]); "
        f"{report['classes']} classes; {report['token_length']['truncated_fraction']:.0%} of texts "
        f"longer than max_length={params.base.max_length}"
    )


if __name__ == "__main__":
    run_stage(main)
