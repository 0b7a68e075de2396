"""The ``lmpipe`` command: check-params, predict, compare and queue-check. (Stages run through
``lmpipe.runner``, so rewording this file re-runs no stage.)"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmpipe.runner import run_stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmpipe", description="lmpipe utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="validate a params file and print its hash")
    check.add_argument("path", nargs="?", default="params.yaml")
    add_predict_parser(sub)
    _add_experiment_commands(sub)
    _add_search_worker_parser(sub)
    fetch = sub.add_parser(
        "fetch-model",
        help="download a Hugging Face model at a revision into the local cache (needs a network)",
        description="For a machine with a network: downloads MODEL (org/name) at --revision into the "
        "Hugging Face cache (HF_HOME), then prints the commit hash to pin as base.revision. Copy the cache "
        "(its models--org--name folder) to machines without a network; stages read it offline.",
    )
    fetch.add_argument("model", help="a Hugging Face model id, e.g. bert-base-cased or org/name")
    fetch.add_argument("--revision", help="a commit hash, branch or tag (default: main)")
    args = parser.parse_args(argv)

    def check_params() -> None:
        from lmpipe.params import load_params

        params = load_params(args.path)
        print(f"{args.path}: ok (hash {params.digest()})")

    commands = {
        "check-params": check_params,
        "predict": lambda: predict(args),
        "compare": lambda: compare(args),
        "splits": lambda: splits(args),
        "queue-check": queue_check,
        "search-worker": lambda: search_worker(args),
        "fetch-model": lambda: fetch_model(args),
    }
    run_stage(commands[args.command])


def add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="label a CSV, JSONL or text file (one text a line) with the exported model",
        description="Writes one row per input text: row, label, p_<class> probabilities, truncated "
        "(the text was longer than max_length tokens and part of it was not read, as the model's "
        "base.reading says; never with windows, which read it all). A token classifier's rows hold its "
        "entities instead.",
    )
    p.add_argument("input", help="a .csv or .jsonl file with a text column, or a .txt file, one text a line")
    p.add_argument("-o", "--output", required=True, help="where to write the predictions (.csv or .jsonl)")
    p.add_argument("--backend", choices=["onnx", "pytorch"], default="onnx", help="default: onnx")
    p.add_argument(
        "--model",
        help="the export folder for onnx (default: models/export), a save_pretrained folder for pytorch "
        "(default: models/model)",
    )
    p.add_argument(
        "--variant",
        choices=["fp32", "int8", "fp32_opt", "int8_opt", "int4"],
        default="fp32",
        help="ONNX model to use (default: fp32); a text generator's export has fp32 and int4",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="a text generator: the most new tokens per text (default: the export's generation.max_new_tokens)",
    )
    p.add_argument(
        "--text-column", default="text", help="CSV column / JSONL key holding the text (default: text)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch (default: 32)")
    p.add_argument(
        "--max-length",
        type=int,
        help="tokens read per text; default: the export's own (onnx) or base.max_length in --params (pytorch)",
    )
    p.add_argument("--params", default="params.yaml", help="params file, for pytorch's max_length")
    p.add_argument(
        "--calibration",
        default="models/calibration.json",
        help="pytorch: the analyze stage's fitted temperature, applied when the file exists (the onnx "
        "export carries its own); default: models/calibration.json",
    )


def predict(args: argparse.Namespace) -> None:
    from lmpipe.serve.predict import check_servable, predict_file

    max_length = args.max_length
    if args.backend == "pytorch" and max_length is None:
        from lmpipe.params import load_params

        max_length = load_params(args.params).base.max_length
    model = args.model or ("models/export" if args.backend == "onnx" else "models/model")
    check_servable(Path(model), args.backend)
    temperature = 1.0
    if args.backend == "pytorch" and Path(args.calibration).is_file():
        temperature = float(json.loads(Path(args.calibration).read_text())["temperature"])
        print(f"predict: probabilities at temperature {temperature:g} ({args.calibration})", file=sys.stderr)
    frame = predict_file(
        args.input,
        args.output,
        model,
        backend=args.backend,
        variant=args.variant,
        text_column=args.text_column,
        batch_size=args.batch_size,
        max_length=max_length,
        temperature=temperature,
        max_new_tokens=args.max_new_tokens,
    )
    truncated = int(frame["truncated"].sum())
    if truncated:
        print(
            f"note: {truncated} of {len(frame)} texts were longer than the model's max_length and were "
            "truncated (only their start was read; see the `truncated` column)",
            file=sys.stderr,
        )
    if "generation" in frame.columns:
        counts = f"{int(frame['new_tokens'].sum())} new tokens"
    elif "label" in frame.columns:
        counts = ", ".join(f"{k} {v}" for k, v in frame["label"].value_counts().sort_index().items())
    else:  # a token classifier: entities per type
        import pandas as pd

        kinds = pd.Series([e["type"] for found in frame["entities"] for e in json.loads(found)], dtype=object)
        counts = f"{len(kinds)} entities: " + ", ".join(
            f"{k} {v}" for k, v in kinds.value_counts().sort_index().items()
        )
    print(f"predict: {len(frame)} texts -> {args.output} ({counts})", file=sys.stderr)


def _add_experiment_commands(sub) -> None:
    cmp = sub.add_parser(
        "compare",
        help="compare two or more DVC experiments, git revisions or MLflow runs on their test predictions",
    )
    cmp.add_argument(
        "refs",
        nargs="*",
        metavar="EXPERIMENT_OR_RUN",
        help="a DVC experiment name, a git revision, 'workspace', or an MLflow run id (train or evaluate)",
    )
    cmp.add_argument("--out", default="reports/compare", help="report folder (default: reports/compare)")
    cmp.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    cmp.add_argument("--seed", type=int, default=0, help="bootstrap seed: same inputs, same report")
    cmp.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level (default: 0.05)")
    cmp.add_argument(
        "--predictions",
        default="reports/evaluate/predictions.csv",
        help="the evaluate stage's per-example predictions, relative to the repo root",
    )
    cmp.add_argument(
        "--unpaired",
        action="store_true",
        help="allow different test sets (runs with different base.seed): per-model CIs and means over "
        "seeds, no paired tests",
    )
    spl = sub.add_parser(
        "splits",
        help="one setting over k seeded splits (DVC experiments differing only in base.seed): model and "
        "baseline mean +- std, per-split and across-split paired differences",
    )
    spl.add_argument("refs", nargs="*", metavar="EXPERIMENT", help="a DVC experiment name or git revision")
    spl.add_argument("--out", default="reports/splits", help="report folder (default: reports/splits)")
    spl.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    spl.add_argument("--seed", type=int, default=0, help="bootstrap seed: same inputs, same report")
    spl.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level (default: 0.05)")
    sub.add_parser(
        "queue-check",
        help="before `dvc exp run --queue`: files a queued run would miss, environment the workers lack",
    )


def splits(args: argparse.Namespace) -> None:
    """Each run's model and baseline test predictions (evaluate's), then report.md and splits.json."""
    from lmpipe import io, tracking
    from lmpipe.errors import UserError
    from lmpipe.experiments import runs
    from lmpipe.experiments.compare import across_splits
    from lmpipe.experiments.report import splits_markdown

    root = tracking.repo_root()
    models, baselines = [], []
    for ref in args.refs:
        model = runs.resolve(ref, root)
        if model.source.startswith("MLflow"):
            raise UserError(
                f"{ref}: splits takes DVC experiments or git revisions (they hold both predictions)"
            )
        models.append(model)
        baselines.append(runs.resolve(ref, root, runs.BASELINE_PREDICTIONS))
    result = across_splits(models, baselines, resamples=args.resamples, seed=args.seed, alpha=args.alpha)
    report = splits_markdown(result)
    with io.staged_outputs(args.out) as out:
        io.write_json(out / "splits.json", result)
        (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    print(f"splits: {args.out}/report.md, {args.out}/splits.json")


def compare(args: argparse.Namespace) -> None:
    """Resolve every input first (so bad input writes nothing), then write report.md, comparison.json
    and comparison.png into ``--out``."""
    from lmpipe import io, plots, tracking
    from lmpipe.errors import UserError
    from lmpipe.experiments import runs
    from lmpipe.experiments.compare import compare as run_compare
    from lmpipe.experiments.report import markdown

    if len(args.refs) < 2:
        raise UserError(f"compare needs at least two experiments or runs, got {len(args.refs)}")
    root = tracking.repo_root()
    candidates = [runs.resolve(ref, root, args.predictions) for ref in args.refs]
    result = run_compare(
        candidates, resamples=args.resamples, seed=args.seed, alpha=args.alpha, unpaired=args.unpaired
    )
    report = markdown(result)
    fig = plots.comparison_figure(result)
    with io.staged_outputs(args.out) as out:
        fig.savefig(out / "comparison.png", dpi=110, metadata={"Software": None})
        plots.close(fig)
        io.write_json(out / "comparison.json", result)
        (out / "report.md").write_text(report, encoding="utf-8")
    for pair in result["pairs"]:
        acc, mc = pair["accuracy"], pair["mcnemar"]
        verdict = "significant" if acc["significant"] or mc["significant"] else "not significant"
        print(
            f"{pair['b']} - {pair['a']}: accuracy {100 * acc['diff']:+.2f} pt "
            f"[{100 * acc['ci'][0]:+.2f}, {100 * acc['ci'][1]:+.2f}], McNemar p {mc['p_holm']:.4g}: {verdict}"
        )
    for diff in result["between_settings"]:
        acc = diff["accuracy"]
        p = "n/a" if acc["p_value"] is None else f"{acc['p_value']:.4g}"
        print(
            f"{' + '.join(diff['b'])} - {' + '.join(diff['a'])} (mean over seeds): accuracy "
            f"{100 * acc['diff']:+.2f} pt, Welch p {p}: {'significant' if acc['significant'] else 'not significant'}"
        )
    print(f"report: {Path(args.out) / 'report.md'}")


def queue_check() -> None:
    from lmpipe import tracking
    from lmpipe.errors import UserError
    from lmpipe.experiments import runs

    root = tracking.repo_root()
    errors, warnings = runs.queue_problems(root)
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    if errors:
        for message in errors[1:]:
            print(f"error: {message}", file=sys.stderr)
        raise UserError(errors[0])
    store = tracking.sqlite_path(tracking.tracking_uri()) or tracking.tracking_uri()
    print(f"queue-check: ok; queued runs will log to {store}")


def _add_search_worker_parser(sub) -> None:
    w = sub.add_parser(
        "search-worker",
        help="run trials of the search stage's study from this machine (search.storage must be shared)",
        description="Joins the Optuna study that `dvc repro search` opened on search.storage, if this "
        "checkout's params and train/val data are the study's, and runs trials until the study has "
        "search.n_trials in all. Start it after the search stage; stop it any time (its running trial "
        "is marked FAIL after 3 heartbeats). With --wait it can start together with the stage.",
    )
    w.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    w.add_argument("--data", default="data/split", help="train/val folder (default: data/split)")
    w.add_argument("--labels", default="data/prepared/labels.json", help="default: data/prepared/labels.json")
    w.add_argument("--storage", help="the study's RDB URL, if not search.storage of --params")
    w.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to this long for the search stage to open the study (default: 0, join now or fail)",
    )
    w.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # local workers' index: their seed


def fetch_model(args: argparse.Namespace) -> None:
    from lmpipe.modeling import hub

    folder = hub.fetch(args.model, args.revision)
    print(f"fetch-model: {args.model} in {folder.parent.parent}")
    print(f"  base.model: {args.model}\n  base.revision: {folder.name}")


def search_worker(args: argparse.Namespace) -> None:
    from lmpipe.params import load_params
    from lmpipe.stages import search

    paths = search.WorkerPaths(data=args.data, labels=args.labels)
    print(search.worker(load_params(args.params), paths, args.storage, args.worker, args.wait))


if __name__ == "__main__":  # how the search stage starts its local workers: python -m lmpipe.cli
    main()
