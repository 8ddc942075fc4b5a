"""Realistic workloads: torchvision ResNet-18 and MobileNetV2 (random weights), every cut.

For each model, input size (32×32, 224×224) and cut that ``edgesplit cuts`` offers, one JSON line:

* ``parity_*``: the client segment exported to ONNX (opset 18, ``onnx.checker`` full check)
  against torch eager on random inputs (batches of 1 and 2): max |ort − torch|, that error over
  max |torch| (the scale: random-weight activations are tiny or huge), and the exporter's own
  verdict with its default tolerances;
* ``torch_ms``, ``ort_ms``: median latency of one sample (batch 1, one thread) in torch eager and
  in ONNX Runtime (CPU), after warm-up;
* ``ort_rss_mb``, ``torch_rss_mb``: peak resident memory of a fresh process that loads the
  segment and runs it (``ort``: numpy + onnxruntime only, as on a device; ``torch``: builds the
  model, cuts it, runs the client segment), and its increase over the process after imports;
* ``bytes_per_sample``: the cut tensor of a batch encoded as a real frame per codec (fp32,
  q8+zstd, q4+zstd) and, for a 16-channel 2-bit bottleneck (``--bottleneck 16:2``, randomly
  initialised encoder, codes bit-packed with ``fq:2`` — what a run sends before it has an entropy
  model), divided by the batch size.

The two factories below also work as user model files:
``edgesplit train --model bench/models.py:resnet18 --cut layer2 ...``.

Run: ``.venv/bin/python bench/models.py [--sizes 32,224] [--models resnet18,mobilenet_v2]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2")
CODECS = ("fp32", "q8+zstd", "q4+zstd")
BOTTLENECK = "16:2"
_TV_LIB: Any = None  # keeps the stub operator library below alive


def import_torchvision() -> Any:
    """``import torchvision``, also where its compiled extension cannot load.

    The torchvision wheels on PyPI are CUDA builds: with the CPU build of torch their ``_C``
    extension (detection operators: nms, roi_align, ...) fails to load, and ``import
    torchvision`` then dies on registering a fake ``torchvision::nms``. The classification models
    do not use those operators, so the two schemas the import registers against are declared
    here (no kernels: calling ``torchvision.ops.nms`` still fails loudly) and the import retried.
    """
    global _TV_LIB
    import torch

    try:
        import torchvision

        return torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _TV_LIB = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _TV_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


def resnet18(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """torchvision ResNet-18, random weights (a user model factory)."""
    del input_shape  # adaptive pooling: any image size ≥ 32×32
    return import_torchvision().models.resnet18(weights=None, num_classes=num_classes)


def mobilenet_v2(input_shape: tuple[int, ...], num_classes: int) -> Any:
    """torchvision MobileNetV2, random weights (a user model factory)."""
    del input_shape
    return import_torchvision().models.mobilenet_v2(weights=None, num_classes=num_classes)


FACTORIES = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def _peak_mb() -> float:
    """Peak resident memory of this process (MiB): VmHWM, which belongs to the address space
    (ru_maxrss would carry over the parent's peak through fork + exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux


def _median_ms(fn: Any, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _build(name: str, size: int) -> Any:
    import torch

    torch.manual_seed(0)
    return FACTORIES[name]((3, size, size), 10).eval()


# ------------------------------------------------------------------ child processes (peak RSS)
def child_ort(path: str, size: int, repeats: int) -> dict[str, float]:
    """Load ``path`` in ONNX Runtime and run it: what a device process holds (no torch)."""
    import onnxruntime as ort

    base = _peak_mb()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    _median_ms(lambda: session.run(None, {"x": x}), repeats)
    return {"rss_mb": _peak_mb(), "rss_base_mb": base}


def child_torch(name: str, cut: str, size: int, repeats: int) -> dict[str, float]:
    """Build the model, cut it, keep the client segment and run it in torch eager."""
    import torch

    from edgesplit.split.cut import cut_model

    torch.set_num_threads(1)
    import_torchvision()
    base = _peak_mb()
    client, _ = cut_model(_build(name, size), cut, input_shape=(3, size, size))
    gc.collect()  # the server segment and the whole model go; the client keeps its modules
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        _median_ms(lambda: client(x), repeats)
    return {"rss_mb": _peak_mb(), "rss_base_mb": base}


def _child(args: list[str]) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed: {proc.stderr.strip()[-400:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------ one cut
def measure(
    name: str, size: int, cut: str, repeats: int, batch: int, workdir: Path
) -> dict[str, Any]:
    """Every figure of one (model, input size, cut); see the module docstring."""
    import onnxruntime as ort
    import torch

    from edgesplit.onnx_export.parity import check_parity
    from edgesplit.onnx_export.segment import export_segment
    from edgesplit.split.bottleneck import BottleneckSpec, encoder
    from edgesplit.split.cut import cut_model
    from edgesplit.split.profile import profile_segment
    from edgesplit.wire.frame import encode_frame

    shape = (3, size, size)
    client, _ = cut_model(_build(name, size), cut, input_shape=shape)
    client.eval()
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((max(batch, 2), *shape)).astype(np.float32)
    with torch.no_grad():
        cut_values = client(torch.from_numpy(samples[:batch])).numpy()
    prof = profile_segment(client, shape)

    t0 = time.perf_counter()
    exported = export_segment(client, samples, opset=18, input_name="x", output_name="cut")
    export_s = time.perf_counter() - t0
    model_bytes = exported.to_bytes()
    parity = check_parity(client, model_bytes, samples, batch_sizes=(1, 2), source="random")
    scale = float(np.abs(cut_values).max())

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )
    one = samples[:1]
    one_t = torch.from_numpy(one)
    with torch.no_grad():
        torch_ms = _median_ms(lambda: client(one_t), repeats)
    ort_ms = _median_ms(lambda: session.run(None, {"x": one}), repeats)

    path = workdir / f"{name}-{size}-{cut}.onnx"
    path.write_bytes(model_bytes)
    ort_rss = _child(["ort", str(path), str(size), str(repeats)])
    torch_rss = _child(["torch", name, cut, str(size), str(repeats)])
    path.unlink()

    per_sample = {c: len(encode_frame(cut_values, c)) / batch for c in CODECS}
    if cut_values.ndim in (2, 3, 4):  # a bottleneck projects the channel axis: 1..3 dims
        spec = BottleneckSpec.parse(BOTTLENECK)
        enc = encoder(spec, tuple(cut_values.shape[1:])).eval()
        with torch.no_grad():
            codes = enc(torch.from_numpy(cut_values)).numpy()
        per_sample[f"bottleneck {BOTTLENECK} fq:{spec.bits}"] = (
            len(encode_frame(codes, f"fq:{spec.bits}")) / batch
        )
    return {
        "model": name,
        "input": list(shape),
        "cut": cut,
        "cut_shape": list(cut_values.shape[1:]),
        "client_params": prof.params,
        "client_mflops": round(prof.flops / 1e6, 2),
        "onnx_bytes": len(model_bytes),
        "export_s": round(export_s, 2),
        "parity_max_abs": parity.max_abs,
        "parity_rel_to_scale": parity.max_abs / scale if scale else 0.0,
        "cut_max_abs": scale,
        "parity_passed_default_tol": parity.passed,
        "torch_ms": round(torch_ms, 3),
        "ort_ms": round(ort_ms, 3),
        "ort_over_torch": round(ort_ms / torch_ms, 3) if torch_ms else None,
        "ort_rss_mb": round(ort_rss["rss_mb"], 1),
        "ort_rss_increase_mb": round(ort_rss["rss_mb"] - ort_rss["rss_base_mb"], 1),
        "torch_rss_mb": round(torch_rss["rss_mb"], 1),
        "torch_rss_increase_mb": round(torch_rss["rss_mb"] - torch_rss["rss_base_mb"], 1),
        "bytes_per_sample": {k: round(v, 1) for k, v in per_sample.items()},
        "fp32_over": {k: round(per_sample["fp32"] / v, 2) for k, v in per_sample.items()},
        "repeats": repeats,
        "batch_for_bytes": batch,
    }


def table(lines: list[dict[str, Any]]) -> str:
    """The JSON lines of a run as one markdown table (docs/models.md)."""
    head = (
        "| model | input | cut | cut shape | client MFLOPs | client.onnx KiB | parity max abs "
        "(÷ max \\|cut\\|) | torch ms | ORT ms | ORT peak RSS MiB (+ model) | torch peak RSS "
        "MiB (+ model) | B/sample fp32 | q8+zstd | q4+zstd | bottleneck 16:2 (fq:2) |"
    )
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in lines:
        b = r["bytes_per_sample"]
        bottleneck = next((v for k, v in b.items() if k.startswith("bottleneck")), None)
        rows.append(
            f"| {r['model']} | {r['input'][1]}×{r['input'][2]} | {r['cut']} | "
            f"{'×'.join(map(str, r['cut_shape']))} | {r['client_mflops']:g} | "
            f"{r['onnx_bytes'] / 1024:.0f} | {r['parity_max_abs']:.1e} "
            f"({r['parity_rel_to_scale']:.1e}) | {r['torch_ms']:.2f} | {r['ort_ms']:.2f} | "
            f"{r['ort_rss_mb']:.0f} (+{r['ort_rss_increase_mb']:.0f}) | "
            f"{r['torch_rss_mb']:.0f} (+{r['torch_rss_increase_mb']:.0f}) | {b['fp32']:.0f} | "
            f"{b['q8+zstd']:.0f} | {b['q4+zstd']:.0f} | "
            f"{'' if bottleneck is None else f'{bottleneck:.0f}'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--cuts", default=None, help="only these cuts (comma-separated)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="samples the byte counts average")
    parser.add_argument("--table", metavar="JSONL", help="print a run's JSON lines as markdown")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        text = Path(args.table).read_text(encoding="utf-8")
        print(table([json.loads(line) for line in text.splitlines() if line.startswith("{")]))
        return 0
    if args.child:
        kind, *rest = args.child
        if kind == "ort":
            out = child_ort(rest[0], int(rest[1]), int(rest[2]))
        else:
            out = child_torch(rest[0], rest[1], int(rest[2]), int(rest[3]))
        print(json.dumps(out))
        return 0

    import torch

    from edgesplit.split.cut import valid_cuts

    torch.set_num_threads(1)
    import_torchvision()
    wanted = set(args.cuts.split(",")) if args.cuts else None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                cuts = valid_cuts(_build(name, size), (3, size, size))
                for cut in cuts:
                    if wanted is not None and cut not in wanted:
                        continue
                    row = measure(name, size, cut, args.repeats, args.batch, Path(tmp))
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
