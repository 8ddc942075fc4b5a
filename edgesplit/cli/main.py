"""``edgesplit`` entry point: builds the parser from the subcommand modules and turns every
expected error into one readable line and a non-zero exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

#: Subcommand modules under edgesplit.cli, in the order ``--help`` lists them.
COMMANDS = ("demo", "train", "cuts", "export", "serve", "client", "status", "evaluate")

#: Top-level packages of the ``[train]`` extra; the base (edge) install has none of them.
TRAIN_EXTRA = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib")
#: The pip name of each, where it differs from the import name.
PIP_NAMES = {"sklearn": "scikit-learn"}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The ``[train]`` package whose absence raised ``exc``, or None for any other module."""
    top = (exc.name or "").split(".")[0]
    return top if top in TRAIN_EXTRA else None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once and keeps paragraph breaks in descriptions.

    The default is appended only when it says something: not for None or a flag's False (the
    help text says what happens when the option is not given), and not when the help text
    already names its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False:
            return text
        if "default" in text.lower() or "when not given" in text:
            return text
        return super()._get_help_string(action)


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
    # gRPC's C core logs handshake failures on stderr at INFO; errors here are one line (the
    # exception names the cause). GRPC_VERBOSITY set by the user still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
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
    except ModuleNotFoundError as exc:
        # The edge install (no extras) runs client/status; the rest need the [train] extra.
        package = missing_extra(exc)
        if package is None:
            raise
        print(
            f"edgesplit {args.command}: error: this command needs "
            f"{PIP_NAMES.get(package, package)}, which is not installed (the base install is "
            "the torch-free edge runtime); install it with: pip install 'edgesplit[train]'",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:  # missing files, full disks, refused sockets: say which
        print(f"edgesplit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
