"""split: a seeded, stratified train/val/test split with a leakage check.

Reads:  params.yaml (base.seed, split), <data>/data.parquet
Writes: <out>/{train,val,test}.parquet, <report> (split sizes and class counts), <metrics> (the sizes,
        the DVC metrics)
"""

from lmpipe.runner import paths_of, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="prepared data.parquet")
    parser.add_argument("--out", required=True, help="folder for the split files")
    parser.add_argument("--metrics", required=True, help="split sizes (DVC metrics JSON)")
    parser.add_argument("--report", required=True, help="sizes and class counts per split (JSON)")
    args = parser.parse_args()

    from lmpipe.params import load_params

    params = load_params(args.params)  # a typo answers here, before the heavy imports below
    from lmpipe.stages import split

    print(split.run(params, paths_of(split.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
