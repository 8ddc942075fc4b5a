"""Recommendations respect the accuracy budget, the objective and feasibility, and explain
themselves when nothing qualifies."""

from __future__ import annotations

import pytest

from edgesplit.errors import ConfigError
from edgesplit.evaluate.recommend import recommend, reference_accuracy, within_budget


def _lat(total: float | None, reason: str = "", frame: int = 100) -> dict:
    return {
        "total_ms": total,
        "feasible": total is not None,
        "reason": reason,
        "frame_bytes_up": frame,
    }


def _row(cut: str, codec: str, acc: float, nbytes: float, lat: dict) -> dict:
    return {
        "cut": cut,
        "codec": codec,
        "grad_codec": "fp32",
        "accuracy_mean": acc,
        "bytes_per_sample": nbytes,
        "latency": lat,
    }


ROWS = [
    # cut a: fp32 is the reference (0.95)
    _row("a", "fp32", 0.95, 1000, {"pi": {"wifi": _lat(50.0), "lora": _lat(None, "too big")}}),
    _row("a", "q8", 0.948, 260, {"pi": {"wifi": _lat(30.0), "lora": _lat(None, "too big")}}),
    _row("a", "q4", 0.945, 130, {"pi": {"wifi": _lat(35.0), "lora": _lat(None, "frame 140 B")}}),
    _row("a", "q1", 0.80, 40, {"pi": {"wifi": _lat(10.0), "lora": _lat(900.0)}}),
    # cut b: worse fp32; its q8 is within 1 point of *its own* fp32 but not of the best
    _row("b", "fp32", 0.90, 500, {"pi": {"wifi": _lat(20.0), "lora": _lat(None, "too big")}}),
    _row("b", "q8", 0.899, 130, {"pi": {"wifi": _lat(5.0), "lora": _lat(None, "too big")}}),
]


def test_reference_is_the_best_fp32_over_all_cuts() -> None:
    base = reference_accuracy(ROWS)
    assert base.accuracy == 0.95 and base.cut == "a" and "fp32" in base.description
    assert within_budget(ROWS, 1.0, base) == [True, True, True, False, False, False]
    no_fp32 = [r for r in ROWS if r["codec"] != "fp32"]
    assert "no fp32 row" in reference_accuracy(no_fp32).description


def test_latency_objective_within_budget() -> None:
    recs = recommend(ROWS, ["pi"], ["wifi", "lora"], max_drop=1.0)
    wifi, lora = recs
    # q1 (10 ms) and cut b (5 ms) are faster but outside the budget: q8 at 30 ms wins
    assert (wifi.cut, wifi.codec, wifi.latency_ms) == ("a", "q8", 30.0)
    assert wifi.drop_points == pytest.approx(0.2)
    assert wifi.drop_points <= 1.0 and wifi.found and wifi.row == 1
    assert "lowest latency" in wifi.reason
    # on LoRa everything within budget is infeasible: no recommendation, and why
    assert not lora.found and lora.codec is None
    assert "infeasible" in lora.reason and "frame 140 B" in lora.reason  # the smallest one


def test_bytes_objective() -> None:
    (wifi,) = recommend(ROWS, ["pi"], ["wifi"], max_drop=1.0, objective="bytes")
    assert (wifi.cut, wifi.codec) == ("a", "q4")
    assert "fewest bytes" in wifi.reason


def test_a_wider_budget_admits_more() -> None:
    wifi, lora = recommend(ROWS, ["pi"], ["wifi", "lora"], max_drop=20.0)
    assert (wifi.cut, wifi.codec) == ("b", "q8")  # 5 ms, 5.1 points below
    assert (lora.cut, lora.codec) == ("a", "q1")  # the only feasible one on LoRa
    for rec in (wifi, lora):
        assert rec.drop_points <= 20.0


def test_nothing_within_budget_says_so() -> None:
    rows = [
        _row("a", "fp32", 0.95, 1000, {"pi": {"wifi": _lat(None, "no memory")}}),
        _row("a", "q1", 0.5, 40, {"pi": {"wifi": _lat(3.0)}}),
    ]
    (rec,) = recommend(rows, ["pi"], ["wifi"], max_drop=0.5)
    assert not rec.found
    assert "infeasible" in rec.reason and "no memory" in rec.reason
    rows = [_row("a", "q4", 0.7, 100, {}), _row("a", "q1", 0.5, 40, {})]
    base = reference_accuracy(rows)
    (rec,) = recommend(rows, ["pi"], ["wifi"], max_drop=0.0, baseline=base)
    assert rec.found is False and "no latency estimate" in rec.reason
    (rec,) = recommend([], ["pi"], ["wifi"], max_drop=1.0)
    assert "no results" in rec.reason


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="objective"):
        recommend(ROWS, ["pi"], ["wifi"], max_drop=1.0, objective="joules")
    with pytest.raises(ConfigError, match="max-drop"):
        recommend(ROWS, ["pi"], ["wifi"], max_drop=-1.0)


# ---------------------------------------------------------------------------------------------
# Recommendations do not depend on how busy the host was


def _timed_rows(seed: int) -> list[dict]:
    """Rows with fixed accuracy, bytes and FLOPs whose *measured* encode/decode times are
    random (as on a host whose load changes): seed picks the timings, nothing else."""
    import random

    from edgesplit.devices import load_device, load_link
    from edgesplit.evaluate import latency

    rng = random.Random(seed)
    server = load_device("server-cpu")
    rows = []
    for cut, elements in (("relu1", 128), ("relu2", 64)):
        for codec, frac, acc in (
            ("fp32", 1.0, 0.96),
            ("q8+zstd", 0.27, 0.958),
            ("q4+zstd", 0.14, 0.955),
            ("q2+zstd", 0.08, 0.951),
            ("topk:0.1+q8+zstd", 0.05, 0.952),
        ):
            up, down = 4 * elements * frac + 20, 4 * elements + 20
            row = {
                "cut": cut,
                "codec": codec,
                "grad_codec": "fp32",
                "accuracy_mean": acc,
                "bytes_per_sample": up + down,
                "cut_elements": elements,
                "latency": {},
            }
            for d in ("rpi4", "jetson-nano", "rpi5"):
                row["latency"][d] = {}
                for lk in ("wifi", "lte", "5g", "ble"):
                    b = latency.estimate(
                        client_flops=16512 * elements / 128,
                        server_flops=17728,
                        batch_size=32,
                        bytes_up=32 * up,
                        bytes_down=32 * down,
                        device=load_device(d),
                        link=load_link(lk),
                        server=server,
                        host=server,
                        encode_s=rng.uniform(1e-5, 2e-2),
                        decode_s=rng.uniform(1e-5, 2e-2),
                    )
                    row["latency"][d][lk] = b.to_json()
            rows.append(row)
    return rows


def test_recommendations_ignore_measured_codec_times() -> None:
    from edgesplit.evaluate.recommend import recommend

    args = (["rpi4", "jetson-nano", "rpi5"], ["wifi", "lte", "5g", "ble"])
    calm, busy = _timed_rows(1), _timed_rows(2)
    # the measured timings really differ, and alone they would rank differently
    assert (
        calm[0]["latency"]["rpi4"]["wifi"]["total_ms"]
        != (busy[0]["latency"]["rpi4"]["wifi"]["total_ms"])
    )
    first = [r.to_json() for r in recommend(calm, *args, max_drop=1.0)]
    second = [r.to_json() for r in recommend(busy, *args, max_drop=1.0)]
    assert first == second
    assert all(r["found"] for r in first)
    assert {r["codec"] for r in first} != {None}


def test_ranked_latency_uses_the_codec_model() -> None:
    from edgesplit.evaluate.latency import CODEC_OPS
    from edgesplit.evaluate.recommend import ranked_latency

    row = _timed_rows(3)[1]  # relu1, q8+zstd, 128 elements
    lat = ranked_latency(row, "rpi4", "wifi")
    assert lat is not None and lat["codec_time"] == "model"
    measured = row["latency"]["rpi4"]["wifi"]
    # by hand: 32 samples x 128 elements; q8 per element, zstd per byte (1 B a value), on
    # rpi4's effective fp32 GFLOPS (encode) and the server's (decode)
    n = 32 * 128
    encode_ops = n * CODEC_OPS["q"][0] + n * 1.0 * CODEC_OPS["zstd"][0]
    assert lat["encode_ms"] == pytest.approx(
        encode_ops / (measured["device_gflops_fp32"] * 1e9) * 1e3
    )
    decode_ops = n * CODEC_OPS["q"][1] + n * 1.0 * CODEC_OPS["zstd"][1]
    assert lat["decode_ms"] == pytest.approx(
        decode_ops / (measured["server_gflops_fp32"] * 1e9) * 1e3
    )
    others = sum(
        measured[k]
        for k in (
            "client_compute_ms",
            "uplink_ms",
            "rtt_ms",
            "server_ms",
            "downlink_ms",
            "duty_cycle_wait_ms",
        )
    )
    assert lat["total_ms"] == pytest.approx(others + lat["encode_ms"] + lat["decode_ms"])
