"""The frame layout, byte for byte, and every refusal of the hardened decoder."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard

from edgesplit.codecs import parse_codec
from edgesplit.errors import CodecError, FrameError
from edgesplit.wire.frame import (
    DEFAULT_LIMITS,
    DTYPE_CODES,
    FrameLimits,
    decode_frame,
    encode_frame,
    read_header,
)

# The wire dtype codes are part of the format: this table is the contract.
WIRE_DTYPES = {
    1: "float32",
    2: "float16",
    3: "float64",
    16: "bool",
    17: "int8",
    18: "uint8",
    19: "int16",
    20: "uint16",
    21: "int32",
    22: "uint32",
    23: "int64",
    24: "uint64",
}


def activation(shape: tuple[int, ...] = (2, 3, 4, 5)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.maximum(rng.standard_normal(shape), 0).astype(np.float32)


def build(
    *,
    magic: bytes = b"ESF",
    version: int = 1,
    dtype: int = 1,
    shape: tuple[int, ...] = (2,),
    stages: list[tuple[int, bytes]] | None = None,
    payload: bytes = b"\0" * 8,
    payload_length: int | None = None,
    ndim: int | None = None,
    nstages: int | None = None,
    crc: int | None = None,
    tail: bytes = b"",
) -> bytes:
    """A frame with any field set by hand (and a correct crc unless told otherwise)."""
    stages = [(1, b"")] if stages is None else stages
    body = struct.pack(
        "<3sBBBB",
        magic,
        version,
        dtype,
        len(shape) if ndim is None else ndim,
        len(stages) if nstages is None else nstages,
    )
    body += b"".join(struct.pack("<I", d) for d in shape)
    body += b"".join(struct.pack("<BH", sid, len(p)) + p for sid, p in stages)
    body += struct.pack("<I", len(payload) if payload_length is None else payload_length)
    body += payload
    return body + struct.pack("<I", zlib.crc32(body) if crc is None else crc) + tail


def with_crc(frame: bytes) -> bytes:
    """Recompute the crc of a hand-edited frame so the decoder looks past it."""
    body = frame[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_dtype_table() -> None:
    assert {c: str(d) for c, d in DTYPE_CODES.items()} == WIRE_DTYPES


def test_layout_byte_for_byte() -> None:
    x = np.array([[1.5, -2.0, 0.25]], dtype=np.float32)
    frame = encode_frame(x, "fp32")
    payload = x.astype("<f4").tobytes()
    body = (
        b"ESF"
        + bytes([2, 1, 2, 1])  # version 2, dtype float32, ndim, nstages
        + bytes([1, 3])  # shape as uvarints
        + bytes([1, 0])  # fp32, param length 0
        + bytes([len(payload)])  # payload length uvarint
        + payload
    )
    assert frame == body + struct.pack("<I", zlib.crc32(body))
    # version 1 (u32 fields) still decodes to the same tensor
    np.testing.assert_array_equal(decode_frame(build(shape=(1, 3), payload=payload)), x)


def test_uvarint_fields_above_one_byte() -> None:
    x = np.zeros((300, 2), dtype=np.float32)
    frame = encode_frame(x, "fp32")
    assert frame[7:10] == bytes([0xAC, 0x02, 2])  # 300 = 0b10_0101100
    assert decode_frame(frame).shape == (300, 2)
    # a non-minimal varint (300 written with a trailing zero group) is refused
    bad = with_crc(frame[:7] + bytes([0xAC, 0x82, 0x00]) + frame[9:])
    with pytest.raises(FrameError, match="non-minimal varint"):
        decode_frame(bad)


def test_packed_integer_frames() -> None:
    labels = (np.arange(33) % 10).astype(np.uint8)
    frame = encode_frame(labels, "fp32", int_bits=4)
    hdr = read_header(frame)
    assert hdr.payload_length == 17  # 33 codes at 4 bits
    assert [(s.stage_id, s.spec) for s in hdr.stages] == [(40, "bits:4")]
    y = decode_frame(frame)
    assert y.dtype == np.uint8
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(FrameError, match="3-bit packing holds 0..7"):
        encode_frame(labels, "fp32", int_bits=3)


def test_layout_with_params() -> None:
    x = activation()
    frame = encode_frame(x, "q4:channel+zstd:3")
    hdr = read_header(frame)
    assert frame[:7] == b"ESF" + bytes([2, 1, 4, 2])
    assert frame[7:11] == bytes([2, 3, 4, 5])
    assert frame[11:14] == bytes([9, 1, 1])  # q4, 1 param byte, channel flag
    assert frame[14:17] == bytes([32, 1, 3])  # zstd, 1 param byte, level 3
    assert hdr.payload_length < 128 and frame[17] == hdr.payload_length
    assert hdr.header_length == 18
    assert hdr.frame_length == len(frame)
    assert struct.unpack_from("<I", frame, len(frame) - 4)[0] == zlib.crc32(frame[:-4])


def test_read_header() -> None:
    frame = encode_frame(activation().astype(np.float16), "topk:0.25+q8+zstd")
    hdr = read_header(frame)
    assert hdr.version == 2
    assert hdr.dtype == np.float16
    assert hdr.shape == (2, 3, 4, 5)
    assert hdr.n_elements == 120
    assert hdr.codec == "topk:0.25+q8+zstd"
    assert [(s.stage_id, s.name, s.spec) for s in hdr.stages] == [
        (16, "topk", "topk:0.25"),
        (8, "q8", "q8"),
        (32, "zstd", "zstd"),
    ]
    assert hdr.stages[0].params == struct.pack("<d", 0.25)
    assert hdr.frame_length == len(frame)


@pytest.mark.parametrize(
    "spec", ["fp32", "fp16", "bf16", "q8", "q4+zstd", "q1:channel", "topk:0.1+q8+zstd", "zstd:7"]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_float_frames(spec: str, dtype: type) -> None:
    x = activation().astype(dtype)
    frame = encode_frame(x, spec)
    assert read_header(frame).dtype == np.dtype(dtype)
    y = decode_frame(frame)
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.writeable
    codec = parse_codec(spec)
    np.testing.assert_array_equal(y, codec.roundtrip(x))
    assert encode_frame(x, codec) == frame


@pytest.mark.parametrize(
    "dtype", [np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.uint64]
)
def test_label_frames_are_raw(dtype: type) -> None:
    labels = (np.arange(12) % 7).astype(dtype).reshape(3, 4)
    for spec in ("fp32", "q4+zstd", "topk:0.1+q8"):
        frame = encode_frame(labels, spec)
        hdr = read_header(frame)
        assert hdr.stages == () and hdr.codec == ""
        assert frame[3:7] == bytes([2, next(c for c, d in DTYPE_CODES.items() if d == dtype), 2, 0])
        assert hdr.payload_length == labels.nbytes
        start = hdr.header_length
        assert (
            frame[start : start + labels.nbytes]
            == labels.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
        )
        y = decode_frame(frame)
        assert y.dtype == dtype and y.flags.writeable
        np.testing.assert_array_equal(y, labels)


def test_bool_frames() -> None:
    mask = np.array([[True, False, True]])
    np.testing.assert_array_equal(decode_frame(encode_frame(mask, "q8")), mask)
    bad = build(dtype=16, shape=(2,), stages=[], payload=b"\x01\x02")
    with pytest.raises(CodecError, match="bytes other than 0 and 1"):
        decode_frame(bad)


def test_scalars_and_empty() -> None:
    for x in (np.float32(3.5), np.zeros((0, 7), np.float32), np.int64(4), np.zeros(0, np.int64)):
        for spec in ("fp32", "q2+zstd", "topk:0.5+q8"):
            y = decode_frame(encode_frame(np.asarray(x), spec))
            assert y.shape == np.shape(x)
            np.testing.assert_array_equal(y, x)


def test_stochastic_frames_take_an_rng() -> None:
    x = activation()
    a = encode_frame(x, "q2:stochastic+zstd", rng=np.random.default_rng(1))
    b = encode_frame(x, "q2:stochastic+zstd", rng=np.random.default_rng(1))
    assert a == b


# ---- encoder refusals ----------------------------------------------------------------------


def test_encode_refusals() -> None:
    with pytest.raises(FrameError, match="ndim 9 exceeds the maximum 8"):
        encode_frame(np.zeros((1,) * 9, np.float32), "fp32")
    with pytest.raises(FrameError, match="dtype complex64 is not allowed; allowed: 1=float32"):
        encode_frame(np.zeros(2, np.complex64), "fp32")
    with pytest.raises(FrameError, match="dtype object is not allowed"):
        encode_frame(np.array([None, 1]), "fp32")
    with pytest.raises(CodecError, match="unknown codec stage 'q3'"):
        encode_frame(np.zeros(2, np.float32), "q3")
    with pytest.raises(CodecError, match="NaN"):
        encode_frame(np.array([np.nan], np.float32), "q8")


# ---- decoder refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        (b"", FrameError, "truncated in its fixed header"),
        (b"ESF\x01", FrameError, "truncated in its fixed header"),
        (build(magic=b"PNG"), FrameError, r"frame magic is b'PNG', expected b'ESF'"),
        (build(version=3), FrameError, "frame version 3 is not supported"),
        (build(version=0), FrameError, "frame version 0 is not supported"),
        (build(dtype=0), FrameError, "frame dtype code 0 is not allowed; allowed: 1=float32"),
        (build(dtype=99), FrameError, "frame dtype code 99 is not allowed"),
        (build(shape=(1,) * 9), FrameError, "frame ndim 9 exceeds the maximum 8"),
        (build(ndim=255), FrameError, "frame ndim 255 exceeds"),
        # ndim 3 with one dim written: the shape eats the stage table and the payload length
        (build(ndim=3), FrameError, "non-zero dims multiply to 268435458"),
        (build()[:9], FrameError, "truncated in its shape"),
        (build(nstages=3), FrameError, "truncated|payload length|crc32"),
        (build(stages=[(1, b"")])[:13], FrameError, "truncated in its stage table entry 0"),
        (build(stages=[(8, b"\x00" * 40)])[:20], FrameError, "truncated in its stage 0 params"),
        (build()[:15], FrameError, "truncated in its payload length"),
        (
            build(payload_length=1200, payload=b"\0" * 1184),
            FrameError,
            "frame payload length 1200 does not match the 1184 bytes present",
        ),
        (build(payload_length=4), FrameError, "payload length 4 does not match the 8 bytes"),
        (build(tail=b"\0"), FrameError, "payload length 8 does not match the 9 bytes"),
        (build()[:-1], FrameError, "payload length 8 does not match the 7 bytes"),
        (build(payload=b"", payload_length=8)[:-4], FrameError, "no room for the 4-byte crc"),
        (build(crc=0), FrameError, r"frame crc32 0x00000000 does not match the computed 0x"),
        (build(stages=[(99, b"")]), CodecError, "unknown codec stage id 99"),
        (build(stages=[(8, b"\x08")]), CodecError, "flags byte 0x08 has unknown bits"),
        (build(stages=[(1, b""), (32, b"\x00")]), CodecError, "zstd level must be in 1..22"),
        (
            build(stages=[(16, struct.pack("<d", 2.0)), (1, b"")]),
            CodecError,
            "topk fraction must be in",
        ),
        (build(stages=[(32, b"\x01"), (1, b"")]), CodecError, "cannot follow"),
        (build(stages=[(32, b"\x01")]), CodecError, "names no value stage"),
        (build(stages=[]), FrameError, "needs a stage table naming its value stage"),
        (build(dtype=23, shape=(1,)), FrameError, "is exact: its stage table must be empty"),
        (build(payload=b"\0" * 7), CodecError, "fp32 payload is 7 bytes; shape \\(2,\\) implies 8"),
        (build(dtype=23, stages=[], shape=(2,)), CodecError, "implies 16"),
        (build(stages=[(8, b"\x00")], payload=b"\0" * 9), CodecError, "q8 payload is 9 bytes"),
    ],
)
def test_decode_refusals(frame: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        decode_frame(frame)


def test_read_header_refuses_like_decode() -> None:
    with pytest.raises(FrameError, match="crc32"):
        read_header(build(crc=1))
    with pytest.raises(CodecError, match="unknown codec stage id"):
        read_header(build(stages=[(99, b"")]))


def test_decode_needs_bytes() -> None:
    with pytest.raises(FrameError, match="a frame must be bytes, got str"):
        decode_frame("ESF")  # type: ignore[arg-type]


def test_accepts_any_buffer() -> None:
    frame = encode_frame(activation(), "q8+zstd")
    ref = decode_frame(frame)
    for buf in (bytearray(frame), memoryview(frame), np.frombuffer(frame, np.uint8)):
        np.testing.assert_array_equal(decode_frame(buf), ref)


# ---- limits --------------------------------------------------------------------------------


def test_default_limits() -> None:
    assert FrameLimits(max_elements=1 << 27, max_decoded_bytes=1 << 29) == DEFAULT_LIMITS
    with pytest.raises(FrameError, match="max_elements must be a non-negative int"):
        FrameLimits(max_elements=-1)


@pytest.mark.parametrize(
    "shape",
    [
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF,) * 8,
        (1 << 16, 1 << 16),
        ((1 << 27) + 1,),
    ],
)
def test_huge_claims_fail_fast_without_allocating(shape: tuple[int, ...]) -> None:
    frame = build(shape=shape, payload=b"\0" * 16)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match=r"elements, over the limit of 134217728"):
            decode_frame(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_empty_tensor_with_huge_dims() -> None:
    frame = build(dtype=23, shape=(0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), stages=[], payload=b"")
    with pytest.raises(FrameError, match="non-zero dims multiply to"):
        decode_frame(frame)
    ok = build(dtype=23, shape=(0, 1000, 1000), stages=[], payload=b"")
    assert decode_frame(ok).shape == (0, 1000, 1000)


def test_decoded_bytes_limit() -> None:
    frame = encode_frame(np.zeros(1000, np.float32), "fp32+zstd")
    limits = FrameLimits(max_elements=10_000, max_decoded_bytes=3999)
    with pytest.raises(FrameError, match="would decode to 4000 bytes, over the limit of 3999"):
        decode_frame(frame, limits)
    with pytest.raises(FrameError, match="has 1000 elements, over the limit of 999"):
        decode_frame(frame, FrameLimits(max_elements=999))
    labels = encode_frame(np.zeros(1000, np.int64), "fp32")
    with pytest.raises(FrameError, match="would decode to 8000 bytes"):
        decode_frame(labels, FrameLimits(max_decoded_bytes=7999))
    assert decode_frame(frame, FrameLimits(max_elements=1000, max_decoded_bytes=4000)).size == 1000


def test_inflation_limit_covers_intermediate_bytes() -> None:
    # topk:1 keeps every value: bitmap (125 B) + 1000 fp32 values = 4125 B inflated by zstd,
    # more than the 4000 B tensor it decodes to
    frame = encode_frame(np.ones(1000, np.float32), "topk:1+zstd")
    with pytest.raises(FrameError, match="would inflate shape \\(1000,\\) to 4125 bytes"):
        decode_frame(frame, FrameLimits(max_decoded_bytes=4100))
    assert decode_frame(frame, FrameLimits(max_decoded_bytes=4125)).sum() == 1000


def test_zstd_content_size_is_checked_in_frames() -> None:
    x = activation()
    frame = encode_frame(x, "q8+zstd")
    hdr = read_header(frame)
    inner = parse_codec("q8").encode(x)[1]
    cobj = zstandard.ZstdCompressor().compressobj()
    streamed = cobj.compress(inner) + cobj.flush()  # no content size in the zstd header
    forged = build(shape=x.shape, stages=[(8, b"\x00"), (32, b"\x01")], payload=streamed)
    with pytest.raises(CodecError, match="does not declare its content size"):
        decode_frame(forged)
    bigger = zstandard.ZstdCompressor().compress(inner + b"\0" * 100)
    forged = build(shape=x.shape, stages=[(8, b"\x00"), (32, b"\x01")], payload=bigger)
    with pytest.raises(CodecError, match=f"declares {len(inner) + 100} bytes of content"):
        decode_frame(forged)
    assert hdr.codec == "q8+zstd"


def test_mutated_header_fields_with_fixed_crc() -> None:
    frame = bytearray(encode_frame(activation(), "q8+zstd"))
    frame[7] = 3  # first dim 2 -> 3: payload no longer matches the shape
    with pytest.raises(CodecError, match="declares 128 bytes of content; the frame header implies"):
        decode_frame(with_crc(bytes(frame)))
