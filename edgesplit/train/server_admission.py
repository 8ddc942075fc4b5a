"""Which clients belong to the run a server trains, and whether that run is over.

A ``serve`` process trains one run: its spec says how many clients (or vertical parties) take
part and for how many epochs. Training HELLOs are admitted until that many distinct clients
joined; a further client, or any training HELLO once the run is finished, is refused at HELLO,
before it can apply a single step to the finished (or someone else's) model. Inference sessions
are never limited here.

The run is finished when the server can tell: the turn-based schedule (vanilla/ushape with
several clients) completed ``epochs × clients`` hand-offs, splitfed completed ``epochs``
FedAvg rounds, or every member said BYE after training.
"""

from __future__ import annotations

from typing import Any

from edgesplit.train.server_checks import PreconditionFailed


class RunAdmission:
    """Membership and end of the run (not thread-safe: called under the server lock)."""

    def __init__(self) -> None:
        #: Clients admitted to train, in order of arrival.
        self.members: list[str] = []
        #: Members that said BYE after training.
        self.done: set[str] = set()
        #: Why the run is over (``None`` while it runs).
        self.finished: str | None = None

    def admit(self, client: str, spec: dict[str, Any]) -> None:
        """Admit ``client`` to train, or refuse it.

        Raises
        ------
        PreconditionFailed
            The run is finished, or already has its expected number of distinct clients.
        """
        if self.finished is not None:
            raise PreconditionFailed(
                f"the training run this server holds is finished ({self.finished}); start a "
                "fresh `edgesplit serve` (or a fresh --state) for a new training run"
            )
        if client in self.members:
            return
        expected = _expected_clients(spec)
        if expected is None:
            return  # a run of unknown size: nothing to bound (and nothing kept)
        if len(self.members) >= expected:
            raise PreconditionFailed(
                f"this run trains {expected} client(s) and {len(self.members)} already joined "
                f"({', '.join(repr(m) for m in self.members[:4])}); client {client!r} cannot join"
            )
        self.members.append(client)

    def bye(self, client: str, spec: dict[str, Any]) -> None:
        """A member finished training; the run ends when every expected member has."""
        if client not in self.members:
            return
        self.done.add(client)
        expected = _expected_clients(spec)
        if expected is not None and len(self.done) >= expected:
            self.finish(f"all {expected} client(s) said BYE")

    def observe(
        self, spec: dict[str, Any], *, turn_based: bool, federated: bool, handoffs: int, rounds: int
    ) -> None:
        """End the run when its schedule says it is over (the configuration's rules say which
        schedule it follows)."""
        clients, epochs = _expected_clients(spec), spec.get("epochs")
        if clients is None or not isinstance(epochs, int) or isinstance(epochs, bool):
            return
        if turn_based and clients > 1 and handoffs >= epochs * clients:
            self.finish(f"{handoffs} hand-offs: {epochs} epoch(s) of {clients} clients")
        if federated and rounds >= epochs:
            self.finish(f"{rounds} FedAvg round(s) of {epochs}")

    def finish(self, why: str) -> None:
        if self.finished is None:
            self.finished = why

    def export(self) -> dict[str, Any]:
        return {"members": list(self.members), "done": sorted(self.done), "finished": self.finished}

    def restore(self, saved: dict[str, Any] | None) -> None:
        if not saved:
            return
        self.members = [str(m) for m in saved.get("members", [])]
        self.done = {str(m) for m in saved.get("done", [])}
        finished = saved.get("finished")
        self.finished = None if finished is None else str(finished)


def _expected_clients(spec: dict[str, Any]) -> int | None:
    value = spec.get("clients")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
