"""Parameter, FLOP and activation-size counts of a segment, for reports and the latency model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SegmentProfile:
    """Per-sample forward cost of a segment."""

    params: int
    flops: int  # multiply-adds counted as 2 FLOPs
    output_shape: list[int]
    peak_activation_bytes: int  # largest single layer output, fp32, one sample


def _layer_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    per_sample_out = out[0].numel()
    if isinstance(module, nn.Linear):
        # per output element one dot product of in_features; counts every leading position
        # of a (seq, features) input, not just one
        return 2 * module.in_features * per_sample_out
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        kernel = int(torch.tensor(module.kernel_size).prod())
        return 2 * (module.in_channels // module.groups) * kernel * per_sample_out
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm):
        return 2 * per_sample_out
    if isinstance(module, nn.Flatten | nn.Unflatten | nn.Identity | nn.Dropout):
        return 0
    return per_sample_out  # element-wise layers: one op per output element


def profile_segment(segment: nn.Module, input_shape: tuple[int, ...]) -> SegmentProfile:
    """Count parameters and per-sample FLOPs by running one probe sample through ``segment``."""
    flops = 0
    peak = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal flops, peak
        if len(list(module.children())) == 0 and isinstance(output, torch.Tensor):
            flops += _layer_flops(module, inputs[0], output)
            peak = max(peak, output[0].numel() * 4)

    handles = [m.register_forward_hook(hook) for m in segment.modules()]
    try:
        with torch.no_grad():
            out = segment(torch.zeros(2, *input_shape))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in segment.parameters())
    return SegmentProfile(params, flops, list(out.shape[1:]), peak)
