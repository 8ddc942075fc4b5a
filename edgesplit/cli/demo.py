"""``edgesplit demo``: the main job on built-in data, start to finish."""

from __future__ import annotations

import argparse

DEMO_CODECS = ("fp32", "q8+zstd", "q4+zstd", "q2+zstd")


def add_parser(sub: argparse._SubParsersAction, formatter: type) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=formatter,
        help="train on digits with three clients and compare codecs",
        description="Split-train an MLP on scikit-learn's digits with three clients (vanilla "
        "SplitNN) once per codec, and print accuracy and bytes per sample.",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs per codec")
    p.add_argument("--clients", type=int, default=3, help="clients taking turns")
    p.add_argument("--codecs", default=",".join(DEMO_CODECS), help="codecs to compare")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgesplit.cli.common import print_json
    from edgesplit.cli.progress import epoch_progress
    from edgesplit.train.engine import run_training
    from edgesplit.train.spec import TrainSpec

    import torch

    torch.set_num_threads(1)  # the demo's MLP is fastest single-threaded
    rows = []
    for codec in args.codecs.split(","):
        spec = TrainSpec(
            data="digits", config="vanilla", clients=args.clients, codec=codec, epochs=args.epochs
        )
        with epoch_progress(f"{codec:>8}", spec.epochs, quiet=args.json) as progress:
            result = run_training(spec, on_epoch=progress).result
        samples = result.train_samples * result.epochs
        rows.append(
            {
                "codec": result.codec,
                "accuracy": result.accuracy,
                "bytes_up_per_sample": result.bytes_up / samples,
                "bytes_down_per_sample": result.bytes_down / samples,
                "ratio_up": result.ratio_up,
                "snr_db": result.snr_db,
            }
        )
    if args.json:
        print_json(
            {"dataset": "digits", "config": "vanilla", "clients": args.clients, "rows": rows}
        )
        return 0
    table = Table(title=f"digits, vanilla SplitNN, {args.clients} clients, {args.epochs} epochs")
    for col in (
        "codec",
        "test accuracy",
        "bytes/sample ↑",
        "bytes/sample ↓",
        "ratio ↑ vs fp32",
        "SNR dB",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["codec"],
            f"{r['accuracy']:.4f}",
            f"{r['bytes_up_per_sample']:.1f}",
            f"{r['bytes_down_per_sample']:.1f}",
            f"{r['ratio_up']:.1f}×",
            f"{r['snr_db']:.1f}",
        )
    Console().print(table)
    return 0
