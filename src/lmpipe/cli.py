"""Command-line plumbing: the stage runner (one-line errors, no traceback) and the ``lmpipe`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lmpipe.errors import UserError


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a ``UserError`` becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmpipe", description="lmpipe utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="validate a params file and print its hash")
    check.add_argument("path", nargs="?", default="params.yaml")
    add_predict_parser(sub)
    args = parser.parse_args(argv)

    def check_params() -> None:
        from lmpipe.params import load_params

        params = load_params(args.path)
        print(f"{args.path}: ok (hash {params.digest()})")

    run_stage({"check-params": check_params, "predict": lambda: predict(args)}[args.command])


def add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="label a CSV, JSONL or text file (one text a line) with the exported model",
        description="Writes one row per input text: row, label, p_<class> probabilities, truncated "
        "(the text was longer than max_length tokens and only its start was read).",
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
        "--variant", choices=["fp32", "int8"], default="fp32", help="ONNX model to use (default: fp32)"
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


def predict(args: argparse.Namespace) -> None:
    from lmpipe.predict import predict_file

    max_length = args.max_length
    if args.backend == "pytorch" and max_length is None:
        from lmpipe.params import load_params

        max_length = load_params(args.params).base.max_length
    model = args.model or ("models/export" if args.backend == "onnx" else "models/model")
    frame = predict_file(
        args.input,
        args.output,
        model,
        backend=args.backend,
        variant=args.variant,
        text_column=args.text_column,
        batch_size=args.batch_size,
        max_length=max_length,
    )
    truncated = int(frame["truncated"].sum())
    if truncated:
        print(
            f"note: {truncated} of {len(frame)} texts were longer than the model's max_length and were "
            "truncated (only their start was read; see the `truncated` column)",
            file=sys.stderr,
        )
    counts = ", ".join(f"{k} {v}" for k, v in frame["label"].value_counts().sort_index().items())
    print(f"predict: {len(frame)} texts -> {args.output} ({counts})", file=sys.stderr)
