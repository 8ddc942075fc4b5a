"""Real processes, real sockets: a server restart loses no applied step, a client that dies
mid-epoch does not stop another, wrong tokens and malformed frames are refused cleanly."""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from netutil import ENV, ROOT, Server, client, finish, write_tokens

from edgesplit.errors import ProtocolError
from edgesplit.transport.grpc_client import GrpcTransport, fetch_status
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message

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


def test_client_dying_mid_epoch_does_not_stop_another(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.txt", ["alice", "bob"])
    with Server("--tokens", str(tmp_path / "tokens.txt"), "--epochs", "4") as server:
        common = ["--trainable", "--server", server.address, "--data", "digits", "--json"]
        # alice has far more work than bob, and is killed as soon as she is under way
        doomed = client(*common, "--token", tokens["alice"], "--epochs", "200")
        survivor = client(*common, "--token", tokens["bob"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            steps = fetch_status(server.address, tokens["bob"])["clients"].get("alice", {})
            if steps.get("steps", 0) >= 5:
                break
            time.sleep(0.2)
        doomed.kill()
        doomed.communicate()
        report = finish(survivor)
        status = fetch_status(server.address, tokens["bob"])
    assert report["accuracy"] >= 0.85
    assert status["clients"]["bob"]["steps"] == 4 * STEPS_PER_EPOCH
    assert 5 <= status["clients"]["alice"]["steps"] < 200 * STEPS_PER_EPOCH


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
    server, tokens = served
    good = encode_frame(np.zeros((2, 128), dtype=np.float32), "q8+zstd")
    labels = encode_frame(np.array([1, 2], dtype=np.uint8), "fp32")
    corrupt = bytearray(good)
    corrupt[-6] ^= 0xFF  # inside the payload: the CRC no longer matches
    with (
        GrpcTransport(server.address, tokens["alice"]) as alice,
        pytest.raises(ProtocolError, match="(?i)crc"),
    ):
        alice.request(
            Message(
                Kind.FORWARD,
                "s-alice",
                "",
                1,
                {"act": bytes(corrupt), "labels": labels},
                {"train": True, "want_grad": True},
            )
        )
    with GrpcTransport(server.address, tokens["bob"]) as bob:
        reply = bob.request(
            Message(
                Kind.FORWARD,
                "s-bob",
                "",
                1,
                {"act": good, "labels": labels},
                {"train": True, "want_grad": True},
            )
        )
    assert reply.kind == Kind.GRADIENT and "grad" in reply.tensors
