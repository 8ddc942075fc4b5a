"""The deployment path with real processes: ``edgesplit serve`` from an export's server
segment, and the torch-free edge client in its own process (torch and onnx blocked), in train
and infer mode, with probes logged by the server."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from netutil import ENV, ROOT, Server, write_tokens

from edgesplit.cli.demo import TORCH_FREE
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.grpc_client import fetch_status


def edge_client(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, "client", *args, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_frozen_edge_client_train_and_infer_against_serve(tmp_path):
    trained = run_training(TrainSpec(epochs=5, codec="q4+zstd"))
    ck = save_checkpoint(tmp_path / "ck", trained)
    report = export_bundle(
        SplitModel.from_checkpoint(load_checkpoint(ck), trained.dataset),
        tmp_path / "bundle",
        ExportOptions(name="net-edge"),
    )
    data = trained.dataset
    npz = tmp_path / "device.npz"
    np.savez(npz, x=data.x_train, y=data.y_train, x_test=data.x_test, y_test=data.y_test)
    tokens = write_tokens(tmp_path / "tokens.txt", ["ward-3"])
    metrics = tmp_path / "metrics.jsonl"
    with Server(
        "--from",
        str(report.server),
        "--tokens",
        str(tmp_path / "tokens.txt"),
        "--metrics",
        str(metrics),
    ) as server:
        common = [
            "--bundle",
            str(report.bundle),
            "--server",
            server.address,
            "--token",
            tokens["ward-3"],
            "--data",
            str(npz),
        ]
        train = edge_client(*common, "--mode", "train", "--probe-every", "4")
        infer = edge_client(*common, "--mode", "infer")
        status = fetch_status(server.address, tokens["ward-3"])
    # no gradients: the replies are envelopes without frames
    assert train["samples"] == len(data.y_train)
    assert train["bytes_down"] - train["envelope_down"] == 0 < train["bytes_down"]
    assert infer["samples"] == len(data.y_test) and infer["accuracy"] >= 0.9
    assert set(infer["latency_ms"]) >= {"compute", "encode", "network"}
    # the server counted exactly the frames the client says it sent (its envelope bytes less
    # their non-frame part)
    frames_up = [r["bytes_up"] - r["envelope_up"] for r in (train, infer)]
    assert min(frames_up) > 0
    assert status["clients"]["ward-3"]["bytes_in"] == sum(frames_up)
    probes = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(probes) == train["probes"] > 0
    assert all(p["client"] == "ward-3" and p["bytes_act"] < p["bytes_act_fp32"] for p in probes)
    assert all(0 <= p["accuracy_decoded"] <= 1 and p["snr_db"] > 5 for p in probes)
