"""``edgesplit client --trainable``: a torch client that trains its own lower layers over gRPC
(the loop itself is :func:`edgesplit.train.remote.train_remote`)."""

from __future__ import annotations

import argparse


def run_trainable_client(args: argparse.Namespace) -> int:
    """``edgesplit client --trainable``: train over gRPC, print a table or one JSON object."""
    import torch

    from edgesplit.cli.client import open_transport
    from edgesplit.cli.common import print_json
    from edgesplit.cli.progress import epoch_progress
    from edgesplit.train.remote import train_remote

    torch.set_num_threads(1)
    transport = open_transport(args)
    with (
        transport,
        epoch_progress(f"client-{args.index}", args.epochs or 0, quiet=args.json) as progress,
    ):
        report = train_remote(
            transport,
            args.data,
            index=args.index,
            clients=args.clients,
            epochs=args.epochs,
            config=args.config,
            initial_weights=args.source,
            session=args.session,
            shard=args.shard,
            on_epoch=progress,
        )
    report["reconnects"] = getattr(transport, "reconnects", 0)
    report["resends"] = getattr(transport, "resends", 0)
    if args.json:
        print_json(report)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['client']} ({report['config']}, {report['codec']})")
    for key in (
        "accuracy",
        "loss",
        "samples",
        "bytes_up",
        "bytes_down",
        "ratio_up",
        "weights_up",
        "weights_down",
        "samples_per_s",
        "reconnects",
    ):
        value = report[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    return 0
