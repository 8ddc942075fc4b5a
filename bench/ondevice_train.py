"""On-device training: the torch-free trainer (ONNX forward/backward + numpy SGD) vs a torch
client, one run.

Models: the digits MLP client segment (fc1 + relu1, 64 → 128), trained in-process for one epoch,
and the cnn2d segment for 8×8 inputs (conv1 + relu1 + max-pool, → 16×4×4), initialised; both
exported with ``export_trainable``. Each side runs in a fresh process, one thread, from the
bundle's initial parameters:

* ``edge``: ``sys.modules["torch"] = None``, load the trainable bundle, then per step the forward
  graph, the backward graph with a cut gradient, and the numpy SGD-momentum update;
* ``torch``: import torch, rebuild the segment and load params.npz, then per step forward,
  ``backward(grad)`` and ``torch.optim.SGD(momentum=0.9).step()``.

Reported per side: median and best step time (ms) at each batch size, peak RSS (VmHWM, MiB) and
import time; then the ratios edge/torch. The network is left out on purpose: both clients send
the same frames, so the local step is where they differ. A cnn2d cut after its adaptive pooling
is listed with the reason it is refused.

Prints one JSON object per line; ``"kind"`` says which table a line belongs to.

    python bench/ondevice_train.py [--steps 200] [--batches 1,32,128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_TIMING = r"""
def timed(step, steps):
    import time
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_ms": times[len(times) // 2] * 1e3, "best_ms": times[0] * 1e3}

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

EDGE_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
for name in ("torch", "onnx", "onnxscript", "sklearn"):
    sys.modules[name] = None
import numpy as np
from edgesplit.edge.optim import SGD
from edgesplit.edge.trainer import load_trainable
t1 = time.perf_counter()
""" + _TIMING + r"""
bundle, steps, batches = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
model = load_trainable(bundle, intra_op_threads=1)
opt = SGD(0.02, 0.9)
rng = np.random.default_rng(0)
out = {"import_s": t1 - t0, "steps": {}}
x_shape, cut_shape = model.bundle.input.shape, model.bundle.output.shape
for b in batches:
    x = rng.standard_normal((b, *x_shape)).astype(np.float32)
    g = rng.standard_normal((b, *cut_shape)).astype(np.float32) * 1e-3
    def step():
        cut, res = model.forward(x)
        grads = model.backward(res, g)
        opt.step(model.params, grads)
    out["steps"][b] = timed(step, steps)
out["peak_rss_mib"] = rss()
print(json.dumps(out))
"""

TORCH_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
import numpy as np
import torch
from edgesplit.models import build_model
t1 = time.perf_counter()
""" + _TIMING + r"""
torch.set_num_threads(1)
bundle, steps, batches = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
manifest = json.load(open(bundle + "/manifest.json"))
family, layers = sys.argv[4], int(sys.argv[5])
x_shape = manifest["input"]["shape"][1:]
cut_shape = manifest["output"]["shape"][1:]
lower = build_model(family, tuple(x_shape), 10)[:layers].train()
with np.load(bundle + "/params.npz") as params:   # the same weights as the device's
    lower.load_state_dict({p["name"]: torch.from_numpy(params[p["key"]])
                           for p in manifest["trainable"]["params"]})
opt = torch.optim.SGD(lower.parameters(), lr=0.02, momentum=0.9)
rng = np.random.default_rng(0)
out = {"import_s": t1 - t0, "steps": {}}
for b in batches:
    x = torch.from_numpy(rng.standard_normal((b, *x_shape)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((b, *cut_shape)).astype(np.float32) * 1e-3)
    def step():
        opt.zero_grad(set_to_none=True)
        lower(x).backward(g)
        opt.step()
    out["steps"][b] = timed(step, steps)
out["peak_rss_mib"] = rss()
print(json.dumps(out))
"""


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps({"bench": "ondevice_train", **obj}), flush=True)


def child(script: str, args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"child failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per batch size")
    parser.add_argument("--batches", default="1,32,128", help="batch sizes, comma-separated")
    args = parser.parse_args()

    import torch

    from edgesplit.errors import ExportError
    from edgesplit.models import cnn2d
    from edgesplit.onnx_export import SplitModel
    from edgesplit.onnx_export.trainable import export_trainable
    from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
    from edgesplit.train.engine import run_training
    from edgesplit.train.spec import TrainSpec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trained = run_training(TrainSpec(epochs=1, seed=0))
        ckpt = save_checkpoint(root / "ckpt", trained)
        torch.manual_seed(0)
        cnn = cnn2d((8, 8), 10)
        models = [
            ("digits-mlp", "mlp", 2, SplitModel.from_checkpoint(load_checkpoint(ckpt))),
            ("cnn2d-8x8", "cnn2d", 4,   # unsqueeze, conv1, relu1, pool1 (initialised)
             SplitModel(config="vanilla", lowers=[cnn[:4]], server=cnn[4:], head=None,
                        input_shape=(8, 8), num_classes=10, trained=False)),
        ]
        for name, family, layers, model in models:
            bundle = root / name
            t = time.perf_counter()
            manifest = export_trainable(model, bundle)
            emit({"kind": "export", "model": name, "seconds": time.perf_counter() - t,
                  "parity_max_abs": manifest["trainable"]["parity"]["max_abs"],
                  "cut_shape": manifest["cut_shape"]})
            edge = child(EDGE_CHILD, [str(bundle), str(args.steps), args.batches])
            eager = child(TORCH_CHILD, [str(bundle), str(args.steps), args.batches, family,
                                        str(layers)])
            for side, result in (("edge", edge), ("torch", eager)):
                emit({"kind": "process", "model": name, "client": side, "threads": 1,
                      "import_s": result["import_s"], "peak_rss_mib": result["peak_rss_mib"]})
                for batch, step in result["steps"].items():
                    emit({"kind": "step", "model": name, "client": side, "batch": int(batch),
                          **step})
            emit({"kind": "ratio", "model": name,
                  "rss_edge_over_torch": edge["peak_rss_mib"] / eager["peak_rss_mib"],
                  "step_ms_edge_over_torch": {
                      b: edge["steps"][b]["median_ms"] / eager["steps"][b]["median_ms"]
                      for b in edge["steps"]}})

        full = cnn2d((8, 8), 10)   # cut after pool2: adaptive pooling cannot train yet
        try:
            export_trainable(SplitModel(config="vanilla", lowers=[full[:7]], server=full[7:],
                                        head=None, input_shape=(8, 8), num_classes=10,
                                        trained=False), root / "cnn-pool2")
            emit({"kind": "refused", "model": "cnn2d-pool2", "reason": None})
        except ExportError as exc:
            emit({"kind": "refused", "model": "cnn2d-pool2", "reason": str(exc)})

if __name__ == "__main__":
    main()
