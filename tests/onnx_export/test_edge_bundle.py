"""The device-side bundle loader: validates the manifest, verifies the file hash, checks inputs,
and runs with no torch (and no onnx) importable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesplit.data import load_dataset
from edgesplit.edge.bundle import load_bundle, read_manifest
from edgesplit.errors import ConfigError
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
from edgesplit.train.engine import build_split
from edgesplit.train.spec import TrainSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def split(data):
    """Initialised (untrained) weights are enough to test loading and running."""
    torch.manual_seed(0)
    parts = build_split(TrainSpec(codec="q4+zstd"), data.input_shape, data.num_classes)
    return SplitModel(config="vanilla", lowers=parts.lowers, server=parts.server, head=None,
                      input_shape=data.input_shape, num_classes=data.num_classes,
                      codec="q4+zstd", cuts=parts.cuts, dataset=data, trained=False)


@pytest.fixture(scope="module")
def bundle_dir(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("edge") / "b"
    export_bundle(split, out, ExportOptions(name="edge-test"))
    return out


@pytest.fixture
def copy(bundle_dir, tmp_path):
    """A private copy of the bundle a test may damage."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "b"))


def _torch_cut(split: SplitModel, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return split.lowers[0].eval()(torch.from_numpy(x)).numpy()


def test_load_and_run_matches_torch(bundle_dir, split, data):
    bundle = load_bundle(bundle_dir)
    assert (bundle.name, bundle.codec, bundle.cut_shape) == ("edge-test", "q4+zstd", (128,))
    assert bundle.label_dtype == np.uint8 and bundle.num_classes == 10
    assert bundle.providers == ["CPUExecutionProvider"] and not bundle.has_head
    for n in (1, 3, 64):
        x = data.x_test[:n]
        np.testing.assert_allclose(bundle.run(x), _torch_cut(split, x), atol=1e-5, rtol=1e-4)


def test_tampered_model_is_refused(copy):
    path = copy / "client.onnx"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="bundle file changed since export: sha256 mismatch"):
        load_bundle(copy)


def _edit(copy: Path, change) -> None:
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("codec"), "missing required key 'codec'"),
        (lambda m: m.update(schema=2), "schema 2; this edgesplit reads schema 1 .upgrade"),
        (lambda m: m.update(num_classes="ten"), "key 'num_classes' must be an integer"),
        (lambda m: m["input"].update(shape=[64]), "input.shape' must be"),
        (lambda m: m["files"].update(client="../client.onnx"), "file name inside the bundle"),
        (lambda m: m["parity"].pop("max_abs"), "parity.max_abs"),
        (lambda m: m.update(weights="int4"), "'weights' must be one of fp32, int8"),
        (lambda m: m["input"].update(name="features"), r"inputs \['x'\], the manifest says"),
    ],
)
def test_bad_manifest_names_the_key_and_file(copy, change, message):
    _edit(copy, change)
    with pytest.raises(ConfigError, match=message) as info:
        load_bundle(copy)
    assert "manifest.json" in str(info.value) or "client.onnx" in str(info.value)


def test_not_a_bundle_and_missing_model(tmp_path, copy):
    with pytest.raises(ConfigError, match="not a bundle: no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_manifest(tmp_path / "broken" / "manifest.json")
    (copy / "client.onnx").unlink()
    with pytest.raises(ConfigError, match="client.onnx is missing"):
        load_bundle(copy)


def test_wrong_inputs_name_expected_and_got(bundle_dir):
    bundle = load_bundle(bundle_dir)
    with pytest.raises(ConfigError, match=r"dtype float32, got float64"):
        bundle.run(np.zeros((2, 64)))
    with pytest.raises(ConfigError, match=r"shape \(batch, 64\) float32, got \(2, 63\)"):
        bundle.run(np.zeros((2, 63), np.float32))
    with pytest.raises(ConfigError, match=r"got \(64,\)"):
        bundle.run(np.zeros(64, np.float32))
    with pytest.raises(ConfigError, match="numpy array"):
        bundle.run([[0.0] * 64])
    with pytest.raises(ConfigError, match="has no head"):
        bundle.run_head(np.zeros((1, 128), np.float32))
    with pytest.raises(ConfigError, match="not available"):
        load_bundle(bundle_dir, providers=["NoSuchExecutionProvider"])


_TORCH_FREE = """
import json, sys
sys.modules["torch"] = None      # any `import torch` now raises ImportError
sys.modules["onnx"] = None
import numpy as np
from edgesplit.edge.bundle import load_bundle
bundle = load_bundle(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], bundle.run(x))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript")
               and sys.modules[m] is not None)
print(json.dumps({"codec": bundle.codec, "heavy": heavy}))
"""


def test_bundle_runs_in_a_process_without_torch(bundle_dir, split, data, tmp_path):
    x = data.x_test[:7]
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _TORCH_FREE, str(bundle_dir),
                          str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"codec": "q4+zstd", "heavy": []}
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _torch_cut(split, x), atol=1e-5,
                               rtol=1e-4)
