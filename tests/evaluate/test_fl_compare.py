"""SplitNN vs FedAvg per-client resources, checked against hand computations."""

from __future__ import annotations

import math

import pytest

from edgesplit.evaluate import fl_compare as fl


def test_acceptance_hand_computation() -> None:
    params, cut_elements, n_total = 17_226, 64, 1347
    # FedAvg: parameter count x 4 bytes x 2 per round (one round per epoch)
    assert fl.fedavg_bytes_per_client(params) == params * 4 * 2
    # SplitNN at fp32: cut elements x 4 bytes x samples x 2
    up, down = fl.splitnn_fp32_bytes_per_sample(cut_elements)
    for k in (10, 100, 500):
        n = n_total / k
        assert fl.splitnn_bytes_per_client(up, down, n) == pytest.approx(cut_elements * 4 * n * 2)

    cmp = fl.compare(total_samples=n_total, model_params=params, client_params=16_576,
                     model_forward_flops=34_240, client_forward_flops=33_088,
                     cut_elements=cut_elements, codec="q4+zstd",
                     codec_bytes_up_per_sample=34.7, codec_bytes_down_per_sample=256.8)
    assert [r.clients for r in cmp.rows] == [10, 100, 500]
    for r in cmp.rows:
        n = n_total / r.clients
        assert r.samples_per_client == pytest.approx(n)
        assert r.fedavg_bytes == params * 4 * 2
        assert r.splitnn_bytes_fp32 == pytest.approx(cut_elements * 4 * n * 2)
        assert r.splitnn_bytes_codec == pytest.approx((34.7 + 256.8) * n)
        # FLOPs per epoch: 3 x forward x samples
        assert r.splitnn_flops == pytest.approx(3 * 33_088 * n)
        assert r.fedavg_flops == pytest.approx(3 * 34_240 * n)

    # crossover: cut_elements x 8 x N / K = params x 8  <=>  K* = cut_elements x N / params
    assert cmp.crossover_fp32 == pytest.approx(cut_elements * 8 * n_total / (params * 8))
    assert cmp.crossover_codec == pytest.approx((34.7 + 256.8) * n_total / (params * 8))
    assert cmp.first_clients_fp32 == math.floor(cmp.crossover_fp32) + 1
    # compression moves the crossover by the compression factor
    assert cmp.crossover_fp32 / cmp.crossover_codec == pytest.approx(cmp.compression_factor)
    doc = cmp.to_json()
    assert doc["rows"][0]["cheaper_fp32"] in ("splitnn", "fedavg", "tie")
    assert "params x 4 B x 2" in doc["conventions"]


def test_crossover_at_the_boundary() -> None:
    # a client count exactly at K* ties: the first with strictly fewer bytes is K* + 1
    assert fl.first_clients_below(5.0) == 6
    assert fl.first_clients_below(5.3) == 6
    assert fl.first_clients_below(0.0) == 1
    assert fl.first_clients_below(math.inf) is None
    assert fl.crossover_clients(100, 8.0, 0.0) == math.inf


def test_who_is_cheaper() -> None:
    cmp = fl.compare(total_samples=1000, model_params=100, client_params=50,
                     model_forward_flops=200, client_forward_flops=100, cut_elements=10,
                     codec="q8", codec_bytes_up_per_sample=10, codec_bytes_down_per_sample=40,
                     clients=[1, 125, 1000])
    # fp32: 80 B/sample x 1000 / K vs 800 B: SplitNN cheaper from K > 100
    assert [r.cheaper_fp32 for r in cmp.rows] == ["fedavg", "splitnn", "splitnn"]
    # codec: 50 B/sample -> K* = 62.5
    assert cmp.crossover_codec == pytest.approx(62.5)
    assert cmp.first_clients_codec == 63
