"""Load test: many concurrent inference clients against one ``edgesplit serve`` with its defaults.

Starts ``edgesplit serve --data digits --config vanilla`` (default limits, one token per client)
on 127.0.0.1, then runs ``--clients`` threads, each with its own token and gRPC connection, that
open a session (HELLO) and send PREDICT requests (one batch of cut activations each, computed
once by the real lower segment and encoded with the server's codec) until ``--seconds`` pass.
Prints one JSON line: requests, errors (by kind), requests/s, latency p50/p99, server peak RSS.
Exits 1 when any request failed.

    .venv/bin/python bench/load.py                  # 64 clients, 20 s
    .venv/bin/python bench/load.py --clients 8 --seconds 5

Everything is bounded: the run stops after ``--seconds`` (plus one reply timeout) or
``--max-requests`` per client, and only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from edgesplit.data import load_dataset
from edgesplit.train.engine import build_split
from edgesplit.train.frames import TensorCodec
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.grpc_client import GrpcTransport
from edgesplit.transport.tokens import generate_token
from edgesplit.wire.messages import Kind, Message, expect

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib(pid: int, field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, MiB (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def start_server(tokens: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgesplit.cli.main", "serve", "--data", "digits", "--config",
         "vanilla", "--tokens", str(tokens), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT, env=env,
    )
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"serve exited: {log.read_text()[-2000:]}")
        match = re.search(r"listening on (\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise SystemExit("serve did not start within 120 s")


def activation_frame(batch: int) -> bytes:
    """PREDICT's ``act``: a real batch through the real lower segment, encoded like a client."""
    spec = TrainSpec()
    data = load_dataset(spec.data)
    torch.manual_seed(spec.seed)
    parts = build_split(spec, data.input_shape, data.num_classes)
    with torch.no_grad():
        act = parts.lowers[0](torch.from_numpy(np.ascontiguousarray(data.x_test[:batch])))
    return TensorCodec.from_spec(spec.codec).encode(act)


def client_loop(
    address: str, name: str, token: str, frame: bytes, start: threading.Barrier,
    deadline_box: list[float], max_requests: int, latencies: list[float],
    errors: collections.Counter[str],
) -> None:
    try:
        with GrpcTransport(address, token, timeout=30.0) as transport:
            session = f"load-{name}"
            hello = Message(Kind.HELLO, session, "", 0, meta={"mode": "infer", "runtime": "bench"})
            expect(transport.request(hello), Kind.WELCOME)
            start.wait(60)
            step = 0
            while time.monotonic() < deadline_box[0] and step < max_requests:
                step += 1
                t0 = time.perf_counter()
                reply = transport.request(Message(Kind.PREDICT, session, "", step, {"act": frame}))
                expect(reply, Kind.PREDICTION)
                latencies.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - counted and reported, that is the point
        errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=32, help="samples per PREDICT")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per client")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = {f"client-{i}": generate_token() for i in range(args.clients)}
        token_file = Path(tmp) / "tokens.txt"
        token_file.write_text("".join(f"{n} {t}\n" for n, t in tokens.items()))
        token_file.chmod(0o600)
        server, address = start_server(token_file, Path(tmp) / "serve.err")
        try:
            rss_start = _rss_mib(server.pid, "VmRSS")
            frame = activation_frame(args.batch)
            latencies: list[float] = []
            errors: collections.Counter[str] = collections.Counter()
            start = threading.Barrier(args.clients + 1)
            deadline_box = [float("inf")]
            threads = [
                threading.Thread(
                    target=client_loop,
                    args=(address, name, token, frame, start, deadline_box, args.max_requests,
                          latencies, errors),
                    daemon=True,
                )
                for name, token in tokens.items()
            ]
            for t in threads:
                t.start()
            start.wait(120)
            t0 = time.monotonic()
            deadline_box[0] = t0 + args.seconds
            for t in threads:
                t.join(max(0.0, deadline_box[0] + 35 - time.monotonic()))
            elapsed = time.monotonic() - t0
            hung = sum(t.is_alive() for t in threads)
            if hung:
                errors["client still waiting at the end"] += hung
            peak = _rss_mib(server.pid, "VmHWM")
            rss_end = _rss_mib(server.pid, "VmRSS")
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    lat_ms = np.array(latencies) * 1e3
    result = {
        "clients": args.clients,
        "seconds": round(elapsed, 2),
        "batch": args.batch,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "samples_per_s": round(len(latencies) * args.batch / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 2) if len(lat_ms) else None,
        "latency_ms_p99": round(float(np.percentile(lat_ms, 99)), 2) if len(lat_ms) else None,
        "server_rss_mib_start": round(rss_start, 1),
        "server_rss_mib_end": round(rss_end, 1),
        "server_peak_rss_mib": round(peak, 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
