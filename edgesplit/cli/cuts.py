"""``edgesplit cuts``: the candidate cuts of a model for some data, with what each would send."""

from __future__ import annotations

import argparse
import math
from typing import Any


def add_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "cuts",
        formatter_class=formatter,
        help="list a model's candidate cuts: cut-tensor shape, bytes per sample, client FLOPs",
        description=(
            "List where a model can be cut for this data: for each candidate, the per-sample "
            "shape of the tensor that crosses the cut, its size at fp32 (what the fp32 codec "
            "sends per sample, before frame headers), and the client segment's parameters and "
            "FLOPs per sample (multiply-add = 2; modules only, element-wise functions in a "
            "custom forward are not counted).\n\n"
            "Built-in models (nn.Sequential): cuts after a non-linearity or pooling layer. Your "
            "own model: after a direct child, or a child of a direct nn.Sequential/ModuleList "
            "child (layer2.1, features.6), where the module's output is the only tensor the rest "
            "of forward uses (a cut inside a residual block is not a candidate).\n\n"
            "examples:\n"
            "  edgesplit cuts --data digits\n"
            "  edgesplit cuts --data my.npz --model my_models.py:build --json"
        ),
    )
    p.add_argument(
        "--data",
        default="digits",
        help="built-in dataset, an .npz with arrays x, y, or an image folder: fixes "
        "the input shape and the number of classes",
    )
    p.add_argument(
        "--model",
        default="auto",
        help="auto, mlp, cnn1d, cnn2d, or your factory file.py:build / package.module:build",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run)


def list_cuts(data: str, model: str) -> dict[str, Any]:
    """The candidate cuts of ``model`` for ``data`` with their costs (see the command help)."""
    import torch

    from edgesplit.data import load_dataset
    from edgesplit.errors import ConfigError
    from edgesplit.models import build_model
    from edgesplit.split.cut import check_chain, cut_model, valid_cuts
    from edgesplit.split.profile import profile_segment

    dataset = load_dataset(data)
    shape = tuple(dataset.input_shape)
    torch.manual_seed(0)
    net = build_model(model, shape, dataset.num_classes)
    check_chain(net, torch.from_numpy(dataset.x_train[:2]))
    total = profile_segment(net, shape)
    rows = []
    for name in valid_cuts(net, shape):
        client, _server = cut_model(net, name)
        prof = profile_segment(client, shape)
        rows.append(
            {
                "cut": name,
                "shape": prof.output_shape,
                "bytes_per_sample_fp32": 4 * math.prod(prof.output_shape),
                "client_params": prof.params,
                "client_flops": prof.flops,
                "client_flops_share": prof.flops / total.flops if total.flops else 0.0,
            }
        )
    if not rows:
        raise ConfigError(
            f"model {model!r} has no candidate cut for {dataset.name} (input "
            f"{list(shape)}): no module whose output alone carries forward"
        )
    return {
        "data": dataset.name,
        "model": model,
        "input_shape": list(shape),
        "input_bytes_per_sample_fp32": 4 * math.prod(shape),
        "params": total.params,
        "flops": total.flops,
        "cuts": rows,
    }


def run(args: argparse.Namespace) -> int:
    from edgesplit.cli.common import human_bytes, print_json

    report = list_cuts(args.data, args.model)
    if args.json:
        print_json(report)
        return 0
    from rich.table import Table

    from edgesplit.cli.console import console

    size = human_bytes(report["input_bytes_per_sample_fp32"])
    table = Table(
        title=f"cuts of {args.model} for {report['data']} (input "
        f"{report['input_shape']}, {size}/sample)"
    )
    for col in ("cut", "cut tensor", "fp32 bytes/sample", "client params", "client FLOPs"):
        table.add_column(col, justify="left" if col == "cut" else "right")
    for row in report["cuts"]:
        table.add_row(
            row["cut"],
            "×".join(map(str, row["shape"])),
            f"{row['bytes_per_sample_fp32']:,}",
            f"{row['client_params']:,}",
            f"{row['client_flops']:,} ({100 * row['client_flops_share']:.0f}%)",
        )
    console().print(table)
    return 0
