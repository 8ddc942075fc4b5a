"""On the torch-free (edge) install, commands that need the ``[train]`` extra say so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Blocks the [train] extra the way a `pip install .` without extras lacks it: any import raises
# ModuleNotFoundError, as it would there.
RUNNER = """
import sys
for name in ("torch", "onnx", "onnxscript", "sklearn", "matplotlib"):
    sys.modules[name] = None
from edgesplit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

COMMANDS = [
    "train --data {npz}",
    "serve --data {npz} --port 0",
    "evaluate --data {npz}",
    "export --from {tmp}/nothing --out {tmp}/bundle",
    "demo",
    "client --trainable --server 127.0.0.1:9 --data {npz}",
    "cuts --data {npz}",
]


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torchfree") / "x.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(64, 8)).astype("float32"), y=rng.integers(0, 2, 64))
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_torch_command_refused_in_one_line(command: str, npz: Path, tmp_path: Path) -> None:
    argv = command.format(npz=npz, tmp=tmp_path).split()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"edgesplit {argv[0]}: error:" in lines[0]
    assert "pip install 'edgesplit[train]'" in lines[0]


def test_edge_commands_still_parse_without_torch(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--bundle" in proc.stdout
