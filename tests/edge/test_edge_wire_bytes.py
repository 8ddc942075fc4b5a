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
from edgesplit.wire.frame import decode_frame, encode_frame, read_header
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
            x, y, progress=False
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
    # labels: bit-packed at 4 bits for 10 classes
    first = batches[0][0]
    assert read_header(first.tensors["labels"]).dtype == np.uint8
    assert first.tensors["labels"] == labels_frame(y[:64], bundle)
    np.testing.assert_array_equal(decode_frame(first.tensors["labels"]), y[:64])
    assert len(first.tensors["labels"]) < 64
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
