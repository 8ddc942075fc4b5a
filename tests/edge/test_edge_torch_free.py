"""The edge client needs no torch: proven in processes where torch (and onnx, scikit-learn)
cannot be imported, and in a fresh virtual environment made by ``pip install`` of the repo
without extras."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Runs ``edgesplit ARGV`` with the training stack made unimportable (``import torch`` raises
#: ImportError, as on a device), then checks none of it slipped in.
BLOCKED = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib")
NO_TORCH = f"""
import sys
BLOCKED = {BLOCKED!r}
for name in BLOCKED:
    sys.modules[name] = None
from edgesplit.cli.main import main
code = main(sys.argv[1:])
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED)
if loaded:
    print("loaded:", loaded, file=sys.stderr)
    code = 3
sys.exit(code)
"""


def _run_blocked(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def test_help_without_torch():
    for argv in (["--help"], ["client", "--help"], ["status", "--help"]):
        done = _run_blocked(*argv)
        assert done.returncode == 0, done.stderr
        assert "usage: edgesplit" in done.stdout
    client_help = _run_blocked("client", "--help").stdout
    for option in ("--bundle", "--probe-every", "--trainable", "--shard", "--tls-ca", "x_test"):
        assert option in client_help


def test_infer_and_train_without_torch(vanilla, serve, token):
    served = serve(vanilla)
    base = ["client", "--bundle", str(vanilla.bundle), "--server", served.address,
            "--token", token, "--data", str(vanilla.npz), "--json"]
    done = _run_blocked(*base, "--mode", "infer", "--probe-every", "5")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["samples"] == len(vanilla.x_test) and report["accuracy"] >= 0.9
    assert report["bytes_up"] > 0 and report["latency_ms"]["network"] > 0

    done = _run_blocked(*base, "--mode", "train", "--limit", "64")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 64
    assert served.engine.steps_applied == 2

    done = _run_blocked("status", served.address, "--token", token, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["clients"]["edge"]["samples"] == 64


def test_builtin_dataset_without_scikit_learn_says_use_npz(vanilla):
    done = _run_blocked("client", "--bundle", str(vanilla.bundle), "--server", "127.0.0.1:1",
                        "--token", "t", "--data", "digits")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "needs scikit-learn" in lines[0] and ".npz" in lines[0]


def _copy_source(dest: Path) -> Path:
    """What ``pip install .`` needs, copied so the build does not write into the work tree."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "edgesplit", dest / "edgesplit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pip_install_without_extras_gives_a_working_edge_client(vanilla, serve, token,
                                                                tmp_path):
    """``pip install .`` (base dependencies from the package index or pip's cache, no extras):
    torch is absent, yet ``edgesplit client`` runs a real inference against the server."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    source = _copy_source(tmp_path / "src")
    # the test runner's environment would leak its packages into the new venv
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["COLUMNS"] = "200"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)],
                          capture_output=True, text=True, timeout=540, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    done = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr

    edgesplit = bindir / "edgesplit"
    done = subprocess.run([str(edgesplit), "client", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--bundle" in done.stdout

    served = serve(vanilla)
    done = subprocess.run(
        [str(edgesplit), "client", "--bundle", str(vanilla.bundle), "--server", served.address,
         "--token", token, "--data", str(vanilla.npz), "--mode", "infer", "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["samples"] == len(vanilla.x_test) and report["accuracy"] >= 0.9
    # it really ran from the new environment, not the work tree
    where = subprocess.run([str(python), "-c", "import edgesplit; print(edgesplit.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert str(env_dir) in where.stdout
