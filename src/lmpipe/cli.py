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
    args = parser.parse_args(argv)

    def check_params() -> None:
        from lmpipe.params import load_params

        params = load_params(args.path)
        print(f"{args.path}: ok (hash {params.digest()})")

    run_stage({"check-params": check_params}[args.command])
