"""Options and output helpers shared by several subcommands (standard library only at import)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_training_options(parser: argparse.ArgumentParser, *, epochs: int = 10) -> None:
    """The options that describe a split training run (see :class:`edgesplit.train.TrainSpec`)."""
    g = parser.add_argument_group("data and model")
    g.add_argument(
        "--data",
        default="digits",
        help="built-in dataset (digits, digits_images, breast_cancer), an .npz with arrays x, y "
        "[, x_test, y_test], or an image folder root/<class>/<image>",
    )
    g.add_argument(
        "--model",
        default="auto",
        help="auto (MLP for (N,F), 1-D CNN for (N,C,L), 2-D CNN for images), mlp, "
        "cnn1d, cnn2d, or your factory file.py:build / package.module:build",
    )
    g.add_argument(
        "--cut",
        default=None,
        help="layer to cut after (ushape: two, 'first,second'); default: the family's default "
        "cut (with --bottleneck: after the feature extractor, e.g. flatten of a CNN)",
    )
    g = parser.add_argument_group("split learning")
    g.add_argument(
        "--config",
        default="vanilla",
        help="vanilla, ushape (labels stay on the client), vertical (parties hold "
        "different features), splitfed (parallel clients + FedAvg)",
    )
    g.add_argument(
        "--clients",
        type=int,
        default=1,
        help="clients (vanilla, ushape, splitfed) or parties (vertical, ≥ 2)",
    )
    g.add_argument(
        "--feature-split",
        default=None,
        help="vertical: feature blocks per party, e.g. 0:10,10:30 (default: equal "
        "contiguous blocks)",
    )
    g.add_argument(
        "--bottleneck",
        default=None,
        metavar="D[:BITS[:RATE]]",
        help="learned bottleneck at the cut: D channels at BITS fixed-range bits (default 2), "
        "RATE weighs a penalty on the codes' entropy after a warm-up (default 0.01; 0: off); "
        "encoder exported in client.onnx, decoder on the server, e.g. 16:2 (default: none)",
    )
    g.add_argument(
        "--codec",
        default=None,
        help="codec for activations, e.g. fp32, fp16, q8+zstd, q4+zstd, topk:0.1+q8+zstd "
        "(default: fp32; with --bottleneck D:B, fq:B,ans — fixed levels, entropy-coded)",
    )
    g.add_argument(
        "--grad-codec",
        default=None,
        help="codec for gradients (default: fp32; with --bottleneck, q4:stochastic)",
    )
    g.add_argument(
        "--defense",
        default=None,
        help="privacy defenses joined by '+': noise:SIGMA[:CLIP] (clip the cut, add noise while "
        "training), nopeek:ALPHA (dCor loss), gradnoise:SIGMA (label-leak defense on returned "
        "gradients); see docs/privacy.md (default: none)",
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the training data")
    g.add_argument("--batch-size", type=int, default=32, help="samples per step")
    g.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (momentum 0.9)")
    g.add_argument("--seed", type=int, default=0, help="random seed (weights, batch order)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; small split models are fastest on one, raise "
                        "it for large CNNs")


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (torch must be importable: training commands only)."""
    import torch

    torch.set_num_threads(max(1, args.threads))


def spec_from_args(args: argparse.Namespace) -> Any:
    from edgesplit.split.bottleneck import default_codecs
    from edgesplit.train.spec import TrainSpec

    codec, grad_codec = default_codecs(args.bottleneck)
    return TrainSpec(
        data=args.data,
        config=args.config,
        clients=args.clients,
        model=args.model,
        cut=args.cut,
        codec=args.codec or codec,
        grad_codec=args.grad_codec or grad_codec,
        bottleneck=args.bottleneck,
        defense=args.defense,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        feature_split=args.feature_split,
    )


def print_json(obj: Any) -> None:
    """One JSON object on stdout (strict JSON: no NaN/inf)."""
    from edgesplit.train.spec import jsonable

    json.dump(jsonable(obj), sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
