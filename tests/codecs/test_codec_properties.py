"""Property tests: random shapes and values round-trip within each codec's bound."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from edgesplit.codecs import Codec, parse_codec
from edgesplit.errors import CodecError

SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "q1",
    "q8:channel",
    "q2:channel,stochastic",
    "q4:stochastic",
    "q8+zstd",
    "q4:channel+zstd",
    "fp32+zstd",
    "topk:0.3+fp32",
    "topk:0.1+q8+zstd",
    "topk:0.7+q4:stochastic",
    "topk:1+bf16+zstd",
]

EPS = float(np.finfo(np.float32).eps)

tensors = arrays(
    dtype=np.float32,
    shape=array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7),
    elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False),
)


def value_bound(spec: str, x: np.ndarray, channel_ok: bool = True) -> np.ndarray:
    """Largest |x_hat - x| the value stage of ``spec`` may produce, per element."""
    if x.size == 0:
        return np.zeros(x.shape)
    value = spec.split("+")[1] if spec.startswith("topk") else spec.split("+")[0]
    name, _, opts = value.partition(":")
    if name == "fp32":
        return np.zeros(x.shape)
    if name == "fp16":
        return np.abs(x) * 2.0**-11 + 2.0**-25
    if name == "bf16":
        return np.abs(x) * 2.0**-8 + 2.0**-133
    bits = int(name[1:])
    levels = (1 << bits) - 1
    if "channel" in opts and x.ndim >= 2 and channel_ok:
        axes = (0,) + tuple(range(2, x.ndim))
        lo = x.min(axis=axes, keepdims=True).astype(np.float64)
        hi = x.max(axis=axes, keepdims=True).astype(np.float64)
    else:
        lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / levels
    step = scale if "stochastic" in opts else scale / 2
    slack = 4 * EPS * (np.abs(lo) + np.abs(hi)) + 1e-37
    return np.broadcast_to(step * (1 + 1e-5) + slack, x.shape)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=tensors, spec=st.sampled_from(SPECS), seed=st.integers(0, 2**32 - 1))
def test_roundtrip_within_bounds(x: np.ndarray, spec: str, seed: int) -> None:
    codec = parse_codec(spec, seed=seed)
    if spec.startswith("fp16") and x.size and np.abs(x).max() >= 65520:
        try:
            codec.encode(x)
        except CodecError as exc:
            assert "fp16 cannot carry" in str(exc)
            return
        raise AssertionError("fp16 accepted a value it cannot represent")
    table, payload = codec.encode(x)
    assert isinstance(payload, bytes)
    y = Codec.decode(table, payload, x.shape, x.dtype)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    # the training-time path sees exactly what the receiver decodes
    np.testing.assert_array_equal(y, parse_codec(spec, seed=seed).roundtrip(x))
    if "zstd" not in spec:
        assert len(payload) == codec.inner_size(x.shape)
    if not spec.startswith("topk"):
        assert np.all(np.abs(y.astype(np.float64) - x) <= value_bound(spec, x))
        return
    flat, got = x.reshape(-1), y.reshape(-1)
    k = codec.sparse.kept(flat.size)  # type: ignore[union-attr]
    if k == 0:
        return
    # recover which elements were kept from the stage itself (zeros can be kept too)
    index, values = codec.sparse.select(flat)  # type: ignore[union-attr]
    kept = codec.sparse.scatter(index, np.ones(k, np.float32), flat.size) != 0  # type: ignore[union-attr]
    assert kept.sum() == k
    assert not got[~kept].any()
    if k < flat.size:
        assert np.abs(flat[kept]).min() >= np.abs(flat[~kept]).max()
    bound = value_bound(spec, flat[kept], channel_ok=False)
    assert np.all(np.abs(got[kept].astype(np.float64) - flat[kept]) <= bound)


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(
        dtype=st.sampled_from([np.int64, np.int32, np.uint8, np.int8, np.bool_]),
        shape=array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    ),
    spec=st.sampled_from(SPECS),
)
def test_integer_tensors_exact(x: np.ndarray, spec: str) -> None:
    table, payload = parse_codec(spec).encode(x)
    assert table == []
    y = Codec.decode(table, payload, x.shape, x.dtype)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, x)
