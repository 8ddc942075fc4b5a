"""The torch-free edge client reports the bytes it puts on the wire as the torch client does:
serialised envelopes (frames, names, ids, meta), with labels bit-packed, over a real gRPC
transport."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgesplit.edge.bundle import load_bundle
from edgesplit.edge.runtime import EdgeClient, labels_frame
from edgesplit.transport.envelope import wire_size
from edgesplit.transport.grpc_client import GrpcTransport
from edgesplit.wire.frame import decode_frame, encode_frame
from edgesplit.wire.labels import pack_labels, unpack_labels
from edgesplit.wire.messages import Kind, Message


@dataclass
class Counting:
    """Wraps a transport: keeps each exchange and the transport's wire counts around it."""

    inner: GrpcTransport
    exchanges: list[tuple[Message, Message, int, int]] = field(default_factory=list)

    @property
    def wire_bytes_up(self) -> int:
        return self.inner.wire_bytes_up

    @property
    def wire_bytes_down(self) -> int:
        return self.inner.wire_bytes_down

    def request(self, message: Message) -> Message:
        up, down = self.inner.wire_bytes_up, self.inner.wire_bytes_down
        reply = self.inner.request(message)
        self.exchanges.append(
            (message, reply, self.inner.wire_bytes_up - up, self.inner.wire_bytes_down - down)
        )
        return reply

    def close(self) -> None:
        self.inner.close()


def test_labels_are_bit_packed_like_the_torch_client(vanilla):
    import torch

    from edgesplit.train.frames import encode_labels

    bundle = load_bundle(vanilla.bundle)
    y = np.arange(10).repeat(7)
    frame = labels_frame(y, bundle)
    np.testing.assert_array_equal(decode_frame(frame), y)
    # 70 labels of 10 classes: 4 bits each, 35 bytes of payload instead of 70 (the frame
    # records the bit width: a few header bytes more)
    assert len(frame) < len(encode_frame(y.astype(np.uint8), "fp32")) - 30
    assert frame == encode_labels(torch.from_numpy(y), 10)


def test_edge_report_counts_the_envelopes_it_sends_and_receives(vanilla, serve, token):
    served = serve(vanilla)
    bundle = load_bundle(vanilla.bundle)
    with GrpcTransport(served.address, token) as grpc:
        counting = Counting(grpc)
        x, y = vanilla.x_test[:200], vanilla.y_test[:200]
        report = EdgeClient(bundle, counting, mode="infer", probe_every=3, batch_size=64).run(
            x, y, on_progress=None
        )
    hello, *batches = counting.exchanges
    assert hello[0].kind == Kind.HELLO and len(batches) == report.batches == 4
    # what the transport carried for the batches, HELLO/WELCOME left out (as before)
    assert report.bytes_up == sum(up for *_, up, _ in batches)
    assert report.bytes_down == sum(down for *_, down in batches)
    frames_up = sum(m.tensor_bytes() for m, *_ in batches)
    frames_down = sum(r.tensor_bytes() for _, r, *_ in batches)
    assert report.envelope_up == report.bytes_up - frames_up > 0
    assert report.envelope_down == report.bytes_down - frames_down > 0
    # the server counts frames: the same frames arrived
    assert served.engine.stats["edge"].bytes_in == report.bytes_up - report.envelope_up
    # labels: the WELCOME offers packed labels, so bare class ids at 4 bits for 10 classes
    assert hello[1].meta["labels"] == "y"
    first = batches[0][0]
    assert "labels" not in first.tensors
    assert first.tensors["y"] == pack_labels(y[:64], 10)
    np.testing.assert_array_equal(unpack_labels(first.tensors["y"], 64, 10), y[:64])
    assert len(first.tensors["y"]) == 32
    # probes: what their tensor entries add to the envelopes
    probed = [m for m, *_ in batches if "act_ref" in m.tensors]
    assert len(probed) == report.probes == 2
    without = [
        Message(
            m.kind,
            m.session,
            m.client,
            m.step,
            {k: v for k, v in m.tensors.items() if k != "act_ref"},
            m.meta,
        )
        for m in probed
    ]
    assert report.bytes_probe == sum(
        wire_size(m) - wire_size(w) for m, w in zip(probed, without, strict=True)
    )
    assert report.bytes_up_fp32 > report.bytes_up and report.ratio_up > 3


def test_labels_travel_as_a_frame_when_the_welcome_offers_no_packed_labels(
    vanilla, start_server, token
):
    """A server that does not know the class count up front says nothing about ``labels`` in
    its WELCOME: the client then sends a bit-packed labels frame, never ``y``."""
    _engine, running = start_server(vanilla.checkpoint)
    bundle = load_bundle(vanilla.bundle)
    x, y = vanilla.x_test[:100], vanilla.y_test[:100]
    with GrpcTransport(running.address, token) as grpc:
        counting = Counting(grpc)
        report = EdgeClient(bundle, counting, mode="train", batch_size=50).run(
            x, y, on_progress=None
        )
    (hello, welcome, *_), *batches = counting.exchanges
    assert "labels" not in welcome.meta
    assert all("y" not in m.tensors for m, *_ in batches)
    order = np.random.default_rng(0).permutation(100)
    first = batches[0][0]
    assert first.tensors["labels"] == labels_frame(y[order[:50]], bundle)
    # the last batch asked for the report, and it covers both batches
    assert [m.meta.get("report") for m, *_ in batches] == [None, True]
    assert report.labelled == 100 and report.accuracy is not None and report.loss is not None
