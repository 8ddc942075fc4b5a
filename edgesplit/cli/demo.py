"""``edgesplit demo``: the whole story on built-in data.

1. split-train on digits with three clients once per codec, in one process: accuracy and bytes;
2. train the deployment model, save a checkpoint and export the client segment to ONNX;
3. start ``edgesplit serve`` on loopback and run the edge client in a separate process with
   torch blocked, once per codec, with probes that measure what compression costs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEMO_CODECS = ("fp32", "q8+zstd", "q4+zstd", "q2+zstd")

#: Runs a CLI command in a fresh interpreter where ``import torch`` (and onnx) fails: the proof
#: that the edge client needs neither.
TORCH_FREE = (
    "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
    "from edgesplit.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def add_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=formatter,
        help="the whole story on digits: train, compare codecs, export, serve, edge client",
        description=__doc__,
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs per training run")
    p.add_argument("--clients", type=int, default=3, help="clients taking turns (vanilla)")
    p.add_argument("--codecs", default=",".join(DEMO_CODECS), help="codecs to compare")
    p.add_argument(
        "--deploy-codec",
        default="q4+zstd",
        help="codec the deployment model is trained and exported with",
    )
    p.add_argument(
        "--out", default="runs/demo", help="where checkpoint, tokens, data and metrics go"
    )
    p.add_argument("--bundle", default="export/out/digits-demo", help="bundle directory")
    p.add_argument(
        "--no-deploy",
        action="store_true",
        help="stop after the in-process codec table (skip export, serve, edge)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from edgesplit.cli.common import print_json

    torch.set_num_threads(1)  # the demo's MLP is fastest single-threaded
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    rows = _codec_table(args, codecs)
    doc: dict[str, Any] = {
        "dataset": "digits",
        "config": "vanilla",
        "clients": args.clients,
        "rows": rows,
    }
    if not args.no_deploy:
        doc["deployment"] = _deploy(args, codecs)
    if args.json:
        print_json(doc)
    return 0


def _codec_table(args: argparse.Namespace, codecs: list[str]) -> list[dict[str, Any]]:
    from rich.table import Table

    from edgesplit.cli.console import console as make_console
    from edgesplit.cli.progress import epoch_progress
    from edgesplit.train.engine import run_training
    from edgesplit.train.spec import TrainSpec

    rows = []
    for codec in codecs:
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
    if not args.json:
        table = Table(
            title=f"1. split training in one process: digits, vanilla SplitNN, "
            f"{args.clients} clients, {args.epochs} epochs"
        )
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
                str(r["codec"]),
                f"{r['accuracy']:.4f}",
                f"{r['bytes_up_per_sample']:.1f}",
                f"{r['bytes_down_per_sample']:.1f}",
                f"{r['ratio_up']:.1f}×",
                f"{r['snr_db']:.1f}",
            )
        make_console().print(table)
    return rows


def _deploy(args: argparse.Namespace, codecs: list[str]) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    import numpy as np
    from rich.table import Table

    from edgesplit.cli.console import console as make_console
    from edgesplit.data import load_dataset
    from edgesplit.errors import EdgesplitError
    from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
    from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
    from edgesplit.train.engine import run_training
    from edgesplit.train.spec import TrainSpec
    from edgesplit.transport.tokens import generate_token

    console = make_console(stderr=args.json)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"\n2. training the deployment model ({args.deploy_codec}) and exporting its "
        "client segment to ONNX …"
    )
    trained = run_training(
        TrainSpec(data="digits", clients=args.clients, epochs=args.epochs, codec=args.deploy_codec)
    )
    checkpoint = save_checkpoint(out / "checkpoint", trained)
    report = export_bundle(
        SplitModel.from_checkpoint(load_checkpoint(checkpoint), trained.dataset),
        args.bundle,
        ExportOptions(name="digits-demo", force=True),
    )
    parity = report.manifest["parity"]
    console.print(
        f"   bundle {report.bundle} (client.onnx opset {report.manifest['opset']}, "
        f"parity max abs err {parity['max_abs']:.1e}: "
        f"{'pass' if parity['passed'] else 'FAIL'}); server segment {report.server}"
    )

    # what a device holds: its own data as .npz, and its token
    data = load_dataset("digits")
    device_data = out / "device-digits.npz"
    np.savez(device_data, x=data.x_train, y=data.y_train, x_test=data.x_test, y_test=data.y_test)
    token = generate_token()
    tokens = out / "tokens.txt"
    tokens.write_text(f"edge-device {token}\n")
    tokens.chmod(0o600)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)

    console.print(
        "3. serving the upper layers on loopback; the edge client runs in its own "
        "process with torch blocked …"
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgesplit.cli.main",
            "serve",
            "--from",
            str(report.server),
            "--port",
            "0",
            "--tokens",
            str(tokens),
            "--metrics",
            str(metrics),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    results = []
    try:
        line = server.stdout.readline() if server.stdout else ""
        if "listening on" not in line:
            err = server.stderr.read() if server.stderr else ""
            raise EdgesplitError(f"serve did not start: {err[-500:]}")
        address = line.split("listening on", 1)[1].strip()
        for mode, codec in [("train", args.deploy_codec)] + [("infer", c) for c in codecs]:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    TORCH_FREE,
                    "client",
                    "--bundle",
                    str(report.bundle),
                    "--server",
                    address,
                    "--token",
                    token,
                    "--data",
                    str(device_data),
                    "--mode",
                    mode,
                    "--codec",
                    codec,
                    "--probe-every",
                    "5",
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise EdgesplitError(f"edge client failed: {proc.stderr.strip()[-500:]}")
            r = json.loads(proc.stdout)
            r["mode"] = mode
            results.append(r)
    finally:
        server.terminate()
        server.wait(timeout=30)
    table = Table(title="3. edge client (ONNX Runtime, no torch) → gRPC → server on loopback")
    for col in (
        "mode",
        "codec",
        "samples",
        "accuracy",
        "bytes/sample ↑",
        "bytes/sample ↓",
        "fp32 probes ↑",
        "ms/batch compute",
        "encode",
        "network",
    ):
        table.add_column(col, justify="right")
    for r in results:
        lat = r["latency_ms"]
        table.add_row(
            r["mode"],
            r["codec"],
            str(r["samples"]),
            f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "-",
            # the fp32 probe copies are reported apart: they measure the codec, they are not it
            f"{(r['bytes_up'] - r['bytes_probe']) / r['samples']:.1f}",
            f"{r['bytes_down'] / r['samples']:.1f}",
            f"{r['bytes_probe'] / r['samples']:.1f}",
            f"{lat['compute']:.2f}",
            f"{lat['encode']:.2f}",
            f"{lat['network']:.2f}",
        )
    console.print(table)
    probes = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    console.print(
        f"bundle: {report.bundle}   server segment: {report.server}\n"
        f"checkpoint: {checkpoint}   probe metrics ({len(probes)} lines): {metrics}\n"
        f"next: edgesplit evaluate --data digits --out runs/evaluate"
    )
    return {
        "checkpoint": str(checkpoint),
        "bundle": str(report.bundle),
        "server": str(report.server),
        "metrics": str(metrics),
        "edge": results,
        "probes": len(probes),
    }
