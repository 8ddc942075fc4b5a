"""Edge runtime vs torch eager, one run: latency per batch, memory and start-up cost.

Two real exported client segments:

* ``digits-mlp``: the digits MLP client segment (fc1 + relu1, 64 → 128), trained in-process
  for a few epochs; exported fp32 and int8.
* ``cnn2d-32``: the cnn2d model cut after ``pool2`` (conv1 … conv2, relu2, adaptive pool:
  1×32×32 → 32×4×4, ~0.9 MFLOP per sample) with initialised weights on random inputs: a
  bigger per-sample cost, so latency means something.

For each: best-of-N latency of ONNX Runtime (the bundle loader) and torch eager at batch sizes
1, 8, 32, 128 with the same thread budget, and the ratio ORT/torch. Then two fresh processes
per model: the edge runtime with ``sys.modules["torch"] = None`` (import
edgesplit.edge.bundle, load the bundle, one run) and torch eager (import torch + edgesplit,
rebuild the segment, one run): import time, time to first output and resident memory.

Prints one JSON object per line; ``"kind"`` says which table a line belongs to.

    python bench/edge_runtime.py [--repeats 50] [--threads 1] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgesplit.data import Dataset
from edgesplit.edge.bundle import load_bundle
from edgesplit.models import build_model
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
from edgesplit.split.cut import cut_model
from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec

BATCHES = (1, 8, 32, 128)
ROOT = Path(__file__).resolve().parent.parent

# A fresh process: the edge runtime with torch and onnx made unimportable.
EDGE_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
sys.modules["torch"] = None
sys.modules["onnx"] = None
import numpy as np
from edgesplit.edge.bundle import load_bundle
t1 = time.perf_counter()
bundle = load_bundle(sys.argv[1], intra_op_threads=int(sys.argv[3]))
t2 = time.perf_counter()
x = np.load(sys.argv[2])
out = bundle.run(x)
t3 = time.perf_counter()
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
kib = lambda k: int(status[k].split()[0])
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_run_s": t3 - t2,
                  "start_to_output_s": t3 - t0, "rss_mib": kib("VmRSS") / 1024,
                  "peak_rss_mib": kib("VmHWM") / 1024, "out_shape": list(out.shape),
                  "torch_loaded": any(m.startswith("torch") and sys.modules[m] is not None
                                      for m in sys.modules)}))
"""

# A fresh process: torch eager, the same segment rebuilt from a state dict.
TORCH_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
import numpy as np
import torch
from edgesplit.models import build_model
from edgesplit.split.cut import cut_model
t1 = time.perf_counter()
torch.set_num_threads(int(sys.argv[3]))
spec = json.loads(sys.argv[4])
segment, _ = cut_model(build_model(spec["model"], tuple(spec["shape"]), spec["classes"]),
                       spec["cut"])
segment.load_state_dict(torch.load(sys.argv[1], weights_only=True))
segment.eval()
t2 = time.perf_counter()
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    out = segment(x)
t3 = time.perf_counter()
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
kib = lambda k: int(status[k].split()[0])
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_run_s": t3 - t2,
                  "start_to_output_s": t3 - t0, "rss_mib": kib("VmRSS") / 1024,
                  "peak_rss_mib": kib("VmHWM") / 1024, "out_shape": list(out.shape),
                  "torch_loaded": True}))
"""


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps({"bench": "edge_runtime", **obj}), flush=True)


def best_of(fn: Any, repeats: int) -> float:
    """Best wall time of ``fn()`` in milliseconds, after warm-up calls."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def latency(name: str, weights: str, bundle_dir: Path, segment: torch.nn.Module,
            inputs: np.ndarray, repeats: int, threads: int) -> None:
    bundle = load_bundle(bundle_dir, intra_op_threads=threads)
    segment.eval()
    for batch in BATCHES:
        x = np.ascontiguousarray(inputs[:batch])
        xt = torch.from_numpy(x)

        def run_torch(xt: torch.Tensor = xt) -> None:
            with torch.no_grad():
                segment(xt)

        ort_ms = best_of(lambda x=x: bundle.run(x), repeats)
        torch_ms = best_of(run_torch, repeats)
        emit({"kind": "latency", "model": name, "weights": weights, "batch": batch,
              "ort_ms": round(ort_ms, 4), "torch_eager_ms": round(torch_ms, 4),
              "ratio_ort_over_torch": round(ort_ms / torch_ms, 3),
              "ort_us_per_sample": round(ort_ms * 1e3 / batch, 2), "repeats": repeats,
              "threads": threads})


def child(script: str, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"child process failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def processes(name: str, bundle_dir: Path, segment: torch.nn.Module, spec: dict[str, Any],
              inputs: np.ndarray, threads: int, tmp: Path) -> None:
    x_path, state_path = tmp / f"{name}-x.npy", tmp / f"{name}-state.pt"
    np.save(x_path, inputs[:8])
    torch.save(segment.state_dict(), state_path)
    edge = child(EDGE_CHILD, [str(bundle_dir), str(x_path), str(threads)])
    eager = child(TORCH_CHILD, [str(state_path), str(x_path), str(threads), json.dumps(spec)])
    emit({"kind": "process", "model": name, "runtime": "edge: onnxruntime, torch blocked",
          **edge})
    emit({"kind": "process", "model": name, "runtime": "torch eager", **eager})
    emit({"kind": "process_ratio", "model": name,
          "import_ratio_edge_over_torch": round(edge["import_s"] / eager["import_s"], 3),
          "start_to_output_ratio_edge_over_torch":
              round(edge["start_to_output_s"] / eager["start_to_output_s"], 3),
          "rss_ratio_edge_over_torch": round(edge["rss_mib"] / eager["rss_mib"], 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per batch size")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for both ONNX Runtime and torch (same budget)")
    parser.add_argument("--epochs", type=int, default=5, help="digits training epochs")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import onnxruntime

    emit({"kind": "env", "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
          "threads": args.threads, "cpus": os.cpu_count(), "python": sys.version.split()[0]})
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="edgesplit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # ---- digits MLP, trained
        trained = run_training(TrainSpec(epochs=args.epochs))
        mlp = SplitModel.from_trained(trained)
        x_digits = trained.dataset.x_test[rng.integers(0, len(trained.dataset.x_test), 128)]
        for weights in ("fp32", "int8"):
            report = export_bundle(mlp, tmp / f"digits-{weights}", ExportOptions(weights=weights))
            m = report.manifest
            emit({"kind": "export", "model": "digits-mlp", "weights": weights,
                  "client_onnx_bytes": m["client"]["file_bytes"]["client.onnx"],
                  "params": m["client"]["params"],
                  "flops_per_sample": m["client"]["flops_per_sample"],
                  "parity_max_abs": m["parity"]["max_abs"],
                  "int8_accuracy_change": m["int8_accuracy_change"],
                  "accuracy_fp32": trained.result.accuracy})
            latency("digits-mlp", weights, report.bundle, mlp.lowers[0], x_digits, args.repeats,
                    args.threads)
        processes("digits-mlp", tmp / "digits-fp32", mlp.lowers[0],
                  {"model": "mlp", "shape": [64], "classes": 10, "cut": "relu1"},
                  x_digits, args.threads, tmp)

        # ---- cnn2d on 1x32x32, initialised weights, random inputs
        shape = (1, 32, 32)
        lower, upper = cut_model(build_model("cnn2d", shape, 10), "pool2")
        x_img = rng.standard_normal((512, *shape), dtype=np.float32)
        y = rng.integers(0, 10, 512)
        data = Dataset("random32", x_img[:384], y[:384], x_img[384:], y[384:], 10)
        cnn = SplitModel(config="vanilla", lowers=[lower], server=upper, head=None,
                         input_shape=shape, num_classes=10, cuts=("pool2",), dataset=data,
                         trained=False)
        report = export_bundle(cnn, tmp / "cnn2d-fp32", ExportOptions(device="rpi4"))
        m = report.manifest
        emit({"kind": "export", "model": "cnn2d-32", "weights": "fp32",
              "client_onnx_bytes": m["client"]["file_bytes"]["client.onnx"],
              "params": m["client"]["params"], "flops_per_sample": m["client"]["flops_per_sample"],
              "parity_max_abs": m["parity"]["max_abs"],
              "rpi4_estimated_ms_per_sample": m["device"]["estimated_ms_per_sample"]})
        latency("cnn2d-32", "fp32", report.bundle, lower, x_img, args.repeats, args.threads)
        processes("cnn2d-32", report.bundle, lower,
                  {"model": "cnn2d", "shape": list(shape), "classes": 10, "cut": "pool2"},
                  x_img, args.threads, tmp)


if __name__ == "__main__":
    main()
