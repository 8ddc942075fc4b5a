"""FLOP, parameter and activation counts of split/profile.py against numbers worked out by hand
(the latency model and the device-fit check rely on them)."""

from __future__ import annotations

from torch import nn

from edgesplit.split.profile import profile_segment


def test_linear() -> None:
    p = profile_segment(nn.Linear(64, 32), (64,))
    assert p.flops == 4_096              # 2 · 64 · 32 multiply-adds
    assert p.params == 2_080             # 64 · 32 weights + 32 biases
    assert p.output_shape == [32]
    assert p.peak_activation_bytes == 128   # 32 fp32 outputs


def test_linear_over_a_sequence_counts_every_position() -> None:
    p = profile_segment(nn.Linear(10, 4), (7, 10))
    assert p.flops == 560                # 7 positions · 2 · 10 · 4
    assert p.output_shape == [7, 4]


def test_conv2d() -> None:
    p = profile_segment(nn.Conv2d(3, 8, kernel_size=3, padding=1), (3, 16, 16))
    assert p.output_shape == [8, 16, 16]
    assert p.flops == 110_592            # 2 · (3 · 3·3) · (8 · 16 · 16 outputs)
    assert p.params == 224               # 8 · 3 · 3·3 weights + 8 biases
    assert p.peak_activation_bytes == 8_192   # 2 048 fp32 outputs


def test_grouped_strided_conv2d() -> None:
    p = profile_segment(nn.Conv2d(4, 8, kernel_size=3, stride=2, groups=2), (4, 9, 9))
    assert p.output_shape == [8, 4, 4]   # (9 - 3) // 2 + 1 = 4
    assert p.flops == 4_608              # 2 · (4/2 · 3·3) · (8 · 4 · 4)
    assert p.params == 152               # 8 · 2 · 3·3 + 8


def test_sequential_sums_its_layers() -> None:
    seg = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    p = profile_segment(seg, (10,))
    assert p.flops == 620                # 2·10·20 + 20 (ReLU, one op each) + 2·20·5
    assert p.params == 10 * 20 + 20 + 20 * 5 + 5
    assert p.peak_activation_bytes == 80  # widest output: 20 fp32


def test_cnn_block_with_norm_pool_and_flatten() -> None:
    seg = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.MaxPool2d(2), nn.Flatten())
    p = profile_segment(seg, (1, 6, 6))
    # conv: 2 · 9 · (2·4·4 = 32) = 576; batch norm: 2 · 32 = 64; pool: 2·2·2 = 8 outputs
    assert p.flops == 576 + 64 + 8
    assert p.output_shape == [8]
    assert p.params == 2 * 9 + 2 + 2 + 2   # conv weights + bias, norm weight + bias
