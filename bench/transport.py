"""Split training over real gRPC on loopback vs the in-process transport: same model, same
codec, same batches, one run. Prints one JSON line per transport and one with the ratios.

    python bench/transport.py [--codec q8+zstd] [--epochs 3] [--clients 1]

Both runs go through the same engine and the same frames; the gRPC run adds protobuf
envelopes, HTTP/2 and the loopback socket. Throughput is training samples per second of wall
time (the test-set evaluation is excluded from neither: it is the same in both).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.grpc_client import GrpcTransport
from edgesplit.transport.grpc_server import serve_handler


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codec", default="q8+zstd")
    parser.add_argument("--grad-codec", default="fp32")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--data", default="digits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = TrainSpec(
        data=args.data,
        clients=args.clients,
        epochs=args.epochs,
        codec=args.codec,
        grad_codec=args.grad_codec,
    )
    servers = []
    transports: list[GrpcTransport] = []

    def grpc_factory(handler, name):  # noqa: ANN001, ANN202 - engine callback
        if not servers:
            servers.append(serve_handler(handler, "127.0.0.1", 0))
        transport = GrpcTransport(f"127.0.0.1:{servers[0].port}", None)
        transports.append(transport)
        return transport

    # warm both paths up (dataset load, first torch kernels, channel set-up) before timing
    warm = TrainSpec(data=args.data, clients=args.clients, epochs=1, codec=args.codec)
    run_training(warm)
    run_training(warm, transport_factory=grpc_factory)
    for t in transports:
        t.close()
    servers.pop().stop()   # the next run must serve its own, fresh SplitServer
    transports.clear()
    rows = {}
    for name, factory in (("inprocess", None), ("grpc", grpc_factory)):
        start = time.perf_counter()
        result = run_training(spec, transport_factory=factory).result
        seconds = time.perf_counter() - start
        samples = result.train_samples * result.epochs
        row = {
            "transport": name,
            "codec": result.codec,
            "epochs": result.epochs,
            "samples": samples,
            "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1),
            "bytes_up_per_sample": round(result.bytes_up / samples, 2),
            "bytes_down_per_sample": round(result.bytes_down / samples, 2),
            "accuracy": round(result.accuracy, 4),
        }
        if name == "grpc":
            row["wire_bytes_up_per_sample"] = round(
                sum(t.wire_bytes_up for t in transports) / samples, 2
            )
            row["wire_bytes_down_per_sample"] = round(
                sum(t.wire_bytes_down for t in transports) / samples, 2
            )
        rows[name] = row
        print(json.dumps(row))
    for t in transports:
        t.close()
    for s in servers:
        s.stop()
    print(
        json.dumps(
            {
                "metric": "grpc_vs_inprocess",
                "throughput_ratio": round(
                    rows["grpc"]["samples_per_s"] / rows["inprocess"]["samples_per_s"], 3
                ),
                "frame_bytes_equal": rows["grpc"]["bytes_up_per_sample"]
                == rows["inprocess"]["bytes_up_per_sample"],
                "envelope_overhead_up": round(
                    rows["grpc"]["wire_bytes_up_per_sample"] / rows["grpc"]["bytes_up_per_sample"],
                    3,
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
