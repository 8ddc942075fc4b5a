"""Round-trips of every stage and chain, error bounds, edge cases and decoder hardening."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard

from edgesplit.codecs import Codec, parse_codec
from edgesplit.codecs.quant import Q8
from edgesplit.codecs.topk import TopK
from edgesplit.codecs.zstd_stage import Zstd
from edgesplit.errors import CodecError

ALL_SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "q1",
    "q8:channel",
    "q4:channel",
    "q2:stochastic",
    "q4:channel,stochastic",
    "zstd",
    "q8+zstd",
    "q4+zstd:3",
    "q1+zstd",
    "topk:0.1+q8+zstd",
    "topk:0.3+fp16",
    "topk:1+q2",
    "topk:0.5+bf16+zstd",
]


def activation(shape: tuple[int, ...] = (4, 6, 5, 3), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal(shape), -0.3).astype(np.float32)


def codec_trip(spec: str, x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, bytes]:
    codec = parse_codec(spec, seed=seed)
    table, payload = codec.encode(x)
    y = Codec.decode(table, payload, x.shape, x.dtype)
    return y, payload


def q_bound(x: np.ndarray, bits: int, stochastic: bool, axis_groups: bool = False) -> np.ndarray:
    """Per-element error bound for affine quantization of ``x``."""
    levels = (1 << bits) - 1
    if axis_groups and x.ndim >= 2:
        axes = (0,) + tuple(range(2, x.ndim))
        lo = x.min(axis=axes, keepdims=True).astype(np.float64)
        hi = x.max(axis=axes, keepdims=True).astype(np.float64)
    else:
        lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / levels
    step = scale if stochastic else scale / 2
    # float32 arithmetic in (x - lo) * inv and lo + c * scale: a few ulps of the range
    slack = 4 * np.finfo(np.float32).eps * (np.abs(lo) + np.abs(hi)) + 1e-30
    return np.broadcast_to(step * (1 + 1e-5) + slack, x.shape)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_roundtrip_matches_bitstream(spec: str) -> None:
    x = activation()
    y, _ = codec_trip(spec, x, seed=11)
    r = parse_codec(spec, seed=11).roundtrip(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.flags.writeable and y.flags.c_contiguous
    np.testing.assert_array_equal(y, r)


def test_fp32_is_exact() -> None:
    x = activation()
    y, payload = codec_trip("fp32", x)
    np.testing.assert_array_equal(y, x)
    assert payload == x.astype("<f4").tobytes()


def test_fp16_precision() -> None:
    x = activation() * 100
    y, payload = codec_trip("fp16", x)
    assert len(payload) == 2 * x.size
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-11 + 2.0**-25)


def test_bf16_precision_and_round_to_nearest_even() -> None:
    x = activation() * 1e20
    y, payload = codec_trip("bf16", x)
    assert len(payload) == 2 * x.size
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-8)
    bits = np.array(
        [
            0x3F808000,  # tie, 0x3F80 even: stays
            0x3F818000,  # tie, 0x3F81 odd: up to 0x3F82
            0x3F808001,  # above the tie: up
            0x3F807FFF,  # below the tie: down
            0xBF818000,  # negative tie, odd: away from zero to 0xBF82
            0x7F7F7FFF,  # largest value that stays finite
        ],
        dtype=np.uint32,
    )
    got = np.frombuffer(parse_codec("bf16").encode(bits.view(np.float32))[1], dtype="<u2")
    np.testing.assert_array_equal(got, [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF82, 0x7F7F])


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quant_error_bounds(bits: int, stochastic: bool) -> None:
    x = activation((3, 5, 7, 11), seed=bits) * 3 + 1
    spec = f"q{bits}" + (":stochastic" if stochastic else "")
    y, payload = codec_trip(spec, x, seed=5)
    lo, scale = struct.unpack_from("<ff", payload)
    assert lo == x.min()
    assert scale == pytest.approx((float(x.max()) - float(x.min())) / ((1 << bits) - 1), rel=1e-6)
    assert np.all(np.abs(y - x) <= q_bound(x, bits, stochastic))


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_channel_scales(bits: int) -> None:
    rng = np.random.default_rng(bits)
    # channels of wildly different magnitude: a global scale would waste them
    mags = np.array([1e-3, 1.0, 50.0], dtype=np.float32)[None, :, None]
    x = (rng.standard_normal((4, 3, 9)) * mags).astype(np.float32)
    y, payload = codec_trip(f"q{bits}:channel", x)
    assert len(payload) == 8 * 3 + (x.size * bits + 7) // 8
    lo = np.frombuffer(payload, "<f4", count=3)
    np.testing.assert_array_equal(lo, x.min(axis=(0, 2)))
    assert np.all(np.abs(y - x) <= q_bound(x, bits, False, axis_groups=True))
    # the small channel is far better off than under one global scale
    g, _ = codec_trip(f"q{bits}", x)
    assert np.abs(y - x)[:, 0].max() < np.abs(g - x)[:, 0].max() or bits == 1


def test_channel_mode_without_channel_axis_uses_one_scale() -> None:
    x = np.linspace(-2, 3, 17, dtype=np.float32)
    _, payload = codec_trip("q4:channel", x)
    assert len(payload) == 8 + 9
    y, _ = codec_trip("q4:channel", x)
    z, _ = codec_trip("q4", x)
    np.testing.assert_array_equal(y, z)


def test_stochastic_rounding_is_unbiased() -> None:
    x = np.array([0.0, 0.1, 0.37, 0.5, 0.93, 1.0], dtype=np.float32)
    codec = parse_codec("q1:stochastic", seed=123)
    mean = np.mean([codec.roundtrip(x) for _ in range(4000)], axis=0)
    np.testing.assert_allclose(mean, x, atol=0.03)


def test_stochastic_uses_the_given_rng() -> None:
    x = activation()
    codec = parse_codec("q4:stochastic")
    a = codec.encode(x, rng=np.random.default_rng(9))
    b = codec.encode(x, rng=np.random.default_rng(9))
    assert a == b


def test_topk_keeps_exactly_the_largest() -> None:
    rng = np.random.default_rng(0)
    x = (rng.permutation(400).astype(np.float32) - 200) / 7  # distinct magnitudes but +-ties
    x = x + np.float32(0.01)  # break the +-ties
    x = x.reshape(4, 100)
    y, _ = codec_trip("topk:0.1", x)
    k = 40
    flat = x.reshape(-1)
    top = np.argsort(-np.abs(flat))[:k]
    expect = np.zeros_like(flat)
    expect[top] = flat[top]
    np.testing.assert_array_equal(y.reshape(-1), expect)
    assert np.count_nonzero(y) == k


@pytest.mark.parametrize(
    ("n", "fraction", "k", "index_bytes"),
    [
        (1000, 0.5, 500, 125),  # bitmap (125) beats 500 u16 indices
        (1000, 0.01, 10, 20),  # 10 u16 indices beat a 125-byte bitmap
        (200, 0.1, 20, 20),  # 20 u8 indices beat a 25-byte bitmap
        (70000, 0.001, 70, 280),  # u32 indices
        (7, 0.01, 1, 1),  # at least one kept; tie goes to the bitmap
        (10, 1.0, 10, 2),
        (0, 0.5, 0, 0),
    ],
)
def test_topk_sizes(n: int, fraction: float, k: int, index_bytes: int) -> None:
    stage = TopK(fraction)
    assert stage.kept(n) == k
    assert stage.index_size(n) == index_bytes
    x = np.arange(1, n + 1, dtype=np.float32)
    table, payload = parse_codec(f"topk:{fraction}").encode(x)
    assert len(payload) == index_bytes + 4 * k
    y = Codec.decode(table, payload, x.shape, x.dtype)
    np.testing.assert_array_equal(y[n - k :], x[n - k :])
    assert not y[: n - k].any()


def test_chain_error_bound() -> None:
    x = activation((8, 50))
    y, _ = codec_trip("topk:0.2+q8+zstd", x)
    kept = y != 0
    assert kept.sum() == 80
    vals = x[kept]
    assert np.all(np.abs(y[kept] - vals) <= q_bound(vals, 8, False).max())
    assert np.abs(x[~kept]).max() <= np.abs(vals).min() + 0.02


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 4)])
def test_empty_tensors(spec: str, shape: tuple[int, ...]) -> None:
    x = np.zeros(shape, dtype=np.float32)
    y, payload = codec_trip(spec, x)
    assert y.shape == shape and y.dtype == np.float32
    if "zstd" not in spec:
        assert payload == b""


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_zero_constant_and_scalar_tensors(spec: str) -> None:
    for x in (
        np.zeros((3, 4, 5), dtype=np.float32),
        np.full((2, 3, 4), -1.75, dtype=np.float32),
        np.array(2.5, dtype=np.float32),
    ):
        y, _ = codec_trip(spec, x)
        assert y.shape == x.shape
        if spec.startswith("topk") and x.ndim:
            # ties everywhere: exactly k elements survive, each exactly
            kept = y != 0
            np.testing.assert_array_equal(y[kept], x[kept])
        else:
            np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(spec: str, bad: float) -> None:
    x = activation()
    x[1, 2, 3, 0] = bad
    with pytest.raises(CodecError, match="NaN and .* inf values"):
        parse_codec(spec).encode(x)
    with pytest.raises(CodecError):
        parse_codec(spec).roundtrip(x)


def test_out_of_range_input_is_refused() -> None:
    with pytest.raises(CodecError, match="fp16 cannot carry"):
        parse_codec("fp16").encode(np.array([1e5], dtype=np.float32))
    with pytest.raises(CodecError, match="bf16 cannot carry"):
        parse_codec("bf16").encode(np.array([3.4e38], dtype=np.float32))
    with pytest.raises(CodecError, match="overflows float32"):
        parse_codec("q8").encode(np.array([-3e38, 3e38], dtype=np.float32))
    with pytest.raises(CodecError, match="inf values"):
        parse_codec("q8").encode(np.array([1e300, 0.0]))  # float64 beyond float32


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_decode_to_float32(dtype: type) -> None:
    x = activation().astype(dtype)
    y, _ = codec_trip("fp32", x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_, np.int8, np.uint64])
def test_integer_tensors_travel_raw(dtype: type) -> None:
    x = (np.arange(-5, 19) % 3).astype(dtype).reshape(4, 6)
    codec = parse_codec("q4+zstd")
    table, payload = codec.encode(x)
    assert table == []
    assert payload == x.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    y = Codec.decode(table, payload, x.shape, x.dtype)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(codec.roundtrip(x), x)


def test_big_endian_input() -> None:
    x = activation().astype(">f4")
    y, payload = codec_trip("fp32", x)
    assert payload == x.astype("<f4").tobytes()
    labels = np.arange(5, dtype=">i8")
    table, raw = parse_codec("fp32").encode(labels)
    assert raw == labels.astype("<i8").tobytes()
    np.testing.assert_array_equal(Codec.decode(table, raw, (5,), labels.dtype), labels)


def test_unsupported_dtypes() -> None:
    with pytest.raises(CodecError, match="got dtype complex64"):
        parse_codec("fp32").encode(np.zeros(3, dtype=np.complex64))
    with pytest.raises(CodecError, match="cannot decode dtype"):
        Codec.decode([], b"", (0,), np.complex64)


def test_decoder_uses_the_frames_stage_table() -> None:
    x = activation()
    table, payload = parse_codec("q8+zstd").encode(x)
    receiver = parse_codec("q4")  # what the receiver expected: irrelevant
    y = receiver.decode(table, payload, x.shape, x.dtype)
    np.testing.assert_array_equal(y, parse_codec("q8").roundtrip(x))


def test_non_contiguous_input() -> None:
    x = activation((6, 8))[:, ::2].T
    assert not x.flags.c_contiguous
    for spec in ("fp32", "q4:channel", "topk:0.5+q8"):
        y, _ = codec_trip(spec, x)
        np.testing.assert_array_equal(y, parse_codec(spec).roundtrip(np.ascontiguousarray(x)))


# ---- decoder hardening at the codec level --------------------------------------------------


def decode(spec: str, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return Codec.decode(parse_codec(spec).stage_table(), payload, shape, np.float32)


@pytest.mark.parametrize("spec", ["fp32", "fp16", "bf16", "q8", "q4:channel", "topk:0.5+q8"])
def test_wrong_payload_size(spec: str) -> None:
    x = activation((2, 3, 4))
    _, payload = parse_codec(spec).encode(x)
    for bad in (payload[:-1], payload + b"\0"):
        with pytest.raises(CodecError, match="implies"):
            decode(spec, bad, x.shape)


def test_quant_scale_checks() -> None:
    good = struct.pack("<ff", 0.0, 1.0) + b"\x00" * 4
    assert decode("q8", good, (4,)).tolist() == [0, 0, 0, 0]
    for lo, scale, msg in [
        (np.nan, 1.0, "NaN or inf"),
        (0.0, np.inf, "NaN or inf"),
        (0.0, -1.0, "negative scale"),
        (3e38, 1e37, "overflows float32"),
    ]:
        with pytest.raises(CodecError, match=msg):
            decode("q8", struct.pack("<ff", lo, scale) + b"\x00" * 4, (4,))


def test_quant_padding_bits_must_be_zero() -> None:
    head = struct.pack("<ff", 0.0, 1.0)
    assert decode("q4", head + b"\x21\x03", (3,)).tolist() == [1, 2, 3]
    with pytest.raises(CodecError, match="non-zero padding"):
        decode("q4", head + b"\x21\x43", (3,))
    with pytest.raises(CodecError, match="non-zero padding"):
        decode("q2", head + b"\x40", (3,))
    with pytest.raises(CodecError, match="non-zero padding"):
        decode("q1", head + b"\x80", (7,))


@pytest.mark.parametrize("spec", ["fp32", "fp16", "bf16"])
def test_float_payload_with_non_finite_values(spec: str) -> None:
    x = np.array([1.0, np.inf], dtype=np.float32)
    raw = {
        "fp32": x.astype("<f4").tobytes(),
        "fp16": x.astype("<f2").tobytes(),
        "bf16": (x.view(np.uint32) >> 16).astype("<u2").tobytes(),
    }[spec]
    with pytest.raises(CodecError, match="NaN or inf"):
        decode(spec, raw, (2,))


def test_topk_index_checks() -> None:
    vals = np.array([1.0, 2.0], dtype="<f4").tobytes()
    # n=100, F=0.02 -> k=2, u8 list (2 bytes) beats a 13-byte bitmap
    assert decode("topk:0.02", bytes([3, 7]) + vals, (100,))[[3, 7]].tolist() == [1, 2]
    with pytest.raises(CodecError, match="not strictly increasing"):
        decode("topk:0.02", bytes([7, 3]) + vals, (100,))
    with pytest.raises(CodecError, match="not strictly increasing"):
        decode("topk:0.02", bytes([7, 7]) + vals, (100,))
    with pytest.raises(CodecError, match="out of range"):
        decode("topk:0.02", bytes([3, 100]) + vals, (100,))
    # n=10, F=0.2 -> k=2, bitmap (2 bytes) ties the u8 list and wins
    assert decode("topk:0.2", b"\x05\x00" + vals, (10,))[[0, 2]].tolist() == [1, 2]
    with pytest.raises(CodecError, match="marks 3 elements"):
        decode("topk:0.2", b"\x07\x00" + vals, (10,))
    with pytest.raises(CodecError, match="past the last element"):
        decode("topk:0.2", b"\x01\x04" + vals, (10,))


def test_zstd_requires_declared_and_matching_content_size() -> None:
    x = activation((4, 8))
    _, inner = parse_codec("q8").encode(x)
    stage = Zstd()
    assert bytes(stage.decode(stage.encode(inner), len(inner))) == inner
    cobj = zstandard.ZstdCompressor().compressobj()
    streamed = cobj.compress(inner) + cobj.flush()
    assert zstandard.frame_content_size(streamed) == -1
    with pytest.raises(CodecError, match="does not declare its content size"):
        decode("q8+zstd", streamed, x.shape)
    other = zstandard.ZstdCompressor().compress(inner + b"\0")
    with pytest.raises(
        CodecError, match=r"declares 41 bytes of content; the frame header implies 40"
    ):
        decode("q8+zstd", other, x.shape)
    good = stage.encode(inner)
    with pytest.raises(CodecError, match="does not decompress"):
        decode("q8+zstd", good + good, x.shape)
    with pytest.raises(CodecError, match="not a zstd frame"):
        decode("q8+zstd", b"\x00" * 16, x.shape)
    with pytest.raises(CodecError):
        decode("q8+zstd", good[:-2], x.shape)


def test_zstd_inflation_limit() -> None:
    x = np.zeros((64, 64), dtype=np.float32)
    table, payload = parse_codec("fp32+zstd").encode(x)
    with pytest.raises(CodecError, match="over the limit of 1000"):
        Codec.decode(table, payload, x.shape, np.float32, max_inner_bytes=1000)


def test_raw_decode_checks() -> None:
    with pytest.raises(CodecError, match="stage table must be empty"):
        Codec.decode([(1, b"")], b"\0" * 8, (1,), np.int64)
    with pytest.raises(CodecError, match="implies 16"):
        Codec.decode([], b"\0" * 8, (2,), np.int64)
    with pytest.raises(CodecError, match="bytes other than 0 and 1"):
        Codec.decode([], b"\x00\x02", (2,), np.bool_)


def test_q8_writes_codes_in_place() -> None:
    x = np.array([0.0, 1.0, 2.0, 255.0], dtype=np.float32)
    _, payload = parse_codec("q8").encode(x)
    assert payload == struct.pack("<ff", 0.0, 1.0) + bytes([0, 1, 2, 255])
    assert Q8().encoded_size(x.shape) == len(payload)


# ---- fast paths are exact ----------------------------------------------------------------


def test_fp16_matches_numpy_bit_for_bit() -> None:
    from edgesplit.codecs.fp import _from_fp16_bits, _to_fp16_bits

    rng = np.random.default_rng(0)
    bits = np.concatenate(
        [
            rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32),
            np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32),  # every exponent
        ]
    )
    f = bits.view(np.float32)
    f = f[np.isfinite(f) & (np.abs(f) < 65520)]
    edges = np.array(
        [0.0, -0.0, 65504, 65519.996, -65519.996, 2**-14, 2**-24, 2**-25, 2**-26, 3 * 2**-26,
         2**-14 - 2**-25, 1e-8, -1e-8, 6.1e-5, 1.0009765625, 1.00048828125, 2049.0, 2051.0],
        dtype=np.float32,
    )  # fmt: skip
    f = np.concatenate([f, edges])
    np.testing.assert_array_equal(_to_fp16_bits(f), f.astype(np.float16).view(np.uint16))
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    np.testing.assert_array_equal(
        _from_fp16_bits(every).view(np.uint32),
        every.view(np.float16).astype(np.float32).view(np.uint32),
    )


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.25, 0.3])
@pytest.mark.parametrize("kind", ["relu", "normal", "ties", "sorted", "constant"])
def test_topk_sampled_selection_is_exact(fraction: float, kind: str) -> None:
    rng = np.random.default_rng(1)
    n = 150_001
    x = {
        "relu": np.maximum(rng.standard_normal(n), 0),
        "normal": rng.standard_normal(n),
        "ties": rng.integers(-3, 4, n),
        "sorted": np.arange(n),
        "constant": np.full(n, 2.0),
    }[kind].astype(np.float32)
    stage = TopK(fraction)
    k = stage.kept(n)
    index, values = stage.select(x)
    y = stage.scatter(index, values, n)
    kept = y != 0 if kind not in ("ties", "relu") else None
    # the kept magnitudes are exactly the k largest (as a multiset)
    ref = np.sort(np.abs(x))[n - k :]
    got_idx = np.flatnonzero(stage.scatter(index, np.ones(k, np.float32), n))
    assert got_idx.size == k
    np.testing.assert_array_equal(np.sort(np.abs(x[got_idx])), ref)
    np.testing.assert_array_equal(y[got_idx], x[got_idx])
    if kept is not None:
        assert kept.sum() == k
