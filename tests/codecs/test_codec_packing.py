"""Bit-packing is real: exact payload sizes and the documented bit layout."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edgesplit.codecs import Codec, parse_codec
from edgesplit.codecs.quant import _pack, _unpack


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 1000, 1001, 1003])
@pytest.mark.parametrize(("bits", "per_byte"), [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_payload_sizes(n: int, bits: int, per_byte: int) -> None:
    x = np.linspace(-1.0, 2.0, n, dtype=np.float32)
    _, payload = parse_codec(f"q{bits}").encode(x)
    # one (lo, scale) pair of float32 + ceil(n / per_byte) code bytes
    assert len(payload) == 8 + -(-n // per_byte)


def test_known_sizes() -> None:
    x = np.zeros(1001, dtype=np.float32)
    x[::3] = 1.0
    sizes = {b: len(parse_codec(f"q{b}").encode(x)[1]) for b in (8, 4, 2, 1)}
    assert sizes == {8: 8 + 1001, 4: 8 + 501, 2: 8 + 251, 1: 8 + 126}


def test_channel_sizes() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 167)).astype(np.float32)  # n = 1002
    sizes = {b: len(parse_codec(f"q{b}:channel").encode(x)[1]) for b in (8, 4, 2, 1)}
    assert sizes == {8: 24 + 1002, 4: 24 + 501, 2: 24 + 251, 1: 24 + 126}


def test_zstd_payload_declares_its_inner_size() -> None:
    import zstandard

    x = np.random.default_rng(1).standard_normal((10, 101)).astype(np.float32)
    codec = parse_codec("q2+zstd")
    _, payload = codec.encode(x)
    assert zstandard.frame_content_size(payload) == 8 + 253 == codec.inner_size(x.shape)


@pytest.mark.parametrize(
    ("bits", "values", "packed"),
    [
        # codes 0,1,2,3 with lo=0, scale=1: first element in the lowest bits
        (2, [0, 1, 2, 3], b"\xe4"),
        (2, [3, 0, 0, 0, 1], b"\x03\x01"),
        (4, [0, 1, 2, 3, 15], b"\x10\x32\x0f"),
        (4, [0, 15], b"\xf0"),
        (1, [0, 1, 1, 0, 0, 0, 0, 1, 1], b"\x86\x01"),
    ],
)
def test_bit_layout(bits: int, values: list[int], packed: bytes) -> None:
    # values span 0..2**bits - 1, so lo = 0, scale = 1 and the codes are the values
    x = np.array(values, dtype=np.float32)
    assert x.min() == 0 and x.max() == (1 << bits) - 1
    table, payload = parse_codec(f"q{bits}").encode(x)
    assert struct.unpack_from("<ff", payload) == (0.0, 1.0)
    assert payload[8:] == packed
    np.testing.assert_array_equal(Codec.decode(table, payload, x.shape, np.float32), x)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_pack_unpack_inverse(bits: int) -> None:
    rng = np.random.default_rng(bits)
    per = 8 // bits
    for n in (0, 1, per - 1, per, per + 1, 1001):
        codes = np.zeros(-(-n // per) * per, dtype=np.uint8)
        codes[:n] = rng.integers(0, 1 << bits, n)
        dst = np.empty(-(-n // per), dtype=np.uint8)
        _pack(codes, bits, dst)
        np.testing.assert_array_equal(_unpack(dst, bits, n), codes[:n])
        # the same as packing one element at a time, little bit order
        ref = np.zeros_like(dst)
        for i, c in enumerate(codes[:n]):
            ref[i // per] |= int(c) << (bits * (i % per))
        np.testing.assert_array_equal(dst, ref)
