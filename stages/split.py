"""split: a seeded, stratified train/val/test split with a leakage check.

Reads:  params.yaml (base.seed, split), <data>/data.parquet
Writes: <out>/{train,val,test}.parquet, <metrics> (split sizes and class counts)
"""

from lmpipe.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="prepared data.parquet")
    parser.add_argument("--out", required=True, help="folder for the split files")
    parser.add_argument("--metrics", required=True, help="split report (JSON metrics)")
    args = parser.parse_args()

    import pandas as pd

    from lmpipe import data, io
    from lmpipe.params import load_params

    params = load_params(args.params)
    parts = data.split_frame(pd.read_parquet(args.data), params.split, params.base.seed)
    with io.atomic_dir(args.out) as tmp:
        for name, part in parts.items():
            part.to_parquet(tmp / f"{name}.parquet", index=False)
    report = data.split_report(parts)
    io.write_json(args.metrics, report)
    print("split: " + ", ".join(f"{k} {v}" for k, v in report["sizes"].items()))


if __name__ == "__main__":
    run_stage(main)
