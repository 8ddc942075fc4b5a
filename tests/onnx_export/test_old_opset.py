"""Old devices: an opset-16 / IR-8 export (Jetson Nano, onnxruntime 1.11 on JetPack 4), written by
the TorchScript-based exporter, checked, matching torch, and loaded by an old onnxruntime.

The old runtime is onnxruntime 1.15.0, the oldest release with wheels for Python 3.11 (the
project's Python; `pip index versions onnxruntime`). It is installed once into its own venv under
``~/.cache/edgesplit/`` (about 200 MB, ~20 s) and reused; set ``EDGESPLIT_OLD_ORT_PYTHON`` to a
Python that has an old onnxruntime to use that instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgesplit.edge.bundle import load_bundle
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle

OLD_ORT = "1.15.0"
OLD_ORT_VENV = Path.home() / ".cache" / "edgesplit" / f"onnxruntime-{OLD_ORT}"

# Runs in the old venv: numpy + onnxruntime only.
OLD_RUNNER = """
import json, sys
import numpy as np, onnxruntime as ort
model, inputs, out = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
y = session.run(None, {"x": np.load(inputs)})[0]
np.save(out, y)
print(json.dumps({"onnxruntime": ort.__version__}))
"""


@pytest.fixture(scope="module")
def nano(digits_trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("nano") / "digits-nano"
    return export_bundle(SplitModel.from_trained(digits_trained), out,
                         ExportOptions(device="jetson-nano"))


def _torch_cut(trained, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return trained.client_segments[-1].eval()(torch.from_numpy(x)).numpy()


def test_jetson_nano_export_is_opset16_ir8_and_matches_torch(nano, digits_trained):
    model = onnx.load(str(nano.bundle / "client.onnx"))
    onnx.checker.check_model(model, full_check=True)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert (opset, model.ir_version) == (16, 8)
    m = nano.manifest
    assert m["opset"] == 16 and m["device"]["fits"] and m["device"]["max_onnx_opset"] == 16
    assert m["versions"]["exporter"] == "torch.onnx.export(dynamo=False)"
    assert m["parity"]["passed"] and m["parity"]["max_abs"] < 1e-5
    x = digits_trained.dataset.x_test[:9]
    bundle = load_bundle(nano.bundle)
    np.testing.assert_allclose(bundle.run(x), _torch_cut(digits_trained, x), atol=1e-5)


def _old_python() -> Path:
    given = os.environ.get("EDGESPLIT_OLD_ORT_PYTHON")
    if given:
        return Path(given)
    python = OLD_ORT_VENV / "bin" / "python"
    if python.is_file():
        return python
    OLD_ORT_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(OLD_ORT_VENV)], check=True)
    # onnxruntime 1.15 was built against numpy 1.x
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", f"onnxruntime=={OLD_ORT}",
                          "numpy<2"], capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        import shutil

        shutil.rmtree(OLD_ORT_VENV, ignore_errors=True)
        pytest.skip(f"cannot install onnxruntime {OLD_ORT} (offline?): "
                    f"{pip.stderr.strip().splitlines()[-1:]}")
    return python


def test_jetson_nano_bundle_runs_in_the_oldest_onnxruntime(nano, digits_trained, tmp_path):
    python = _old_python()
    x = digits_trained.dataset.x_test[:16]
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([str(python), "-c", OLD_RUNNER, str(nano.bundle / "client.onnx"),
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    version = json.loads(proc.stdout.strip().splitlines()[-1])["onnxruntime"]
    assert tuple(int(p) for p in version.split(".")[:2]) <= (1, 15)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _torch_cut(digits_trained, x),
                               atol=1e-5)
