"""Fuzzing the decoder: whatever the bytes, only FrameError / CodecError, and quickly."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesplit.errors import CodecError, FrameError
from edgesplit.wire.frame import FrameLimits, decode_frame, encode_frame, read_header

SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2:channel",
    "q1",
    "q8+zstd",
    "q4:channel+zstd",
    "q1+zstd",
    "fp32+zstd",
    "topk:0.1+q8+zstd",
    "topk:0.5+fp16",
    "topk:0.02+q4",
]
# small limits keep every accepted frame cheap; the decoder must respect them
LIMITS = FrameLimits(max_elements=1 << 16, max_decoded_bytes=1 << 20)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sample_frames() -> list[bytes]:
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((3, 4, 5)), 0).astype(np.float32)
    frames = [encode_frame(x, spec) for spec in SPECS]
    frames.append(encode_frame(np.arange(24, dtype=np.int64).reshape(4, 6), "fp32"))
    frames.append(encode_frame(np.array([True, False, True]), "fp32"))
    frames.append(encode_frame(np.zeros((0, 3), np.float32), "q4+zstd"))
    return frames


FRAMES = sample_frames()


def fix_crc(frame: bytes) -> bytes:
    if len(frame) < 4:
        return frame
    body = frame[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def decode_safely(frame: bytes) -> None:
    """Decode; only the two documented errors may come out, and never slowly."""
    t0 = time.perf_counter()
    try:
        out = decode_frame(frame, LIMITS)
    except (FrameError, CodecError):
        pass
    else:
        hdr = read_header(frame, LIMITS)
        assert out.shape == hdr.shape
        assert out.dtype == (np.float32 if hdr.dtype.kind == "f" else hdr.dtype)
        if out.dtype.kind == "f":
            assert np.isfinite(out).all()
    assert time.perf_counter() - t0 < 2.0


@SETTINGS
@given(st.binary(max_size=256))
def test_random_bytes(data: bytes) -> None:
    decode_safely(data)
    decode_safely(fix_crc(b"ESF\x01" + data))


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and frame:
            # header bytes are where the interesting fields live
            pos = draw(st.integers(0, min(len(frame), 40) - 1))
            frame[pos] = draw(st.sampled_from([0, 1, 2, 3, 8, 9, 16, 23, 32, 127, 255]))
        elif op == "truncate":
            del frame[pos:]
        elif op == "extend":
            frame += draw(st.binary(min_size=1, max_size=16))
        elif op == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and frame:
            del frame[pos : pos + draw(st.integers(1, 8))]
    out = bytes(frame)
    return fix_crc(out) if draw(st.booleans()) else out


@SETTINGS
@given(mutations())
def test_mutated_frames(frame: bytes) -> None:
    decode_safely(frame)


@st.composite
def forged_headers(draw: st.DrawFn) -> bytes:
    """Arbitrary header fields with a correct crc: every semantic check gets exercised."""
    dtype = draw(st.sampled_from([1, 2, 3, 16, 18, 23, 0, 4, 99]))
    ndim = draw(st.integers(0, 9))
    dims = st.one_of(st.integers(0, 8), st.integers(0, 0xFFFFFFFF))
    shape = [draw(dims) for _ in range(ndim)]
    stage = st.tuples(
        st.sampled_from([1, 2, 3, 8, 9, 10, 11, 16, 32, 0, 5, 200]),
        st.one_of(
            st.just(b""),
            st.binary(min_size=1, max_size=1),
            st.floats(allow_nan=True).map(lambda f: struct.pack("<d", f)),
            st.binary(max_size=12),
        ),
    )
    stages = draw(st.lists(stage, max_size=4))
    payload = draw(st.binary(max_size=300))
    body = struct.pack("<3sBBBB", b"ESF", 1, dtype, ndim, len(stages))
    body += b"".join(struct.pack("<I", d) for d in shape)
    body += b"".join(struct.pack("<BH", sid, len(p)) + p for sid, p in stages)
    body += struct.pack("<I", len(payload)) + payload
    return body + struct.pack("<I", zlib.crc32(body))


@SETTINGS
@given(forged_headers())
def test_forged_headers(frame: bytes) -> None:
    decode_safely(frame)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    pos=st.integers(0, 10_000),
    value=st.integers(0, 255),
)
def test_payload_corruption_with_valid_crc(
    spec: str, shape: tuple[int, ...], pos: int, value: int
) -> None:
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    frame = bytearray(encode_frame(x, spec))
    start = read_header(bytes(frame)).header_length
    end = len(frame) - 4
    if end > start:
        frame[start + pos % (end - start)] = value
    decode_safely(fix_crc(bytes(frame)))
