"""search: an Optuna study over the train params, each trial run through the shared training loop.

Reads:  params.yaml (base, search, train, mlflow), <data>/{train,val}.parquet, <labels>
Writes: <out>/best_params.json (laid over `train` by the train stage), <out>/trials.csv,
        <out>/history.csv and <out>/importance.csv (DVC plots), <out>/report.json (trial counts,
        best value, timings, run id) and <out>/metrics.json (its headline figures, the DVC metrics),
        <db>/study.json and, with the default storage, <db>/optuna.db (the study itself)
Logs:   one MLflow parent run per study (space, strategy, best value) with a child run per trial.
With `search.enabled: false` it writes empty results at once, and train uses its own params.
With `search.workers: N` it starts N - 1 more worker processes on the study (`lmpipe search-worker`,
the command that adds workers on other machines when `search.storage` is a shared database).
"""

from lmpipe.runner import paths_of, run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="folder with train.parquet and val.parquet")
    parser.add_argument("--labels", required=True, help="labels.json from prepare")
    parser.add_argument("--out", required=True, help="folder for the search reports")
    parser.add_argument("--db", required=True, help="folder for the study storage")
    args = parser.parse_args()

    from lmpipe.params import load_params

    params = load_params(args.params)  # a typo answers here, before the heavy imports below
    from lmpipe.stages import search

    print(search.run(params, paths_of(search.Paths, args)))


if __name__ == "__main__":
    run_stage(main)
