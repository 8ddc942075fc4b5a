"""The edge client against a real gRPC split server: message flow, byte counts, accuracy,
probes, latency breakdown, and the errors raised before anything is sent."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from edgesplit.data import iid_shard_indices
from edgesplit.edge.bundle import load_bundle
from edgesplit.edge.runtime import EdgeClient, EdgeReport
from edgesplit.errors import ConfigError, ProtocolError, TransportError
from edgesplit.transport.envelope import StreamIds, wire_size
from edgesplit.transport.grpc_client import GrpcTransport, fetch_status
from edgesplit.wire.frame import encode_frame, read_header
from edgesplit.wire.labels import pack_labels
from edgesplit.wire.messages import Kind, Message, expect


@dataclass
class Recording:
    """Wraps a transport and keeps every request and reply that crossed it, and the serialised
    envelope bytes the inner transport counted for each (``wire_up``, ``wire_down``)."""

    inner: object
    sent: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)
    wire_up: list[int] = field(default_factory=list)
    wire_down: list[int] = field(default_factory=list)

    def request(self, message: Message) -> Message:
        up, down = self.wire_bytes_up, self.wire_bytes_down
        reply = self.inner.request(message)
        self.sent.append(message)
        self.received.append(reply)
        self.wire_up.append(self.wire_bytes_up - up)
        self.wire_down.append(self.wire_bytes_down - down)
        return reply

    def clear(self) -> None:
        for kept in (self.sent, self.received, self.wire_up, self.wire_down):
            kept.clear()

    def close(self) -> None:
        self.inner.close()

    @property
    def wire_bytes_up(self) -> int:
        return self.inner.wire_bytes_up

    @property
    def wire_bytes_down(self) -> int:
        return self.inner.wire_bytes_down

    @property
    def reconnects(self) -> int:
        return getattr(self.inner, "reconnects", 0)

    @property
    def resends(self) -> int:
        return getattr(self.inner, "resends", 0)


class NoServer:
    """A transport that must never be used."""

    def request(self, message: Message) -> Message:
        raise AssertionError(f"nothing should be sent, got {message.kind}")

    def close(self) -> None:
        pass


def _frames_len(messages: list[Message]) -> int:
    return sum(len(frame) for m in messages for frame in m.tensors.values())


def _fp32_len(frame: bytes) -> int:
    return len(encode_frame(np.zeros(read_header(frame).shape, np.float32), "fp32"))


def _compacted_sizes(messages: list[Message]) -> list[int]:
    """Serialised sizes of ``messages`` sent in order on one fresh stream (only the first
    carries the session and client; a kind repeating the previous one is left out)."""
    ids = StreamIds()
    return [wire_size(ids.compact(m)) for m in messages]


def _without(message: Message, name: str) -> Message:
    return replace(message, tensors={k: v for k, v in message.tensors.items() if k != name})


def _check_latency(report: EdgeReport) -> None:
    parts = ("compute", "encode", "network", "decode")
    for table in (report.latency_ms, report.latency_ms_total):
        assert set(table) == {*parts, "total"}
        assert all(table[k] >= 0 for k in table)
        assert table["total"] == pytest.approx(sum(table[k] for k in parts), rel=1e-6, abs=1e-6)
        assert table["network"] > 0 and table["compute"] > 0
    assert report.latency_ms["total"] == pytest.approx(
        report.latency_ms_total["total"] / report.batches)


def test_train_then_infer_on_digits(vanilla, serve, token):
    served = serve(vanilla)
    bundle = load_bundle(vanilla.bundle)
    with GrpcTransport(served.address, token) as grpc_transport:
        rec = Recording(grpc_transport)
        train = EdgeClient(bundle, rec, mode="train", probe_every=5, batch_size=64).run(
            vanilla.x_train, vanilla.y_train, on_progress=None)

        # message flow: HELLO first, then one FORWARD per batch, steps 0, 1, 2, ...
        assert [m.step for m in rec.sent] == list(range(len(rec.sent)))
        hello, forwards = rec.sent[0], rec.sent[1:]
        assert hello.kind == Kind.HELLO and rec.received[0].kind == Kind.WELCOME
        assert hello.meta["runtime"] == "edge" and hello.meta["mode"] == "train"
        assert hello.meta["codec"] == "q8+zstd"
        assert hello.meta["bundle_sha256"] == bundle.manifest["sha256"]["client.onnx"]
        n_batches = math.ceil(len(vanilla.x_train) / 64)
        assert train.batches == len(forwards) == n_batches
        assert all(m.kind == Kind.FORWARD for m in forwards)
        # only the last batch asks for the server's report; only its reply carries one
        assert all(m.meta == {"train": True, "want_grad": False} for m in forwards[:-1])
        assert forwards[-1].meta == {"train": True, "want_grad": False, "report": True}
        assert all(r.kind == Kind.GRADIENT and not r.tensors for r in rec.received[1:])
        assert all("loss" not in r.meta for r in rec.received[1:-1])
        last = rec.received[-1].meta
        assert last["n"] == len(vanilla.x_train) and 0 <= last["correct"] <= last["n"]
        # the server knows the class count (WELCOME labels=y): labels travel as bare packed
        # class ids, 4 bits a label for 10 classes, no frame header
        assert rec.received[0].meta["labels"] == "y"
        assert all("labels" not in m.tensors for m in forwards)
        order = np.random.default_rng(0).permutation(len(vanilla.x_train))
        assert forwards[0].tensors["y"] == pack_labels(vanilla.y_train[order[:64]], 10)
        assert len(forwards[0].tensors["y"]) == 64 * 4 // 8
        assert read_header(forwards[0].tensors["act"]).codec == "q8+zstd"
        probed = [i for i, m in enumerate(forwards) if "act_ref" in m.tensors]
        assert probed == list(range(0, n_batches, 5))
        assert read_header(forwards[0].tensors["act_ref"]).codec == "fp32"

        # bytes: the serialised envelopes the transport carried for the batches (HELLO and
        # WELCOME not counted), as sent on the stream (session and repeated kinds compacted)
        assert train.bytes_up == sum(rec.wire_up[1:]) == sum(_compacted_sizes(rec.sent)[1:])
        assert train.bytes_up == grpc_transport.wire_bytes_up - rec.wire_up[0]
        assert train.bytes_down == sum(rec.wire_down[1:]) == sum(
            _compacted_sizes(rec.received)[1:])
        assert train.bytes_down == grpc_transport.wire_bytes_down - rec.wire_down[0]
        # of which frames: what the transport counted as frame bytes; the rest is envelope
        assert train.bytes_up - train.envelope_up == _frames_len(rec.sent) \
            == grpc_transport.bytes_up
        assert train.bytes_down - train.envelope_down == _frames_len(rec.received) \
            == grpc_transport.bytes_down == 0
        assert train.envelope_up > 0 and train.envelope_down > 0  # gradient replies: no frame
        # probes: what the act_ref entries add to the envelopes (frames, names and lengths)
        assert train.bytes_probe == sum(wire_size(m) - wire_size(_without(m, "act_ref"))
                                        for m in forwards)
        assert train.bytes_probe > sum(len(m.tensors.get("act_ref", b"")) for m in forwards)
        # fp32 baseline: each act frame replaced by the fp32 frame of its tensor, nothing else
        acts = sum(len(m.tensors["act"]) for m in forwards)
        acts_fp32 = sum(_fp32_len(m.tensors["act"]) for m in forwards)
        fp32_extra = sum(
            wire_size(replace(m, tensors={**m.tensors, "act": bytes(_fp32_len(m.tensors["act"]))}))
            - wire_size(m) for m in forwards)
        assert train.bytes_up_fp32 - train.bytes_up == fp32_extra >= acts_fp32 - acts > 0
        # the ratio is the codec's, from the envelopes that crossed: the fp32 probe copies left
        # out of both sides, each act frame against the fp32 frame of its tensor
        sent = train.bytes_up - train.bytes_probe
        assert train.ratio_up == pytest.approx(
            (train.bytes_up_fp32 - train.bytes_probe) / (train.bytes_up - train.bytes_probe))
        assert train.ratio_up == pytest.approx((sent + fp32_extra) / sent)
        assert train.ratio_up > 3.0   # q8 is a quarter of fp32 before zstd and headers

        assert train.samples == train.labelled == len(vanilla.x_train)
        assert train.accuracy is not None and train.accuracy > 0.85
        assert train.loss is not None and 0 < train.loss < 1
        # the report is the server's own count of this run's steps
        stats = served.engine.stats["edge"]
        assert train.accuracy == stats.correct / stats.labelled == last["correct"] / last["n"]
        assert train.loss == pytest.approx(stats.loss_sum / stats.labelled, rel=1e-3)
        assert train.probes == len(probed) and train.predictions == 0 and train.pred is None
        assert train.reconnects == 0 and train.resends == 0
        _check_latency(train)

        # the server trained on it, and evaluated every probe
        assert served.engine.steps_applied == n_batches
        assert len(served.engine.probes) == len(probed)
        probe = served.engine.probes[-1]
        assert probe["client"] == "edge" and probe["snr_db"] > 20
        assert probe["bytes_act_fp32"] > probe["bytes_act"]

        rec.clear()
        infer = EdgeClient(bundle, rec, mode="infer", probe_every=3).run(
            vanilla.x_test, vanilla.y_test, on_progress=None)
        assert infer.accuracy is not None and infer.accuracy >= 0.9
        assert infer.predictions == len(vanilla.x_test) == len(infer.pred)
        assert infer.accuracy == pytest.approx(float(np.mean(infer.pred == vanilla.y_test)))
        assert all(m.kind == Kind.PREDICT and "y" in m.tensors and "labels" not in m.tensors
                   for m in rec.sent[1:])
        assert all(r.kind == Kind.PREDICTION for r in rec.received[1:])
        assert infer.bytes_up == sum(rec.wire_up[1:]) and infer.bytes_down == sum(rec.wire_down[1:])
        assert infer.bytes_up - infer.envelope_up == _frames_len(rec.sent)
        assert infer.bytes_down - infer.envelope_down == _frames_len(rec.received) > 0
        assert infer.loss is not None  # the server reports a loss when it gets labels
        _check_latency(infer)
        assert infer.session != train.session

    status = fetch_status(served.address, token)
    row = status["clients"]["edge"]
    assert row["steps"] == n_batches and row["samples"] == len(vanilla.x_train)
    assert status["last_probe"] is not None and status["last_probe"]["client"] == "edge"


def test_predictions_follow_input_order(vanilla, serve, token):
    """Inference keeps the input order (only training shuffles), including a short last batch.

    fp32 so that batching cannot change a prediction (q8 scales are per batch)."""
    served = serve(vanilla)
    bundle = load_bundle(vanilla.bundle)
    x = vanilla.x_test[:45]
    with GrpcTransport(served.address, token) as transport:
        seen: list[tuple[str, int, int, str]] = []
        full = EdgeClient(bundle, transport, batch_size=16, codec="fp32").run(
            x, on_progress=lambda *a: seen.append(a))
        one = EdgeClient(bundle, transport, batch_size=45, codec="fp32").run(x[::-1],
                                                                            on_progress=None)
    assert full.accuracy is None and full.labelled == 0 and full.batches == 3
    # one call per batch: samples done so far out of the total, the running bytes as info
    assert [(label, done, total) for label, done, total, _ in seen] == [
        ("infer fp32 samples", 16, 45), ("infer fp32 samples", 32, 45),
        ("infer fp32 samples", 45, 45)]
    assert all("KiB" in info for *_, info in seen)
    np.testing.assert_array_equal(full.pred, one.pred[::-1])


def test_ushape_infer_runs_the_head_on_the_device(ushape, serve, token):
    served = serve(ushape)
    bundle = load_bundle(ushape.bundle)
    assert bundle.has_head
    with GrpcTransport(served.address, token) as transport:
        rec = Recording(transport)
        report = EdgeClient(bundle, rec, mode="infer").run(ushape.x_test, ushape.y_test,
                                                           on_progress=None)
        with pytest.raises(ConfigError, match="frozen edge client cannot train"):
            EdgeClient(bundle, rec, mode="train")
    # labels never leave a ushape client; the server answers with its middle output
    assert all("labels" not in m.tensors for m in rec.sent)
    assert all(r.kind == Kind.MIDDLE for r in rec.received[1:])
    assert report.accuracy is not None and report.accuracy >= 0.8
    assert report.bytes_down == sum(rec.wire_down[1:])
    assert report.bytes_down - report.envelope_down == _frames_len(rec.received) > 0
    _check_latency(report)


def test_wrong_server_configuration_is_refused_naming_both(ushape, vanilla, serve, token):
    """The server refuses a HELLO for another configuration (FAILED_PRECONDITION: a refusal,
    not a malformed request), saying what the client was trained as and what it runs; the
    client raises a ConfigError of one line quoting it. Nothing past the HELLO is sent and the
    server trains on nothing."""
    served = serve(vanilla)
    bundle = load_bundle(ushape.bundle)
    with GrpcTransport(served.address, token) as transport:
        rec = Recording(transport)
        with pytest.raises(ConfigError, match="the server refused bundle 'digits-ushape' "
                           r"\(ushape, infer, .*\): this client was trained as ushape, but "
                           "the server runs vanilla") as info:
            EdgeClient(bundle, rec).run(ushape.x_test[:8], on_progress=None)
    message = str(info.value)
    assert "\n" not in message
    assert "connect to a ushape server, or use a vanilla bundle" in message
    assert [m.kind for m in rec.sent] == [Kind.HELLO] and rec.sent[0].meta["config"] == "ushape"
    assert [r.kind for r in rec.received] == [Kind.ERROR]
    assert rec.received[0].meta["code"] == "FAILED_PRECONDITION"
    assert served.engine.steps_applied == 0


class WelcomeAs:
    """A server that welcomes any HELLO as running ``config`` (it does not check HELLO's)."""

    def __init__(self, config: str) -> None:
        self.config = config
        self.sent: list[Message] = []

    def request(self, message: Message) -> Message:
        self.sent.append(message)
        return Message(Kind.WELCOME, message.session, message.client, message.step,
                       meta={"config": self.config, "codec": "q8+zstd"})

    def close(self) -> None:
        pass


def test_welcome_for_another_configuration_is_a_config_error(ushape):
    """A server that welcomes the HELLO anyway still cannot get batches: the client compares
    the WELCOME's configuration with its bundle's and stops with a ConfigError."""
    server = WelcomeAs("vanilla")
    with pytest.raises(ConfigError, match="'digits-ushape' was trained as ushape, but the "
                       "server runs vanilla"):
        EdgeClient(load_bundle(ushape.bundle), server).run(ushape.x_test[:8], on_progress=None)
    assert [m.kind for m in server.sent] == [Kind.HELLO]


@pytest.mark.parametrize(
    ("x", "y", "mode", "match"),
    [
        (np.zeros((4, 8, 8), np.float32), None, "infer", r"samples have shape \(8, 8\).*\(64,\)"),
        (np.zeros((4, 63), np.float32), None, "infer", r"expects samples of shape \(64,\)"),
        (np.zeros((0, 64), np.float32), None, "infer", "no samples"),
        (np.full((2, 64), np.nan, np.float32), None, "infer", "NaN"),
        (np.zeros((2, 64), np.float32), None, "train", "train mode needs labels"),
        (np.zeros((2, 64), np.float32), np.array([0, 10]), "train", r"class ids 0\.\.9"),
        (np.zeros((2, 64), np.float32), np.array([0]), "infer", "one class id per sample"),
        (np.zeros((2, 64), np.float32), np.array([0.5, 1]), "infer", "integer class ids"),
        ("not an array", None, "infer", "numpy array"),
    ],
)
def test_bad_data_is_refused_before_anything_is_sent(vanilla, x, y, mode, match):
    client = EdgeClient(load_bundle(vanilla.bundle), NoServer(), mode=mode)
    with pytest.raises(ConfigError, match=match):
        client.run(x, y, on_progress=None)


def test_data_is_converted_to_float32(vanilla):
    client = EdgeClient(load_bundle(vanilla.bundle), NoServer())
    x, y = client.check_data(np.ones((3, 64), np.float64), np.array([1.0, 2.0, 3.0]))
    assert x.dtype == np.float32 and y.dtype == np.int64


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "eval"}, ConfigError, "unknown mode 'eval'"),
        ({"probe_every": -1}, ConfigError, "probe_every"),
        ({"batch_size": 0}, ConfigError, "batch_size"),
        ({"codec": "q9"}, Exception, "q9"),
    ],
)
def test_bad_options(vanilla, kwargs, error, match):
    with pytest.raises(error, match=match):
        EdgeClient(load_bundle(vanilla.bundle), NoServer(), **kwargs)


def test_codec_override_is_sent(vanilla, serve, token):
    served = serve(vanilla)
    with GrpcTransport(served.address, token) as transport:
        rec = Recording(transport)
        report = EdgeClient(load_bundle(vanilla.bundle), rec, codec="q4+zstd").run(
            vanilla.x_test[:64], vanilla.y_test[:64], on_progress=None)
    assert report.codec == "q4+zstd" and rec.sent[0].meta["codec"] == "q4+zstd"
    assert read_header(rec.sent[1].tensors["act"]).codec == "q4+zstd"


def test_error_replies_become_typed_exceptions():
    invalid = Message(Kind.ERROR, step=3, meta={"code": "INVALID_ARGUMENT", "message": "bad"})
    with pytest.raises(ProtocolError, match="server refused step 3: INVALID_ARGUMENT: bad"):
        expect(invalid, Kind.GRADIENT)
    late = Message(Kind.ERROR, step=4, meta={"code": "DEADLINE_EXCEEDED", "message": "slow"})
    with pytest.raises(TransportError, match="DEADLINE_EXCEEDED") as info:
        expect(late, Kind.GRADIENT)
    assert not isinstance(info.value, ProtocolError)
    with pytest.raises(ProtocolError, match="expected gradient from the server, got 'ack'"):
        expect(Message(Kind.ACK), Kind.GRADIENT)


def test_iid_shards_are_disjoint_and_cover_the_data():
    shards = [iid_shard_indices(103, i, 4, seed=1) for i in range(4)]
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(103))
    assert {len(s) for s in shards} <= {25, 26}
    np.testing.assert_array_equal(shards[2], iid_shard_indices(103, 2, 4, seed=1))
    with pytest.raises(ConfigError):
        iid_shard_indices(10, 4, 4)
    with pytest.raises(ConfigError):
        iid_shard_indices(3, 0, 4)


def test_vertical_parties_send_their_own_features(vertical, serve, token):
    """Two frozen parties of one vertical model, each on its own stream with the full samples:
    each selects its feature block on the device; only party 0 holds the labels."""
    served = serve(vertical)
    tokens = {0: token, 1: "peer-token-9876543210"}
    reports: dict[tuple[int, str], EdgeReport] = {}
    errors: list[BaseException] = []

    def party(k: int, mode: str) -> None:
        bundle = load_bundle(vertical.bundle.with_name(
            vertical.bundle.name + (f"-party{k}" if k else "")))
        x, y = ((vertical.x_train, vertical.y_train) if mode == "train"
                else (vertical.x_test, vertical.y_test))
        try:
            with GrpcTransport(served.address, tokens[k], timeout=60) as transport:
                client = EdgeClient(bundle, transport, mode=mode, group="run-1", batch_size=64)
                reports[(k, mode)] = client.run(x, y if k == 0 else None, on_progress=None)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    for mode in ("train", "infer"):
        threads = [threading.Thread(target=party, args=(k, mode)) for k in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
    assert served.engine.steps_applied == math.ceil(len(vertical.x_train) / 64)
    assert reports[(0, "train")].accuracy is not None and reports[(1, "train")].accuracy is None
    infer0, infer1 = reports[(0, "infer")], reports[(1, "infer")]
    assert infer0.accuracy is not None and infer0.accuracy >= 0.7
    # both parties get the same joint prediction for the same samples
    np.testing.assert_array_equal(infer0.pred, infer1.pred)
