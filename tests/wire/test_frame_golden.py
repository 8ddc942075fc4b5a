"""Golden frames: the bytes this version writes are the bytes every later version must read.

``tests/golden/<name>.esf`` holds one frame (format version 2) per codec below, made from
:func:`golden_input` (integer arithmetic only, so it is the same on every platform and numpy
version), and ``tests/golden/expected.npz`` the tensor each one must decode to (stored when the
goldens were made, so decoding is pinned to data, not to today's code). The test checks that
encoding today gives the same bytes and that decoding gives the stored tensor.
``tests/golden/v1/`` keeps the version-1 frames of the earlier release: they must still decode.

Regenerate (after a deliberate format change only) with::

    EDGESPLIT_REGEN_GOLDEN=1 pytest tests/wire/test_frame_golden.py

zstd output is deterministic for a given libzstd version but may change between versions, so the
byte comparison of frames with a zstd stage is made only when the installed libzstd is the one
recorded in ``tests/golden/esf_manifest.json``; otherwise those goldens are checked by decoding
alone. Stochastic codecs are not in the list: their bytes depend on numpy's random stream, which
numpy may change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zstandard

from edgesplit.codecs import parse_codec
from edgesplit.wire.frame import decode_frame, encode_frame, read_header

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
MANIFEST = GOLDEN_DIR / "esf_manifest.json"
EXPECTED = GOLDEN_DIR / "expected.npz"
V1_DIR = GOLDEN_DIR / "v1"
REGEN = os.environ.get("EDGESPLIT_REGEN_GOLDEN") == "1"
ZSTD_VERSION = ".".join(str(v) for v in zstandard.ZSTD_VERSION)

FLOAT_CODECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "q1",
    "q8:channel",
    "q4:channel",
    "fp32+zstd",
    "fp16+zstd:3",
    "q8+zstd",
    "q4+zstd",
    "q2+zstd",
    "q1+zstd",
    "q8:channel+zstd",
    "topk:0.1+q8+zstd",
    "topk:0.25+fp32",
    "topk:0.5+q4",
    "fq:2",
    "fq:3",
    "fq:8",
]
# (golden name, dtype) of label frames: raw, whatever the codec
LABEL_FRAMES = [("labels-int64", np.int64), ("labels-uint8", np.uint8), ("mask-bool", np.bool_)]
# label frames bit-packed (format version 2)
PACKED_LABEL_FRAMES = [("labels-packed4", np.uint8)]


def safe_name(spec: str) -> str:
    """``topk:0.1+q8+zstd`` -> ``topk-0p1_q8_zstd``: portable file names."""
    return spec.replace("+", "_").replace(":", "-").replace(",", "-").replace(".", "p")


def golden_input() -> np.ndarray:
    """(2, 3, 5, 7) float32 activation-like tensor: multiples of 1/64, a quarter zeros."""
    i = np.arange(2 * 3 * 5 * 7, dtype=np.int64)
    v = (i * 7919 + 13) % 1009 - 400  # integers in [-400, 608]
    v = np.where(v < -150, 0, v)  # ReLU-ish zeros
    return (v.astype(np.float32) / np.float32(64)).reshape(2, 3, 5, 7)


def golden_labels(dtype: type) -> np.ndarray:
    i = np.arange(16, dtype=np.int64)
    return ((i * 7 + 3) % 10 if dtype is not np.bool_ else i % 3 == 0).astype(dtype)


def golden_unit_input() -> np.ndarray:
    """The golden input squashed into [0, 1] (what a bottleneck sends), some values outside."""
    x = golden_input()
    return ((x + np.float32(2.0)) / np.float32(9.0)).astype(np.float32)


def cases() -> list[tuple[str, np.ndarray, str]]:
    x, unit = golden_input(), golden_unit_input()
    out = [
        (safe_name(spec), unit if spec.startswith("fq") else x, spec) for spec in FLOAT_CODECS
    ]
    out += [(name, golden_labels(dtype), "q8+zstd") for name, dtype in LABEL_FRAMES]
    out += [(name, golden_labels(dtype), "fp32") for name, dtype in PACKED_LABEL_FRAMES]
    return out


def v1_cases() -> list[tuple[str, np.ndarray, str]]:
    return [c for c in cases() if not c[2].startswith("fq") and c[0] != "labels-packed4"]


def encode_case(name: str, x: np.ndarray, spec: str) -> bytes:
    return encode_frame(x, spec, int_bits=4 if name == "labels-packed4" else None)


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


@pytest.fixture(scope="module", autouse=True)
def regenerate() -> None:
    if not REGEN:
        return
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    files = {}
    expected = {}
    for name, x, spec in cases():
        frame = encode_case(name, x, spec)
        (GOLDEN_DIR / f"{name}.esf").write_bytes(frame)
        files[name] = {
            "codec": spec,
            "sha256": hashlib.sha256(frame).hexdigest(),
            "source": "golden_unit_input()" if spec.startswith("fq") else (
                "golden_input()" if x.dtype.kind == "f" else f"golden_labels({x.dtype})"
            ),
        }
        expected[name] = decode_frame(frame)
    np.savez(EXPECTED, **expected)
    manifest = {
        "zstd_version": ZSTD_VERSION,
        "zstandard": zstandard.__version__,
        "numpy": np.__version__,
        "files": files,
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_golden_input_is_stable() -> None:
    x = golden_input()
    assert hashlib.sha256(x.astype("<f4").tobytes()).hexdigest()[:16] == "5d51f1b8e303315f"
    assert 0.2 < (x == 0).mean() < 0.45


@pytest.mark.parametrize(("name", "x", "spec"), cases(), ids=[c[0] for c in cases()])
def test_golden_frame(name: str, x: np.ndarray, spec: str) -> None:
    path = GOLDEN_DIR / f"{name}.esf"
    if not path.exists():
        pytest.fail(f"{path} is missing; create it with EDGESPLIT_REGEN_GOLDEN=1")
    golden = path.read_bytes()
    manifest = load_manifest()
    assert manifest["files"][name]["codec"] == spec
    assert hashlib.sha256(golden).hexdigest() == manifest["files"][name]["sha256"]

    # decoding the stored frame gives the stored tensor (and what the training path gives)
    hdr = read_header(golden)
    decoded = decode_frame(golden)
    with np.load(EXPECTED, allow_pickle=False) as stored:  # never allow_pickle
        expect = stored[name]
    assert hdr.version == 2
    assert hdr.shape == x.shape
    assert decoded.dtype == expect.dtype
    np.testing.assert_array_equal(decoded, expect)
    np.testing.assert_array_equal(decoded, parse_codec(spec).roundtrip(x))

    # encoding today gives the stored bytes
    if "zstd" in hdr.codec and manifest["zstd_version"] != ZSTD_VERSION:
        pytest.skip(
            f"libzstd {ZSTD_VERSION} != {manifest['zstd_version']}: checked by decoding only"
        )
    assert encode_case(name, x, spec) == golden, f"{name}: encoder output changed"


@pytest.mark.parametrize(("name", "x", "spec"), v1_cases(), ids=[c[0] for c in v1_cases()])
def test_version1_frames_still_decode(name: str, x: np.ndarray, spec: str) -> None:
    golden = (V1_DIR / f"{name}.esf").read_bytes()
    manifest = json.loads((V1_DIR / "esf_manifest.json").read_text())
    assert hashlib.sha256(golden).hexdigest() == manifest["files"][name]["sha256"]
    assert read_header(golden).version == 1
    with np.load(EXPECTED, allow_pickle=False) as stored:
        np.testing.assert_array_equal(decode_frame(golden), stored[name])
