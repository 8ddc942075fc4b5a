"""Shared fixtures. Tests use real parts: real codecs, real frames, real sockets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Small split models run fastest on one thread; two spinning intra-op threads per process slow
# everything down when tests and servers share two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the edge-only environment has no torch
    pass


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``edgesplit ARGS`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "edgesplit.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=full_env,
    )


@pytest.fixture
def cli():
    return run_cli


# --------------------------------------------------------------------------------------- TLS
# A throwaway CA made with the openssl CLI: the ``cryptography`` package is not a dependency
# and openssl is on every CI image we use. Without it the TLS tests fail (not skip): TLS must
# be tested somewhere.
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(args: list[str], cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _leaf(cwd: Path, name: str, ca: str, ext: str) -> None:
    """A key + certificate called ``name`` signed by the CA ``ca``, with extensions ``ext``."""
    _openssl(["req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
              "-subj", f"/CN={name}"], cwd)
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
              "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
              "-extfile", f"{name}.ext"], cwd)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl CLI on PATH to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl(["req", "-x509", *_EC, "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                  "-days", "2", "-subj", f"/CN=edgesplit test {ca}"], d)
    _leaf(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                             "extendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "rogue", "other-ca", "extendedKeyUsage=clientAuth\n")
    return d


#: A user model with a residual block and a custom forward (not an nn.Sequential): what a user
#: brings with --model file.py:build (shared by the cut, CLI and export tests).
RESNET = '''
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

class TinyResNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block1 = Block(8)
        self.block2 = Block(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        if x.dim() == 2:   # digits arrive as 64 features
            x = x.reshape(x.shape[0], 1, 8, 8)
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))

def build(input_shape, num_classes):
    return TinyResNet(num_classes)
'''


@pytest.fixture(scope="session")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``resnet_tiny.py`` holding :data:`RESNET` (its factory is ``build``)."""
    path = tmp_path_factory.mktemp("usermodel") / "resnet_tiny.py"
    path.write_text(RESNET)
    return path
