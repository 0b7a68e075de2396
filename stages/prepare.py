"""prepare: load the source named in params, clean it, remove duplicates, write the label map and a report.

Reads:  params.yaml (base, prepare), the source data (the built-in corpus or a user file)
Writes: <out>/data.parquet (id, text, label), <out>/labels.json, <report> (the data report: counts,
        token lengths, source), <metrics> (its headline figures, the DVC metrics)
"""

from lmpipe.runner import paths_of, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="folder for data.parquet and labels.json")
    parser.add_argument("--metrics", required=True, help="headline figures (DVC metrics JSON)")
    parser.add_argument("--report", required=True, help="the full data report (JSON)")
    args = parser.parse_args()

    from lmpipe.params import load_params

    params = load_params(args.params)  # a typo answers here, before the heavy imports below
    from lmpipe.stages import prepare

    print(prepare.run(params, paths_of(prepare.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
