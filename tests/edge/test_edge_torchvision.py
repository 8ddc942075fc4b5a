"""torchvision ResNet-18 and MobileNetV2 (random weights) cut mid-network with torch.fx: they
train a few steps in process, export with parity, and run in the torch-free edge client against a
real gRPC server.

Small on purpose (32×32 images, batches of 4, a few dozen samples): the 224×224 figures are
bench/models.py's (docs/models.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgesplit.edge.bundle import load_bundle
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
from edgesplit.split.cut import cut_model, valid_cuts
from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec

ROOT = Path(__file__).resolve().parents[2]
FACTORY_FILE = ROOT / "bench" / "models.py"

#: (factory, cut, cut tensor shape at 32×32, a module on each side of the cut)
CASES = {
    "resnet18": ("layer2", [128, 4, 4], "layer2.1.conv2.weight", "layer3.0.conv1.weight"),
    "mobilenet_v2": (
        "features.6",
        [32, 4, 4],
        "features.6.conv.0.0.weight",
        "features.7.conv.0.0.weight",
    ),
}

BLOCKED = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib", "torchvision")
NO_TORCH = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
from edgesplit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Exported:
    """A checkpoint, its bundle and the .npz it was trained on (what ``serve`` needs)."""

    checkpoint: Path
    bundle: Path
    npz: Path
    x_test: np.ndarray


def _factory(name: str):
    """The factory of bench/models.py (loaded as a user model file, as the CLI would)."""
    from edgesplit.models import load_factory

    return load_factory(f"{FACTORY_FILE}:{name}")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 random 3×32×32 'images' with raw pixel values 0..255 and 4 classes (32 train)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    path = tmp_path_factory.mktemp("tv") / "images.npz"
    np.savez(path, x=x[:32], y=y[:32], x_test=x[32:], y_test=y[32:])
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_cut_segments_compose_to_the_torchvision_forward(name):
    cut, cut_shape, client_key, server_key = CASES[name]
    torch.manual_seed(0)
    model = _factory(name)((3, 32, 32), 10).eval()
    assert cut in valid_cuts(model, (3, 32, 32)) or f"{cut}.1" in valid_cuts(model, (3, 32, 32))
    client, server = cut_model(model, cut, input_shape=(3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        middle = client(x)
        torch.testing.assert_close(server(middle), model(x), rtol=0, atol=0)
    assert list(middle.shape[1:]) == cut_shape
    assert client_key in client.state_dict() and client_key not in server.state_dict()
    assert server_key in server.state_dict() and server_key not in client.state_dict()


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, images, tmp_path_factory) -> tuple[str, Exported, dict]:
    """Trained one epoch (8 steps of 4 images) in process, checkpointed, exported."""
    name = request.param
    cut = CASES[name][0]
    root = tmp_path_factory.mktemp(name)
    spec = TrainSpec(
        data=str(images),
        model=f"{FACTORY_FILE}:{name}",
        cut=cut,
        epochs=1,
        batch_size=4,
        lr=0.01,
        codec="q8+zstd",
    )
    trained = run_training(spec)
    assert np.isfinite(trained.result.history[-1]["loss"])
    ckpt = save_checkpoint(root / "ckpt", trained)
    model = SplitModel.from_checkpoint(load_checkpoint(ckpt))
    # a few steps leave batch-norm running statistics far from the batch statistics: in eval
    # mode a BN layer then subtracts a large running mean from a large convolution output, and
    # fp32 kernels that fold BN into the convolution (ORT) round that cancellation differently
    # (measured up to 5e-5 of the cut's largest value for MobileNetV2, 2e-7 for ResNet-18;
    # both below 1e-6 with fresh statistics). The parity check scales atol by the cut's
    # largest value; 1e-4 of it (not the default 1e-5) covers that, and a wrong graph would be
    # off by the order of the scale itself.
    report = export_bundle(
        model, root / "bundle", ExportOptions(name=name, batch_sizes=(1, 3), atol=1e-4)
    )
    return name, Exported(ckpt, report.bundle, images, trained.dataset.x_test), report.manifest


def test_exports_with_parity(exported):
    name, ex, manifest = exported
    assert manifest["parity"]["passed"] and manifest["parity"]["batch_sizes"] == [1, 3]
    assert manifest["cut_shape"] == CASES[name][1]
    assert manifest["cuts"] == [CASES[name][0]]
    onnx.checker.check_model(onnx.load(str(ex.bundle / "client.onnx")), full_check=True)
    ckpt = load_checkpoint(ex.checkpoint)
    x = ex.x_test[:5]  # raw pixels: the fitted standardization is inside client.onnx
    with torch.no_grad():
        want = ckpt.parts.lowers[0].eval()(torch.from_numpy(x)).numpy()
    got = load_bundle(ex.bundle).run(x)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_runs_in_the_torch_free_edge_client(exported, serve, token):
    _, ex, _ = exported
    served = serve(ex)
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH,
            "client",
            "--bundle",
            str(ex.bundle),
            "--server",
            served.address,
            "--token",
            token,
            "--data",
            str(ex.npz),
            "--mode",
            "infer",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["samples"] == len(ex.x_test)
    assert 0.0 <= report["accuracy"] <= 1.0
