"""analyze: robustness, explanations, calibration and slices of the trained model, next to the baseline.

Reads:  params.yaml (base, evaluate, analyze, mlflow), <data>/{train,val,test}.parquet, <model>/, <train-report>
Writes: <out>/report.json (everything, with the seconds each part took), <out>/metrics.json (its headline
        figures, the DVC metrics), <out>/robustness.csv (macro-F1, drop and flip rate with CI per
        perturbation, strength and predictor), <out>/fragile.csv (texts the perturbations flip),
        <out>/attack.csv, <out>/faithfulness.csv, <out>/top_tokens.csv, <out>/attributions.html,
        <out>/slices_length.csv, <out>/slices_class.csv, <out>/plots/{robustness,reliability}/*.csv (DVC plots),
        <calibration> (the temperature fit on val, which export serves)
Logs:   an MLflow run with the same figures, the tables and HTML report, and PNG plots.
"""

from lmpipe.runner import paths_of, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="folder with train, val and test parquet files")
    parser.add_argument("--model", required=True, help="trained model folder")
    parser.add_argument("--train-report", required=True, help="train stage report (for the MLflow run id)")
    parser.add_argument("--out", required=True, help="folder for the analysis outputs")
    parser.add_argument("--calibration", required=True, help="JSON file for the fitted temperature")
    args = parser.parse_args()

    from lmpipe.params import load_params

    params = load_params(args.params)  # a typo answers here, before the heavy imports below
    from lmpipe.stages import analyze

    print(analyze.run(params, paths_of(analyze.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
