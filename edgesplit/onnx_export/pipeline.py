"""Export a client segment as a bundle: ONNX model(s), parity, int8, device fit, manifest.

Layout written (``OUT`` defaults to ``export/out/<name>``)::

    OUT/                   the bundle: everything the device needs, nothing the server keeps
      client.onnx          client segment (self-contained, dynamic batch axis)
      head.onnx            ushape only: the client's last layers
      manifest.json        schema 1 (see edgesplit.edge.bundle.REQUIRED_KEYS)
    OUT.server/            beside the bundle, never inside: what the server loads
      checkpoint.json      the checkpoint's metadata (TrainSpec, shapes, cuts, ...)
      server.pt            the server segment's state dict
      export.json          which bundle this server belongs to (name, client sha256, codec)

Both directories are written to temporary siblings first and renamed into place, so a failed
export (parity, device fit, int8 accuracy) leaves no half-written bundle behind.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import edgesplit
from edgesplit.codecs import parse_codec
from edgesplit.devices import DeviceProfile, load_device
from edgesplit.edge.bundle import (
    BATCH,
    CLIENT_FILE,
    HEAD_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    WEIGHTS,
    sha256_bytes,
    validate_manifest,
)
from edgesplit.errors import ExportError
from edgesplit.jsonable import jsonable
from edgesplit.onnx_export.fit import (
    DeviceFit,
    check_opset_fits,
    device_fit,
    estimate_memory,
)
from edgesplit.onnx_export.int8 import (
    DEFAULT_MAX_DROP,
    Int8Result,
    int8_accuracy,
    quantize_best,
)
from edgesplit.onnx_export.parity import (
    DEFAULT_BATCH_SIZES,
    FP32_ATOL,
    FP32_RTOL,
    ParityResult,
    check_parity,
    ort_session,
)
from edgesplit.onnx_export.segment import (
    DEFAULT_OPSET,
    ExportedSegment,
    check_model,
    check_opset,
    export_segment,
    exporter_name,
    model_opset,
)
from edgesplit.onnx_export.source import SplitModel
from edgesplit.split.preprocess import input_ranges, standardize_layer
from edgesplit.split.profile import SegmentProfile, profile_segment

DEFAULT_OUT_ROOT = Path("export/out")
SERVER_SUFFIX = ".server"


@dataclass
class ExportOptions:
    """How to export.

    Attributes
    ----------
    name: bundle name (default: ``<dataset>-<config>[-party<K>][-int8]``).
    party: which client segment: the vertical party ``K`` (others have one segment: 0).
    opset: ai.onnx opset (18 or newer: torch.export-based exporter; 13..17: TorchScript-based);
        ``None``: 18, or the device's max opset when that is lower.
    weights: ``fp32`` or ``int8`` (static QDQ quantization, calibrated on training samples).
    device: a device profile (or its name) the export must fit; ``None`` = no device check.
    batch_sizes: batch sizes of the parity check.
    atol, rtol: fp32 parity tolerances (see :class:`ParityResult`).
    calibration_samples: training samples (a seeded random subset) that calibrate int8 ranges.
    int8_max_drop: largest accuracy drop (points) int8 may cause before the export fails.
    fit_batch: batch size the device memory estimate is for.
    force: replace an earlier export at the same place (without it that is an error).
    """

    name: str | None = None
    party: int = 0
    opset: int | None = None
    weights: str = "fp32"
    device: DeviceProfile | str | None = None
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    atol: float = FP32_ATOL
    rtol: float = FP32_RTOL
    calibration_samples: int = 1024
    int8_max_drop: float = DEFAULT_MAX_DROP
    fit_batch: int = 1
    force: bool = False


@dataclass
class ExportReport:
    """What an export wrote and measured.

    Attributes
    ----------
    bundle: the bundle directory.
    server: the server segment directory beside it.
    manifest: the manifest written.
    files: path → size in bytes of every file written (bundle and server).
    fit: the device check, when a device was given.
    int8: the int8 measurement, when ``weights="int8"``.
    warnings: unique exporter warnings (also logged at debug level).
    """

    bundle: Path
    server: Path
    manifest: dict[str, Any]
    files: dict[str, int]
    fit: DeviceFit | None = None
    int8: Int8Result | None = None
    warnings: list[str] = field(default_factory=list)


def default_name(model: SplitModel, options: ExportOptions) -> str:
    """``<dataset>-<config>[-party<K>][-int8]``."""
    name = f"{model.dataset_name}-{model.config}"
    if model.config == "vertical":
        name += f"-party{options.party}"
    if options.weights == "int8":
        name += "-int8"
    return name


def server_dir(bundle: Path) -> Path:
    """Where the server segment of ``bundle`` goes: the sibling ``<bundle>.server``."""
    bundle = Path(bundle)
    return bundle.with_name(bundle.name + SERVER_SUFFIX)


def export_bundle(model: SplitModel, out: str | Path | None = None,
                  options: ExportOptions | None = None) -> ExportReport:
    """Export ``model``'s client segment (``options.party``) as a bundle, and its server
    segment beside it.

    Parameters
    ----------
    model: the split model (see :class:`SplitModel` for ways to get one).
    out: bundle directory; default ``export/out/<name>``. Replaced if it holds a bundle.
    options: see :class:`ExportOptions`.

    Raises
    ------
    ExportError
        Bad options; the exporter failed or its output fails ``onnx.checker`` (full check);
        parity outside tolerance; int8 without data or dropping accuracy more than allowed;
        the device's opset or memory is too small; ``out`` is a non-empty folder that is not a
        bundle.
    ConfigError
        An unknown device name or malformed device profile.
    """
    options = options or ExportOptions()
    device = load_device(options.device) if isinstance(options.device, str) else options.device
    opset = resolve_opset(options.opset, device)
    options = replace(options, opset=opset)
    _check_options(model, options)
    if device is not None:
        check_opset_fits(device, opset)   # fail before the slow part
    name = options.name or default_name(model, options)
    bundle_dir = Path(out) if out is not None else DEFAULT_OUT_ROOT / name
    if not bundle_dir.name:   # "." or "/": name the folder so OUT.server has a sibling to be
        bundle_dir = bundle_dir.resolve()
    server_path = server_dir(bundle_dir)
    check_replaceable(bundle_dir, MANIFEST_FILE, force=options.force)
    check_replaceable(server_path, "export.json", force=options.force)

    party = options.party
    shape = model.party_shape(party)
    n_samples = max(256, max(options.batch_sizes), 2)   # parity batches draw from these
    samples, source = model.samples(party, n_samples)
    lower = model.lowers[party]
    meta = {"edgesplit.role": "client", "edgesplit.cuts": ",".join(model.cuts),
            "edgesplit.config": model.config, "edgesplit.party": str(party)}

    client = export_segment(lower, samples, opset=opset, input_name="x",
                            output_name="cut", metadata=meta)
    parity = check_parity(lower, client.to_bytes(), samples, input_name="x",
                          batch_sizes=options.batch_sizes, atol=options.atol, rtol=options.rtol,
                          source=source)
    if not parity.passed:
        raise ExportError(f"client segment {parity.describe()}: ONNX Runtime and torch disagree "
                          "beyond tolerance; the export is not written")
    client_bytes = client.to_bytes()
    int8: Int8Result | None = None
    shipped = {**parity.to_json(), "model": "fp32"}
    if options.weights == "int8":
        client_bytes, int8 = _int8(model, client, options)
        shipped = _int8_parity(lower, client_bytes, samples, source, options, int8, parity)

    head, head_parity = _export_head(model, samples, source, options, meta) \
        if model.head is not None else (None, None)

    prof = profile_segment(lower, shape)
    head_prof = profile_segment(model.head, tuple(model.mid_shape())) \
        if model.head is not None else None
    files = {CLIENT_FILE: client_bytes}
    if head is not None:
        files[HEAD_FILE] = head.to_bytes()

    fit: DeviceFit | None = None
    if device is not None:
        peak = max(prof.peak_activation_bytes, head_prof.peak_activation_bytes if head_prof else 0)
        memory = estimate_memory(sum(len(b) for b in files.values()), math.prod(shape) * 4, peak,
                                 options.fit_batch)
        fit = device_fit(device, opset=opset, memory=memory,
                         flops=prof.flops + (head_prof.flops if head_prof else 0),
                         precision=options.weights)
        if not fit.fits:
            raise ExportError(f"device {device.name} cannot run this export: "
                              f"{'; '.join(fit.reasons)}")

    manifest = _manifest(model, options, name, shape, client, head, shipped, head_parity, prof,
                         head_prof, int8, fit, files, source, server_path)
    validate_manifest(manifest, f"{name}/{MANIFEST_FILE} (about to be written)")
    written = _write(bundle_dir, server_path, files, manifest, model)
    return ExportReport(bundle_dir, server_path, manifest, written, fit, int8,
                        client.warnings + (head.warnings if head else []))


def resolve_opset(opset: int | None, device: DeviceProfile | None) -> int:
    """The opset to write: the one asked for, else 18, or the device's max when that is lower
    (an old runtime, e.g. the Jetson Nano's 1.11 reads ≤ 16: the TorchScript exporter's)."""
    if opset is not None:
        return opset
    if device is not None and device.max_onnx_opset < DEFAULT_OPSET:
        return device.max_onnx_opset
    return DEFAULT_OPSET


# ---------------------------------------------------------------------------------- steps
def _export_head(model: SplitModel, samples: np.ndarray, source: str, options: ExportOptions,
                 meta: dict[str, str]) -> tuple[ExportedSegment, ParityResult]:
    """ushape: export the client's last layers, fed with real middle outputs for parity."""
    if model.head is None:   # callers check; keeps the type checker honest
        raise ExportError("this model has no head")
    with torch.no_grad():
        cut = model.lowers[0].eval()(torch.from_numpy(samples))
        mids = model.server.eval()(cut).numpy()
    head = export_segment(model.head, mids, opset=options.opset or DEFAULT_OPSET, input_name="mid",
                          output_name="logits", metadata={**meta, "edgesplit.role": "head"})
    parity = check_parity(model.head, head.to_bytes(), mids, input_name="mid",
                          batch_sizes=options.batch_sizes, atol=options.atol, rtol=options.rtol,
                          source=f"middle of {source}")
    if not parity.passed:
        raise ExportError(f"head {parity.describe()}; the export is not written")
    return head, parity


def _check_options(model: SplitModel, options: ExportOptions) -> None:
    if options.weights not in WEIGHTS:
        raise ExportError(f"unknown weights {options.weights!r}; valid: {', '.join(WEIGHTS)}")
    model.check_party(options.party)
    if options.opset is None:   # resolve_opset ran first; keeps the type checker honest
        raise ExportError("no opset resolved")
    check_opset(options.opset)
    if not options.batch_sizes or min(options.batch_sizes) < 1:
        raise ExportError(f"parity batch sizes must be ≥ 1, got {list(options.batch_sizes)}")
    if options.fit_batch < 1:
        raise ExportError(f"--fit-batch must be ≥ 1, got {options.fit_batch}")
    if not (options.atol >= 0 and options.rtol >= 0):
        raise ExportError(f"tolerances must be ≥ 0, got atol {options.atol}, rtol {options.rtol}")
    if options.weights == "int8":
        if model.dataset is None or not len(model.dataset.y_test):
            raise ExportError("--weights int8 needs the training data (to calibrate) and a test "
                              "split (to measure the accuracy change); pass --data")
        if options.calibration_samples < 1:
            raise ExportError("int8 needs at least one calibration sample")


def check_replaceable(path: Path, marker: str, *, force: bool) -> None:
    """An empty or absent folder may be written; an earlier export only with ``force``;
    anything else (the user's files) never."""
    if path.is_file():
        raise ExportError(f"{path} is a file; --out must name a directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not (path / marker).is_file():
        raise ExportError(f"{path} exists and is not an edgesplit export (no {marker}); "
                          "refusing to overwrite it: choose another --out")
    if not force:
        raise ExportError(f"{path} holds an earlier export{_describe(path / marker)}; pass "
                          "--force to replace it, or choose another --out")



def _describe(marker: Path) -> str:
    """`` (bundle NAME, run RUN_ID, created TIME)`` from an earlier export's JSON, if readable."""
    try:
        old = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(old, dict):
        return ""
    parts = [f"{label} {old[key]}" for key, label in
             (("name", "bundle"), ("bundle", "bundle"), ("run_id", "run"), ("created", "created"))
             if old.get(key)]
    return f" ({', '.join(parts)})" if parts else ""


def _int8(model: SplitModel, client: ExportedSegment, options: ExportOptions
          ) -> tuple[bytes, Int8Result]:
    data = model.dataset
    if data is None:   # _check_options refused this already
        raise ExportError("int8 needs a dataset")
    party = options.party
    # a seeded random subset: MinMax ranges come from the extremes, so the sample should be
    # representative, and large enough that test-time activations rarely exceed it (with 256
    # z-scored digits samples a cut value of 4.5 was clipped to 1.8; 1024 bounded the error)
    order = np.random.default_rng(0).permutation(len(data.x_train))
    calibration = model.party_x(data.x_train[order[:options.calibration_samples]], party)
    held = order[options.calibration_samples:options.calibration_samples + 256]
    validation = model.party_x(data.x_train[held if len(held) else order[:256]], party)
    reference = _party_cut(model, validation, party)
    quantized, per_channel = quantize_best(client.model, calibration, validation,
                                           reference.astype(np.float64), input_name="x")
    check_model(quantized, what="int8 client segment")
    int8_bytes = quantized.SerializeToString()
    session = ort_session(int8_bytes)

    codec = parse_codec(model.codec)

    def run_int8(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"x": model.party_x(x, party)})[0]

    def run_fp32(x: np.ndarray) -> np.ndarray:
        return model.cut(x, party)

    def predict(x: np.ndarray, cut: np.ndarray) -> np.ndarray:
        # every other party stays fp32; every cut goes through the codec the server trained on
        cuts = [cut if k == party else model.cut(x, k) for k in range(model.parties)]
        decoded = [codec.roundtrip(c, rng=np.random.default_rng(0)).reshape(c.shape)
                   for c in cuts]
        return model.predict_from_cuts([d.astype(np.float32) for d in decoded])

    acc32, acc8, max_abs = int8_accuracy(run_int8, run_fp32, predict, data.x_test, data.y_test)
    change = (acc8 - acc32) * 100.0
    result = Int8Result(acc32, acc8, change, max_abs, per_channel, len(calibration),
                        len(data.y_test))
    if change < -options.int8_max_drop:
        raise ExportError(f"int8 weights drop test accuracy by {-change:.2f} points "
                          f"({acc32:.4f} → {acc8:.4f}), more than the allowed "
                          f"{options.int8_max_drop:g}; export fp32, or raise --int8-max-drop")
    return int8_bytes, result


def _int8_parity(lower: torch.nn.Module, int8_bytes: bytes, samples: np.ndarray, source: str,
                 options: ExportOptions, int8: Int8Result, fp32: ParityResult
                 ) -> dict[str, Any]:
    """The parity record of the file shipped: the int8 model against torch (fp32 weights) on
    the parity batches. Its ``passed`` is the int8 criterion (the test-accuracy change within
    ``int8_max_drop``; the export is refused otherwise); the fp32 model's parity is kept."""
    measured = check_parity(lower, int8_bytes, samples, input_name="x",
                            batch_sizes=options.batch_sizes, atol=options.atol,
                            rtol=options.rtol, source=source)
    return {**measured.to_json(), "model": "int8",
            "passed": int8.accuracy_change >= -options.int8_max_drop,
            "criterion": f"test accuracy change {int8.accuracy_change:+.2f} points, allowed "
                         f"-{options.int8_max_drop:g}",
            "fp32": {**fp32.to_json(), "model": "fp32"}}


def _party_cut(model: SplitModel, party_x: np.ndarray, party: int) -> np.ndarray:
    """``party``'s torch cut for inputs that already hold only its features."""
    with torch.no_grad():
        return model.lowers[party].eval()(torch.from_numpy(party_x)).numpy()


def _tensor(name: str, shape: list[int] | tuple[int, ...]) -> dict[str, Any]:
    return {"name": name, "shape": [BATCH, *map(int, shape)], "dtype": "float32"}


def _versions(opset: int) -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {"edgesplit": edgesplit.__version__, "exporter": exporter_name(opset),
            "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def _manifest(model: SplitModel, options: ExportOptions, name: str, shape: tuple[int, ...],
              client: ExportedSegment, head: ExportedSegment | None, parity: dict[str, Any],
              head_parity: ParityResult | None, prof: SegmentProfile,
              head_prof: SegmentProfile | None, int8: Int8Result | None, fit: DeviceFit | None,
              files: dict[str, bytes], source: str, server_path: Path) -> dict[str, Any]:
    party = options.party
    block = model.feature_block(party)
    head_entry = None
    if head is not None and head_parity is not None and head_prof is not None:
        head_entry = {
            "file": HEAD_FILE, "input": _tensor("mid", model.mid_shape()),
            "output": _tensor("logits", head.output_shape), "parity": head_parity.to_json(),
            "params": head_prof.params, "flops_per_sample": head_prof.flops,
            "weights": "fp32",
        }
    manifest: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "name": name,
        # the run whose weights these are; the server segment beside the bundle carries the same
        "run_id": model.run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": model.config,
        "party": party,
        "parties": model.parties,
        "feature_block": list(block) if block else None,
        "full_input_shape": list(model.input_shape),
        "files": {"client": CLIENT_FILE, "head": HEAD_FILE if head is not None else None},
        "sha256": {fname: sha256_bytes(data) for fname, data in files.items()},
        "input": _tensor("x", shape),
        "output": _tensor("cut", client.output_shape),
        "cuts": list(model.cuts),
        "cut_shape": list(client.output_shape),
        "head": head_entry,
        "codec": model.party_codec(party),
        "grad_codec": model.grad_codec,
        # side information the codec references by id (fitted once, shipped with the model)
        "entropy_models": model.meta.get("entropy_models") or {},
        "num_classes": model.num_classes,
        "label_dtype": model.label_dtype,
        "opset": model_opset(client.model),
        "weights": options.weights,
        # the shipped client.onnx against torch: the int8 model's error for int8 bundles
        "parity": parity,
        "int8_accuracy_fp32": int8.accuracy_fp32 if int8 else None,
        "int8_accuracy": int8.accuracy if int8 else None,
        "int8_accuracy_change": int8.accuracy_change if int8 else None,
        "int8_cut_max_abs": int8.cut_max_abs if int8 else None,
        "int8": int8.to_json() if int8 else None,
        "client": {
            "params": prof.params + (head_prof.params if head_prof else 0),
            "flops_per_sample": prof.flops + (head_prof.flops if head_prof else 0),
            "segment_params": prof.params, "segment_flops_per_sample": prof.flops,
            "peak_activation_bytes": prof.peak_activation_bytes,
            "file_bytes": {fname: len(data) for fname, data in files.items()},
        },
        "device": fit.to_json() if fit else None,
        # what the training inputs spanned: the device warns when its inputs leave it
        "input_ranges": _input_ranges(model, party),
        "server_segment": f"../{server_path.name}",
        "source": {"checkpoint": model.checkpoint, "dataset": model.dataset_name,
                   "trained": model.trained, "accuracy": model.accuracy, "samples": source},
        "versions": _versions(model_opset(client.model)),
    }
    return jsonable(manifest)


def _input_ranges(model: SplitModel, party: int) -> dict[str, Any] | None:
    """Per-feature ranges of ``party``'s training rows; without the training data (an export
    from a checkpoint alone) its input standardization's mean ± a few spreads, else ``None``."""
    layer = standardize_layer(model.lowers[party])
    if model.dataset is None or not len(model.dataset.x_train):
        return input_ranges(None, layer)
    return input_ranges(model.party_x(model.dataset.x_train, party), layer)


def _staging(final: Path) -> Path:
    """A fresh hidden sibling of ``final`` (same file system, so the rename is atomic; created
    with mkdir so it gets the user's umask, not mkdtemp's 0700)."""
    path = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    path.mkdir()
    return path


def _write(bundle_dir: Path, server_path: Path, files: dict[str, bytes],
           manifest: dict[str, Any], model: SplitModel) -> dict[str, int]:
    """Write both directories next to their targets, then swap them in."""
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    staged: list[tuple[Path, Path]] = []
    try:
        tmp_bundle = _staging(bundle_dir)
        staged.append((tmp_bundle, bundle_dir))
        for fname, data in files.items():
            (tmp_bundle / fname).write_bytes(data)
            written[str(bundle_dir / fname)] = len(data)
        text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
        (tmp_bundle / MANIFEST_FILE).write_text(text, encoding="utf-8")
        written[str(bundle_dir / MANIFEST_FILE)] = len(text.encode())

        tmp_server = _staging(server_path)
        staged.append((tmp_server, server_path))
        if model.server_state is not None:
            shutil.copyfile(model.server_state, tmp_server / "server.pt")
        else:
            torch.save(model.server.state_dict(), tmp_server / "server.pt")
        meta = model.meta if "schema" in model.meta else {
            "schema": 1, "dataset": model.dataset_name, "input_shape": list(model.input_shape),
            "num_classes": model.num_classes, "cuts": list(model.cuts), **model.meta}
        (tmp_server / "checkpoint.json").write_text(json.dumps(jsonable(meta), indent=2,
                                                               default=str))
        link = {"bundle": manifest["name"], "run_id": model.run_id,
                "bundle_dir": f"../{bundle_dir.name}",
                "client_sha256": manifest["sha256"][CLIENT_FILE], "config": model.config,
                "party": manifest["party"], "parties": model.parties,
                "weights": manifest["weights"], "codec": model.codec,
                "grad_codec": model.grad_codec, "cut_shape": manifest["cut_shape"],
                "created": manifest["created"]}
        (tmp_server / "export.json").write_text(json.dumps(link, indent=2) + "\n")
        for fname in ("server.pt", "checkpoint.json", "export.json"):
            written[str(server_path / fname)] = (tmp_server / fname).stat().st_size
        for tmp, final in staged:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        staged.clear()
    finally:
        for tmp, _ in staged:   # an error above: leave nothing half-written
            shutil.rmtree(tmp, ignore_errors=True)
    return written
