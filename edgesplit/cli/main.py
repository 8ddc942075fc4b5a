"""``edgesplit`` entry point: builds the parser from the subcommand modules and turns every
expected error into one readable line and a non-zero exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Subcommand modules under edgesplit.cli, in the order ``--help`` lists them.
COMMANDS = ("demo", "train", "export", "serve", "client", "status", "evaluate")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps paragraph breaks in descriptions."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit",
        description="Split learning at the edge: train split models with compressed cut "
        "tensors, export client segments to ONNX, serve and run them.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"edgesplit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"edgesplit.cli.{name}":
                continue  # a subcommand not built yet
            raise
        module.add_parser(sub, HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from edgesplit.errors import EdgesplitError

    try:
        return int(args.run(args) or 0)
    except EdgesplitError as exc:
        print(f"edgesplit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgesplit {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # missing files, full disks, refused sockets: say which
        print(f"edgesplit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
