"""Every subcommand's --help names each default at most once and never as None/False."""

from __future__ import annotations

import argparse
import re

import pytest

from edgesplit.cli.main import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option_entries(text: str) -> list[str]:
    """The help text split into one entry per option (an entry starts at '  -X' or '  --x')."""
    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            entries.append(line)
        elif entries and line.startswith("    "):
            entries[-1] += " " + line.strip()
    return entries


SUBPARSERS = _subparsers()


@pytest.mark.parametrize("command", sorted(SUBPARSERS))
def test_help_defaults_are_said_once_and_mean_something(command: str) -> None:
    entries = _option_entries(SUBPARSERS[command].format_help())
    assert entries, "no options parsed from the help text"
    for entry in entries:
        assert "(default: None)" not in entry, entry
        assert "(default: False)" not in entry, entry
        assert entry.lower().count("default:") <= 1, entry


def test_real_defaults_still_shown() -> None:
    entries = {e.split()[0]: e for e in _option_entries(SUBPARSERS["serve"].format_help())}
    assert "(default: 127.0.0.1)" in entries["--host"]
    export = {e.split()[0]: e for e in _option_entries(SUBPARSERS["export"].format_help())}
    assert "default: 1e-05" in export["--atol"]
    assert "default: fp32" in export["--weights"]
