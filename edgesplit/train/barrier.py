"""Rendezvous of several participants inside the server: vertical parties of one step, the
clients of one FedAvg round. The last to arrive computes everyone's reply; each leaves with its
own. A failure reaches every participant at once, not only the one that computed, with the
same status: a peer's mistake (an :class:`~edgesplit.errors.EdgesplitError`: its code, e.g.
``INVALID_ARGUMENT``) stays one, a timeout stays ``DEADLINE_EXCEEDED``, and anything else is the
server's fault (:class:`~edgesplit.train.server_checks.InternalFault`, ``INTERNAL``, logged
with its traceback), never blamed on the participants."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgesplit.errors import EdgesplitError, ProtocolError
from edgesplit.train.server_checks import InternalFault
from edgesplit.wire.messages import Message

log = logging.getLogger(__name__)

#: Computes every participant's reply from their parts (index -> part).
Compute = Callable[[dict[int, Any]], dict[int, Message]]


@dataclass
class _Meeting:
    expected: int
    parts: dict[int, Any] = field(default_factory=dict)
    replies: dict[int, Message] | None = None
    error: EdgesplitError | TimeoutError | None = None


class Barriers:
    """Meetings keyed by (what, step), sharing the server's condition variable (waiting
    releases the server lock, so other requests go on meanwhile)."""

    def __init__(self, cond: threading.Condition, timeout: Callable[[], float]) -> None:
        self._cond = cond
        self._timeout = timeout
        self._meetings: dict[tuple[str, int], _Meeting] = {}

    def meet(
        self, key: tuple[str, int], expected: int, index: int, part: Any, compute: Compute
    ) -> Message:
        """Leave ``part`` for meeting ``key`` and wait for this participant's reply."""
        if not 0 <= index < expected:
            raise ProtocolError(f"participant index {index} outside 0..{expected - 1}")
        with self._cond:
            meeting = self._meetings.setdefault(key, _Meeting(expected))
            meeting.parts[index] = part
            if len(meeting.parts) == expected and meeting.replies is None:
                try:
                    meeting.replies = compute(meeting.parts)
                except (EdgesplitError, TimeoutError) as exc:
                    # every participant must hear it, not only the last
                    meeting.error = exc
                    meeting.replies = {}
                except Exception as exc:  # a server bug, not the participants' fault
                    log.exception("server fault inside a %s meeting", key[0])
                    meeting.error = InternalFault(
                        f"the server failed on this step ({type(exc).__name__}); see the "
                        "server log"
                    )
                    meeting.replies = {}
                self._cond.notify_all()
            timeout = self._timeout()
            deadline = time.monotonic() + timeout
            while meeting.replies is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._meetings.pop(key, None)
                    raise TimeoutError(
                        f"waited {timeout:.0f}s for "
                        f"{expected - len(meeting.parts)} more participant(s)"
                    )
                self._cond.wait(left)
            if meeting.error is not None:
                raise _again(meeting.error)
            reply = meeting.replies.pop(index, None)
            if reply is None:
                raise ProtocolError(
                    f"participant {index} already collected its reply for this "
                    "step; a resent request is answered from the record"
                )
            if not meeting.replies:
                self._meetings.pop(key, None)
            return reply


def _again(error: EdgesplitError | TimeoutError) -> Exception:
    """A fresh exception like ``error`` for one participant (each raises its own, so no
    traceback is shared between threads): same type and message, or the server's fault when
    the type cannot be rebuilt from its message."""
    try:
        again = type(error)(str(error))
    except Exception:  # an error type whose constructor wants more than a message
        return InternalFault(f"{type(error).__name__}: {error}".splitlines()[0])
    again.__dict__.update(error.__dict__)  # e.g. a status code set on the instance
    return again
