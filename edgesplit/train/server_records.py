"""What the server keeps per client session, and the byte budget that bounds it.

A session is ``(client, session id)``. It holds what its HELLO bound (mode, configuration,
codec), the last step it applied, the replies of recent steps (a resent step is answered from
them, never applied twice) and, in ushape, the forwards waiting for their MIDDLE_GRAD.

Three rules make this safe to share between clients that do not trust each other:

* **Only accepted requests create state.** The table is written by :meth:`SessionTable.open`
  and the ``keep``/``add`` methods, which the server calls after a request passed its checks;
  a refused request never touches it.
* **Everything is counted in bytes, per client and in total**
  (:class:`RecordLimits`). When a client is over its budget only *its own* older entries are
  evicted; when the total is over, the client holding the most bytes gives way first.
* **The last applied step of a session is an integer that is never evicted** while the session
  lives. Should its reply have been evicted, a resend of that step is refused with a sentence
  saying so, never applied again.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from edgesplit.errors import ConfigError, ProtocolError
from edgesplit.wire.messages import Message

#: Bytes a kept reply costs beyond its tensor frames (object, dict, meta): a conservative guess
#: so that a flood of empty replies is bounded too.
REPLY_OVERHEAD = 512
#: The same for a session's own bookkeeping.
SESSION_OVERHEAD = 1024


class ResourceExhausted(ProtocolError):
    """The request would make the server keep more than its byte budget allows."""

    code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class RecordLimits:
    """How much the server keeps for its clients.

    Parameters
    ----------
    client_bytes:
        Bytes of replies and pending forwards one client may hold (default 128 MiB: a reply of
        the largest default frame, 64 MiB, always fits).
    total_bytes:
        The same over every client (default 1 GiB).
    sessions_per_client:
        Open sessions one client may hold; beyond it the client's least recently used session
        is forgotten (only that client's own).
    replies_per_session:
        Replies kept per session (a client only ever resends its latest steps).
    """

    client_bytes: int = 128 << 20
    total_bytes: int = 1 << 30
    sessions_per_client: int = 256
    replies_per_session: int = 64

    def __post_init__(self) -> None:
        for name in ("client_bytes", "total_bytes", "sessions_per_client", "replies_per_session"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"record limit {name} must be positive, got {getattr(self, name)}"
                )


@dataclass
class _Entry:
    """One kept thing: a reply or a pending forward, with its byte cost and age."""

    value: Any
    nbytes: int
    seq: int


@dataclass
class Session:
    """State of one ``(client, session)``.

    Attributes
    ----------
    mode:
        ``"train"``/``"infer"`` from HELLO; ``None`` when HELLO did not say (or no HELLO came:
        the in-process engine sends none).
    config, codec:
        What HELLO bound (``None``: not sent, nothing bound).
    index:
        The client index HELLO named (orders splitfed steps), ``None`` if none.
    hello:
        Whether a HELLO opened this session.
    last_step:
        The highest step of a recorded kind this session applied (``-1``: none yet).
    last_key:
        ``(kind, step)`` of that step.
    report:
        Loss sum, correct count and samples of the steps since the session's last report
        (:func:`report_step`).
    """

    client: str
    session: str
    mode: str | None = None
    config: str | None = None
    codec: str | None = None
    family: tuple[str, ...] | None = None
    index: int | None = None
    hello: bool = False
    last_step: int = -1
    last_key: tuple[str, int] | None = None
    replies: OrderedDict[tuple[str, int], _Entry] = field(default_factory=OrderedDict)
    pending: OrderedDict[int, _Entry] = field(default_factory=OrderedDict)
    used: float = field(default_factory=time.monotonic)
    report: list[float] = field(default_factory=lambda: [0.0, 0, 0])

    def reply(self, key: tuple[str, int]) -> Message | None:
        """The kept reply of ``key``, or ``None``."""
        entry = self.replies.get(key)
        return None if entry is None else entry.value


class SessionTable:
    """Every client's sessions and what they hold, bounded by :class:`RecordLimits`.

    Not thread-safe on its own: the server calls it under its lock.
    """

    def __init__(self, limits: RecordLimits | None = None) -> None:
        self.limits = limits or RecordLimits()
        self._clients: dict[str, OrderedDict[str, Session]] = {}
        self._held: dict[str, int] = {}
        self._seq = itertools.count()

    # ------------------------------------------------------------------ sessions
    def find(self, client: str, session: str) -> Session | None:
        """The session, or ``None``; never creates one."""
        sessions = self._clients.get(client)
        found = None if sessions is None else sessions.get(session)
        if found is not None:
            found.used = time.monotonic()
            sessions.move_to_end(session)  # type: ignore[union-attr]
        return found

    def open(self, client: str, session: str) -> Session:
        """The session, created if new (call only for an accepted request). A client over its
        session cap loses its own least recently used session."""
        found = self.find(client, session)
        if found is not None:
            return found
        sessions = self._clients.setdefault(client, OrderedDict())
        while len(sessions) >= self.limits.sessions_per_client:
            oldest = next(iter(sessions))
            self.release(client, oldest)
        created = Session(client, session)
        sessions[session] = created
        self._charge(client, SESSION_OVERHEAD)
        return created

    def release(self, client: str, session: str, *, keep_last: bool = False) -> None:
        """Forget a session (BYE). With ``keep_last`` (the stream closed, the client may come
        back and resend) keep its last step, that step's reply and its latest pending forward
        (the one a reconnecting ushape client answers with MIDDLE_GRAD); drop everything else."""
        sessions = self._clients.get(client)
        state = None if sessions is None else sessions.get(session)
        if state is None:
            return
        latest = max(state.pending, default=None)
        for step in list(state.pending):
            if not (keep_last and step == latest):
                self._drop_pending(state, step)
        for key in list(state.replies):
            if not (keep_last and key == state.last_key):
                self._drop_reply(state, key)
        if not keep_last:
            sessions.pop(session)  # type: ignore[union-attr]
            self._charge(client, -SESSION_OVERHEAD)
            if not sessions:
                self._clients.pop(client, None)

    def sessions(self) -> list[Session]:
        """Every session, per client in least recently used order."""
        return [s for sessions in self._clients.values() for s in sessions.values()]

    def clients(self) -> list[str]:
        """Clients that hold at least one session."""
        return list(self._clients)

    def count(self, client: str | None = None) -> int:
        """Open sessions of ``client`` (all clients: ``None``)."""
        if client is not None:
            return len(self._clients.get(client, ()))
        return sum(len(s) for s in self._clients.values())

    # ------------------------------------------------------------------ bytes
    def held(self, client: str | None = None) -> int:
        """Bytes kept for ``client`` (all clients: ``None``), by this table's own accounting."""
        if client is not None:
            return self._held.get(client, 0)
        return sum(self._held.values())

    def _charge(self, client: str, nbytes: int) -> None:
        held = self._held.get(client, 0) + nbytes
        if held:
            self._held[client] = held
        else:
            self._held.pop(client, None)

    # ------------------------------------------------------------------ replies
    def keep_reply(self, state: Session, key: tuple[str, int], reply: Message) -> bool:
        """Record ``reply`` as the answer to ``key`` and mark the step applied. Returns whether
        the reply itself could be kept (a reply over the client's whole budget is not; the
        step stays applied and a resend is refused rather than applied again)."""
        if key[1] >= state.last_step:
            state.last_step, state.last_key = key[1], key
        nbytes = reply.tensor_bytes() + REPLY_OVERHEAD
        while len(state.replies) >= self.limits.replies_per_session:
            self._drop_reply(state, next(iter(state.replies)))
        if not self._make_room(state.client, nbytes):
            return False
        state.replies[key] = _Entry(reply, nbytes, next(self._seq))
        self._charge(state.client, nbytes)
        return True

    def _drop_reply(self, state: Session, key: tuple[str, int]) -> None:
        entry = state.replies.pop(key)
        self._charge(state.client, -entry.nbytes)

    # ------------------------------------------------------------------ pending forwards
    def add_pending(self, state: Session, step: int, value: Any, nbytes: int) -> None:
        """Keep a ushape forward until its MIDDLE_GRAD arrives.

        Raises
        ------
        ResourceExhausted
            When it cannot fit even after evicting what may be evicted.
        """
        if step in state.pending:
            self._drop_pending(state, step)  # a resent FORWARD replaces its own
        if not self._make_room(state.client, nbytes):
            raise ResourceExhausted(
                f"a pending ushape forward of {nbytes} bytes does not fit the server's record "
                f"budget ({self.limits.client_bytes} bytes per client, "
                f"{self.limits.total_bytes} in total): send MIDDLE_GRAD for earlier steps first "
                "or send smaller batches"
            )
        state.pending[step] = _Entry(value, nbytes, next(self._seq))
        self._charge(state.client, nbytes)

    def peek_pending(self, state: Session, step: int) -> Any | None:
        """The pending forward of ``step`` without removing it (``None`` if there is none)."""
        entry = state.pending.get(step)
        return None if entry is None else entry.value

    def adopt(self, client: str, session: str) -> Session | None:
        """Move the session a HELLO without a client name opened (an unauthenticated server:
        the torch client leaves the name empty in HELLO) to ``client``, the name its steps use."""
        anonymous = self._clients.get("")
        state = None if anonymous is None else anonymous.get(session)
        if state is None or not client or self.find(client, session) is not None:
            return None
        self.release("", session)  # it holds no replies or pending forwards yet...
        moved = self.open(client, session)  # ...only what HELLO bound
        moved.mode, moved.config, moved.codec = state.mode, state.config, state.codec
        moved.family, moved.hello, moved.index = state.family, state.hello, state.index
        return moved

    def take_pending(self, state: Session, step: int) -> Any | None:
        """Remove and return the pending forward of ``step`` (``None`` if there is none)."""
        if step not in state.pending:
            return None
        entry = state.pending[step]
        self._drop_pending(state, step)
        return entry.value

    def _drop_pending(self, state: Session, step: int) -> None:
        entry = state.pending.pop(step)
        self._charge(state.client, -entry.nbytes)

    # ------------------------------------------------------------------ eviction
    def _make_room(self, client: str, nbytes: int) -> bool:
        """Evict until ``nbytes`` more fit for ``client`` and in total; False if impossible."""
        limits = self.limits
        if nbytes > min(limits.client_bytes, limits.total_bytes):
            return False
        while self.held(client) + nbytes > limits.client_bytes:
            if not self._evict_one(client):
                return False
        while self.held() + nbytes > limits.total_bytes:
            # the heaviest client gives way first: one client cannot push out the others
            # while it holds more than they do
            victims = sorted(self._held, key=lambda c: self._held[c], reverse=True)
            if not any(self._evict_one(c) for c in victims):
                return False
        return True

    def _evict_one(self, client: str) -> bool:
        """Drop ``client``'s cheapest-to-lose entry: an older reply (not a session's last),
        else its oldest pending forward, else the last reply of its least recently used
        session. Step numbers are never dropped. False when nothing is left to drop."""
        sessions = list(self._clients.get(client, {}).values())
        older = [(e.seq, s, k) for s in sessions for k, e in s.replies.items() if k != s.last_key]
        if older:
            _, state, key = min(older, key=lambda t: t[0])
            self._drop_reply(state, key)
            return True
        pending = [(e.seq, s, k) for s in sessions for k, e in s.pending.items()]
        if pending:
            _, state, step = min(pending, key=lambda t: t[0])
            self._drop_pending(state, step)
            return True
        for state in sessions:  # least recently used first
            if state.replies:
                self._drop_reply(state, next(iter(state.replies)))
                return True
        return False


def report_step(session: Session, request: Message, reply: Message, batch: int) -> None:
    """Move a trained step's loss and correct count from ``reply`` into the session's running
    report; put the report (``loss`` mean, ``correct``, ``n`` samples, since the previous
    report) back into the reply only if the request's meta asks with ``report: true``.

    A client asks once an epoch: per step, the two numbers cost the down-link about a byte a
    sample at 100× compression (the reply is otherwise ~10 B a sample).
    """
    meta = reply.meta
    if "loss" not in meta:
        return
    loss, correct = float(meta.pop("loss")), int(meta.pop("correct", 0))
    totals = session.report
    totals[0] += loss * batch
    totals[1] += correct
    totals[2] += batch
    if request.meta.get("report") is True:
        total_loss, right, n = totals
        meta.update(loss=float(f"{total_loss / n:.4g}"), correct=int(right), n=int(n))
        session.report = [0.0, 0, 0]
