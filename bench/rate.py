"""Speed and size of the rate-aware codec stages against ``q4+zstd``, measured in one run.

The tensor is what a trained bottleneck sends: a sigmoid output of ``D`` channels whose codes
follow a skewed per-channel distribution. For each codec: encode and decode time per frame
(median of repeats), frame bytes, and — for the entropy-coded stage — whether the time it adds
on the device is smaller than the time the bytes it saves take to send at 1 Mbit/s.

    python bench/rate.py [--batch 32] [--width 16] [--repeats 300]

Prints one JSON line per codec and one summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from edgesplit.codecs import parse_codec
from edgesplit.codecs.entropy import EntropyModel, ModelTable, code_counts, use_models
from edgesplit.codecs.fixed import quantize_codes
from edgesplit.wire.frame import decode_frame, encode_frame

LINK_BITS_PER_S = 1_000_000  # the yardstick: a 1 Mbit/s uplink


def bottleneck_like(batch: int, width: int, seed: int = 0) -> np.ndarray:
    """Sigmoid outputs with per-channel bias: most channels sit near one end, a few in between."""
    bias = np.random.default_rng(1234).normal(0, 2.5, width)  # the model's channels: fixed
    pre = np.random.default_rng(seed).normal(bias, 1.5, (batch, width))
    return (1 / (1 + np.exp(-pre))).astype(np.float32)


def timed(fn, repeats: int) -> float:  # noqa: ANN001 - a zero-argument callable
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="samples per frame (default 32)")
    parser.add_argument("--width", type=int, default=16, help="bottleneck channels (default 16)")
    parser.add_argument("--bits", type=int, default=2, help="bits per value (default 2)")
    parser.add_argument("--repeats", type=int, default=300, help="timed repeats (default 300)")
    args = parser.parse_args()

    x = bottleneck_like(args.batch, args.width)
    fit_on = bottleneck_like(4096, args.width, seed=1)  # the training codes the model is fit on
    table = ModelTable()
    model = EntropyModel.fit(code_counts(quantize_codes(fit_on, args.bits), 1 << args.bits))
    model_id = table.add(model)
    codecs = ["q4+zstd", f"fq:{args.bits}", f"fq:{args.bits},model={model_id:08x}"]
    rows = {}
    with use_models(table):
        for spec in codecs:
            codec = parse_codec(spec)
            frame = encode_frame(x, codec)
            enc = timed(lambda codec=codec: encode_frame(x, codec), args.repeats)
            dec = timed(lambda frame=frame: decode_frame(frame), args.repeats)
            rows[spec] = {"bench": "rate", "codec": spec, "batch": args.batch,
                          "width": args.width, "frame_bytes": len(frame),
                          "bytes_per_sample": len(frame) / args.batch,
                          "encode_us": enc * 1e6, "decode_us": dec * 1e6}
            print(json.dumps(rows[spec]))
    packed, coded = rows[codecs[1]], rows[codecs[2]]
    saved = packed["frame_bytes"] - coded["frame_bytes"]
    extra_s = (coded["encode_us"] - packed["encode_us"]) / 1e6
    send_s = saved * 8 / LINK_BITS_PER_S
    print(json.dumps({
        "bench": "rate-summary",
        "entropy_bits_per_element": model.bits_per_element(),
        "bytes_saved_per_frame": saved,
        "entropy_extra_encode_us": extra_s * 1e6,
        "saved_bytes_send_us_at_1mbit": send_s * 1e6,
        "entropy_pays_off_at_1mbit": extra_s < send_s,
        "fq_vs_q4zstd_bytes": rows[codecs[0]]["frame_bytes"] / coded["frame_bytes"],
        "fq_encode_speed_vs_q4zstd": rows[codecs[0]]["encode_us"] / coded["encode_us"],
    }))


if __name__ == "__main__":
    main()
