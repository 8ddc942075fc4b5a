"""Fuzz the real gRPC split server with hostile requests; report anything that is a server fault.

A real :class:`~edgesplit.train.server.SplitServer` (digits, vanilla, fresh weights) is served
by :func:`~edgesplit.transport.grpc_server.serve_handler` on 127.0.0.1, with tokens and the
default limits. Several workers send generated requests as raw bytes on ``Session`` streams:
random bytes, valid envelopes (HELLO, FORWARD, PREDICT, WEIGHTS, BYE, ...) built from real
frames with bit flips, truncations and splices, and structured mutations (kinds, steps,
sessions, meta values, tensor names, frames). A stream the server ends is replaced by a new one.

Findings (each makes the exit code 1):

* a stream ended with ``INTERNAL`` or ``UNKNOWN`` (a server exception, not a refusal);
* an ``ERROR`` reply whose code is ``INTERNAL``;
* no reply and no status within ``--reply-timeout`` seconds (a hang);
* the server stops answering a well-formed control client or ``Status`` (checked every
  ``--check-every`` inputs and at the end).

Run, bounded in count and time (measured: 100,000 inputs in 209 s with 2 workers on a busy
2-core machine, so 10^6 take about 35 min)::

    .venv/bin/python scripts/fuzz_server.py --inputs 1000000 --seconds 7200 --workers 2
    .venv/bin/python scripts/fuzz_server.py --inputs 2000 --seed 7        # a quick look

It prints one JSON line: inputs sent, how streams ended (by status code), reply codes, findings
(first few with the input that caused them, hex), seconds, server RSS. The quick version of this
target runs in the test suite (``tests/network/test_fuzz_server.py``).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from edgesplit.train.frames import TensorCodec, encode_labels
from edgesplit.train.serving import server_fresh
from edgesplit.train.spec import TrainSpec
from edgesplit.transport import split_pb2
from edgesplit.transport.grpc_client import GrpcTransport, fetch_status
from edgesplit.transport.grpc_server import RunningServer, serve_handler
from edgesplit.transport.tokens import Role, TokenGrant
from edgesplit.wire.messages import Kind, Message, expect

TOKENS = {"fuzzer": "fuzz-token-0123456789abcdef", "control": "ctrl-token-0123456789abcdef"}
SESSION_METHOD = "/edgesplit.v1.Split/Session"
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
KINDS = [Kind.HELLO, Kind.FORWARD, Kind.PREDICT, Kind.MIDDLE_GRAD, Kind.WEIGHTS, Kind.BYE,
         Kind.STATUS, Kind.ACK, Kind.ERROR, Kind.WELCOME, "", "x" * 300, "forward\x00", "HELLO"]
META_VALUES: list[Any] = [
    0, -1, 1, 2**63, -(2**63), 2**64 + 1, 1e308, -0.0, 0.5, True, False, None, "", "x" * 1000,
    [], {}, [1, [2, [3]]], {"a": {"b": {"c": 1}}}, "train", "infer", "vertical", "ushape",
]
META_KEYS = ["mode", "train", "want_grad", "ids", "index", "group", "round", "n_samples",
             "config", "codec", "runtime", "probe", "n", "party", "seed", "x"]
RAW_META = ['{"train": NaN}', '{"train": Infinity}', '{"n": 1e400}', "[[[[[[[[", "{", "null",
            '{"a":' * 2000 + "1" + "}" * 2000, '"\\ud800"', '{"n": ' + "9" * 5000 + "}"]


@dataclass
class Report:
    inputs: int = 0
    streams: int = 0
    ends: collections.Counter[str] = field(default_factory=collections.Counter)
    replies: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: list[dict[str, str]] = field(default_factory=list)
    checks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finding(self, what: str, data: bytes) -> None:
        with self.lock:
            self.findings.append({"what": what[:300], "input_hex": data[:256].hex()})


class Corpus:
    """Valid requests built from real frames, and mutations of them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        from edgesplit.data import load_dataset
        from edgesplit.train.engine import build_split

        spec = TrainSpec()
        data = load_dataset(spec.data)
        torch.manual_seed(0)
        parts = build_split(spec, data.input_shape, data.num_classes)
        x = torch.from_numpy(np.ascontiguousarray(data.x_test[:8]))
        with torch.no_grad():
            act = parts.lowers[0](x)
        self.frames = {
            "act": TensorCodec.from_spec("fp32", measure_snr=False).encode(act),
            "act_q8": TensorCodec.from_spec("q8+zstd", measure_snr=False).encode(act),
            "labels": encode_labels(torch.from_numpy(data.y_test[:8]), data.num_classes),
            "weight": TensorCodec.from_spec("fp32", measure_snr=False).encode(
                next(iter(parts.server.parameters())).detach()
            ),
        }

    def valid(self, session: str, step: int) -> Message:
        r = self.rng
        # no BYE among the well-formed bases: a training client's BYE ends a 1-client run, after
        # which every training step is (rightly) refused and the step rules go unfuzzed; BYE
        # still comes up as a mutated kind
        kind = r.choice([Kind.HELLO, Kind.FORWARD, Kind.PREDICT, Kind.WEIGHTS])
        act = self.frames[r.choice(["act", "act_q8"])]
        if kind == Kind.HELLO:
            return Message(kind, session, "", 0, meta={"mode": r.choice(["train", "infer"]),
                                                       "runtime": "torch", "index": 0})
        if kind == Kind.FORWARD:
            return Message(kind, session, "", step, {"act": act, "labels": self.frames["labels"]},
                           {"train": True})
        if kind == Kind.PREDICT:
            return Message(kind, session, "", step, {"act": act})
        if kind == Kind.WEIGHTS:
            return Message(kind, session, "", step, {"w": self.frames["weight"]},
                           {"op": r.choice(["get", "put"]), "round": 1})
        return Message(kind, session, "", step)

    def envelope_bytes(self, msg: Message, meta_json: str | None = None) -> bytes:
        tensors = [split_pb2.Tensor(name=n, frame=f) for n, f in msg.tensors.items()]
        return split_pb2.Envelope(
            kind=msg.kind, session=msg.session, client=msg.client, step=msg.step,
            tensors=tensors,
            meta_json=meta_json if meta_json is not None else json.dumps(msg.meta),
        ).SerializeToString()

    def generate(self, session: str, step: int) -> bytes:
        r = self.rng
        choice = r.random()
        base = self.valid(session, step)
        if choice < 0.15:
            return self.envelope_bytes(base)
        if choice < 0.25:
            return r.randbytes(r.choice([0, 1, 2, 5, 16, 100, 1000]))
        if choice < 0.45:
            return _mutate_bytes(r, self.envelope_bytes(base))
        if choice < 0.60:
            name = r.choice(list(base.tensors) or ["act"])
            frame = self.frames[r.choice(list(self.frames))]
            base.tensors[name] = _mutate_bytes(r, frame) if r.random() < 0.8 else frame
            if r.random() < 0.2:
                base.tensors[r.choice(["labels", "act_ref", "", "a" * 300])] = r.randbytes(8)
            return self.envelope_bytes(base)
        if choice < 0.75:
            base.meta = {r.choice(META_KEYS): r.choice(META_VALUES) for _ in range(r.randint(0, 4))}
            return self.envelope_bytes(base)
        if choice < 0.85:
            return self.envelope_bytes(base, meta_json=r.choice(RAW_META))
        base.kind = r.choice(KINDS)
        base.step = r.choice([0, 1, step, step - 1, 2**64 - 1, 2**63, r.randint(0, 10**6)])
        base.session = r.choice([session, "", "s" * 300, "other", "\u00e9"])
        base.client = r.choice(["", "control", "someone-else"])
        return self.envelope_bytes(base)


def _mutate_bytes(r: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(r.randint(1, 4)):
        op = r.random()
        if not out:
            out += r.randbytes(4)
        elif op < 0.4:
            i = r.randrange(len(out))
            out[i] ^= 1 << r.randrange(8)
        elif op < 0.55:
            out[r.randrange(len(out))] = r.choice([0, 0xFF, 0x7F, 0x80])
        elif op < 0.75:
            del out[r.randrange(len(out)) :]
        elif op < 0.9:
            i = r.randrange(len(out))
            out[i:i] = r.randbytes(r.randint(1, 16))
        else:
            i, j = sorted(r.randrange(len(out)) for _ in range(2))
            out += out[i:j]
    return bytes(out)


class RawStream:
    """One Session stream carrying raw request bytes; replies and the end arrive on a queue."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        self.events: queue.Queue[Any] = queue.Queue()
        call = channel.stream_stream(SESSION_METHOD, request_serializer=None,
                                     response_deserializer=split_pb2.Envelope.FromString)
        self.call = call(self._iter(), metadata=[("authorization",
                                                  f"Bearer {TOKENS['fuzzer']}")])
        threading.Thread(target=self._read, daemon=True).start()

    def _iter(self) -> Iterator[bytes]:
        while (item := self._requests.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.events.put(reply)
            self.events.put(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            self.events.put(exc)

    def send(self, data: bytes) -> None:
        self._requests.put(data)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


def _worker(address: str, corpus: Corpus, n: int, deadline: float, timeout: float,
            report: Report, worker: int) -> None:
    with grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]) as channel:
        stream: RawStream | None = None
        session = f"fz{worker}-0"
        for i in range(n):
            if time.monotonic() > deadline:
                break
            if stream is None:
                stream = RawStream(channel)
                session = f"fz{worker}-{i}"
                last_kind = ""  # a reply of the previous reply's kind leaves its kind empty
                with report.lock:
                    report.streams += 1
                # a served session opens with HELLO (steps before it are refused), so the
                # mutated requests after it reach the step rules
                stream.send(corpus.envelope_bytes(
                    Message(Kind.HELLO, session, "", 0, meta={"mode": "train"})))
                try:
                    opened = stream.events.get(timeout=timeout)
                except queue.Empty:
                    opened = None
                if isinstance(opened, split_pb2.Envelope):
                    last_kind = opened.kind or last_kind
                else:
                    stream.close()
                    stream = None
                    continue
            data = corpus.generate(session, i + 1)
            stream.send(data)
            with report.lock:
                report.inputs += 1
            try:
                event = stream.events.get(timeout=timeout)
            except queue.Empty:
                report.finding(f"no reply or status within {timeout} s", data)
                stream.close()
                stream = None
                continue
            if isinstance(event, split_pb2.Envelope):
                code = ""
                kind = last_kind = event.kind or last_kind
                if kind == Kind.ERROR:
                    code = str(json.loads(event.meta_json or "{}").get("code", "?"))
                    if code == "INTERNAL":
                        report.finding(f"ERROR reply INTERNAL: {event.meta_json[:200]}", data)
                with report.lock:
                    report.replies[f"{kind}{':' + code if code else ''}"] += 1
                continue
            code = event if isinstance(event, grpc.StatusCode) else event.code()
            with report.lock:
                report.ends[code.name] += 1
            if code in BAD_CODES:
                report.finding(f"stream ended {code.name}: {event.details()}", data)
            stream.close()
            stream = None
        if stream is not None:
            stream.close()


def _control(address: str, step: int, frame: bytes) -> None:
    """A well-formed client and Status must still be answered."""
    with GrpcTransport(address, TOKENS["control"], timeout=30) as t:
        expect(t.request(Message(Kind.HELLO, "control", "", 0, meta={"mode": "infer"})),
               Kind.WELCOME)
        expect(t.request(Message(Kind.PREDICT, "control", "", step, {"act": frame})),
               Kind.PREDICTION)
    fetch_status(address, TOKENS["control"], timeout=30)


def start_server() -> RunningServer:
    server, _ = server_fresh(TrainSpec())
    server.wait_timeout = 2.0  # nothing here should make anyone wait long
    # the fuzzer trains (role=train: its status messages are refused); the control client also
    # reads Status (role=admin)
    admin = frozenset({Role.TRAIN, Role.ADMIN})
    tokens = {**TOKENS, "control": TokenGrant(TOKENS["control"], admin)}
    return serve_handler(server.handle, "127.0.0.1", 0, tokens=tokens, status=server.status)


def run_fuzz(inputs: int, seconds: float, seed: int = 0, workers: int = 2,
             reply_timeout: float = 20.0, check_every: int = 5000) -> dict[str, Any]:
    """Fuzz a fresh in-process server; return the JSON-able report (``findings`` empty = pass)."""
    torch.set_num_threads(1)
    # The server logs each refusal; at fuzzing rates that is only noise. Faults still count:
    # they end streams with INTERNAL, which the workers see.
    # (restored on the way out: the caller's process keeps its own logging)
    quiet = logging.getLogger("edgesplit")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return _fuzz(inputs, seconds, seed, workers, reply_timeout, check_every)
    finally:
        quiet.setLevel(level)


def _fuzz(inputs: int, seconds: float, seed: int, workers: int, reply_timeout: float,
          check_every: int) -> dict[str, Any]:
    running = start_server()
    address = f"127.0.0.1:{running.port}"
    report = Report()
    t0 = time.monotonic()
    deadline = t0 + seconds
    try:
        corpora = [Corpus(random.Random(seed * 1000 + w)) for w in range(workers)]
        control_frame = corpora[0].frames["act"]
        done = 0
        chunk = max(1, min(check_every, inputs))
        while done < inputs and time.monotonic() < deadline:
            per = [chunk // workers + (w < chunk % workers) for w in range(workers)]
            threads = [threading.Thread(target=_worker, args=(
                address, corpora[w], per[w], deadline, reply_timeout, report, w), daemon=True)
                for w in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(1.0, deadline - time.monotonic() + 2 * reply_timeout))
            done += chunk
            try:
                _control(address, 10**9 + report.checks, control_frame)
                report.checks += 1
            except Exception as exc:  # noqa: BLE001 - that is the finding
                report.finding(f"control client or Status failed: {exc}", b"")
                break
    finally:
        running.stop(None)
    rss = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    return {
        "inputs": report.inputs,
        "streams": report.streams,
        "seconds": round(time.monotonic() - t0, 1),
        "stream_ends": dict(report.ends),
        "replies": dict(report.replies),
        "control_checks": report.checks,
        "findings": len(report.findings),
        "first_findings": report.findings[:5],
        "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None,
        "seed": seed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000, help="requests to send in all")
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="concurrent fuzzing streams")
    parser.add_argument("--reply-timeout", type=float, default=20.0)
    parser.add_argument("--check-every", type=int, default=5000,
                        help="inputs between control-client checks")
    args = parser.parse_args()
    result = run_fuzz(args.inputs, args.seconds, args.seed, args.workers, args.reply_timeout,
                      args.check_every)
    print(json.dumps(result), flush=True)
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
