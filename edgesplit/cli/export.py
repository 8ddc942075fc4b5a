"""``edgesplit export``: a client segment ▸ an ONNX bundle for a device (plus its server part)."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgesplit.cli.common import add_training_options, human_bytes, print_json, spec_from_args

log = logging.getLogger(__name__)


#: The target options: their value when neither the command line nor ``--recipe`` sets them.
#: Their argparse default is None, which means "not given": the command line wins, then the
#: recipe, then this table (comparing against a default cannot tell ``--fit-batch 1`` from
#: nothing).
TARGET_DEFAULTS: dict[str, Any] = {
    "device": None,
    "weights": "fp32",
    "opset": None,
    "fit_batch": 1,
    "atol": 1e-5,
    "rtol": 1e-4,
    "int8_max_drop": 2.0,
    "calibration_samples": 1024,
    "name": None,
}
#: Options an export recipe may set (TOML keys = option names with underscores).
RECIPE_KEYS = tuple(TARGET_DEFAULTS)
WEIGHTS = ("fp32", "int8")
#: What each recipe value must be: its type and the smallest value allowed (None: any).
_RECIPE_TYPES: dict[str, tuple[type, float | None]] = {
    "device": (str, None),
    "weights": (str, None),
    "opset": (int, 1),
    "fit_batch": (int, 1),
    "atol": (float, 0.0),
    "rtol": (float, 0.0),
    "int8_max_drop": (float, 0.0),
    "calibration_samples": (int, 1),
    "name": (str, None),
}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The settings of an export recipe, each checked for its type and range.

    Raises
    ------
    ConfigError
        The file is unreadable or not TOML, a key is not a target option, or a value has the
        wrong type or range (``fit_batch = "lots"``).
    """
    from edgesplit.errors import ConfigError
    from edgesplit.toml_compat import tomllib

    path = Path(path)
    try:
        recipe = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(
            f"recipe {path} has unknown keys {', '.join(unknown)}; valid: {', '.join(RECIPE_KEYS)}"
        )
    for key, value in recipe.items():
        problem = _recipe_value_problem(key, value)
        if problem:
            raise ConfigError(f"recipe {path}: {key} must be {problem}, got {value!r}")
    return dict(recipe)


def _recipe_value_problem(key: str, value: Any) -> str | None:
    """What ``value`` should have been for recipe key ``key``, or None when it is fine."""
    kind, minimum = _RECIPE_TYPES[key]
    if key == "weights":
        return None if value in WEIGHTS else f"one of {', '.join(WEIGHTS)}"
    if kind is str:
        return None if isinstance(value, str) and value else "a non-empty string"
    # TOML booleans are Python bools, which are ints: refuse them explicitly
    numeric = (int,) if kind is int else (int, float)
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
        return f"{what} >= {minimum:g}"
    if minimum is not None and value < minimum:
        return f"{what} >= {minimum:g}"
    return None


def resolve_target(args: argparse.Namespace) -> None:
    """Set every target option: the command line's value, else the recipe's, else the default.

    Runs before any work, so a bad recipe is refused before training or exporting starts.
    """
    recipe = read_recipe(args.recipe) if args.recipe else {}
    for key, default in TARGET_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, default))


def add_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "export",
        formatter_class=formatter,
        help="export a client segment to an ONNX bundle for a device",
        description=(
            "Export the client segment of a split model as a bundle: client.onnx (torch.export-"
            "based exporter, dynamic batch axis, one self-contained file, onnx.checker full "
            "check), manifest.json (shapes, codec, parity, sha256, device fit) and, for ushape, "
            "head.onnx. The server segment is written beside the bundle as OUT.server/, never "
            "inside it. The export fails (exit 2) when ONNX Runtime and torch disagree beyond "
            "tolerance, when int8 costs more accuracy than allowed, or when --device cannot run "
            "the model (opset or memory).\n\n"
            "Where the model comes from:\n"
            "  --from CHECKPOINT   a checkpoint written by `edgesplit train --save` (usual)\n"
            "  (no --from)         trains first with the data/model/split/optimisation options "
            "below, exactly like `edgesplit train`\n"
            "  --untrained         skips training: exports initialised weights (for testing a "
            "device or a pipeline, not for use)\n\n"
            "--data: the data for a fresh run (default digits); with --from, the checkpoint's "
            "dataset unless given. It supplies parity inputs, int8 calibration and the int8 "
            "test accuracy.\n\n"
            "examples:\n"
            "  edgesplit train --data digits --save runs/digits && "
            "edgesplit export --from runs/digits --device rpi4\n"
            "  edgesplit export --from runs/digits --weights int8 --out export/out/digits-int8\n"
            "  edgesplit export --data digits --config ushape --epochs 5"
        ),
    )
    g = p.add_argument_group("what to export")
    g.add_argument(
        "--from",
        dest="source",
        metavar="CHECKPOINT",
        default=None,
        help="checkpoint directory from `edgesplit train --save`; when not given "
        "the model is trained first (or exported untrained with --untrained)",
    )
    g.add_argument(
        "--untrained",
        action="store_true",
        help="without --from: export freshly initialised weights, no training",
    )
    g.add_argument(
        "--trainable",
        action="store_true",
        help="also export the training graphs (forward, backward, parameters) so a "
        "torch-free device trains its own client segment (`edgesplit client "
        "--bundle`); fp32 weights only, no --device/--opset/--recipe",
    )
    g.add_argument(
        "--party",
        type=int,
        default=0,
        metavar="K",
        help="vertical: which party's client segment to export (0-based); other "
        "configurations have one client segment: 0",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="bundle directory (must be new or empty; an earlier export is replaced "
        "only with --force); when not given: export/out/NAME",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export at --out (and its OUT.server folder)",
    )
    g.add_argument(
        "--name", default=None, help="bundle name; when not given: DATASET-CONFIG[-partyK][-int8]"
    )
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    g = p.add_argument_group("target")
    g.add_argument(
        "--recipe",
        metavar="TOML",
        default=None,
        help="an export recipe (see export/*.toml): target settings by their option "
        "names (device, weights, opset, fit_batch, atol, rtol, int8_max_drop, "
        "calibration_samples, name); options given on the command line win",
    )
    g.add_argument(
        "--device",
        metavar="NAME",
        default=None,
        help="device profile (devices/NAME.toml, or a path to a .toml) the export "
        "must fit: its max ONNX opset and memory; when not given: no check",
    )
    g.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=None,
        help="fp32, or int8 (static QDQ quantization calibrated on training data; "
        "its accuracy change is measured on the test split) (default: "
        f"{TARGET_DEFAULTS['weights']})",
    )
    g.add_argument(
        "--opset",
        type=int,
        default=None,
        metavar="N",
        help="ai.onnx opset: 18 or newer (torch.export-based exporter) or 13..17 "
        "(TorchScript-based exporter, IR version lowered to match, e.g. 16 → "
        "IR 8 for onnxruntime 1.11); when not given: 18, or the device's max "
        "opset when that is lower",
    )
    g.add_argument(
        "--fit-batch",
        type=int,
        default=None,
        metavar="N",
        help="batch size the device memory estimate is for (default: "
        f"{TARGET_DEFAULTS['fit_batch']})",
    )
    g = p.add_argument_group("checks")
    g.add_argument(
        "--atol",
        type=float,
        default=None,
        help="fp32 parity: absolute tolerance of |onnxruntime - torch|, scaled by the batch's "
        "largest |torch| value when above 1 (default: "
        f"{TARGET_DEFAULTS['atol']:g})",
    )
    g.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="fp32 parity: relative tolerance (element passes if diff <= "
        "atol*max(1, max|torch|) + rtol*|torch|) "
        f"(default: {TARGET_DEFAULTS['rtol']:g})",
    )
    g.add_argument(
        "--int8-max-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="int8: largest test-accuracy drop in percentage points before the "
        f"export fails (default: {TARGET_DEFAULTS['int8_max_drop']:g})",
    )
    g.add_argument(
        "--calibration-samples",
        type=int,
        default=None,
        metavar="N",
        help="int8: training samples (random subset) that calibrate the MinMax "
        f"quantization ranges (default: {TARGET_DEFAULTS['calibration_samples']})",
    )
    add_training_options(p, epochs=10)
    p.set_defaults(run=run, data=None)


def run(args: argparse.Namespace) -> int:
    from edgesplit.errors import ConfigError
    from edgesplit.onnx_export import ExportOptions, export_bundle

    resolve_target(args)
    if args.source and args.untrained:
        raise ConfigError("--untrained exports a fresh model; it cannot be combined with --from")
    if args.trainable:
        _check_trainable_args(args)
    if args.source:
        model = _from_checkpoint(args)
    elif args.untrained:
        model = _untrained(args)
    else:
        model = _trained(args)
    if args.trainable:
        return _run_trainable(args, model)
    options = ExportOptions(
        name=args.name,
        party=args.party,
        opset=args.opset,
        weights=args.weights,
        device=args.device,
        atol=args.atol,
        rtol=args.rtol,
        calibration_samples=args.calibration_samples,
        int8_max_drop=args.int8_max_drop,
        fit_batch=args.fit_batch,
        force=args.force,
    )
    report = export_bundle(model, args.out, options)
    for note in report.warnings:
        log.debug("exporter warning: %s", note)
    if args.json:
        print_json(
            {
                "bundle": str(report.bundle),
                "server": str(report.server),
                "files": report.files,
                "manifest": report.manifest,
                "warnings": report.warnings,
            }
        )
        return 0
    _print_report(report)
    return 0


# ---------------------------------------------------------------------------------- trainable
def _check_trainable_args(args: argparse.Namespace) -> None:
    """--trainable writes fp32 graphs at the exporter's opset for any device: refuse the
    options it would otherwise silently ignore."""
    from edgesplit.errors import ConfigError

    if args.weights == "int8":
        raise ConfigError(
            "--trainable exports fp32 weights (the device updates them); it "
            "cannot be combined with --weights int8"
        )
    given = [
        flag
        for flag, value in (
            ("--device", args.device),
            ("--opset", args.opset),
            ("--recipe", args.recipe),
        )
        if value is not None
    ]
    if given:
        raise ConfigError(
            f"--trainable does not take {', '.join(given)} (its training graphs "
            "are written at the default opset, fp32); drop them"
        )


def _run_trainable(args: argparse.Namespace, model: Any) -> int:
    """``export --trainable``: :func:`edgesplit.onnx_export.trainable.export_trainable`."""
    import shutil

    from edgesplit.edge.bundle import MANIFEST_FILE
    from edgesplit.onnx_export import DEFAULT_OUT_ROOT, ExportOptions, default_name, server_dir
    from edgesplit.onnx_export.pipeline import check_replaceable
    from edgesplit.onnx_export.trainable import export_trainable

    name = args.name or default_name(model, ExportOptions(party=args.party)) + "-trainable"
    out = Path(args.out) if args.out else DEFAULT_OUT_ROOT / name
    server = server_dir(out)
    # export_trainable replaces an earlier export itself: --force is decided here
    check_replaceable(out, MANIFEST_FILE, force=args.force)
    check_replaceable(server, "export.json", force=args.force)
    for path in (out, server):
        if path.is_dir() and any(path.iterdir()):  # an earlier export, and --force given
            shutil.rmtree(path)
    manifest = export_trainable(model, out, party=args.party)
    if args.json:
        print_json({"bundle": str(out), "server": str(server), "manifest": manifest})
        return 0
    section = manifest.get("trainable") or {}
    params = section.get("params") or []
    count = sum(math.prod(p.get("shape") or [1]) for p in params)
    parity = section.get("parity") or {}
    worst = parity.get("max_abs")
    print(
        f"trainable bundle {manifest['name']} → {out} (server segment {server}): "
        f"{len(params)} tensors, {count:,} trainable parameters, opset {manifest['opset']}, "
        f"gradient parity {'ok' if parity.get('passed') else 'FAILED'}"
        + (f" {worst:.1e}" if isinstance(worst, float) else "")
        + f", run {manifest.get('run_id')}"
    )
    return 0


# ---------------------------------------------------------------------------------- sources
def _load_data(source: str, *, required: bool) -> Any:
    from edgesplit.data import load_dataset
    from edgesplit.errors import ConfigError

    try:
        return load_dataset(source)
    except ConfigError as exc:
        if required:
            raise ConfigError(f"{exc} (int8 needs the data: pass --data)") from None
        log.warning("no data for parity inputs (%s); checking parity on random inputs", exc)
        return None


def _from_checkpoint(args: argparse.Namespace) -> Any:
    from edgesplit.onnx_export import SplitModel
    from edgesplit.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.source)
    data = _load_data(args.data or checkpoint.spec.data, required=args.weights == "int8")
    return SplitModel.from_checkpoint(checkpoint, data)


def _trained(args: argparse.Namespace) -> Any:
    from edgesplit.cli.progress import epoch_progress
    from edgesplit.onnx_export import SplitModel
    from edgesplit.train.engine import run_training

    args.data = args.data or "digits"
    spec = spec_from_args(args)
    with epoch_progress(f"{spec.config} {spec.codec}", spec.epochs, quiet=args.json) as on_epoch:
        trained = run_training(spec, on_epoch=on_epoch)
    return SplitModel.from_trained(trained)


def _untrained(args: argparse.Namespace) -> Any:
    import torch

    from edgesplit.codecs import parse_codec
    from edgesplit.data import load_dataset
    from edgesplit.onnx_export import SplitModel
    from edgesplit.train.engine import build_split

    args.data = args.data or "digits"
    spec = spec_from_args(args)
    parse_codec(spec.codec)  # the bundle records it: refuse a bad one now
    parse_codec(spec.grad_codec)
    data = load_dataset(spec.data)
    torch.manual_seed(spec.seed)
    parts = build_split(
        spec, data.input_shape, data.num_classes, example=torch.from_numpy(data.x_train[:2])
    )
    meta = {
        "schema": 1,
        "spec": asdict(spec),
        "dataset": data.name,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "cuts": list(parts.cuts),
        "feature_blocks": [list(b) for b in parts.blocks],
        "parties": len(parts.lowers),
        "result": None,
        "trained": False,
    }
    return SplitModel(
        config=spec.config,
        lowers=list(parts.lowers),
        server=parts.server,
        head=parts.head,
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        codec=spec.codec,
        grad_codec=spec.grad_codec,
        cuts=tuple(parts.cuts),
        feature_blocks=list(parts.blocks),
        dataset=data,
        meta=meta,
        trained=False,
    )


# ---------------------------------------------------------------------------------- output
def _print_report(report: Any) -> None:
    from rich.table import Table

    from edgesplit.cli.console import console as make_console

    m = report.manifest
    fit = m["device"]
    parity = m["parity"]
    table = Table(
        title=f"bundle {m['name']}: {m['config']}, cut {m['cut_shape']}, codec {m['codec']}"
    )
    for col in ("file", "size", "opset", "parity", "params", "FLOPs", "device"):
        table.add_column(col, justify="left" if col == "file" else "right")
    fit_text = "—" if fit is None else f"{fit['device']} ok"
    for path, size in report.files.items():
        full = Path(path)
        name = full.name
        shown = f"{full.parent.name}/{name}"
        if name == "client.onnx":
            row = (
                str(m["opset"]),
                _parity(parity),
                f"{m['client']['segment_params']:,}",
                f"{m['client']['segment_flops_per_sample']:,}",
                fit_text,
            )
        elif name == "head.onnx" and m["head"]:
            row = (
                str(m["opset"]),
                _parity(m["head"]["parity"]),
                f"{m['head']['params']:,}",
                f"{m['head']['flops_per_sample']:,}",
                "",
            )
        else:
            row = ("", "", "", "", "")
        table.add_row(shown, human_bytes(size), *row)
    console = make_console()
    console.print(table)
    if fit is not None:
        console.print(
            f"device {fit['device']}: opset {fit['opset']} ≤ {fit['max_onnx_opset']}, needs "
            f"~{fit['estimated_memory_bytes'] / 2**20:.0f} MiB of {fit['memory_mib']} MiB at "
            f"batch {fit['memory']['batch']}, ~{_per_sample(fit['estimated_ms_per_sample'])} "
            f"({fit['precision']}, {fit['execution_provider']})"
        )
    if parity.get("model") == "int8":
        console.print(
            f"parity of the int8 client.onnx vs torch: {parity['max_abs']:.1e} max abs "
            f"(fp32 export: {_parity(parity['fp32'])}; int8 is judged by accuracy: "
            f"{parity.get('criterion', '')})"
        )
    else:
        console.print(
            f"parity vs torch: {_parity(parity)} max abs, {parity['max_rel']:.1e} max "
            f"rel (atol {parity['atol']:g}, rtol {parity['rtol']:g}, batches "
            f"{parity['batch_sizes']}); FLOPs and params per sample of the segment"
        )
    if m["weights"] == "int8":
        console.print(
            f"int8 weights: test accuracy {m['int8_accuracy_fp32']:.4f} → {m['int8_accuracy']:.4f}"
            f" ({m['int8_accuracy_change']:+.2f} points), cut tensor max abs error "
            f"{m['int8_cut_max_abs']:.3g}"
        )
    if not m["source"]["trained"]:
        console.print("[yellow]untrained weights: for testing a device or pipeline only[/]")
    if parity["samples"] == "random":
        console.print("[yellow]parity checked on random inputs (no data found)[/]")
    console.print(
        f"copy [bold]{report.bundle}[/] to the device; the server segment stays in "
        f"{report.server} (run {m.get('run_id')})"
    )


def _per_sample(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs/sample" if ms < 0.1 else f"{ms:.2f} ms/sample"


def _parity(p: dict[str, Any]) -> str:
    if p.get("model") == "int8":  # judged by the accuracy change, not by fp32 tolerances
        return f"int8 {p['max_abs']:.1e}"
    verdict = "ok" if p["passed"] else "FAILED"
    return f"{verdict} {p['max_abs']:.1e}"
