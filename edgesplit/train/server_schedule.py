"""A fixed order for splitfed steps, so a run with a fixed seed gives the same weights every time.

In splitfed the clients train in parallel against one shared server segment. Over the network
their steps reach the server in whatever order the processes and threads happen to run, and
since each step changes the shared weights, two runs with the same seed differ. The server
therefore applies the steps of a round in the order the in-process engine uses: batch position
first, client index second (``for b: for i: step(i, b)``), then the FedAvg round. A client whose
step is not next waits (the lock released) until it is; a client that has no more batches in the
round is out of the way as soon as it arrives at the FedAvg barrier.

Only sessions whose HELLO named their client ``index`` take part (the torch client does); a
server without a known client count, or a client that never says its index, is not ordered.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from edgesplit.train.server_checks import PreconditionFailed

#: A client's place in the order: (round, batch position, index).
Position = tuple[int, float, int]


class SplitFedSchedule:
    """Positions of the clients of one splitfed run (called under the server lock).

    Parameters
    ----------
    clients:
        How many clients the run has (indices ``0..clients-1``).
    """

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self._round = [0] * clients
        self._batch = [0] * clients
        self._averaging: dict[int, int] = {}  # index -> round it waits at the FedAvg barrier

    def position(self, index: int) -> Position:
        """Where client ``index`` is: its next step, or the end of its round while it waits for
        the FedAvg of that round."""
        if index in self._averaging:
            return (self._averaging[index], math.inf, index)
        return (self._round[index], self._batch[index], index)

    def is_next(self, index: int) -> bool:
        """Whether client ``index``'s next step is the first in the order."""
        mine = self.position(index)
        return all(mine <= self.position(j) for j in range(self.clients))

    def wait_turn(self, cond: threading.Condition, index: int, timeout: float) -> None:
        """Block (releasing ``cond``'s lock) until client ``index``'s step is next.

        Raises
        ------
        TimeoutError
            When another client did not take its step within ``timeout`` seconds.
        """
        if not cond.wait_for(lambda: self.is_next(index), timeout):
            ahead = [j for j in range(self.clients) if self.position(j) < self.position(index)]
            raise TimeoutError(
                f"splitfed client {index} waited {timeout:.0f}s for the steps of client(s) "
                f"{ahead[:8]} that come before it in the round's fixed order"
            )

    def stepped(self, index: int) -> None:
        """Client ``index`` applied a step."""
        self._batch[index] += 1

    def averaging(self, index: int, rnd: int) -> None:
        """Client ``index`` arrived at the FedAvg barrier of round ``rnd``."""
        self._averaging[index] = rnd

    def averaged(self, index: int, rnd: int) -> None:
        """Client ``index`` left the FedAvg barrier of round ``rnd``: its next round begins."""
        self._averaging.pop(index, None)
        self._round[index] = max(self._round[index], rnd + 1)
        self._batch[index] = 0

    def left(self, index: int) -> None:
        """Client ``index`` left the FedAvg barrier without an average (timeout, refusal)."""
        self._averaging.pop(index, None)

    def export(self) -> dict[str, Any]:
        return {"round": list(self._round), "batch": list(self._batch)}

    def restore(self, saved: dict[str, Any] | None) -> None:
        if not saved or len(saved.get("round", ())) != self.clients:
            return
        self._round = [int(r) for r in saved["round"]]
        self._batch = [int(b) for b in saved["batch"]]


class IndexOwners:
    """Which client holds each client index (vertical: party index). An index belongs to the
    client that first used it in an answered request; another client naming it is refused.
    Not thread-safe on its own: the server calls it under its lock."""

    def __init__(self) -> None:
        self._owner: dict[int, str] = {}
        self._used: set[int] = set()

    def claim(self, index: int, client: str) -> bool:
        """Bind ``index`` to ``client``; returns whether this call made the claim (give it
        back with :meth:`release` if the request then fails).

        Raises
        ------
        PreconditionFailed
            ``index`` belongs to another client.
        """
        new = index not in self._owner
        owner = self._owner.setdefault(index, client)
        if owner != client:
            raise PreconditionFailed(
                f"party/client index {index} belongs to client {owner!r}; client {client!r} "
                "cannot take its place"
            )
        return new

    def release(self, index: int) -> None:
        """Give back a claim whose request failed: refused requests leave nothing behind."""
        if index not in self._used:
            self._owner.pop(index, None)

    def used(self, index: int) -> None:
        """A request under ``index`` was answered: the claim is kept for good."""
        self._used.add(index)

    def rename(self, index: int, old: str, new: str) -> None:
        """Move ``index`` from ``old`` to ``new`` if ``old`` holds it."""
        if self._owner.get(index) == old:
            self._owner[index] = new

    def export(self) -> dict[str, str]:
        return {str(i): c for i, c in self._owner.items()}

    def restore(self, saved: dict[str, Any] | None) -> None:
        self._owner = {int(i): str(c) for i, c in (saved or {}).items()}
        self._used = set(self._owner)
