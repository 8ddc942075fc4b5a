"""The server screens cut activations against the training distribution (issue 10, item 1):
a checkpoint trained in process carries the reference; a server built from it flags (or, with
policy ``refuse``, refuses before anything is applied) batches from inputs ×16, shifted inputs
or garbage, and never flags the training or test split's own batches."""

from __future__ import annotations

import copy
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesplit.errors import ConfigError
from edgesplit.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgesplit.train.engine import run_training
from edgesplit.train.frames import encode_labels
from edgesplit.train.server import SplitServer
from edgesplit.train.server_drift import (
    MAX_OUT_FRACTION,
    DriftGuard,
    DriftReference,
    check_batch,
    fit_reference,
)
from edgesplit.train.spec import TrainSpec
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message

BATCH = 32


def _train(tmp: Path, config: str, clients: int, epochs: int) -> Checkpoint:
    trained = run_training(TrainSpec(config=config, clients=clients, epochs=epochs))
    return load_checkpoint(save_checkpoint(tmp / config, trained))


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return _train(tmp_path_factory.mktemp("drift"), "vanilla", 1, 3)


@pytest.fixture(scope="module")
def digits(vanilla: Checkpoint):
    from edgesplit.data import load_dataset

    return load_dataset("digits")


def _server(ck: Checkpoint, policy: str | None = "flag", **guard) -> SplitServer:
    drift = None if policy is None else DriftGuard.from_json(ck.meta["drift_reference"], policy)
    if drift is not None and guard:
        drift = DriftGuard(drift.references, policy or "flag", **guard)
    return SplitServer(
        ck.spec.config,
        copy.deepcopy(ck.parts.server),
        codec=ck.spec.codec,
        lr=ck.spec.lr,
        num_classes=ck.num_classes,
        drift=drift,
    )


def _act(ck: Checkpoint, x: np.ndarray, party: int = 0) -> bytes:
    lower = ck.parts.lowers[party]
    if ck.parts.blocks:
        lo, hi = ck.parts.blocks[party]
        x = x[..., lo:hi]
    lower.eval()
    with torch.no_grad():
        act = lower(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return encode_frame(act.numpy(), "fp32")


def _forward(ck: Checkpoint, x: np.ndarray, y: np.ndarray, step: int, client="ward-1"):
    tensors = {"act": _act(ck, x), "labels": encode_labels(torch.from_numpy(y), ck.num_classes)}
    return Message(Kind.FORWARD, "s", client, step, tensors)


def _predict(ck: Checkpoint, x: np.ndarray, step: int, client="ward-1") -> Message:
    return Message(Kind.PREDICT, "p", client, step, {"act": _act(ck, x)})


def _weights(server: SplitServer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in server.segment.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_carries_the_reference_of_the_decoded_cut(vanilla: Checkpoint, digits):
    saved = json.loads((vanilla.path / "checkpoint.json").read_text())["drift_reference"]
    assert len(saved) == 1
    reference = DriftReference.from_json(saved[0])
    cut = tuple(vanilla.meta["result"]["cut_shape"])
    assert reference.shape == cut and reference.channels == cut[0]
    # every training sample, once in train mode and once in eval mode
    assert reference.samples == 2 * len(digits.y_train)
    assert (reference.lo <= reference.mean).all() and (reference.mean <= reference.hi).all()
    assert (reference.std >= 0).all()
    with pytest.raises(ConfigError, match="malformed drift reference"):
        DriftReference.from_json({**saved[0], "mean": saved[0]["mean"][:-1]})
    with pytest.raises(ConfigError, match="unknown drift policy 'block'"):
        DriftGuard([reference], "block")


def test_training_and_test_batches_are_never_flagged(vanilla: Checkpoint, digits):
    server = _server(vanilla)
    x, y = digits.x_train, digits.y_train
    step = 0
    for start in range(0, len(y), BATCH):
        step += 1
        reply = server.handle(
            _forward(vanilla, x[start : start + BATCH], y[start : start + BATCH], step)
        )
        assert reply.kind == Kind.GRADIENT, reply.meta
        assert "drift" not in reply.meta, reply.meta["drift"]
    assert server.steps_applied == step
    # the test split, in batches and one sample at a time, as PREDICT
    xt = digits.x_test
    for start in range(0, len(xt), BATCH):
        reply = server.handle(_predict(vanilla, xt[start : start + BATCH], start + 1))
        assert reply.kind == Kind.PREDICTION and "drift" not in reply.meta, reply.meta
    reference = server.drift.references[0] if server.drift else None
    assert reference is not None
    singles = [
        check_batch(torch.from_numpy(_decoded(vanilla, xt[i : i + 1])), reference)
        for i in range(len(xt))
    ]
    assert not any(v.drift for v in singles), max(v.out_fraction for v in singles)
    row = server.status()["clients"]["ward-1"]
    assert row["drift_flagged"] == 0 and row["drift_refused"] == 0
    assert server.status()["drift"]["policy"] == "flag"


def _decoded(ck: Checkpoint, x: np.ndarray) -> np.ndarray:
    from edgesplit.wire.frame import decode_frame

    return decode_frame(_act(ck, x))


def _off_distribution(digits) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = digits.x_train[:BATCH]
    return {
        "x16": x * 16,
        "shifted": x + 2.0,
        "garbage": rng.uniform(0, 16, x.shape).astype(np.float32),
    }


def test_inputs_x16_shifted_and_garbage_are_flagged_and_still_applied(
    vanilla: Checkpoint, digits, caplog
):
    records: list[dict] = []
    server = _server(vanilla)
    server.on_probe = records.append
    y = digits.y_train[:BATCH]
    caplog.set_level(logging.WARNING, logger="edgesplit.train.server_drift")
    for step, (name, x) in enumerate(_off_distribution(digits).items(), start=1):
        before = _weights(server)
        reply = server.handle(_forward(vanilla, x, y, step))
        assert reply.kind == Kind.GRADIENT, (name, reply.meta)
        drift = reply.meta["drift"]
        assert drift["out_fraction"] > MAX_OUT_FRACTION, (name, drift)
        assert drift["channels"] and {"channel", "seen", "range"} <= drift["channels"][0].keys()
        assert not _same(before, _weights(server))  # policy flag: the step is applied
    # activations that are garbage themselves (not through the client segment)
    garbage = np.random.default_rng(1).normal(0, 50, (BATCH, *vanilla.meta["result"]["cut_shape"]))
    msg = Message(
        Kind.FORWARD,
        "s",
        "ward-1",
        4,
        {
            "act": encode_frame(garbage.astype(np.float32), "fp32"),
            "labels": encode_labels(torch.from_numpy(y), vanilla.num_classes),
        },
    )
    assert "drift" in server.handle(msg).meta
    prediction = server.handle(_predict(vanilla, digits.x_test[:BATCH] * 16, 1))
    assert prediction.kind == Kind.PREDICTION and "drift" in prediction.meta
    assert server.steps_applied == 4
    row = server.status()["clients"]["ward-1"]
    assert row["drift_flagged"] == 5 and row["drift_refused"] == 0
    # the metrics log gets one drift record per flagged batch
    events = [r for r in records if r.get("event") == "drift"]
    assert [(r["kind"], r["step"]) for r in events] == [
        (Kind.FORWARD, 1),
        (Kind.FORWARD, 2),
        (Kind.FORWARD, 3),
        (Kind.FORWARD, 4),
        (Kind.PREDICT, 1),
    ]
    # one warning for this client's first flagged batch (then one per WARN_EVERY)
    warnings = [r for r in caplog.records if "off the training distribution" in r.getMessage()]
    assert len(warnings) == 1 and "ward-1" in warnings[0].getMessage()


def test_warnings_are_rate_limited_per_client(vanilla: Checkpoint, digits, caplog):
    server = _server(vanilla, warn_every=3)
    x, y = digits.x_train[:BATCH] * 16, digits.y_train[:BATCH]
    caplog.set_level(logging.WARNING, logger="edgesplit.train.server_drift")
    for step in range(1, 8):
        server.handle(_forward(vanilla, x, y, step, client="ward-1"))
    server.handle(_forward(vanilla, x, y, 1, client="ward-2"))
    warned = [r.getMessage() for r in caplog.records if "off the training" in r.getMessage()]
    # ward-1: its 1st, 4th and 7th flagged batch; ward-2: its first
    assert sum("'ward-1'" in m for m in warned) == 3
    assert sum("'ward-2'" in m for m in warned) == 1


def test_refuse_applies_nothing_and_names_the_channels(vanilla: Checkpoint, digits):
    server = _server(vanilla, "refuse")
    y = digits.y_train[:BATCH]
    before = _weights(server)
    for step, (name, x) in enumerate(_off_distribution(digits).items(), start=1):
        reply = server.handle(_forward(vanilla, x, y, step))
        assert reply.kind == Kind.ERROR, name
        assert reply.meta["code"] == "FAILED_PRECONDITION"
        text = reply.meta["message"]
        assert "channel" in text and "trained" in text and "\n" not in text, text
    assert server.steps_applied == 0
    assert _same(before, _weights(server))
    # the refused steps left no record: a corrected batch with the same step id is applied
    reply = server.handle(_forward(vanilla, digits.x_train[:BATCH], y, 3))
    assert reply.kind == Kind.GRADIENT and "drift" not in reply.meta
    assert server.steps_applied == 1
    # PREDICT is answered, flagged
    prediction = server.handle(_predict(vanilla, digits.x_test[:BATCH] * 16, 1))
    assert prediction.kind == Kind.PREDICTION and "drift" in prediction.meta
    row = server.status()["clients"]["ward-1"]
    assert row["drift_refused"] == 3 and row["drift_flagged"] == 1
    assert server.status()["drift"]["clients"]["ward-1"]["checked"] == 5


def test_drift_counters_survive_a_restart(vanilla: Checkpoint, digits):
    server = _server(vanilla, "refuse")
    server.handle(_forward(vanilla, digits.x_train[:BATCH] * 16, digits.y_train[:BATCH], 1))
    tensors, meta = server.export_state()
    restarted = _server(vanilla, "refuse")
    restarted.import_state(tensors, json.loads(json.dumps(meta)))
    assert restarted.status()["clients"]["ward-1"]["drift_refused"] == 1


def test_without_a_guard_nothing_is_screened(vanilla: Checkpoint, digits):
    server = _server(vanilla, None)
    reply = server.handle(_forward(vanilla, digits.x_train[:BATCH] * 16, digits.y_train[:BATCH], 1))
    assert reply.kind == Kind.GRADIENT and "drift" not in reply.meta
    assert server.status()["drift"] == {"policy": "off"}
    assert DriftGuard.from_json(None) is None


def test_non_finite_and_misshapen_activations_drift():
    reference = fit_reference([np.random.default_rng(0).normal(size=(64, 4, 3))])
    ok = check_batch(np.random.default_rng(1).normal(size=(8, 4, 3)) * 0.5, reference)
    assert not ok.drift and ok.out_fraction == 0.0
    bad = np.zeros((8, 4, 3))
    bad[:, 2] = np.nan
    verdict = check_batch(bad, reference)
    assert verdict.drift and verdict.worst[0][0] == 2
    other = check_batch(np.zeros((8, 12)), reference)
    assert other.drift and "(12,)" in other.sentence()


def test_ushape_refuses_the_forward_so_nothing_is_pending(tmp_path: Path, digits):
    ck = _train(tmp_path, "ushape", 1, 1)
    server = _server(ck, "refuse")
    before = _weights(server)
    bad = Message(Kind.FORWARD, "s", "ward-1", 1, {"act": _act(ck, digits.x_train[:BATCH] * 16)})
    reply = server.handle(bad)
    assert reply.kind == Kind.ERROR and reply.meta["code"] == "FAILED_PRECONDITION"
    assert server.held_bytes() == 0 and _same(before, _weights(server))
    good = Message(Kind.FORWARD, "s", "ward-1", 1, {"act": _act(ck, digits.x_train[:BATCH])})
    reply = server.handle(good)
    assert reply.kind == Kind.MIDDLE and "drift" not in reply.meta
    flagged = _server(ck, "flag").handle(bad)
    assert flagged.kind == Kind.MIDDLE and "drift" in flagged.meta


def test_vertical_refusal_reaches_every_party_and_names_the_drifted_one(tmp_path: Path, digits):
    ck = _train(tmp_path, "vertical", 2, 1)
    assert len(ck.meta["drift_reference"]) == 2
    x, y = digits.x_train[:BATCH], digits.y_train[:BATCH]

    def step(server: SplitServer, scale: list[float], n: int) -> list[Message]:
        replies: list[Message] = [Message(Kind.ERROR)] * 2

        def send(k: int) -> None:
            tensors = {"act": _act(ck, x * scale[k], party=k)}
            if k == 0:
                tensors["labels"] = encode_labels(torch.from_numpy(y), ck.num_classes)
            meta = {"parties": 2, "party": k}
            replies[k] = server.handle(Message(Kind.FORWARD, "s", f"party-{k}", n, tensors, meta))

        threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return replies

    server = _server(ck, "refuse")
    before = _weights(server)
    replies = step(server, [1.0, 16.0], 1)
    for reply in replies:
        assert reply.kind == Kind.ERROR and reply.meta["code"] == "FAILED_PRECONDITION"
        assert "party 1" in reply.meta["message"]
    assert server.steps_applied == 0 and _same(before, _weights(server))
    status = server.status()["clients"]
    assert status["party-1"]["drift_refused"] == 1 and status["party-0"]["drift_refused"] == 0
    replies = step(server, [1.0, 1.0], 2)
    assert all(r.kind == Kind.GRADIENT and "drift" not in r.meta for r in replies)
    flagging = _server(ck, "flag")
    replies = step(flagging, [1.0, 16.0], 1)
    assert [r.kind for r in replies] == [Kind.GRADIENT, Kind.GRADIENT]
    assert "drift" not in replies[0].meta and "drift" in replies[1].meta


def test_a_sparse_codec_still_shows_drift_through_the_values_it_keeps(vanilla: Checkpoint, digits):
    # topk:0.05 sends 5% of the values: zeros are in range, the few kept are far out
    reference = DriftReference.from_json(vanilla.meta["drift_reference"][0])

    def topk(x: np.ndarray) -> np.ndarray:
        act = _decoded(vanilla, x)
        keep = np.abs(act) >= np.quantile(np.abs(act), 0.95)
        return np.where(keep, act, 0.0)

    drifted = check_batch(topk(digits.x_train[:BATCH] * 16), reference)
    assert drifted.drift and drifted.out_fraction <= MAX_OUT_FRACTION + 0.01
    assert drifted.far_fraction > 0.03
    assert not check_batch(topk(digits.x_test[:BATCH]), reference).drift


def test_the_checkpoint_builds_the_guard(vanilla: Checkpoint, tmp_path: Path):
    guard = vanilla.drift_guard("refuse")
    assert guard is not None and guard.policy == "refuse" and len(guard.references) == 1
    meta = {k: v for k, v in vanilla.meta.items() if k != "drift_reference"}
    older = Checkpoint(vanilla.path, meta, vanilla.spec, vanilla.parts)
    assert older.drift_guard() is None  # saved before references existed: no guard
    broken = Checkpoint(
        vanilla.path, {**meta, "drift_reference": [{"shape": [2]}]}, vanilla.spec, vanilla.parts
    )
    with pytest.raises(ConfigError, match="checkpoint.json: malformed drift reference"):
        broken.drift_guard()


def test_serve_builds_the_guard_its_drift_option_names(vanilla: Checkpoint, caplog) -> None:
    from edgesplit.train.serving import server_from_checkpoint

    path = vanilla.path
    for policy in ("flag", "refuse"):
        server, _ = server_from_checkpoint(path, drift=policy)
        assert server.drift is not None and server.drift.policy == policy
    server, _ = server_from_checkpoint(path, drift="off")
    assert server.drift is None
    with pytest.raises(ConfigError, match="drift policy"):
        server_from_checkpoint(path, drift="ignore")
