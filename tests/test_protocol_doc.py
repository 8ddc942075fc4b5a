"""docs/protocol.md is a specification another language implements: hold it to the code.

Every byte-exact example in the document is re-encoded with the real encoder; the stage and dtype
tables are compared with the registries; the quantizer, topk and rANS rules are implemented here
*from the document's text* (plain Python, no edgesplit internals) and compared with the codecs
on random and adversarial inputs. If the code changes, this fails until the document follows.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest

from edgesplit.codecs import parse_codec
from edgesplit.codecs.base import REGISTRY
from edgesplit.codecs.entropy import EntropyModel, ans_decode, ans_encode
from edgesplit.codecs.zstd_stage import DEFAULT_LEVEL
from edgesplit.transport.envelope import MAX_META_DEPTH, EnvelopeLimits
from edgesplit.transport.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, SessionLimits
from edgesplit.wire.frame import (
    DTYPE_CODES,
    INT_PACK_ID,
    decode_frame,
    encode_frame,
    read_header,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def doc_example(name: str) -> bytes:
    """The bytes of the fenced block after ``<!-- frame-example: name -->``: the leading hex
    pairs of each line (the comment column after them is ignored)."""
    match = re.search(rf"<!-- frame-example: {re.escape(name)} -->\n```\n(.*?)```", DOC, re.S)
    assert match, f"docs/protocol.md has no frame example {name!r}"
    out = bytearray()
    for line in match.group(1).splitlines():
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            out.append(int(token, 16))
    return bytes(out)


FQ_MODEL = np.array([[1000, 200, 30, 5], [10, 10, 300, 3000]], dtype=np.uint16)


def test_worked_examples_are_what_the_encoder_writes() -> None:
    q2 = encode_frame(np.array([[0, 1, 2, 3]], dtype=np.float32), "q2")
    assert doc_example("q2") == q2 and len(q2) == 26
    v1 = doc_example("q2-v1")  # version 1 is still read
    assert read_header(v1).version == 1 and len(v1) == 36
    np.testing.assert_array_equal(decode_frame(v1), decode_frame(q2))
    labels = encode_frame(np.array([3, 0, 9, 7, 1], dtype=np.uint8), "fp32", int_bits=4)
    assert doc_example("labels") == labels
    np.testing.assert_array_equal(decode_frame(doc_example("labels")), [3, 0, 9, 7, 1])
    emodel = encode_frame(FQ_MODEL, "fp32")
    assert doc_example("emodel") == emodel
    model = EntropyModel(FQ_MODEL)
    assert f"{model.model_id:08x}" == "76c78d73"
    x = np.array([[0, 1], [0, 1], [0.34, 0.67], [0, 1]], dtype=np.float32)
    codes = np.array([[0, 3], [0, 3], [1, 2], [0, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(parse_codec("fq:2").value.codes(x), codes)
    assert doc_example("fq-ans")[-8:-4] == ans_encode(codes, model)
    assert doc_example("fq-ans")[9:16] == bytes([12, 5, 2]) + model.model_id.to_bytes(4, "little")


def test_stage_and_dtype_tables_match_the_registries() -> None:
    section = DOC[DOC.index("## 9. Codec stages") : DOC.index("### Bit packing")]
    documented: dict[int, str] = {}
    for ids, spec in re.findall(r"^\| ([\d, ]+) \| ([^|]+) \|", section, re.M):
        names = re.findall(r"`([a-z0-9]+)", spec)
        for sid, name in zip([int(i) for i in ids.split(",")], names or ["int"], strict=False):
            documented[sid] = name
    registered = {sid: cls.name for sid, cls in REGISTRY.by_id.items()}
    assert {k: v for k, v in documented.items() if k != INT_PACK_ID} == registered
    assert INT_PACK_ID in documented
    listed = DOC[DOC.index("**dtype codes**") :]
    codes = dict(re.findall(r"(\d+) (float\d+|bool|u?int\d+)", listed)[:12])
    assert {int(k): v for k, v in codes.items()} == {c: d.name for c, d in DTYPE_CODES.items()}
    assert f"default **{DEFAULT_LEVEL}**" in DOC


def test_limits_in_the_document_are_the_defaults() -> None:
    s, e = SessionLimits(), EnvelopeLimits()
    assert (s.max_sessions, s.max_streams_per_client, s.idle_timeout) == (1024, 8, 300.0)
    assert (e.max_meta_bytes, e.max_tensors, e.max_name_bytes) == (64 * 1024, 64, 256)
    assert MAX_META_DEPTH == 32 and DEFAULT_MAX_MESSAGE_BYTES == 64 << 20
    for text in ("| 8 (`--max-streams-per-client`", "| 1024 (`--max-sessions`)",
                 "| 300 s (`--idle-timeout`)", "| 64 KiB UTF-8 (`--max-meta-kib`)",
                 "| meta nesting (objects/arrays) | 32 levels", "| tensors per envelope | 64 |",
                 "| 256 UTF-8 bytes each", "| 64 MiB (`--max-message-bytes`)"):
        assert text in DOC, text


def test_the_proto_in_the_document_is_the_proto_file() -> None:
    block = re.search(r"```proto\n(.*?)```", DOC, re.S)
    assert block and block.group(1) == (ROOT / "edgesplit/transport/split.proto").read_text()


# ---- the codec rules, implemented from the document's text ---------------------------------


def doc_quantize(x: np.ndarray, bits: int, channel: bool) -> np.ndarray:
    """Section 9, q8..q1 deterministic, decoded: lo + c * scale in float32."""
    f32 = np.float32
    levels = (1 << bits) - 1
    groups = x.shape[1] if channel and x.ndim >= 2 else 1
    out = np.empty_like(x)
    for g in range(groups):
        sel = (slice(None), g) if groups > 1 else (Ellipsis,)
        v = x[sel]
        lo, hi = f32(v.min()), f32(v.max())
        scale = f32((float(hi) - float(lo)) / levels)
        inv = f32(1.0 / float(scale)) if scale > 0 else f32(0)
        if bits == 1:
            c = (v >= f32(lo + f32(0.5) * scale)).astype(np.uint8)
        else:
            t = ((v - lo).astype(f32) * inv).astype(f32)
            c = np.trunc((t + f32(0.5)).astype(f32)).astype(np.uint8)
        out[sel] = (c.astype(f32) * scale).astype(f32) + lo
    return out


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("channel", [False, True])
def test_quantizer_rules(bits: int, channel: bool) -> None:
    rng = np.random.default_rng(bits)
    spec = f"q{bits}:channel" if channel else f"q{bits}"
    for x in (
        rng.normal(size=(6, 5, 3)).astype(np.float32),
        np.maximum(rng.normal(size=(4, 7)), 0).astype(np.float32),  # lo == 0
        np.full((3, 4), 2.5, dtype=np.float32),  # hi == lo: decodes exactly
    ):
        decoded = decode_frame(encode_frame(x, spec))
        np.testing.assert_array_equal(decoded, doc_quantize(x, bits, channel))
    const = np.full((3, 4), 2.5, dtype=np.float32)
    np.testing.assert_array_equal(decode_frame(encode_frame(const, spec)), const)


def test_fixed_range_and_packing_rules() -> None:
    x = np.random.default_rng(1).uniform(-0.2, 1.2, size=(5, 3, 2)).astype(np.float32)
    for bits in range(1, 9):
        levels = np.float32((1 << bits) - 1)
        c = np.floor(np.clip(x, np.float32(0), np.float32(1)) * levels + np.float32(0.5))
        frame = encode_frame(x, f"fq:{bits}")
        np.testing.assert_array_equal(decode_frame(frame), c.astype(np.float32) / levels)
        stream = 0  # code i at bits [i*b, (i+1)*b) of an LSB-first stream
        for i, code in enumerate(c.astype(int).reshape(-1).tolist()):
            stream |= code << (i * bits)
        payload = stream.to_bytes(math.ceil(x.size * bits / 8), "little")
        assert frame[-4 - len(payload) : -4] == payload


def test_topk_rules() -> None:
    rng = np.random.default_rng(2)
    for n in (1, 7, 8, 9, 64, 300, 70_000):
        for f in (0.01, 0.1, 0.125, 0.5, 1.0):
            x = rng.normal(size=n).astype(np.float32)
            k = min(n, max(1, math.floor(f * n + 0.5)))
            w = next(w for w in (1, 2, 4, 8) if n - 1 < 1 << (8 * w))
            index = (n + 7) // 8 if (n + 7) // 8 <= w * k else w * k
            frame = encode_frame(x, f"topk:{f}+fp32")
            assert read_header(frame).payload_length == index + 4 * k  # index, then k f32
            kept = np.flatnonzero(decode_frame(frame))
            assert len(kept) == k
            assert np.abs(x[kept]).min() >= np.sort(np.abs(x))[n - k]  # the k largest |x|


# rANS exactly as section 9 describes it
def doc_tables(row: np.ndarray) -> tuple[list[int], list[int]]:
    f = [int(v) for v in row]
    total, n = sum(f), len(f)
    p = [v / total for v in f]
    norm = 0.0
    for v in p:
        norm += v
    scale = float((1 << 24) - n) / norm
    left, prob, acc = [], [], 0.0
    for s in range(n):
        lo = int(acc * scale) + s
        acc2 = acc + p[s]
        hi = 1 << 24 if s == n - 1 else int(acc2 * scale) + s + 1
        left.append(lo)
        prob.append(hi - lo)
        acc = acc2
    return left, prob


def doc_channels(shape: tuple[int, ...], channels: int) -> list[int]:
    inner = math.prod(shape[2:])
    return [(i // inner) % channels for i in range(math.prod(shape))]


def doc_ans_encode(codes: np.ndarray, freqs: np.ndarray) -> bytes:
    tables = [doc_tables(r) for r in freqs]
    chans = doc_channels(codes.shape, len(freqs))
    flat = [int(c) for c in codes.reshape(-1)]
    state, out = 0, []
    for i in range(len(flat) - 1, -1, -1):
        left, prob = tables[chans[i]]
        s = flat[i]
        if (state >> 40) >= prob[s]:
            out.append(state & 0xFFFFFFFF)
            state >>= 32
        state = ((state // prob[s]) << 24) | (left[s] + state % prob[s])
    if state:
        out.append(state & 0xFFFFFFFF)
    if state >> 32:
        out.append(state >> 32)
    return np.array(out, dtype="<u4").tobytes()


def doc_ans_decode(data: bytes, shape: tuple[int, ...], freqs: np.ndarray) -> np.ndarray:
    tables = [doc_tables(r) for r in freqs]
    words = [int(w) for w in np.frombuffer(data, dtype="<u4")]
    state = 0
    if words:
        state = words.pop()
        assert state != 0
        while words and state < 1 << 32:
            state = state << 32 | words.pop()
    out = []
    for c in doc_channels(shape, len(freqs)):
        left, prob = tables[c]
        q = state & ((1 << 24) - 1)
        s = max(k for k in range(len(left)) if left[k] <= q)
        out.append(s)
        state = (state >> 24) * prob[s] + q - left[s]
        if state < 1 << 32 and words:
            state = state << 32 | words.pop()
    assert state == 0 and not words
    return np.array(out, dtype=np.uint8).reshape(shape)


def test_rans_as_documented_is_byte_exact() -> None:
    rng = np.random.default_rng(3)
    for trial in range(40):
        bits = int(rng.integers(1, 9))
        channels = int(rng.integers(1, 4))
        shape = (int(rng.integers(0, 5)), channels, *(int(d) for d in rng.integers(1, 4, 2)))
        codes = rng.integers(0, 1 << bits, size=shape).astype(np.uint8)
        freqs = rng.integers(1, 1 << 16, size=(channels, 1 << bits)).astype(np.uint16)
        if trial % 4 == 0:  # adversarial: the least likely symbol everywhere
            freqs[:, :] = 65535
            freqs[:, -1] = 1
            codes[...] = (1 << bits) - 1
        if trial % 4 == 1:
            codes[...] = 0  # the state can stay 0: an empty stream
        model = EntropyModel(freqs)
        data = ans_encode(codes, model)
        assert doc_ans_encode(codes, freqs) == data
        np.testing.assert_array_equal(doc_ans_decode(data, shape, freqs), codes)
        np.testing.assert_array_equal(ans_decode(data, shape, model), codes)


def test_model_id_rule() -> None:
    freqs = np.random.default_rng(4).integers(1, 1 << 16, size=(3, 16)).astype(np.uint16)
    digest = hashlib.sha256(freqs.astype("<u2").tobytes()).digest()
    assert EntropyModel(freqs).model_id == (int.from_bytes(digest[:4], "little") or 1)
    assert parse_codec(f"fq:4,model={EntropyModel(freqs).model_id:08x}").spec.startswith("fq:4,")
