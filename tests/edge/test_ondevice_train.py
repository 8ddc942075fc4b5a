"""On-device training of a trainable bundle: ONNX backward graph + numpy optimizer, no torch.

The client side of the parity and gRPC tests runs in a subprocess where ``import torch`` (and
onnx, scikit-learn) raises ImportError, as on a device; the server runs in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesplit.data import iid_shard_indices
from edgesplit.edge.bundle import load_bundle
from edgesplit.edge.optim import SGD, Adam, make_optimizer
from edgesplit.edge.runtime import EdgeClient
from edgesplit.edge.trainer import STATE_FILE, EdgeTrainer, load_state, load_trainable
from edgesplit.errors import ConfigError, TransportError
from edgesplit.onnx_export import SplitModel
from edgesplit.onnx_export.trainable import export_trainable
from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
from edgesplit.train.client import SplitClient
from edgesplit.train.engine import run_training
from edgesplit.train.server import SplitServer
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.grpc_client import GrpcTransport
from edgesplit.transport.inprocess import InProcessTransport
from edgesplit.wire.labels import pack_labels
from edgesplit.wire.messages import Kind

ROOT = Path(__file__).resolve().parents[2]
BLOCK = """
import sys
BLOCKED = ("torch", "onnx", "onnxscript", "sklearn", "matplotlib")
for name in BLOCKED:
    sys.modules[name] = None
"""
CHECK_BLOCKED = """
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED)
if loaded:
    print("loaded:", loaded, file=sys.stderr)
    sys.exit(3)
"""
#: One epoch of the torch-free trainer over gRPC; writes its final parameters to argv[4].
EDGE_EPOCH = BLOCK + """
import numpy as np
from edgesplit.edge.trainer import EdgeTrainer, load_trainable
from edgesplit.transport.grpc_client import GrpcTransport
bundle, address, npz, out = sys.argv[1:5]
data = np.load(npz)
model = load_trainable(bundle)
with GrpcTransport(address, sys.argv[5]) as transport:
    EdgeTrainer(model, transport, seed=0).fit(data["x"], data["y"], epochs=1)
np.savez(out, **model.parameters())
""" + CHECK_BLOCKED
CLI = BLOCK + """
from edgesplit.cli.main import main
code = main(sys.argv[1:])
""" + CHECK_BLOCKED + "sys.exit(code)\n"


def _python(code: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_one_epoch_equals_the_torch_client(trainable, start_server, token, tmp_path):
    """Same initialisation, same batches, same lr/momentum: the torch-free client (torch
    unimportable) and the torch client end one epoch with the same weights."""
    ckpt = load_checkpoint(trainable.checkpoint)
    initial = {n: p.detach().clone() for n, p in ckpt.parts.lowers[0].named_parameters()}

    engine, running = start_server(trainable.checkpoint)
    assert running is not None
    out = tmp_path / "edge-params.npz"
    done = _python(EDGE_EPOCH, str(trainable.bundle), running.address, str(trainable.npz),
                   str(out), token)
    assert done.returncode == 0, done.stderr[-3000:]
    edge = dict(np.load(out))

    # the torch client: the order EdgeTrainer.epoch_order(n, 0) gives for seed 0
    torch_engine, _ = start_server(trainable.checkpoint, grpc=False)
    lower = ckpt.parts.lowers[0]
    client = SplitClient("edge", lower, InProcessTransport(torch_engine.handle),
                         codec=ckpt.spec.codec, grad_codec=ckpt.spec.grad_codec,
                         num_classes=10, lr=ckpt.spec.lr, momentum=0.9)
    n = len(trainable.y_train)
    order = np.random.default_rng([0, 0]).permutation(n)
    for start in range(0, n, 32):
        rows = order[start:start + 32]
        client.train_step(torch.from_numpy(trainable.x_train[rows]),
                          torch.from_numpy(trainable.y_train[rows]))
    assert engine.steps_applied == torch_engine.steps_applied == -(-n // 32)

    for name, param in lower.named_parameters():
        moved = float((param.detach() - initial[name]).abs().max())
        assert moved > 1e-3, f"{name} did not train"
        diff = float(np.abs(edge[name] - param.detach().numpy()).max())
        assert diff <= 1e-5, f"{name}: torch-free and torch clients differ by {diff:.2e}"


def test_cli_trains_over_grpc_to_093_and_writes_back_a_bundle(trainable, start_server, token,
                                                             tmp_path):
    """`edgesplit client --mode train` with a trainable bundle, torch unimportable: the device
    receives gradients, reaches ≥ 0.93 test accuracy, reports its RSS, checkpoints its state,
    and the trained client written back is an ordinary bundle giving the same accuracy."""
    engine, running = start_server(trainable.checkpoint)
    assert running is not None
    saved = tmp_path / "trained"
    done = _python(CLI, "client", "--bundle", str(trainable.bundle), "--server",
                   running.address, "--token", token, "--data", str(trainable.npz),
                   "--mode", "train", "--epochs", "3", "--json", "--state",
                   str(tmp_path / "state"), "--checkpoint-every", "10", "--save-bundle",
                   str(saved))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["accuracy"] >= 0.93, report["accuracy"]
    assert report["accuracy_on"] == "test" and report["test_samples"] == len(
        trainable.y_test)
    assert report["bytes_down"] > 0 and report["steps"] == 3 * -(-len(trainable.y_train)
                                                                  // 32)
    assert 0 < report["peak_rss_mib"] < 250   # a torch client needs > 300 MiB
    arrays, meta = load_state(tmp_path / "state") or ({}, {})
    assert meta["epoch"] == 3 and meta["batch"] == 0 and "momentum_0" in arrays

    # the written-back bundle is an ordinary one: the frozen edge client infers with it
    bundle = load_bundle(saved)
    assert "trainable" not in bundle.manifest
    with GrpcTransport(running.address, token) as transport:
        infer = EdgeClient(bundle, transport, mode="infer").run(
            trainable.x_test, trainable.y_test, on_progress=None)
    assert infer.accuracy == pytest.approx(report["accuracy"])


class _Flaky:
    """A transport that fails (before delivering) on its ``fail_at``-th request."""

    def __init__(self, handler, fail_at: int) -> None:
        self.inner = InProcessTransport(handler)
        self.fail_at = fail_at
        self.count = 0

    def request(self, message):
        self.count += 1
        if self.count == self.fail_at:
            raise TransportError("device rebooted")
        return self.inner.request(message)

    def close(self) -> None:
        pass


def test_a_rebooted_device_resumes_from_its_checkpoint(trainable, start_server, tmp_path):
    """A run cut off mid-epoch and resumed from --state ends where an uninterrupted run does."""
    x, y = trainable.x_train, trainable.y_train
    engine, _ = start_server(trainable.checkpoint, grpc=False)
    state = tmp_path / "state"
    first = EdgeTrainer(load_trainable(trainable.bundle), _Flaky(engine.handle, 20),
                        state_dir=state, checkpoint_every=7)
    with pytest.raises(TransportError):
        first.fit(x, y, epochs=2)
    second = EdgeTrainer(load_trainable(trainable.bundle), InProcessTransport(engine.handle),
                         state_dir=state, checkpoint_every=7)
    assert second.resumed_from == 14 and second.batch == 14   # the last checkpoint: step 14
    calls: list[tuple[str, int, int, str]] = []
    resumed = second.fit(x, y, epochs=2, on_progress=lambda *call: calls.append(call))
    # the progress callback counts the samples this run sends, out of what was left to send
    assert [c[1] for c in calls] == sorted({c[1] for c in calls}) and calls[-1][1] > 0
    assert all(c[2] == 2 * len(y) for c in calls) and calls[0][0].startswith("train ")
    # steps 14..18 were applied by the server before the reboot: it answered them from its
    # records, so nothing was applied twice
    assert engine.steps_applied == 2 * -(-len(y) // 32)
    assert resumed.resumed_from == 14

    clean_engine, _ = start_server(trainable.checkpoint, grpc=False)
    clean = load_trainable(trainable.bundle)
    clean_report = EdgeTrainer(clean, InProcessTransport(clean_engine.handle)).fit(
        x, y, epochs=2)
    for a, b in zip(second.model.params, clean.params, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # the epoch's report (asked on its last batch) covers the steps sent before the reboot too
    assert [h["train_accuracy"] for h in resumed.history] == \
        [h["train_accuracy"] for h in clean_report.history]
    assert [h["loss"] for h in resumed.history] == \
        pytest.approx([h["loss"] for h in clean_report.history], rel=1e-3)


class _Recorded:
    """An in-process transport that keeps every request and reply."""

    def __init__(self, handler) -> None:
        self.inner = InProcessTransport(handler)
        self.sent: list = []
        self.received: list = []

    @property
    def wire_bytes_up(self) -> int:
        return self.inner.wire_bytes_up

    @property
    def wire_bytes_down(self) -> int:
        return self.inner.wire_bytes_down

    def request(self, message):
        reply = self.inner.request(message)
        self.sent.append(message)
        self.received.append(reply)
        return reply

    def close(self) -> None:
        self.inner.close()


def test_trainer_sends_packed_labels_and_asks_for_one_report_an_epoch(trainable):
    """Against a server that knows the class count (WELCOME labels=y) the device sends labels as
    packed ``y``, asks ``report: true`` on the last batch of each epoch only, and its per-epoch
    loss and accuracy are the server's own counts of that epoch's steps."""
    ckpt = load_checkpoint(trainable.checkpoint)
    engine = SplitServer(ckpt.spec.config, ckpt.parts.server, codec=ckpt.spec.codec,
                         grad_codec=ckpt.spec.grad_codec, lr=ckpt.spec.lr, num_classes=10)
    x, y = trainable.x_train[:200], trainable.y_train[:200]
    transport = _Recorded(engine.handle)
    trainer = EdgeTrainer(load_trainable(trainable.bundle), transport, seed=0)
    report = trainer.fit(x, y, epochs=2)
    assert transport.received[0].meta["labels"] == "y"
    forwards = [(m, r) for m, r in zip(transport.sent, transport.received, strict=True)
                if m.kind == Kind.FORWARD]
    assert len(forwards) == 2 * 7   # 200 samples in batches of 32
    assert all("y" in m.tensors and "labels" not in m.tensors for m, _ in forwards)
    order = trainer.epoch_order(200, 0)
    assert forwards[0][0].tensors["y"] == pack_labels(y[order[:32]], 10)
    asked = [i for i, (m, _) in enumerate(forwards) if m.meta.get("report") is True]
    assert asked == [6, 13]
    assert [i for i, (_, r) in enumerate(forwards) if "loss" in r.meta] == asked
    assert all(forwards[i][1].meta["n"] == 200 for i in asked)
    stats = engine.stats["edge"]
    epochs = report.history
    assert len(epochs) == 2 and stats.labelled == 400
    correct = [forwards[i][1].meta["correct"] for i in asked]
    assert [h["train_accuracy"] for h in epochs] == [c / 200 for c in correct]
    assert sum(correct) == stats.correct
    assert report.train_accuracy == correct[1] / 200
    assert sum(h["loss"] for h in epochs) * 200 == pytest.approx(stats.loss_sum, rel=1e-3)


def test_numpy_optimizers_follow_torch():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(3).astype(
        np.float32)]
    for ours, theirs in ((SGD(0.1, 0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
                         (SGD(0.1, 0.0), lambda p: torch.optim.SGD(p, lr=0.1)),
                         (Adam(0.01), lambda p: torch.optim.Adam(p, lr=0.01))):
        mine = [p.copy() for p in params]
        tparams = [torch.tensor(p, requires_grad=True) for p in params]
        opt = theirs(tparams)
        for _ in range(5):
            grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
            ours.step(mine, grads)
            for t, g in zip(tparams, grads, strict=True):
                t.grad = torch.from_numpy(g.copy())
            opt.step()
        for a, t in zip(mine, tparams, strict=True):
            np.testing.assert_allclose(a, t.detach().numpy(), atol=1e-6)
    with pytest.raises(ConfigError, match="valid: sgd, adam"):
        make_optimizer("rmsprop", 0.1)
    with pytest.raises(ConfigError, match="momentum"):
        make_optimizer("sgd", 0.1, momentum=1.5)


def test_bundles_that_cannot_train_are_refused(trainable, start_server, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(trainable.bundle, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest.pop("trainable")
    (plain / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="export --trainable"):
        load_trainable(plain)

    tampered = tmp_path / "tampered"
    shutil.copytree(trainable.bundle, tampered)
    with open(tampered / "params.npz", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        load_trainable(tampered)

    other = tmp_path / "other-state"
    other.mkdir()
    (other / STATE_FILE).write_bytes(b"not an npz")
    engine, _ = start_server(trainable.checkpoint, grpc=False)
    with pytest.raises(ConfigError, match="unreadable"):
        EdgeTrainer(load_trainable(trainable.bundle), InProcessTransport(engine.handle),
                    state_dir=other)

    # writing the trained client over its own trainable bundle is refused before training
    trainer = EdgeTrainer(load_trainable(trainable.bundle), InProcessTransport(engine.handle))
    with pytest.raises(ConfigError, match="the trainable bundle itself"):
        trainer.fit(trainable.x_train[:64], trainable.y_train[:64],
                    save_bundle=trainable.bundle)
    assert engine.steps_applied == 0


def test_splitfed_devices_average_their_trained_layers(trainable, start_server, tmp_path):
    """Two torch-free splitfed clients train their own shards in parallel and end each epoch
    with the FedAvg of both parameter sets."""
    bundle = tmp_path / "splitfed"
    shutil.copytree(trainable.bundle, bundle)   # a splitfed client segment is a vanilla one
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["config"] = "splitfed"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    ckpt = load_checkpoint(trainable.checkpoint)
    engine = SplitServer("splitfed", ckpt.parts.server, lr=ckpt.spec.lr, wait_timeout=60)
    initial = load_trainable(bundle).params
    trainers, errors = [], []

    def run(index: int) -> None:
        rows = iid_shard_indices(len(trainable.y_train), index, 2)
        trainer = EdgeTrainer(load_trainable(bundle), InProcessTransport(engine.handle),
                              index=index, clients=2, session=f"s{index}", seed=index)
        trainers.append(trainer)
        try:
            trainer.fit(trainable.x_train[rows], trainable.y_train[rows], epochs=2)
        except Exception as exc:   # reported below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    first, second = (t.model.params for t in trainers)
    for a, b, start in zip(first, second, initial, strict=True):
        np.testing.assert_array_equal(a, b)   # both hold the same average
        assert float(np.abs(a - start).max()) > 1e-3
    assert engine.steps_applied == sum(t.step for t in trainers) - 2 * 2   # minus 2 averages


def test_vertical_parties_train_their_own_layers(trainable_vertical):
    """Two torch-free vertical parties (only party 0 holds the training labels) each train
    their own feature block's layers from their slice of the gradient."""
    checkpoint, bundles, data = trainable_vertical
    ckpt = load_checkpoint(checkpoint)
    engine = SplitServer("vertical", ckpt.parts.server, lr=ckpt.spec.lr, wait_timeout=60)
    reports, errors, trainers = {}, [], {}

    def run(party: int) -> None:
        trainer = trainers[party] = EdgeTrainer(
            load_trainable(bundles[party]), InProcessTransport(engine.handle),
            session=f"party{party}")
        try:
            reports[party] = trainer.fit(data.x_train, data.y_train if party == 0 else None,
                                         epochs=1, x_test=data.x_test, y_test=data.y_test)
        except Exception as exc:   # reported below, with the thread's error
            errors.append(exc)

    initial = [load_trainable(b).params for b in bundles]
    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert engine.steps_applied == -(-len(data.y_train) // 32)
    for party in range(2):
        assert reports[party].bytes_down > 0
        assert reports[party].accuracy == reports[0].accuracy >= 0.85
        moved = max(float(np.abs(a - b).max()) for a, b in zip(
            trainers[party].model.params, initial[party], strict=True))
        assert moved > 1e-3


def test_ushape_device_trains_its_segment_and_head_like_the_torch_client(tmp_path):
    """ushape: the head runs and trains on the device, the loss is computed there (labels never
    leave it), and one epoch ends with the torch client's weights; the trained client is
    written back with its head."""
    trained = run_training(TrainSpec(epochs=1, seed=0, config="ushape"))
    ckpt_dir = save_checkpoint(tmp_path / "ckpt", trained)
    export_trainable(SplitModel.from_checkpoint(load_checkpoint(ckpt_dir)), tmp_path / "b")
    data = trained.dataset

    ckpt = load_checkpoint(ckpt_dir)
    engine = SplitServer("ushape", ckpt.parts.server, lr=ckpt.spec.lr)
    model = load_trainable(tmp_path / "b")
    assert model.head is not None and model.names[-1] == "head.fc3.bias"
    trainer = EdgeTrainer(model, InProcessTransport(engine.handle))
    report = trainer.fit(data.x_train, data.y_train, epochs=1, x_test=data.x_test,
                         y_test=data.y_test, save_bundle=tmp_path / "trained")
    assert report.bytes_down > 0 and report.accuracy is not None and report.accuracy > 0.85

    twin = load_checkpoint(ckpt_dir)
    client = SplitClient("edge", twin.parts.lowers[0],
                         InProcessTransport(SplitServer("ushape", twin.parts.server,
                                                        lr=twin.spec.lr).handle),
                         num_classes=10, lr=twin.spec.lr, head=twin.parts.head)
    order = np.random.default_rng([0, 0]).permutation(len(data.y_train))
    for start in range(0, len(order), 32):
        rows = order[start:start + 32]
        client.train_step(torch.from_numpy(data.x_train[rows]),
                          torch.from_numpy(data.y_train[rows]))
    theirs = [p.detach().numpy() for m in (twin.parts.lowers[0], twin.parts.head)
              for p in m.parameters()]
    for name, ours, ref in zip(model.names, model.params, theirs, strict=True):
        assert float(np.abs(ours - ref).max()) <= 1e-5, name

    written = load_bundle(tmp_path / "trained")
    mid = np.random.default_rng(0).standard_normal((4, *written.head_input.shape)).astype(
        np.float32)
    logits, _ = model.head_forward(mid)
    np.testing.assert_allclose(written.run_head(mid), logits, atol=1e-5)
