"""Codec throughput and size on a realistic ReLU activation tensor (JSON lines, one run).

The tensor: the output of a randomly initialised 3x3 convolution (16 -> 64 channels, He-normal
weights, small bias, stride 1, 'same' padding) applied to a batch of 16 spatially smooth 16-channel
32x32 inputs (white noise low-pass filtered in the Fourier domain, so neighbouring pixels are
correlated as in images), followed by ReLU. Shape (16, 64, 32, 32), float32, 4 MiB, about half
zeros. Computed with numpy (im2col + matmul) from a fixed seed.

Every codec is measured through the real frame path (``encode_frame`` / ``decode_frame``: header,
scales, indices and crc32 included); ``bytes`` is the frame length. Baselines: ``copy`` (np.copy of
the tensor both ways) and ``zstd-fp32`` (zstd level 1 on the raw fp32 bytes, no frame). Times are
the best of ``--repeats`` runs; MB/s = fp32 input bytes / 1e6 / seconds, for encode and decode
alike. ``ratio`` = fp32 input bytes / bytes.

The last line is a summary with the acceptance bars:

* ``q8+zstd`` encodes faster than ``zstd-fp32`` and is at least 3x smaller;
* ``q4+zstd`` encodes at least 1/3 as fast as ``q8`` alone.

The exit status is 1 when a bar fails. Usage: ``python bench/codecs.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zstandard

from edgesplit.codecs import parse_codec
from edgesplit.codecs.zstd_stage import DEFAULT_LEVEL
from edgesplit.wire.frame import decode_frame, encode_frame

CODECS = [
    "fp32",
    "fp16",
    "bf16",
    "q8",
    "q8+zstd",
    "q4+zstd",
    "q2+zstd",
    "q1+zstd",
    "q8:channel+zstd",
    "topk:0.1+q8+zstd",
]
# Not part of the required list: the evidence for the default zstd level.
LEVEL_PROBES = ["q8+zstd:3", "q4+zstd:3"]


def smooth_inputs(rng: np.random.Generator, shape: tuple[int, ...], cutoff: float) -> np.ndarray:
    """White noise low-pass filtered over the last two axes, standardised per sample/channel."""
    noise = rng.standard_normal(shape)
    h, w = shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    mask = np.exp(-(fy**2 + fx**2) / (2 * cutoff**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * mask, s=(h, w))
    field -= field.mean(axis=(-2, -1), keepdims=True)
    field /= field.std(axis=(-2, -1), keepdims=True) + 1e-12
    return field


def relu_conv_activation(seed: int = 0) -> np.ndarray:
    """(16, 64, 32, 32) float32: ReLU(conv3x3(smooth inputs)) with He-initialised weights."""
    rng = np.random.default_rng(seed)
    n, cin, cout, hw, k = 16, 16, 64, 32, 3
    x = smooth_inputs(rng, (n, cin, hw, hw), cutoff=0.08)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    # im2col: (n, cin, hw, hw, k, k) windows -> (n*hw*hw, cin*k*k)
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * hw * hw, cin * k * k)
    w = rng.standard_normal((cin * k * k, cout)) * np.sqrt(2.0 / (cin * k * k))
    b = rng.standard_normal(cout) * 0.1
    y = cols @ w + b
    y = y.reshape(n, hw, hw, cout).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(np.maximum(y, 0.0), dtype=np.float32)


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: caches, thread-local (de)compressors, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(
    name: str, enc: Callable[[], Any], dec: Callable[[], Any], size: int, raw: int, repeats: int
) -> dict[str, Any]:
    te = best_of(enc, repeats)
    td = best_of(dec, repeats)
    return {
        "codec": name,
        "encode_mb_s": round(raw / 1e6 / te, 1),
        "decode_mb_s": round(raw / 1e6 / td, 1),
        "bytes": size,
        "ratio": round(raw / size, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per measurement (best is kept)")
    args = ap.parse_args(argv)

    x = relu_conv_activation()
    raw = x.nbytes
    print(
        json.dumps(
            {
                "tensor": "relu(conv3x3 16->64, He init) on smooth 16x32x32 inputs, batch 16",
                "shape": list(x.shape),
                "dtype": str(x.dtype),
                "mib": raw / 2**20,
                "zero_fraction": round(float((x == 0).mean()), 4),
                "zstd_default_level": DEFAULT_LEVEL,
                "numpy": np.__version__,
                "zstandard": zstandard.__version__,
                "python": platform.python_version(),
                "repeats": args.repeats,
            }
        )
    )
    results: dict[str, dict[str, Any]] = {}

    res = measure("copy", lambda: np.copy(x), lambda: np.copy(x), raw, raw, args.repeats)
    results["copy"] = res
    print(json.dumps(res))

    cctx = zstandard.ZstdCompressor(level=1)
    dctx = zstandard.ZstdDecompressor()
    blob = cctx.compress(x)
    res = measure(
        "zstd-fp32",
        lambda: cctx.compress(x),
        lambda: np.frombuffer(dctx.decompress(blob), dtype=np.float32),
        len(blob),
        raw,
        args.repeats,
    )
    results["zstd-fp32"] = res
    print(json.dumps(res))

    for spec in CODECS + LEVEL_PROBES:
        codec = parse_codec(spec, seed=0)
        frame = encode_frame(x, codec)
        res = measure(
            spec,
            lambda c=codec: encode_frame(x, c),
            lambda f=frame: decode_frame(f),
            len(frame),
            raw,
            args.repeats,
        )
        if spec in LEVEL_PROBES:
            res["note"] = "zstd level probe, not in the required list"
        results[spec] = res
        print(json.dumps(res))

    q8z, zf, q8, q4z = results["q8+zstd"], results["zstd-fp32"], results["q8"], results["q4+zstd"]
    speedup = q8z["encode_mb_s"] / zf["encode_mb_s"]
    smaller = zf["bytes"] / q8z["bytes"]
    q4_vs_q8 = q4z["encode_mb_s"] / q8["encode_mb_s"]
    bars = {
        "q8+zstd encodes faster than zstd-fp32": speedup > 1.0,
        "q8+zstd is >=3x smaller than zstd-fp32": smaller >= 3.0,
        "q4+zstd encodes at >=1/3 the speed of q8": q4_vs_q8 >= 1.0 / 3.0,
    }
    print(
        json.dumps(
            {
                "summary": True,
                "q8+zstd_encode_speedup_vs_zstd_fp32": round(speedup, 2),
                "zstd_fp32_bytes_over_q8+zstd_bytes": round(smaller, 2),
                "q4+zstd_encode_speed_over_q8": round(q4_vs_q8, 2),
                "bars": bars,
                "pass": all(bars.values()),
            }
        )
    )
    return 0 if all(bars.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
