"""How every stage script runs: its argument parser, and one-line errors with exit codes, no traceback."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from lmpipe.errors import Terminated, UserError


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a ``UserError`` becomes ``error: <message>`` on stderr and exit code 2,
    Ctrl-C exit code 130 and SIGTERM 143."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as err:
        print(str(err) or "terminated", file=sys.stderr)
        sys.exit(143)
    finally:
        from lmpipe import tasks

        tasks.end_stage()  # the stage's check on the task parts it declared ends with it


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first line of the stage's docstring, with ``--params``."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return parser


def paths_of(cls: type, args: argparse.Namespace) -> Any:
    """A stage's ``Paths`` dataclass filled from the parsed arguments of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
