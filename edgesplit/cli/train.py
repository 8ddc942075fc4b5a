"""``edgesplit train``: split training in one process, through the real codecs and frames."""

from __future__ import annotations

import argparse

from edgesplit.cli.common import (
    add_training_options,
    human_bytes,
    print_json,
    set_threads,
    spec_from_args,
)


def add_parser(
    sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]
) -> None:
    p = sub.add_parser(
        "train",
        formatter_class=formatter,
        help="split training in one process (real codecs, real frames)",
        description="Train a split model in one process. Every cut tensor is encoded to a real "
        "frame and decoded on the other side; byte counts are frame lengths.\n\n"
        "example: edgesplit train --data digits --clients 3 --codec q4+zstd "
        "--save runs/digits",
    )
    add_training_options(p)
    p.add_argument(
        "--save",
        metavar="PATH",
        default=None,
        help="write a checkpoint directory that export and serve can load",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgesplit.cli.progress import epoch_progress
    from edgesplit.train.checkpoint import save_checkpoint
    from edgesplit.train.engine import run_training

    set_threads(args)
    spec = spec_from_args(args)
    label = f"{spec.config} {spec.codec}"
    with epoch_progress(label, spec.epochs, quiet=args.json, per_epoch=True) as progress:
        trained = run_training(spec, on_epoch=progress, on_step=progress.step)
    saved = save_checkpoint(args.save, trained) if args.save else None
    result = trained.result
    if args.json:
        out = result.to_json()
        out["checkpoint"] = str(saved) if saved else None
        print_json(out)
        return 0
    print_result_table(result, trained.dataset.name)
    if saved:
        print(f"checkpoint written to {saved}  (next: edgesplit export --from {saved})")
    return 0


def print_result_table(result, dataset: str) -> None:  # noqa: ANN001 - TrainResult, lazy import
    from rich.console import Console
    from rich.table import Table

    samples = max(result.train_samples * result.epochs, 1)
    table = Table(
        title=f"{result.config} on {dataset}: cut {result.cut_shape}, "
        f"{len(result.clients)} client(s)"
    )
    for col in ("client", "bytes up", "bytes down", "up fp32", "down fp32", "ratio up",
                "weights ↑/↓"):
        table.add_column(col, justify="right")
    for c in result.clients:
        ratio = c.bytes_up_fp32 / c.bytes_up if c.bytes_up else float("nan")
        table.add_row(
            c.client,
            human_bytes(c.bytes_up),
            human_bytes(c.bytes_down),
            human_bytes(c.bytes_up_fp32),
            human_bytes(c.bytes_down_fp32),
            f"{ratio:.1f}×",
            f"{human_bytes(c.weights_up)} / {human_bytes(c.weights_down)}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"test accuracy [bold]{result.accuracy:.4f}[/]  loss {result.loss:.4f}  "
        f"codec {result.codec} (↑ {result.ratio_up:.1f}× fewer bytes than fp32, "
        f"{result.bytes_up / samples:.1f} B/sample)  grad codec {result.grad_codec} "
        f"(↓ {result.ratio_down:.1f}×)  SNR {result.snr_db:.1f} dB"
    )
