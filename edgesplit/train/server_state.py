"""What a restarted server restores, and what ``status`` shows.

:func:`export_state` gives (tensors for ``torch.save``, JSON-able counters) with everything a
restart needs so that no applied step is lost and a retried step is still answered from its
record: weights and optimizer, step counters, each session's last step, latest replies and HELLO
bindings, the hand-off, the FedAvg rounds and order, who holds each client index, the run's
members, per-client counters. :func:`import_state` restores it. Both are called under the
server lock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from edgesplit.train.server_checks import codec_family
from edgesplit.train.server_drift import DriftCounts
from edgesplit.wire.messages import message_from_dict, message_to_dict

if TYPE_CHECKING:
    from edgesplit.train.server import SplitServer

#: Replies kept per session in a saved state (a client resends only its latest steps).
SAVED_REPLIES = 2


@dataclass
class ClientStats:
    """What the server has seen from one client."""

    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    labelled: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    repeats: int = 0
    errors: int = 0
    last_seen: float = 0.0
    probe_steps: int = 0  # counters at this client's previous probe (interval start)
    probe_bytes_in: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "samples": self.samples,
            "loss": self.loss_sum / self.labelled if self.labelled else None,
            "accuracy": self.correct / self.labelled if self.labelled else None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "repeats": self.repeats,
            "errors": self.errors,
            "last_seen": self.last_seen,
        }


def _key(session: str, client: str) -> str:
    return f"{session}\t{client}"


def export_state(server: SplitServer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, JSON-able counters) of ``server`` (call under its lock)."""
    tensors = {
        "segment": server.segment.state_dict(),
        "optimizer": server.optimizer.state_dict(),
    }
    sessions = server.table.sessions()
    schedule = server.schedule()
    meta = {
        "steps_applied": server.steps_applied,
        "group": server.group,
        "last_step": {_key(s.session, s.client): s.last_step for s in sessions},
        "records": {
            _key(s.session, s.client): [
                {"request_kind": kind, "request_step": step, **message_to_dict(entry.value)}
                for (kind, step), entry in list(s.replies.items())[-SAVED_REPLIES:]
            ]
            for s in sessions
        },
        "sessions": {
            _key(s.session, s.client): {
                "mode": s.mode,
                "config": s.config,
                "codec": s.codec,
                "hello": s.hello,
                "index": s.index,
                # the loss/correct totals since the session's last report (a restart keeps them)
                "report": list(s.report),
            }
            for s in sessions
        },
        **server.handoff.export(),
        "rounds": server.rounds,
        "schedule": schedule.export() if schedule else None,
        "index_owner": server.owners.export(),
        "admission": server.admission.export(),
        "stats": {name: asdict(st) for name, st in server.stats.items()},
        "drift_counts": (
            {name: asdict(c) for name, c in server.drift.counts.items()} if server.drift else {}
        ),
    }
    return tensors, meta


def import_state(server: SplitServer, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Restore what :func:`export_state` saved (call under the server lock). States saved
    before a field existed restore without it."""
    server.segment.load_state_dict(tensors["segment"])
    server.optimizer.load_state_dict(tensors["optimizer"])
    server.steps_applied = int(meta["steps_applied"])
    server.group = str(meta["group"])
    server.handoff.restore(meta)
    server.weights.rounds = int(meta.get("rounds", 0))
    server.admission.restore(meta.get("admission"))
    schedule = server.schedule()
    if schedule is not None:
        schedule.restore(meta.get("schedule"))
    server.owners.restore(meta.get("index_owner"))
    bound = meta.get("sessions", {})
    for key, last in meta["last_step"].items():
        sid, client = key.split("\t", 1)
        state = server.table.open(client, sid)
        for item in meta["records"].get(key, []):
            reply_key = (str(item["request_kind"]), int(item["request_step"]))
            server.table.keep_reply(state, reply_key, message_from_dict(item))
        state.last_step = int(last)
        terms = bound.get(key)
        if terms:
            state.mode, state.config = terms.get("mode"), terms.get("config")
            state.codec, state.hello = terms.get("codec"), bool(terms.get("hello"))
            state.family = codec_family(state.codec) if state.codec else None
            index = terms.get("index")
            state.index = None if index is None else int(index)
            report = terms.get("report")
            if report:
                state.report = [float(report[0]), int(report[1]), int(report[2])]
    for name, st in meta["stats"].items():
        server.stats[name] = ClientStats(**st)
    if server.drift is not None:
        for name, counts in (meta.get("drift_counts") or {}).items():
            server.drift.counts[name] = DriftCounts(**counts)


def status(server: SplitServer) -> dict[str, Any]:
    """A JSON-able snapshot of ``server`` (call under its lock)."""
    table = server.table
    guard = server.drift
    clients = {name: s.row() for name, s in sorted(server.stats.items())}
    if guard is not None:
        # batches whose activations were off the training distribution, per client
        for name, row in clients.items():
            counts = guard.counts.get(name, DriftCounts())
            row["drift_flagged"], row["drift_refused"] = counts.flagged, counts.refused
    return {
        "config": server.config,
        "steps_applied": server.steps_applied,
        "clients": clients,
        "drift": guard.status() if guard is not None else {"policy": "off"},
        "last_probe": server.probes[-1] if server.probes else None,
        "probes": dict(sorted(server.latest_probe.items())),
        # what the server keeps for its clients, against its budget (issue 9)
        "records": {
            "held_bytes": table.held(),
            "client_bytes_limit": table.limits.client_bytes,
            "total_bytes_limit": table.limits.total_bytes,
            "sessions": table.count(),
            "clients": {name: table.held(name) for name in sorted(table.clients())},
        },
        "run": {"members": list(server.admission.members), "finished": server.admission.finished},
    }
