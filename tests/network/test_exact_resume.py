"""Exact resume after SIGKILL, for all four configurations (issue 9), weight for weight.

Each configuration trains the same seeded run twice against a real ``edgesplit serve`` process
started with ``--state DIR``: once undisturbed, once with the server SIGKILLed mid-run (twice)
and restarted on the same port with the same ``--state``. The clients are the trainer of
``edgesplit client --trainable`` (:func:`~edgesplit.train.remote.train_remote` over a real
:class:`~edgesplit.transport.grpc_client.GrpcTransport`), run in this process so that each
crash lands at a chosen point of the protocol, not wherever a poll of Status happens to be:

* ``lost``: the server applied (and saved) a step, and its reply dies with the server; the
  client resends the request to the restarted server, which must answer it from its record;
* ``gap``: the server dies right after a reply reached the client, so its next request meets
  the restarted server; in ushape the crash falls between the FORWARD's MIDDLE reply and the
  MIDDLE_GRAD, where the server holds a pending forward it does not persist (the client sends
  that FORWARD again).

A crash at a step that several clients meet for (a vertical step, a FedAvg round) waits until
every one of them holds its reply (see :meth:`Client.crash`).

The two runs must agree bit for bit: the server segment and its optimizer state in the final
``server-state.pt`` (read with the server's own checked loader), the step and hand-off counters
and per-client loss sums, every tensor each client sent and received at every step, and the
final test accuracy.
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from netutil import Server, write_tokens

from edgesplit.train.remote import train_remote
from edgesplit.train.serving import STATE_FILE, StateStore
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy
from edgesplit.wire.messages import Kind, Message

EPOCHS = 2
CODEC = "q8+zstd"
#: configuration -> (clients, shard the data, where client-0 crashes the server: (request
#: kind, step, mode)). Steps: vanilla/ushape/vertical 43 an epoch; splitfed 21 and a WEIGHTS.
CASES: dict[str, tuple[int, bool, list[tuple[str, int, str]]]] = {
    "vanilla": (1, False, [(Kind.FORWARD, 20, "lost"), (Kind.FORWARD, 60, "gap")]),
    "ushape": (1, False, [(Kind.FORWARD, 20, "gap"), (Kind.MIDDLE_GRAD, 60, "lost")]),
    "vertical": (2, False, [(Kind.FORWARD, 20, "lost"), (Kind.FORWARD, 60, "gap")]),
    "splitfed": (2, True, [(Kind.WEIGHTS, 22, "lost"), (Kind.FORWARD, 30, "gap")]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """One run's ``edgesplit serve``; :meth:`crash` SIGKILLs it and starts it again."""

    def __init__(self, root: Path, config: str, clients: int) -> None:
        root.mkdir()
        self.tokens = write_tokens(root / "tokens.txt", [f"client-{i}" for i in range(clients)])
        self.state = root / "state"
        self.port = free_port()
        self.args = ["--tokens", str(root / "tokens.txt"), "--config", config, "--clients",
                     str(clients), "--epochs", str(EPOCHS), "--codec", CODEC, "--state",
                     str(self.state), "--wait-timeout", "60", "--port", str(self.port)]
        self.server = Server(*self.args)
        self.restarts = 0

    def crash(self) -> None:
        proc = self.server.proc
        proc.send_signal(signal.SIGKILL)  # no graceful save: only what --state already holds
        proc.communicate(timeout=30)
        self.server = Server(*self.args)  # same port, same --state
        self.restarts += 1

    def final_state(self) -> dict[str, Any]:
        """Stop the server and read its last state with the server's own (checked) loader."""
        self.server.stop()
        return StateStore._read(self.state / STATE_FILE)


class Client:
    """A client's transport: keeps the last answered exchange of each (kind, step) and, at the
    planned requests, crashes the server."""

    def __init__(self, served: Served, name: str, plan: list[tuple[str, int, str]]) -> None:
        retry = RetryPolicy(attempts=12, initial_backoff=0.2, max_backoff=1.0)
        self.inner = GrpcTransport(f"127.0.0.1:{served.port}", served.tokens[name],
                                   retry=retry, timeout=120)
        self.served = served
        self.plan = {(kind, step): mode for kind, step, mode in plan}
        self.started = threading.Event()  # past its set-up (its first step is on its way)
        self.exchanges: dict[tuple[str, int], tuple[dict[str, bytes], str, dict[str, bytes]]] = {}
        self.refused: list[Message] = []
        self.from_record: list[bool] = []
        self.answered: set[tuple[str, int]] = set()
        self.cond = threading.Condition()
        #: The other clients of the run: a crash waits until they hold their reply too.
        self.peers: list[Client] = []

    @property
    def wire_bytes_up(self) -> int:
        return self.inner.wire_bytes_up

    @property
    def wire_bytes_down(self) -> int:
        return self.inner.wire_bytes_down

    def close(self) -> None:
        self.inner.close()

    def request(self, message: Message) -> Message:
        if message.kind != Kind.HELLO:
            self.started.set()
        key = (message.kind, message.step)
        mode = self.plan.pop(key, None)
        if mode == "lost":
            first = self.inner.request(message)  # applied and saved; the reply is "lost"
            self.crash(key)
            reply = self.inner.request(message)  # the resend, to the restarted server
            self.from_record.append(
                first.kind == reply.kind != Kind.ERROR and first.tensors == reply.tensors
            )
        else:
            reply = self.inner.request(message)
        if mode == "gap":
            self.crash(key)
        if reply.kind == Kind.ERROR:
            self.refused.append(reply)
        else:
            self.exchanges[key] = (dict(message.tensors), reply.kind, dict(reply.tensors))
            with self.cond:
                self.answered.add(key)
                self.cond.notify_all()
        return reply

    def crash(self, key: tuple[str, int]) -> None:
        # A step the server met several clients for (a vertical step, a FedAvg round) is
        # recorded and saved for each of them in turn; crash once all of them hold their reply.
        # Not covered here, because it fails today: a crash between two of those saves leaves a
        # state with the step applied but a later participant's reply unrecorded, so that
        # participant's resend is taken for a new step and waits at the barrier for peers that
        # have moved on (DEADLINE_EXCEEDED).
        for peer in self.peers:
            with peer.cond:
                assert peer.cond.wait_for(lambda p=peer: key in p.answered, 60), key
        self.served.crash()


def run(root: Path, config: str, *, crash: bool) -> tuple[Served, list[Client], list[dict]]:
    """Train ``config`` over real gRPC against a real server; client-0 crashes it as planned."""
    clients, shard, plan = CASES[config]
    served = Served(root, config, clients)
    transports = [Client(served, f"client-{i}", plan if crash and i == 0 else [])
                  for i in range(clients)]
    transports[0].peers = transports[1:]
    reports: list[dict] = [{} for _ in range(clients)]
    errors: list[BaseException] = []

    def train(i: int) -> None:
        try:
            reports[i] = train_remote(
                transports[i], "digits", index=i, session=f"{config}-session-{i}",
                shard=(i, clients) if shard else None,
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test thread
            errors.append(exc)
            transports[i].started.set()
        finally:
            transports[i].close()

    threads = []
    try:
        for i in range(clients):
            thread = threading.Thread(target=train, args=(i,), daemon=True)
            thread.start()
            threads.append(thread)
            # train_remote seeds torch's global generator and builds its segments from it:
            # one client at a time, or the initial weights would depend on thread timing
            assert transports[i].started.wait(120), f"client-{i} did not start"
        for thread in threads:
            thread.join(300)
            assert not thread.is_alive(), "a client did not finish"
    except BaseException:
        served.server.stop()
        raise
    if errors:
        served.server.stop()
        raise errors[0]
    return served, transports, reports


def same(a: Any, b: Any, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ (tensors compared with :func:`torch.equal`)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where} keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where} length {len(a)} != {len(b)}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in same(x, y, f"{where}/{i}")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


#: Per-client counters that must agree (bytes, repeats, errors and times may not).
TRAINED = ("steps", "samples", "loss_sum", "correct", "labelled")


def trained(stats: dict[str, dict[str, Any]], config: str) -> dict[str, Any]:
    """What the server counted as trained, per client. A vertical step is counted for the
    party that arrived last at its barrier (timing, even without a crash): there, the sums."""
    rows = {name: {k: row[k] for k in TRAINED} for name, row in stats.items() if row["steps"]}
    if config != "vertical":
        return rows
    total = {k: sum(row[k] for row in rows.values()) for k in TRAINED}
    total["loss_sum"] = round(total["loss_sum"], 6)  # summed in another grouping
    return {"all parties": total}


@pytest.fixture
def one_thread():
    # the server processes run single-threaded (netutil's OMP_NUM_THREADS=1); so do the clients
    # here, so both runs of a configuration compute with the same reduction order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("config", list(CASES))
def test_resume_after_sigkill_is_exact(tmp_path, config, one_thread):
    ref_served, ref_clients, ref_reports = run(tmp_path / "undisturbed", config, crash=False)
    ref = ref_served.final_state()
    served, crashed_clients, reports = run(tmp_path / "crashed", config, crash=True)
    got = served.final_state()

    plan = CASES[config][2]
    assert served.restarts == len(plan) and ref_served.restarts == 0
    lead = crashed_clients[0]
    assert not lead.plan, f"crash points never reached: {lead.plan}"
    # a step applied before the crash whose reply was lost is answered from the saved record
    assert lead.from_record == [True] * sum(mode == "lost" for *_, mode in plan)
    assert got["meta"]["stats"]["client-0"]["repeats"] >= 1
    if config == "ushape":
        # the MIDDLE_GRAD after the gap crash met a server without the pending forward
        assert [r.meta["code"] for r in lead.refused] == ["FAILED_PRECONDITION"]
        assert "no ushape forward pending" in lead.refused[0].meta["message"]
    else:
        assert not lead.refused

    # the server's segment and optimizer, tensor for tensor
    assert set(ref["tensors"]["segment"]) == set(got["tensors"]["segment"])
    assert same(ref["tensors"]["segment"], got["tensors"]["segment"], "segment") == []
    assert same(ref["tensors"]["optimizer"], got["tensors"]["optimizer"], "optimizer") == []
    # every step applied exactly once, and the same hand-offs / FedAvg rounds
    for key in ("steps_applied", "handoffs", "handoff", "rounds", "schedule"):
        assert got["meta"].get(key) == ref["meta"].get(key), key
    assert ref["meta"]["steps_applied"] >= EPOCHS * 40
    assert trained(got["meta"]["stats"], config) == trained(ref["meta"]["stats"], config)

    # every tensor each client sent and received, at every step (the last answer of a resend)
    for mine, twin in zip(crashed_clients, ref_clients, strict=True):
        assert mine.exchanges.keys() == twin.exchanges.keys()
        differ = [key for key, exchange in mine.exchanges.items()
                  if exchange != twin.exchanges[key]]
        assert differ == [], f"exchanges differ at {differ[:5]}"
    for report, twin in zip(reports, ref_reports, strict=True):
        assert report["accuracy"] == twin["accuracy"]
    assert reports[-1]["accuracy"] >= 0.6
