"""The Neurosurgeon-style latency model against hand computations."""

from __future__ import annotations

import math

import pytest

from edgesplit.devices import DeviceProfile, LinkProfile, load_device, load_link
from edgesplit.errors import ConfigError
from edgesplit.evaluate import latency
from edgesplit.evaluate.latency import estimate


def _device(name: str, gflops: float, memory_mib: int = 1024) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        description="test",
        effective_gflops_fp32=gflops,
        effective_gflops_int8=2 * gflops,
        memory_mib=memory_mib,
        max_onnx_opset=17,
        execution_provider="CPUExecutionProvider",
    )


DEVICE = _device("dev", 10.0)  # 10 GFLOPS
SERVER = _device("srv", 100.0)  # 100 GFLOPS
HOST = _device("host", 100.0)  # codec timings measured here: device runs them 10x slower
LINK = LinkProfile(name="net", description="test", uplink_mbps=8.0, downlink_mbps=16.0, rtt_ms=20.0)


def test_training_step_by_hand() -> None:
    b = estimate(
        client_flops=1e6,
        server_flops=2e6,
        batch_size=10,
        bytes_up=1000,
        bytes_down=4000,
        device=DEVICE,
        link=LINK,
        server=SERVER,
        host=HOST,
        encode_s=0.001,
        decode_s=0.002,
        mode="train",
    )
    # client: 1e6 FLOP x 10 samples x 3 (fwd + bwd) / 10e9 FLOP/s = 3 ms
    assert b.client_compute_ms == pytest.approx(3.0)
    # encode: 1 ms on the host x (100 / 10) = 10 ms on the device
    assert b.encode_ms == pytest.approx(10.0)
    # uplink: 1000 B x 8 / 8e6 bit/s = 1 ms; downlink: 4000 x 8 / 16e6 = 2 ms
    assert b.uplink_ms == pytest.approx(1.0)
    assert b.downlink_ms == pytest.approx(2.0)
    # server: 2e6 x 10 x 3 / 100e9 = 0.6 ms; decode 2 ms x (100 / 100)
    assert b.server_ms == pytest.approx(0.6)
    assert b.decode_ms == pytest.approx(2.0)
    assert b.rtt_ms == 20.0 and b.duty_cycle_wait_ms == 0.0
    assert b.total_ms == pytest.approx(3 + 10 + 1 + 20 + 0.6 + 2 + 2)
    assert b.feasible and b.reason == ""
    assert (b.frame_bytes_up, b.frame_bytes_down) == (1000, 4000)


def test_inference_is_forward_only_and_unscaled_without_host() -> None:
    b = estimate(
        client_flops=1e6,
        server_flops=2e6,
        batch_size=10,
        bytes_up=1000,
        bytes_down=4000,
        device=DEVICE,
        link=LINK,
        server=SERVER,
        encode_s=0.001,
        decode_s=0.002,
        mode="infer",
    )
    assert b.client_compute_ms == pytest.approx(1.0)
    assert b.server_ms == pytest.approx(0.2)
    assert b.encode_ms == pytest.approx(1.0)  # host=None: no scaling
    assert b.total_ms == pytest.approx(1 + 1 + 1 + 20 + 0.2 + 2 + 2)


def test_precision_picks_the_throughput() -> None:
    b = estimate(
        client_flops=1e6,
        server_flops=0,
        batch_size=10,
        bytes_up=0,
        bytes_down=0,
        device=DEVICE,
        link=LINK,
        server=SERVER,
        mode="infer",
        precision="int8",
    )
    assert b.client_compute_ms == pytest.approx(0.5)  # int8 = 20 GOPS


def test_lora_frame_over_the_payload_is_infeasible_not_timed() -> None:
    lora = load_link("lora")
    b = estimate(
        client_flops=1e5,
        server_flops=1e5,
        batch_size=1,
        bytes_up=300,
        bytes_down=40,
        device=load_device("rpi4"),
        link=lora,
        server=load_device("server-cpu"),
        mode="infer",
    )
    assert not b.feasible
    assert math.isinf(b.total_ms)
    assert "300 B" in b.reason and "222 B" in b.reason and "fragmentation" in b.reason
    assert b.to_json()["total_ms"] is None  # strict JSON
    # the gradient direction is checked too
    b = estimate(
        client_flops=1e5,
        server_flops=1e5,
        batch_size=1,
        bytes_up=100,
        bytes_down=500,
        device=load_device("rpi4"),
        link=lora,
        server=load_device("server-cpu"),
        mode="train",
    )
    assert not b.feasible and "gradient frame of 500 B" in b.reason


def test_lora_small_frame_by_hand() -> None:
    lora = load_link("lora")
    b = estimate(
        client_flops=0,
        server_flops=0,
        batch_size=1,
        bytes_up=20,
        bytes_down=20,
        device=DEVICE,
        link=lora,
        server=SERVER,
        mode="train",
    )
    assert b.feasible
    # (20 B + 13 B LoRaWAN overhead) x 8 bit / 5470 bit/s
    air = 33 * 8 / 5470 * 1e3
    assert b.uplink_ms == pytest.approx(air)
    assert b.downlink_ms == pytest.approx(air)
    assert b.rtt_ms == 1000.0  # RECEIVE_DELAY1
    # 1 % duty cycle: silent for 99x the air time before the next step
    assert b.duty_cycle_wait_ms == pytest.approx(99 * air)
    assert b.total_ms == pytest.approx(air + 1000 + air + 99 * air)
    single = estimate(
        client_flops=0,
        server_flops=0,
        batch_size=1,
        bytes_up=20,
        bytes_down=20,
        device=DEVICE,
        link=lora,
        server=SERVER,
        mode="infer",
    )
    assert single.duty_cycle_wait_ms == 0.0  # one request does not wait


def test_memory_over_the_device_is_infeasible() -> None:
    small = _device("small", 10.0, memory_mib=1)
    need = latency.estimate_client_memory_bytes(100_000, 4 * 1000, 32, "train")
    assert need == 100_000 * 12 + 4 * 1000 * 32 * 2
    b = estimate(
        client_flops=1,
        server_flops=1,
        batch_size=32,
        bytes_up=1,
        bytes_down=1,
        device=small,
        link=LINK,
        server=SERVER,
        client_memory_bytes=need,
    )
    assert not b.feasible and "MiB" in b.reason and "small" in b.reason
    assert latency.estimate_client_memory_bytes(100, 40, 2, "infer") == 100 * 4 + 80


def test_frame_rescaling() -> None:
    assert latency.frame_bytes_for_batch(1000, 32, 32) == 1000
    # payload (1000 - 32) / 32 per sample; one sample keeps the 32-byte header
    assert latency.frame_bytes_for_batch(1000, 32, 1) == math.ceil(968 / 32 + 32)
    assert latency.frame_bytes_for_batch(1000, 32, 64) == math.ceil(968 * 2 + 32)
    with pytest.raises(ConfigError):
        latency.frame_bytes_for_batch(1000, 0, 1)


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="mode"):
        estimate(
            client_flops=1,
            server_flops=1,
            batch_size=1,
            bytes_up=1,
            bytes_down=1,
            device=DEVICE,
            link=LINK,
            server=SERVER,
            mode="fly",
        )
    with pytest.raises(ConfigError, match="bytes_up"):
        estimate(
            client_flops=1,
            server_flops=1,
            batch_size=1,
            bytes_up=-1,
            bytes_down=1,
            device=DEVICE,
            link=LINK,
            server=SERVER,
        )
    with pytest.raises(ConfigError, match="batch"):
        estimate(
            client_flops=1,
            server_flops=1,
            batch_size=0,
            bytes_up=1,
            bytes_down=1,
            device=DEVICE,
            link=LINK,
            server=SERVER,
        )


def test_codec_cost_model_by_hand() -> None:
    from edgesplit.evaluate.latency import CALIBRATION_GFLOPS, codec_ms

    n = 4096 * 256
    # on the calibration host, q8+zstd takes the benchmark's 0.89 + 2.84 ns per element
    assert codec_ms("q8+zstd", n, CALIBRATION_GFLOPS, "encode") == pytest.approx(
        n * (0.89 + 2.84) * 1e-6
    )
    # topk keeps 10 %: selection over all, q8 over the kept, zstd over kept values + indices
    want = n * 4.0 + 0.1 * n * 0.89 + 0.1 * n * (1 + 4) * 2.84
    assert codec_ms("topk:0.1+q8+zstd", n, CALIBRATION_GFLOPS, "encode") == pytest.approx(
        want * 1e-6
    )
    # a device 10x slower takes 10x longer; the gradient half of a cell is not timed
    assert codec_ms("q4+zstd/q8", n, CALIBRATION_GFLOPS / 10, "encode") == pytest.approx(
        10 * codec_ms("q4+zstd", n, CALIBRATION_GFLOPS, "encode")
    )
    # a bottleneck cell is its fq:BITS,ans codec
    assert codec_ms("bn:16:2", n, 100.0, "decode") == codec_ms("fq:2,ans", n, 100.0, "decode")
    with pytest.raises(ConfigError, match="no cost model for stage 'q5'"):
        codec_ms("q5", n, 100.0, "encode")


def test_estimate_with_a_codec_ignores_measured_times() -> None:
    from edgesplit.evaluate.latency import codec_ms, estimate

    common = dict(
        client_flops=16512,
        server_flops=17728,
        batch_size=32,
        bytes_up=1000,
        bytes_down=4000,
        device=load_device("rpi4"),
        link=load_link("wifi"),
        server=load_device("server-cpu"),
        host=load_device("server-cpu"),
        codec="q4+zstd",
        cut_elements=128,
    )
    calm = estimate(encode_s=1e-4, decode_s=1e-4, **common)
    busy = estimate(encode_s=5e-2, decode_s=5e-2, **common)
    assert calm == busy and calm.codec_time == "model"
    assert calm.encode_ms == pytest.approx(
        codec_ms("q4+zstd", 32 * 128, load_device("rpi4").effective_gflops_fp32, "encode")
    )
