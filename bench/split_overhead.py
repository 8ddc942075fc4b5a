"""Time per training step: in-process split training (fp32 codecs, real frames through the
in-process transport) vs the same model trained centrally on the same batches, one run.

Prints JSON lines; the last one holds the ratio. Aim: ratio ≤ 1.3 on a model of ≥ 1 M params.

    python bench/split_overhead.py [--steps 200] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

from edgesplit.models import mlp
from edgesplit.split.cut import cut_model
from edgesplit.train.client import SplitClient
from edgesplit.train.server import SplitServer
from edgesplit.transport.inprocess import InProcessTransport


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps per mode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--codec", default="fp32")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # same thread budget for both modes: compare work, not scheduling
    model = mlp((args.features,), 10, hidden=args.hidden)
    params = sum(p.numel() for p in model.parameters())
    central = copy.deepcopy(model)
    lower, upper = cut_model(model, "relu1")
    server = SplitServer("vanilla", upper, codec=args.codec, grad_codec=args.codec)
    client = SplitClient(
        "bench",
        lower,
        InProcessTransport(server.handle),
        codec=args.codec,
        grad_codec=args.codec,
        num_classes=10,
        measure_snr=False,
    )
    opt = torch.optim.SGD(central.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(args.batch_size, args.features, generator=gen),
            torch.randint(0, 10, (args.batch_size,), generator=gen),
        )
        for _ in range(16)
    ]

    def central_step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        loss_fn(central(x), y).backward()
        opt.step()

    times: dict[str, list[float]] = {"central": [], "split": []}
    for step in range(args.steps + 20):  # the first 20 steps warm up both
        x, y = data[step % len(data)]
        for mode, fn in (("central", central_step), ("split", client.train_step)):
            start = time.perf_counter()
            fn(x, y)
            if step >= 20:
                times[mode].append(time.perf_counter() - start)
    med = {mode: statistics.median(t) for mode, t in times.items()}
    for mode, t in med.items():
        print(
            json.dumps(
                {
                    "mode": mode,
                    "params": params,
                    "batch_size": args.batch_size,
                    "codec": args.codec,
                    "step_ms_median": round(t * 1e3, 4),
                }
            )
        )
    print(
        json.dumps(
            {
                "metric": "split_overhead_ratio",
                "ratio": round(med["split"] / med["central"], 3),
                "params": params,
                "aim": 1.3,
                "meets_aim": med["split"] / med["central"] <= 1.3,
            }
        )
    )


if __name__ == "__main__":
    main()
