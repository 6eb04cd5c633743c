"""``python -m studio``: the command line of Adapter Studio."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from studio.config import default_data_dir

# Each module in studio.commands exposes ``register(subparsers, parent)``; its commands set
# ``func(args) -> int`` on their parser.
COMMAND_MODULES: tuple[str, ...] = (
    "studio.commands.catalog",
    "studio.commands.gate",
    "studio.commands.generate",
    "studio.commands.jobs",
    "studio.commands.pocket",
    "studio.commands.train",
)


def common_parent() -> argparse.ArgumentParser:
    """Options every command takes."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--data-dir",
        type=str,
        default=str(default_data_dir()),
        help="where the catalog, files, caches and history live "
        "(default: $STUDIO_DATA_DIR, else ~/.adapter-studio)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered command."""
    import importlib

    parser = argparse.ArgumentParser(prog="python -m studio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = common_parent()
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run one command; domain errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly (Python docs, signal)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: a missing file, no permission, disk full
        print(f"error: {exc}", file=sys.stderr)
        return 2
