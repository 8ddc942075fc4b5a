"""Neurosurgeon-style latency model of one split step (Kang et al., "Neurosurgeon: Collaborative
Intelligence Between the Cloud and Mobile Edge", ASPLOS 2017).

One step moves one batch across the cut::

    client compute + encode + uplink + RTT + server compute (+ decode)        inference
    ... + downlink of the gradient (+ client backward inside client compute)  training

* **Compute** is FLOPs / effective throughput of the device profile (``devices/*.toml``):
  forward FLOPs per sample x batch, x :data:`TRAIN_FLOPS_FACTOR` when training (forward +
  backward). Per-call overheads (kernel launches, framework dispatch) are not modelled: for tiny
  segments they dominate, so measure on the device when that matters.
* **Encode/decode** come from a fixed **codec cost model** (:func:`codec_ms`): work per cut
  element (and per byte for zstd) of each stage of the codec, in fp32-FLOP equivalents, divided
  by the effective fp32 throughput of the device that runs it (encode: the client, decode: the
  server) -- the same form as compute, so the result depends only on the codec, the cut size
  and the profiles, never on how busy the machine running the sweep was. The constants are one
  stated calibration (:data:`CODEC_OPS`). Times measured during a sweep can still be passed
  (``encode_s``/``decode_s``, scaled by ``host / device`` throughput) when no codec is named;
  :func:`with_codec_model` replaces them in a finished breakdown.
* **Transfer** is (frame bytes + per-message protocol overhead) x 8 / link throughput, plus one
  RTT per step.
* A step is **infeasible** -- reported with ``feasible=False``, a reason and ``total_ms = inf``,
  never silently timed -- when a frame exceeds the link's ``max_payload_bytes`` (LoRaWAN: 222 B
  at DR5; application-level fragmentation is not modelled) or the client's estimated memory
  exceeds the device's.

Everything here is a pure function of numbers and profiles (no torch), so it is testable by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from edgesplit.devices import DeviceProfile, LinkProfile
from edgesplit.errors import ConfigError

#: What a step is: a training step (activations up, gradients down, forward + backward on both
#: sides) or an inference request (activations up, predictions down, forward only).
MODES = ("train", "infer")

#: Training FLOPs = 3 x forward FLOPs: the backward pass computes gradients with respect to the
#: inputs and to the weights, each costing about one forward pass (the usual convention, e.g.
#: the "6N per token" = 2N forward + 4N backward of Kaplan et al., "Scaling Laws for Neural
#: Language Models", 2020).
TRAIN_FLOPS_FACTOR = 3.0

#: Approximate fixed bytes of one frame (magic, version, dtype, ndim, nstages, shape, stage table,
#: payload length, CRC: about 20-40 bytes for tensors of <= 4 dims with 1-3 stages). Used only to
#: rescale a measured frame size to another batch size; see :func:`frame_bytes_for_batch`.
FRAME_OVERHEAD_BYTES = 32

#: Optimizer state while training: weights + gradients + one SGD momentum buffer, fp32.
TRAIN_BYTES_PER_PARAM = 12
#: Inference keeps only fp32 weights.
INFER_BYTES_PER_PARAM = 4

#: Effective fp32 GFLOPS of the profile the codec constants are expressed on: ``server-cpu``
#: (``devices/server-cpu.toml``), the ``--host-device`` the timings of ``bench/codecs.py`` are
#: taken to come from. ``ns per element x CALIBRATION_GFLOPS`` = FLOP equivalents per element.
CALIBRATION_GFLOPS = 183.0

#: Codec cost model: per stage, (encode, decode) work in fp32-FLOP equivalents, **per cut
#: element** for value and sparse stages and the entropy coder, **per input byte** for zstd.
#: Calibrated once from ``python bench/codecs.py`` (README, "Measured figures": a 4096x256 fp32
#: ReLU activation): q8 alone 4478 MB/s = 0.89 ns/element; q8+zstd 1071 MB/s = 3.73 ns/element,
#: so zstd-1 costs 2.84 ns per byte it reads; a plain copy 37 GB/s = 0.11 ns/element. Times the
#: benchmark does not give are estimates, said so: fp16/bf16 casts 0.5 ns, dequantization and
#: zstd decompression about half / a third of their encode, top-k selection 4 ns/element
#: (argpartition), the rANS coder (``ans``) 60 ns/element (``bench/rate.py``: +32 µs for 512
#: elements over plain packing).
CODEC_OPS: dict[str, tuple[float, float]] = {
    "fp32": (0.11 * CALIBRATION_GFLOPS, 0.11 * CALIBRATION_GFLOPS),
    "fp16": (0.5 * CALIBRATION_GFLOPS, 0.5 * CALIBRATION_GFLOPS),
    "bf16": (0.5 * CALIBRATION_GFLOPS, 0.5 * CALIBRATION_GFLOPS),
    "q": (0.89 * CALIBRATION_GFLOPS, 0.45 * CALIBRATION_GFLOPS),  # q8, q4, q2, q1, fq
    "topk": (4.0 * CALIBRATION_GFLOPS, 0.3 * CALIBRATION_GFLOPS),
    "zstd": (2.84 * CALIBRATION_GFLOPS, 0.95 * CALIBRATION_GFLOPS),  # per byte
    "ans": (60.0 * CALIBRATION_GFLOPS, 60.0 * CALIBRATION_GFLOPS),
}
#: Stochastic rounding draws one random number per element: +50 % on the quantizer.
STOCHASTIC_FACTOR = 1.5


@dataclass(frozen=True)
class LatencyBreakdown:
    """Where the time of one step goes, in milliseconds.

    ``total_ms`` is the sum of the components when ``feasible``, else ``inf`` (and ``reason``
    says why). Components are still filled in for infeasible steps so a report can show them.
    """

    device: str
    link: str
    mode: str
    batch_size: int
    client_compute_ms: float
    encode_ms: float
    uplink_ms: float
    rtt_ms: float
    server_ms: float
    decode_ms: float
    downlink_ms: float
    duty_cycle_wait_ms: float
    total_ms: float
    feasible: bool
    reason: str
    frame_bytes_up: int
    frame_bytes_down: int
    client_memory_bytes: int
    #: Effective fp32 GFLOPS of the client device and of the server: what
    #: :func:`with_codec_model` needs to model the codec's time from the breakdown alone.
    device_gflops_fp32: float = math.nan
    server_gflops_fp32: float = math.nan
    #: ``model`` (:func:`codec_ms`) or ``measured`` (host timings scaled to the devices).
    codec_time: str = "measured"

    def to_json(self) -> dict[str, Any]:
        """Strict-JSON dict (``inf`` becomes ``None``)."""
        out = asdict(self)
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()
        }


def estimate(
    *,
    client_flops: float,
    server_flops: float,
    batch_size: int,
    bytes_up: float,
    bytes_down: float,
    device: DeviceProfile,
    link: LinkProfile,
    server: DeviceProfile,
    encode_s: float = 0.0,
    decode_s: float = 0.0,
    host: DeviceProfile | None = None,
    mode: str = "train",
    precision: str = "fp32",
    client_memory_bytes: int = 0,
    codec: str | None = None,
    cut_elements: float = 0.0,
) -> LatencyBreakdown:
    """Latency of one step of ``batch_size`` samples on ``device`` over ``link``.

    Parameters
    ----------
    client_flops, server_flops:
        Forward FLOPs **per sample** of the client and server segments.
    batch_size:
        Samples per step (one frame each way per step).
    bytes_up, bytes_down:
        Bytes of the frame sent up (activations) and down (gradients when training, predictions
        when inferring) in one step -- the real frame lengths, headers included.
    device, link, server:
        Client device, link and server profiles.
    encode_s, decode_s:
        Measured activation encode and decode seconds **per step** on ``host``; ignored when
        ``codec`` is given.
    host:
        Profile of the machine ``encode_s``/``decode_s`` were measured on; ``None`` takes the
        times as they are on both sides (no scaling).
    mode:
        ``train`` or ``infer`` (see :data:`MODES`).
    precision:
        Which effective throughput of ``device`` runs the client segment (fp32, fp16, int8).
    client_memory_bytes:
        Estimated client memory (:func:`estimate_client_memory_bytes`); 0 skips the check.
    codec, cut_elements:
        The activation codec and the cut tensor's elements per sample: encode and decode times
        from the codec cost model (:func:`codec_ms`) instead of measured ones.

    Returns
    -------
    LatencyBreakdown
    """
    if mode not in MODES:
        raise ConfigError(f"unknown latency mode {mode!r}; valid: {', '.join(MODES)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    for name, value in (
        ("client_flops", client_flops),
        ("server_flops", server_flops),
        ("bytes_up", bytes_up),
        ("bytes_down", bytes_down),
        ("encode_s", encode_s),
        ("decode_s", decode_s),
    ):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {value}")

    factor = TRAIN_FLOPS_FACTOR if mode == "train" else 1.0
    client_ms = _compute_ms(client_flops * batch_size * factor, device.gflops(precision))
    server_ms = _compute_ms(server_flops * batch_size * factor, server.gflops("fp32"))

    # codec work runs on the client (encode) and on the server (decode)
    if codec is not None:
        elements = cut_elements * batch_size
        encode_ms = codec_ms(codec, elements, device.effective_gflops_fp32, "encode")
        decode_ms = codec_ms(codec, elements, server.effective_gflops_fp32, "decode")
    else:  # host timings, scaled to the devices
        encode_ms = 1e3 * encode_s * _scale(host, device)
        decode_ms = 1e3 * decode_s * _scale(host, server)

    up_bytes = math.ceil(bytes_up)
    down_bytes = math.ceil(bytes_down)
    uplink_ms = _transfer_ms(up_bytes + link.overhead_bytes_per_message, link.uplink_mbps)
    downlink_ms = _transfer_ms(down_bytes + link.overhead_bytes_per_message, link.downlink_mbps)
    # in training, steps follow each other: the client must sit out the duty-cycle off-time
    # before its next uplink (a single inference request does not wait)
    wait_ms = uplink_ms * (1.0 / link.duty_cycle - 1.0) if mode == "train" else 0.0

    reasons: list[str] = []
    limit = link.max_payload_bytes
    if limit is not None:
        if up_bytes > limit:
            reasons.append(
                f"activation frame of {up_bytes:,} B exceeds the {link.name} max payload of "
                f"{limit:,} B (fragmentation is not modelled)"
            )
        if down_bytes > limit:
            what = "gradient" if mode == "train" else "prediction"
            reasons.append(
                f"{what} frame of {down_bytes:,} B exceeds the {link.name} max payload of "
                f"{limit:,} B (fragmentation is not modelled)"
            )
    if client_memory_bytes > device.memory_bytes:
        reasons.append(
            f"client needs ~{client_memory_bytes / 2**20:,.0f} MiB, more than the "
            f"{device.memory_mib:,} MiB of {device.name}"
        )

    feasible = not reasons
    parts = (
        client_ms,
        encode_ms,
        uplink_ms,
        link.rtt_ms,
        server_ms,
        decode_ms,
        downlink_ms,
        wait_ms,
    )
    total = sum(parts) if feasible else math.inf
    return LatencyBreakdown(
        device=device.name,
        link=link.name,
        mode=mode,
        batch_size=batch_size,
        client_compute_ms=client_ms,
        encode_ms=encode_ms,
        uplink_ms=uplink_ms,
        rtt_ms=link.rtt_ms,
        server_ms=server_ms,
        decode_ms=decode_ms,
        downlink_ms=downlink_ms,
        duty_cycle_wait_ms=wait_ms,
        total_ms=total,
        feasible=feasible,
        reason="; ".join(reasons),
        frame_bytes_up=up_bytes,
        frame_bytes_down=down_bytes,
        client_memory_bytes=int(client_memory_bytes),
        device_gflops_fp32=device.effective_gflops_fp32,
        server_gflops_fp32=server.effective_gflops_fp32,
        codec_time="measured" if codec is None else "model",
    )


def codec_ms(codec: str, elements: float, gflops_fp32: float, direction: str) -> float:
    """Modelled milliseconds to encode (or decode) ``elements`` cut values with ``codec`` on a
    device of ``gflops_fp32`` effective fp32 throughput.

    ``codec`` is a codec spec (``q4+zstd``, ``topk:0.1+q8+zstd``), a sweep cell ``ACT/GRAD``
    (the activation codec ``ACT`` is the one timed) or a bottleneck cell ``bn:D:BITS[:RATE]``
    (its ``fq:BITS,ans``). Work per stage is :data:`CODEC_OPS`; zstd's is per byte it reads,
    i.e. what the stages before it leave (4 B a value for fp32, BITS/8 for a quantizer, values
    and 4-byte indices for top-k).

    Raises
    ------
    ConfigError
        An unknown stage (the message lists the known ones), ``direction`` other than encode or
        decode, or a throughput that is not positive.
    """
    if direction not in ("encode", "decode"):
        raise ConfigError(f"direction must be encode or decode, got {direction!r}")
    if not (math.isfinite(gflops_fp32) and gflops_fp32 > 0):
        raise ConfigError(f"effective fp32 GFLOPS must be > 0, got {gflops_fp32}")
    side = 0 if direction == "encode" else 1
    ops = 0.0
    values = float(elements)  # values still to code after a sparse stage
    value_bytes = 4.0  # bytes per value before any value stage (fp32)
    index_bytes = 0.0
    for name, params in _stages(codec):
        if name == "topk":
            ops += CODEC_OPS["topk"][side] * values
            values *= _fraction(params, codec)
            index_bytes = 4.0 * values
        elif name == "zstd":
            ops += CODEC_OPS["zstd"][side] * (values * value_bytes + index_bytes)
        elif name in ("fp32", "fp16", "bf16"):
            ops += CODEC_OPS[name][side] * values
            value_bytes = 4.0 if name == "fp32" else 2.0
        elif name in ("q8", "q4", "q2", "q1", "fq"):
            bits = int(name[1:]) if name != "fq" else _bits(params, default=8)
            factor = STOCHASTIC_FACTOR if "stochastic" in params else 1.0
            ops += CODEC_OPS["q"][side] * values * factor
            value_bytes = bits / 8
            if "ans" in params:
                ops += CODEC_OPS["ans"][side] * values
        else:
            raise ConfigError(
                f"codec {codec!r}: no cost model for stage {name!r}; modelled stages: fp32, fp16, "
                "bf16, q8, q4, q2, q1, fq, topk, zstd"
            )
    return ops / (gflops_fp32 * 1e9) * 1e3


def with_codec_model(
    breakdown: Mapping[str, Any], codec: str, cut_elements: float
) -> dict[str, Any]:
    """A latency breakdown dict (``LatencyBreakdown.to_json()``) with its encode and decode
    times from the codec cost model and its total recomputed -- what a recommendation ranks
    by, so it does not depend on timings measured on a busy host.

    A breakdown without the device throughputs (written before they were recorded) is returned
    unchanged.
    """
    out = dict(breakdown)
    device, server = _gflops(out.get("device_gflops_fp32")), _gflops(out.get("server_gflops_fp32"))
    if device is None or server is None:
        return out
    elements = cut_elements * int(out.get("batch_size") or 1)
    out["encode_ms"] = codec_ms(codec, elements, device, "encode")
    out["decode_ms"] = codec_ms(codec, elements, server, "decode")
    out["codec_time"] = "model"
    if out.get("feasible", True):
        keys = (
            "client_compute_ms",
            "encode_ms",
            "uplink_ms",
            "rtt_ms",
            "server_ms",
            "decode_ms",
            "downlink_ms",
            "duty_cycle_wait_ms",
        )
        out["total_ms"] = sum(float(out.get(k) or 0.0) for k in keys)
    return out


def _gflops(value: Any) -> float | None:
    """A recorded throughput, or None when absent or unusable."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _stages(codec: str) -> list[tuple[str, list[str]]]:
    """``[(stage name, params)]`` of the activation half of a codec or sweep cell."""
    act = codec.split("/", 1)[0].strip()
    if act.startswith("bn:"):  # a learned bottleneck sends fq:BITS,ans
        parts = act.split(":")
        bits = parts[2] if len(parts) > 2 and parts[2] else "2"
        act = f"fq:{bits},ans"
    out = []
    for part in act.split("+"):
        name, _, rest = part.partition(":")
        out.append((name.strip().lower(), [p.strip() for p in rest.split(",") if p.strip()]))
    return out


def _fraction(params: list[str], codec: str) -> float:
    try:
        value = float(params[0])
    except (IndexError, ValueError):
        raise ConfigError(f"codec {codec!r}: topk needs a fraction, e.g. topk:0.1") from None
    if not 0 < value <= 1:
        raise ConfigError(f"codec {codec!r}: topk fraction must be in (0, 1], got {value}")
    return value


def _bits(params: list[str], *, default: int) -> int:
    """The bit width among a stage's parameters (``fq:2,ans`` -> 2)."""
    for p in params:
        if p.isdigit():
            return int(p)
    return default


def estimate_client_memory_bytes(
    client_params: int, activation_bytes_per_sample: float, batch_size: int, mode: str = "train"
) -> int:
    """A lower bound on the client's working memory for one step.

    Weights (fp32), plus gradients and one momentum buffer when training
    (:data:`TRAIN_BYTES_PER_PARAM`), plus the batch's activations (kept for the backward pass
    and their gradients when training: x2). The runtime's own footprint (ONNX Runtime, Python)
    is not included, so only clear misfits are flagged.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown latency mode {mode!r}; valid: {', '.join(MODES)}")
    per_param = TRAIN_BYTES_PER_PARAM if mode == "train" else INFER_BYTES_PER_PARAM
    act = activation_bytes_per_sample * batch_size * (2 if mode == "train" else 1)
    return int(client_params * per_param + act)


def frame_bytes_for_batch(
    frame_bytes: float, measured_batch: int, target_batch: int, overhead: int = FRAME_OVERHEAD_BYTES
) -> int:
    """Rescale a measured frame size to another batch size.

    The payload grows with the batch, the header does not::

        bytes(target) = (frame_bytes - overhead) / measured_batch * target_batch + overhead

    ``overhead`` (default :data:`FRAME_OVERHEAD_BYTES`) is an estimate; the result is exact
    when ``target_batch == measured_batch``.
    """
    if measured_batch < 1 or target_batch < 1:
        raise ConfigError("batch sizes must be >= 1")
    if target_batch == measured_batch:
        return math.ceil(frame_bytes)
    payload = max(frame_bytes - overhead, 0.0) / measured_batch
    return math.ceil(payload * target_batch + min(overhead, frame_bytes))


def _compute_ms(flops: float, gflops: float) -> float:
    return flops / (gflops * 1e9) * 1e3


def _transfer_ms(nbytes: float, mbps: float) -> float:
    # 1 Mbit/s = 1e6 bit/s = 1e3 bit/ms
    return nbytes * 8.0 / (mbps * 1e3)


def _scale(host: DeviceProfile | None, target: DeviceProfile) -> float:
    """How much slower ``target`` runs host-measured code: host / target effective fp32."""
    if host is None:
        return 1.0
    return host.effective_gflops_fp32 / target.effective_gflops_fp32
