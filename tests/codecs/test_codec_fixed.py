"""The fixed-range quantizer ``fq`` and its entropy models: exact levels, exact packing,
round trips on random and adversarial code streams, and typed errors for anything corrupt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesplit.codecs import parse_codec
from edgesplit.codecs.entropy import (
    EntropyModel,
    ModelTable,
    ans_decode,
    ans_encode,
    code_counts,
    max_stream_bytes,
    models_from_json,
    models_to_json,
    use_models,
)
from edgesplit.codecs.fixed import pack_codes, quantize_codes, unpack_codes
from edgesplit.errors import CodecError, FrameError
from edgesplit.split.bottleneck import NOISE_WARMUP_STEPS, FixedRangeQuantizer
from edgesplit.wire.frame import decode_frame, encode_frame, read_header


def unit(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random(shape, dtype=np.float32)


@pytest.mark.parametrize("bits", range(1, 9))
def test_torch_quantizer_gives_the_codec_levels(bits: int) -> None:
    # the QAT forward (torch) and the device's codec (numpy) must agree level for level,
    # including values outside [0, 1] and exact midpoints between levels
    levels = (1 << bits) - 1
    x = np.concatenate(
        [unit((4096,)), np.arange(levels + 1, dtype=np.float32) / levels,
         (np.arange(levels, dtype=np.float32) + 0.5) / levels, np.array([-0.3, 1.7], np.float32)]
    ).reshape(1, -1)
    codec = parse_codec(f"fq:{bits}")
    decoded = decode_frame(encode_frame(x, codec))
    trained = FixedRangeQuantizer(bits).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(trained, decoded)
    np.testing.assert_array_equal(codec.roundtrip(x), decoded)
    assert set(np.unique(decoded * levels).round().astype(int)) <= set(range(levels + 1))


def test_torch_quantizer_passes_gradients_straight_through() -> None:
    x = torch.rand(3, 5, requires_grad=True)
    FixedRangeQuantizer(2)(x).sum().backward()  # rounding or noise: both pass 1 through
    assert x.grad is not None
    assert torch.equal(x.grad, torch.ones(3, 5))


def test_training_rounds_on_some_steps_and_adds_bounded_noise_on_the_others() -> None:
    torch.manual_seed(0)
    quantizer = FixedRangeQuantizer(2).train()  # (1 bit always rounds)
    x = torch.rand(64, 8)
    rounded = FixedRangeQuantizer(2).eval()(x)
    for _ in range(NOISE_WARMUP_STEPS):  # plain rounding while the encoder warms up
        assert torch.equal(quantizer(x), rounded)
    kinds = set()
    for _ in range(40):
        out = quantizer(x)
        if torch.equal(out, rounded):
            kinds.add("round")
        else:
            kinds.add("noise")
            # uniform noise of one level's width around the value, never more
            assert float((out - x).abs().max()) <= 0.5 / 3 + 1e-6
    assert kinds == {"round", "noise"}


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_exact_and_tight(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, 1001).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert len(packed) == (1001 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(packed, bits, 1001), codes)


def test_packing_refuses_dirty_padding_and_wrong_lengths() -> None:
    packed = bytearray(pack_codes(np.ones(5, np.uint8), 3))  # 15 bits in 2 bytes
    packed[-1] |= 0x80
    with pytest.raises(CodecError, match="padding"):
        unpack_codes(bytes(packed), 3, 5)
    with pytest.raises(CodecError, match="take 2 bytes"):
        unpack_codes(b"\x00", 3, 5)


def test_fq_frames_send_no_range_and_pack_tightly() -> None:
    x = unit((32, 16))
    frame = encode_frame(x, "fq:2")
    hdr = read_header(frame)
    assert hdr.payload_length == 32 * 16 * 2 // 8  # codes only: no lo, no scale
    assert hdr.codec == "fq:2"


def fitted(codes: np.ndarray, bits: int) -> EntropyModel:
    return EntropyModel.fit(code_counts(codes, 1 << bits))


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 4),
    batch=st.integers(0, 40),
    channels=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    skew=st.floats(0.05, 20.0),
)
def test_ans_round_trips_random_streams(
    bits: int, batch: int, channels: int, seed: int, skew: float
) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(1 << bits, skew), size=channels)
    codes = np.stack(
        [rng.choice(1 << bits, size=batch, p=p) for p in probs], axis=1
    ).astype(np.uint8).reshape(batch, channels)
    model = fitted(rng.integers(0, 1 << bits, (64, channels)).astype(np.uint8), bits)
    data = ans_encode(codes, model)
    np.testing.assert_array_equal(ans_decode(data, codes.shape, model), codes)


def test_ans_round_trips_adversarial_streams() -> None:
    # a model fitted on all-zero codes, then fed only the rarest code: the worst case
    skewed = fitted(np.zeros((10_000, 4), np.uint8), 2)
    worst = np.full((256, 4), 3, np.uint8)
    data = ans_encode(worst, skewed)
    np.testing.assert_array_equal(ans_decode(data, worst.shape, skewed), worst)
    assert len(data) <= max_stream_bytes(worst.size)  # within the decoder's bound


def test_rare_codes_of_a_lopsided_model_still_decode() -> None:
    # a code the model has (almost) never seen costs up to 24 bits: still within the bound
    model = EntropyModel.fit(np.array([[10**6] * 3 + [0]] * 4))
    codes = np.full((32, 4), 3, np.uint8)
    np.testing.assert_array_equal(ans_decode(ans_encode(codes, model), codes.shape, model), codes)


def test_entropy_coding_beats_packing_where_zstd_loses() -> None:
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0.5, 0.5, (32, 16)), 0, 1).astype(np.float32) ** 4
    packed = len(encode_frame(x, "fq:2"))
    table = ModelTable()
    model_id = table.add(fitted(quantize_codes(x, 2), 2))
    with use_models(table):
        coded = encode_frame(x, f"fq:2,model={model_id:08x}")
        np.testing.assert_array_equal(decode_frame(coded), parse_codec("fq:2").roundtrip(x))
    assert coded and len(coded) < packed


def test_corrupt_streams_raise_codec_errors() -> None:
    x = unit((32, 8))
    model = fitted(quantize_codes(x, 2), 2)
    data = ans_encode(quantize_codes(x, 2), model)
    with pytest.raises(CodecError, match="whole 32-bit words"):
        ans_decode(data[:-1], x.shape, model)
    with pytest.raises(CodecError, match="too long"):
        ans_decode(data * 40, x.shape, model)
    failures = 0
    for i in range(0, len(data), 4):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        try:
            ans_decode(bytes(bad), x.shape, model)
        except CodecError:
            failures += 1
    assert failures > 0  # flipped words are caught (the frame's crc32 catches the rest)


def test_a_frame_needs_its_model() -> None:
    x = unit((4, 8))
    table = ModelTable()
    model_id = table.add(fitted(quantize_codes(x, 2), 2))
    with use_models(table):
        frame = encode_frame(x, f"fq:2,model={model_id:08x}")
    with pytest.raises(CodecError, match=f"entropy model {model_id:08x}"):
        decode_frame(frame)  # a receiver without the model refuses, naming it
    other = ModelTable()
    other.add(fitted(np.zeros((4, 8), np.uint8), 2))
    with use_models(other), pytest.raises(CodecError, match="does not have"):
        decode_frame(frame)


def test_model_shape_must_match_the_tensor() -> None:
    model = fitted(np.zeros((4, 8), np.uint8), 2)
    with pytest.raises(CodecError, match="8 channels"):
        ans_encode(np.zeros((4, 6), np.uint8), model)
    with pytest.raises(CodecError, match="2-bit"):
        ans_encode(np.full((4, 8), 7, np.uint8), model)


def test_models_round_trip_through_json_and_refuse_tampering() -> None:
    model = fitted(np.arange(64, dtype=np.uint8).reshape(16, 4) % 4, 2)
    stored = models_to_json([model])
    (back,) = models_from_json(stored)
    np.testing.assert_array_equal(back.freqs, model.freqs)
    key = next(iter(stored))
    stored[key][0][0] += 1
    with pytest.raises(CodecError, match="altered"):
        models_from_json(stored)
    with pytest.raises(CodecError, match="1..65535"):
        models_from_json({key: [[0, 1], [1, 1]]})


def test_spec_errors_name_the_problem() -> None:
    with pytest.raises(CodecError, match="1..8"):
        parse_codec("fq:9")
    with pytest.raises(CodecError, match="needs a bit width"):
        parse_codec("fq")
    with pytest.raises(CodecError, match="valid options: ans"):
        parse_codec("fq:2,fast")
    with pytest.raises(CodecError, match="only stage"):
        parse_codec("fq:2,model=0000abcd+zstd")
    assert parse_codec("fq:2,ans").spec == "fq:2,ans"
    assert parse_codec("fq:3,model=0000abcd").spec == "fq:3,model=0000abcd"


def test_frame_with_bad_fq_params_is_refused() -> None:
    frame = bytearray(encode_frame(unit((2, 4)), "fq:2"))
    frame[frame.index(12) + 2] = 9  # bits byte of the fq entry -> 9
    body = bytes(frame[:-4])
    import zlib

    with pytest.raises((CodecError, FrameError)):
        decode_frame(body + zlib.crc32(body).to_bytes(4, "little"))
