"""The rich consoles the CLI prints its tables and messages with.

One place decides how wide output is: a terminal gets its own width, anything else (a pipe, a
file, a captured stream) gets :data:`PIPE_WIDTH` columns. rich would assume 80 columns there and
truncate cells (``0.99…``) or wrap titles, so ``edgesplit … | grep`` and ``> out.txt`` would see
less than the screen; a pipe has no width, so none is imposed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported when a command prints, not when the CLI starts
    from rich.console import Console

#: Columns when the stream is not a terminal: wider than any table the CLI prints, so no cell is
#: cut (a table is only as wide as its content; nothing is padded to this width).
PIPE_WIDTH = 10_000


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr) that never truncates when the stream is not a terminal.

    Parameters
    ----------
    stderr:
        Print to stderr (keeps stdout free for ``--json``).
    """
    from rich.console import Console

    out = Console(stderr=stderr)
    if out.is_terminal:
        return out
    return Console(stderr=stderr, width=PIPE_WIDTH)
