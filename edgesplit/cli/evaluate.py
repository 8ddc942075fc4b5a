"""``edgesplit evaluate``: sweep cuts x codecs, measure accuracy, bytes and distortion, model the
latency per device x link, and recommend a configuration within an accuracy budget.

Standard library only at import; the sweep (torch, matplotlib, rich) is imported in :func:`run`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from edgesplit.errors import ConfigError

#: Defaults shared with :class:`edgesplit.evaluate.sweep.SweepArgs` (kept here so ``--help``
#: needs no heavy import; a test checks the two agree).
DEFAULT_CODECS = "fp32,fp16,q8+zstd,q4+zstd,q2+zstd,q1+zstd,topk:0.1+q8+zstd"
DEFAULT_FL_CLIENTS = "10,100,500"
#: Codec stage names, used to split ``--codecs`` on commas that separate codecs and not the
#: parameters of one stage (``q4:channel,stochastic+zstd``).
STAGE_NAMES = ("fp32", "fp16", "bf16", "q8", "q4", "q2", "q1", "topk", "zstd")

DESCRIPTION = """\
Train every cut x codec (x seeds) through the in-process engine and record accuracy (mean and
std), real frame bytes per sample up and down, the ratio vs fp32, the distortion (SNR dB),
client parameters, FLOPs and memory, and measured encode/decode time. A latency model
(Neurosurgeon-style) turns them into a time per step for every device x link in devices/, the
Pareto frontier of accuracy vs bytes is marked, and for each device x link the configuration
with the lowest latency (or fewest bytes) within --max-drop points of the best fp32 accuracy is
recommended.

Writes results.json, results.csv, report.md, accuracy_vs_bytes.png and latency.png to --out.
Finished cells are cached in --out/.cache: rerunning the same command resumes an interrupted
sweep and re-uses every finished cell (changing --devices, --links, --max-drop or --objective
re-uses them all).
"""


def add_parser(
    subparsers: Any, formatter_class: type[argparse.HelpFormatter] | None = None
) -> argparse.ArgumentParser:
    """Register ``evaluate`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "evaluate",
        help="sweep cuts x codecs: accuracy, bytes, latency per device x link",
        description=DESCRIPTION,
        formatter_class=formatter_class or argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--data",
        default="digits",
        help="built-in dataset (digits, digits_images, breast_cancer), an .npz with arrays x, y "
        "[, x_test, y_test], or an image folder",
    )
    g.add_argument(
        "--config",
        default="vanilla",
        help="split configuration: vanilla, ushape, vertical, splitfed",
    )
    g.add_argument(
        "--model",
        default="auto",
        help="auto, mlp, cnn1d, cnn2d, or a factory file.py:build / package.module:build",
    )
    g.add_argument(
        "--cuts",
        default=None,
        help="comma-separated layers to cut after (ushape: pairs 'a,b;c,d'); "
        "default: every valid cut of the model that leaves the client a layer "
        "with parameters",
    )
    g.add_argument(
        "--codecs",
        default=DEFAULT_CODECS,
        help="comma-separated activation codec specs (';' also separates); "
        "ACT/GRAD sets the gradient codec of that cell too, e.g. "
        "q4+zstd/q4+zstd; bn:D:BITS[:RATE] trains a learned bottleneck of D channels at "
        "BITS bits at the cut (its codecs fq:BITS,ans up, q4:stochastic down), e.g. bn:16:2",
    )
    g.add_argument(
        "--grad-codec",
        default="fp32",
        help="codec for the gradients sent down (cells without /GRAD)",
    )
    g.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="training seeds per cut x codec (accuracy std needs >= 2)",
    )
    g.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed, seed+1, ...)")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    g.add_argument("--batch-size", type=int, default=32, help="samples per step")
    g.add_argument("--lr", type=float, default=0.02, help="SGD learning rate")
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; small split models are fastest on one",
    )
    g.add_argument("--clients", type=int, default=1, help="clients (or parties for vertical)")
    g.add_argument(
        "--feature-split", default=None, help="vertical: feature blocks per party, e.g. 0:10,10:30"
    )

    g.add_argument(
        "--defense",
        default=None,
        help="privacy defenses at the cut, joined by '+': noise:SIGMA[:CLIP], "
        "nopeek:ALPHA, gradnoise:SIGMA (see docs/privacy.md)",
    )

    g = p.add_argument_group("how to judge it")
    g.add_argument(
        "--privacy",
        nargs="?",
        const="on",
        default=None,
        choices=("on", "full"),
        help="per cut x codec (first seed only): inversion attack (MSE/PSNR/SSIM vs "
        "the mean-input baseline), bias-corrected dCor, and norm/cosine "
        "label-leak attacks on the returned gradients (max AUC over epochs); "
        "'--privacy full' adds the query-free attack (a shadow client trained "
        "through the frozen server)",
    )
    g.add_argument(
        "--privacy-aux",
        type=float,
        default=0.2,
        help="the inversion attacker's data: this fraction of the training data",
    )
    g.add_argument(
        "--max-psnr",
        type=float,
        default=None,
        help="leakage budget (needs --privacy): recommend only cells whose "
        "inversion PSNR is at most this many dB",
    )
    g.add_argument(
        "--max-label-auc",
        type=float,
        default=None,
        help="leakage budget (needs --privacy): recommend only cells whose "
        "label-leak AUC (max over epochs) is at most this",
    )
    g.add_argument(
        "--devices",
        default=None,
        help="comma-separated device profiles (names in devices/ or .toml paths); "
        "default: every client profile in devices/",
    )
    g.add_argument(
        "--links", default=None, help="comma-separated links from devices/links.toml; default: all"
    )
    g.add_argument(
        "--server-device",
        default="server-cpu",
        help="profile of the server running the server segment",
    )
    g.add_argument(
        "--host-device",
        default="server-cpu",
        help="profile of this machine, to scale measured encode/decode times to the devices",
    )
    g.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        help="accuracy budget: points below the best fp32 accuracy over all cuts",
    )
    g.add_argument(
        "--objective",
        choices=("latency", "bytes"),
        default="latency",
        help="what a recommendation minimises within the budget",
    )
    g.add_argument(
        "--latency-mode",
        choices=("train", "infer"),
        default="train",
        help="model a training step (activations up, gradients down) or an "
        "inference request (activations up, predictions down)",
    )
    g.add_argument(
        "--latency-batch",
        type=int,
        default=None,
        help="samples per modelled step; default: --batch-size for train, 1 for infer",
    )
    g.add_argument(
        "--compare-fl",
        action="store_true",
        help="add the SplitNN vs FedAvg per-client compute/communication comparison",
    )
    g.add_argument(
        "--fl-clients", default=DEFAULT_FL_CLIENTS, help="client counts for --compare-fl"
    )
    g.add_argument(
        "--fl-codec",
        default=None,
        help="codec for --compare-fl; default: the frontier codec with the fewest "
        "bytes within the budget",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default="runs/evaluate",
        help="output folder (results.json, results.csv, report.md, plots, .cache)",
    )
    g.add_argument(
        "--json", action="store_true", help="print results.json as one JSON object on stdout"
    )
    g.add_argument(
        "--fresh", action="store_true", help="ignore cached cells and train everything again"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the sweep, write the outputs, print a summary (or the JSON). Returns 0."""
    from edgesplit.cli.common import print_json, set_threads
    from edgesplit.cli.progress import sweep_progress
    from edgesplit.evaluate.sweep import run_sweep

    set_threads(args)
    sweep_args = to_sweep_args(args)
    check_cuts(sweep_args)
    # progress goes to stderr, so it does not disturb --json on stdout
    with sweep_progress(not args.no_progress) as on_progress:
        result = run_sweep(sweep_args, on_progress=on_progress)
    doc = result.to_json()
    if args.json:
        print_json(doc)
    else:
        _print_summary(doc, result.out_dir, result.trained_cells, result.cached_cells)
    return 0


def to_sweep_args(args: argparse.Namespace) -> Any:
    """The parsed options as :class:`edgesplit.evaluate.sweep.SweepArgs`."""
    from edgesplit.evaluate.sweep import SweepArgs

    return SweepArgs(
        data=args.data,
        config=args.config,
        model=args.model,
        cuts=split_cuts(args.cuts, args.config) if args.cuts else None,
        codecs=split_codecs(args.codecs),
        grad_codec=args.grad_codec,
        seeds=args.seeds,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        clients=args.clients,
        feature_split=args.feature_split,
        devices=_split_list(args.devices, "--devices"),
        links=_split_list(args.links, "--links"),
        server_device=args.server_device,
        host_device=args.host_device,
        max_drop=args.max_drop,
        objective=args.objective,
        latency_mode=args.latency_mode,
        latency_batch=args.latency_batch,
        out=args.out,
        compare_fl=args.compare_fl,
        fl_clients=_split_ints(args.fl_clients, "--fl-clients"),
        fl_codec=args.fl_codec,
        command=command_line(args),
        fresh=args.fresh,
        privacy=args.privacy is not None,
        privacy_full=args.privacy == "full",
        privacy_aux=args.privacy_aux,
        defense=args.defense,
        max_psnr=args.max_psnr,
        max_label_auc=args.max_label_auc,
    )


def split_codecs(text: str) -> list[str]:
    """Split a ``--codecs`` value into codec specs.

    ``;`` always separates codecs. A comma separates codecs unless what follows it does not
    start with a stage name *and* the codec before it ends in a stage with ``:`` parameters --
    then it continues that stage's parameters (``fp32,q4:channel,stochastic+zstd`` -> ``fp32``
    and ``q4:channel,stochastic+zstd``). So a misspelt codec stays a codec of its own
    (``q8+zstd,q5`` -> ``q8+zstd`` and ``q5``) and is refused by that name, not as a parameter.
    """
    # "bn" starts a learned-bottleneck entry (bn:D:BITS), which is not a codec stage
    names = set(STAGE_NAMES) | _registered_stage_names() | {"bn"}
    out: list[str] = []
    for chunk in text.split(";"):
        pieces = [piece.strip() for piece in chunk.split(",") if piece.strip()]
        for j, piece in enumerate(pieces):
            head = piece.split("+", 1)[0].split(":", 1)[0]
            # the last stage of the previous codec (its gradient half if it names one)
            last_stage = out[-1].rsplit("/", 1)[-1].rsplit("+", 1)[-1] if out else ""
            if j > 0 and head not in names and ":" in last_stage:
                out[-1] = f"{out[-1]},{piece}"  # a parameter of the previous stage
            else:
                out.append(piece)
    if not out:
        raise ConfigError("--codecs is empty")
    return out


def split_cuts(text: str, config: str | None = None) -> list[str]:
    """``a,b,c`` -> three cuts; with ``;`` (ushape pairs) ``a,b;c,d`` -> ``a,b`` and ``c,d``;
    for ``config="ushape"`` without ``;``, ``a,b`` is one pair."""
    sep = ";" if ";" in text or config == "ushape" else ","
    cuts = [c.strip() for c in text.split(sep) if c.strip()]
    if not cuts:
        raise ConfigError("--cuts is empty")
    return cuts


def check_cuts(sweep_args: Any) -> None:
    """Refuse a ``--cuts`` name the model does not have before any cell trains (the sweep
    itself would find out only when that cell starts, after the cells before it trained).

    Each cut is applied to the model built for the data, as a cell would apply it. When the
    model cannot be built from the whole input (a vertical party's factory that needs its own
    features), the check is left to the cells.

    Raises
    ------
    ConfigError
        Naming the cut and the valid ones (:func:`edgesplit.split.cut.cut_model`'s message).
    """
    if not sweep_args.cuts:
        return  # the sweep uses the model's own valid cuts
    from edgesplit.data import load_dataset
    from edgesplit.models import build_model
    from edgesplit.split.cut import cut_model, cut_ushape, parse_cuts

    data = load_dataset(sweep_args.data)
    try:
        model = build_model(sweep_args.model, data.input_shape, data.num_classes)
    except ConfigError:
        return
    for cut in sweep_args.cuts:
        try:
            names = parse_cuts(cut, sweep_args.config, None)
            if len(names) == 2:
                cut_ushape(model, *names, input_shape=data.input_shape)
            else:
                cut_model(model, names[0], input_shape=data.input_shape)
        except ConfigError as exc:
            raise ConfigError(f"--cuts {cut!r}: {exc}") from None


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: every option that shapes the results, explicit."""
    parts = ["edgesplit", "evaluate"]
    for opt, value in (
        ("--data", args.data),
        ("--config", args.config),
        ("--model", args.model),
        ("--cuts", args.cuts),
        ("--codecs", args.codecs),
        ("--grad-codec", args.grad_codec),
        ("--seeds", args.seeds),
        ("--seed", args.seed),
        ("--epochs", args.epochs),
        ("--batch-size", args.batch_size),
        ("--lr", args.lr),
        ("--clients", args.clients),
        ("--feature-split", args.feature_split),
        ("--devices", args.devices),
        ("--links", args.links),
        ("--server-device", args.server_device),
        ("--host-device", args.host_device),
        ("--max-drop", args.max_drop),
        ("--objective", args.objective),
        ("--latency-mode", args.latency_mode),
        ("--latency-batch", args.latency_batch),
        ("--defense", args.defense),
        ("--out", args.out),
    ):
        if value is not None:
            parts += [opt, str(value)]
    if args.privacy:
        parts += [
            "--privacy",
            *(["full"] if args.privacy == "full" else []),
            "--privacy-aux",
            str(args.privacy_aux),
        ]
        for opt, value in (("--max-psnr", args.max_psnr), ("--max-label-auc", args.max_label_auc)):
            if value is not None:
                parts += [opt, str(value)]
    if args.compare_fl:
        parts += ["--compare-fl", "--fl-clients", str(args.fl_clients)]
        if args.fl_codec:
            parts += ["--fl-codec", args.fl_codec]
    return shlex.join(parts)


def _registered_stage_names() -> set[str]:
    # the codec registry knows stages added after this list was written; numpy-only import
    try:
        import edgesplit.codecs  # noqa: F401  (registers the built-in stages)
        from edgesplit.codecs.base import REGISTRY
    except ImportError:
        return set()
    return set(getattr(REGISTRY, "by_name", {}) or {})


def _split_list(text: str | None, opt: str) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{opt} is empty")
    return items


def _split_ints(text: str, opt: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{opt} takes comma-separated integers, got {text!r}") from None


def _print_summary(doc: dict[str, Any], out: Any, trained: int, reused: int) -> None:
    from rich.table import Table

    from edgesplit.cli.console import console as make_console

    console = make_console()
    table = Table(title="edgesplit evaluate (bytes per sample, mean over seeds)")
    for col, justify in (
        ("cut", "left"),
        ("codec", "left"),
        ("acc %", "right"),
        ("± std", "right"),
        ("up B", "right"),
        ("down B", "right"),
        ("ratio", "right"),
        ("SNR dB", "right"),
        ("Pareto", "center"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in doc.get("rows", []):
        snr = r.get("snr_db")
        table.add_row(
            str(r["cut"]),
            str(r["codec"]),
            _fmt(r.get("accuracy_mean"), 100, 2),
            _fmt(r.get("accuracy_std"), 100, 2),
            _fmt(r.get("bytes_up_per_sample"), 1, 1),
            _fmt(r.get("bytes_down_per_sample"), 1, 1),
            _fmt(r.get("ratio_up"), 1, 2),
            "∞" if snr is None else f"{snr:.1f}",
            "★" if r.get("pareto") else "",
        )
    console.print(table)
    base = doc.get("baseline") or {}
    console.print(
        f"reference accuracy {_fmt(base.get('accuracy'), 100, 2)} % "
        f"({base.get('description')}), budget {doc.get('max_drop')} points, "
        f"objective {doc.get('objective')}"
    )
    recs = Table(title="recommendations (device × link)")
    for col in ("device", "link", "cut", "codec", "ms/step", "why"):
        recs.add_column(col, overflow="fold")
    for r in doc.get("recommendations", []):
        lat = r.get("latency_ms")
        recs.add_row(
            str(r["device"]),
            str(r["link"]),
            str(r.get("cut") or "—"),
            str(r.get("codec") or "—"),
            "—" if lat is None else f"{lat:,.1f}",
            "" if r.get("found") else str(r.get("reason")),
        )
    console.print(recs)
    private = any("privacy" in r for r in doc.get("rows", []))
    if private:
        _print_privacy(console, doc)
    console.print(f"cells trained {trained}, reused from cache {reused}")
    console.print(
        f"wrote {out}/results.json, results.csv, report.md, accuracy_vs_bytes.png, "
        f"latency.png" + (", privacy.png, inversion_<cut>.png" if private else "")
    )
    if sys.stdout.isatty():
        console.print(f"open {out}/report.md for the full report")


def _print_privacy(console: Any, doc: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="privacy (first seed per cell; see report.md)")
    for col in ("cut", "codec", "PSNR dB", "mean-input dB", "SSIM", "dCor", "label AUC"):
        table.add_column(col)
    for r in doc.get("rows", []):
        p = r.get("privacy") or {}
        table.add_row(
            str(r["cut"]),
            str(r["codec"]),
            _fmt(p.get("inversion_psnr_db"), 1, 1),
            _fmt(p.get("mean_baseline_psnr_db"), 1, 1),
            _fmt(p.get("inversion_ssim"), 1, 3),
            _fmt(p.get("dcor"), 1, 3),
            _fmt(p.get("label_auc"), 1, 3),
        )
    console.print(table)


def _fmt(value: Any, scale: float, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value * scale:,.{digits}f}"
