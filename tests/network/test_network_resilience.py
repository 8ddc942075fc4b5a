"""Real processes, real sockets: a server restart loses no applied step, a training client
killed mid-epoch stops nothing else and resumes exactly, wrong tokens and malformed frames are
refused cleanly."""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from netutil import ENV, ROOT, Server, client, finish, write_tokens

from edgesplit.errors import ProtocolError, TransportError
from edgesplit.transport.grpc_client import GrpcTransport, fetch_status
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message, expect

STEPS_PER_EPOCH = math.ceil(1347 / 32)  # digits training split, batch 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_restart_loses_no_applied_step(tmp_path):
    EPOCHS = 20  # enough work that the crash always lands mid-run
    tokens = write_tokens(tmp_path / "tokens.txt", ["client-0"])
    port = free_port()
    args = [
        "--tokens",
        str(tmp_path / "tokens.txt"),
        "--epochs",
        str(EPOCHS),
        "--state",
        str(tmp_path / "state"),
    ]
    first = Server(*args, "--port", str(port))
    trainer = client(
        "--trainable",
        "--server",
        f"127.0.0.1:{port}",
        "--token",
        tokens["client-0"],
        "--data",
        "digits",
        "--json",
        "--retries",
        "12",
    )
    # let it train a while, then kill the server hard (no graceful save)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if fetch_status(first.address, tokens["client-0"])["steps_applied"] >= 20:
            break
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    with Server(*args, "--port", str(port)):
        report = finish(trainer)
        status = fetch_status(f"127.0.0.1:{port}", tokens["client-0"])
    assert report["resends"] >= 1 or report["reconnects"] >= 1
    # every step applied exactly once: none lost in the crash, none applied twice on resend
    assert status["steps_applied"] == EPOCHS * STEPS_PER_EPOCH
    assert report["accuracy"] >= 0.85


def _trainable_export(root: Path) -> tuple[Path, Path, Path]:
    """A 1-epoch vanilla digits checkpoint, its trainable bundle, and the data as an npz."""
    from edgesplit.onnx_export import SplitModel
    from edgesplit.onnx_export.trainable import export_trainable
    from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
    from edgesplit.train.engine import run_training
    from edgesplit.train.spec import TrainSpec

    trained = run_training(TrainSpec(epochs=1, seed=0))
    ckpt = save_checkpoint(root / "ckpt", trained)
    bundle = root / "bundle"
    export_trainable(SplitModel.from_checkpoint(load_checkpoint(ckpt)), bundle)
    data = trained.dataset
    npz = root / "digits.npz"
    np.savez(npz, x=data.x_train, y=data.y_train, x_test=data.x_test, y_test=data.y_test)
    return ckpt, bundle, npz


def test_killed_training_client_does_not_stop_the_server_and_resumes_exactly(tmp_path):
    """A run admits one training client; killing it mid-epoch stops nothing else: Status and an
    infer-only client are served while it is dead, and no step moves. The killed device,
    restarted with its token and its --state, resumes its session and finishes the run with
    every step applied exactly once."""
    EPOCHS = 12
    ckpt, bundle, npz = _trainable_export(tmp_path)
    tokens = {"alice": "alice-token-0000-abcdefghijkl", "carol": "carol-token-0001-abcdefghijkl",
              "ops": "ops-token-0002-abcdefghijkl"}
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"alice {tokens['alice']} role=train\n"
                          f"carol {tokens['carol']} role=infer\n"
                          f"ops {tokens['ops']} role=admin\n")
    token_file.chmod(0o600)
    total = EPOCHS * STEPS_PER_EPOCH
    with Server("--from", str(ckpt), "--tokens", str(token_file)) as server:

        def steps() -> int:
            row = fetch_status(server.address, tokens["ops"])["clients"].get("alice", {})
            return int(row.get("steps", 0))

        train = ["--bundle", str(bundle), "--server", server.address, "--token",
                 tokens["alice"], "--data", str(npz), "--mode", "train", "--epochs",
                 str(EPOCHS), "--state", str(tmp_path / "device-state"), "--json"]
        doomed = client(*train)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and steps() < 10:
            time.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate()
        at_kill = steps()
        assert 10 <= at_kill < total, "the kill must land mid-run"

        # while alice is dead: an infer-only client is served, Status answers, nothing trains
        infer = finish(client("--bundle", str(bundle), "--server", server.address, "--token",
                              tokens["carol"], "--data", str(npz), "--mode", "infer",
                              "--json"))
        assert infer["samples"] == infer["predictions"] == 450
        assert infer["accuracy"] is not None and infer["accuracy"] > 0.5
        status = fetch_status(server.address, tokens["ops"])
        assert status["clients"]["alice"]["steps"] == at_kill == status["steps_applied"]
        assert status["run"]["members"] == ["alice"] and status["run"]["finished"] is None

        # alice comes back with her token and device state: same session, the steps it had
        # not checkpointed are answered from the server's record, the rest are trained
        report = finish(client(*train))
        status = fetch_status(server.address, tokens["ops"])
    assert report["resumed_from"] is not None and 0 < report["resumed_from"] <= at_kill
    assert report["resumed_from"] + report["steps"] == total
    assert status["clients"]["alice"]["steps"] == status["steps_applied"] == total
    assert report["accuracy"] >= 0.85


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    tokens = write_tokens(tmp / "tokens.txt", ["alice", "bob"])
    with Server("--tokens", str(tmp / "tokens.txt")) as server:
        yield server, tokens


def test_wrong_token_is_one_line_and_exit_2(served):
    server, _ = served
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesplit.cli.main",
            "client",
            "--trainable",
            "--server",
            server.address,
            "--token",
            "not-a-valid-token-000000",
            "--data",
            "digits",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0].lower(), proc.stderr


def test_malformed_frame_is_invalid_argument_and_server_keeps_serving(served):
    """A corrupt frame is INVALID_ARGUMENT and changes nothing: the same client's next good step
    trains, and another client's session is served. (``edgesplit serve`` refuses steps of a
    session that did not open with HELLO.)"""
    server, tokens = served
    good = encode_frame(np.zeros((2, 128), dtype=np.float32), "q8+zstd")
    labels = encode_frame(np.array([1, 2], dtype=np.uint8), "fp32")
    corrupt = bytearray(good)
    corrupt[-6] ^= 0xFF  # inside the payload: the CRC no longer matches

    def forward(act: bytes, session: str) -> Message:
        return Message(Kind.FORWARD, session, "", 1, {"act": act, "labels": labels},
                       {"train": True, "want_grad": True})

    with GrpcTransport(server.address, tokens["bob"]) as bob:
        # no HELLO on this session yet: refused as out of order, not as malformed
        with pytest.raises(TransportError, match="FAILED_PRECONDITION: .*HELLO"):
            expect(bob.request(forward(good, "s-bob")), Kind.GRADIENT)
        # bob only infers (the run's one training client is alice)
        expect(bob.request(Message(Kind.HELLO, "s-bob", "", 0, meta={"mode": "infer"})),
               Kind.WELCOME)
        reply = bob.request(Message(Kind.PREDICT, "s-bob", "", 1, {"act": good}))
        assert reply.kind == Kind.PREDICTION and "pred" in reply.tensors
    with GrpcTransport(server.address, tokens["alice"]) as alice:
        expect(alice.request(Message(Kind.HELLO, "s-alice", "", 0, meta={"mode": "train"})),
               Kind.WELCOME)
        with pytest.raises(ProtocolError, match="(?i)crc"):
            expect(alice.request(forward(bytes(corrupt), "s-alice")), Kind.GRADIENT)
        reply = alice.request(forward(good, "s-alice"))
    assert reply.kind == Kind.GRADIENT and "grad" in reply.tensors
    assert fetch_status(server.address, tokens["alice"])["clients"]["alice"]["steps"] == 1
