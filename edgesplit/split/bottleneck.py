"""A learned bottleneck at the cut: the model learns to produce something cheap to send.

The encoder (to ``D`` channels, a linear map or a 1×1 convolution, then a sigmoid) is the last
module of the client segment, so it is exported inside ``client.onnx``; its output lies in
[0, 1] and is quantized to ``2**bits`` *fixed* levels by :class:`FixedRangeQuantizer` — the torch
half of the ``fq`` codec (:mod:`edgesplit.codecs.fixed`): same float32 operations, so the levels
the model trains with are the levels the device sends, and nothing (no range, no scale) travels
per batch. The decoder (back to the cut's width, then a ReLU) is the first module of the server
segment. Both train end to end; the quantizer passes gradients straight through.

Measured on digits (README): 16 channels at 2 bits after the first hidden layer cost 4 bytes per
sample before entropy coding, against 512 for the fp32 cut.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from edgesplit.errors import ConfigError

#: Learning-rate multiplier of the bottleneck's encoder and decoder. The sigmoid and the
#: quantizer scale their gradients down (at most 1/4 through the sigmoid); with the model's
#: learning rate they lag the layers around them — measured on digits, 30 epochs, 5 seeds:
#: ×1 loses 1.3 points against fp32, ×10 loses 0.3.
LR_SCALE = 10.0


#: Default weight of the rate penalty. Measured on digits (16 channels, 30 epochs, 5 seeds):
#: 0.01 gives 96.62 ± 0.58 % at 85.4× up, against 96.00 ± 0.63 % at 84.7× without.
DEFAULT_RATE = 0.01
#: Fraction of training steps (after :data:`NOISE_WARMUP_STEPS`) on which the quantizer adds
#: uniform noise of one level's width before rounding; the other steps round with a
#: straight-through gradient. In split training the codes that travel are the codec's rounding
#: of this output, so a noisy step sends *dithered* codes: a regularizer the decoder learns to
#: tolerate. Measured on digits (16:2, 30 epochs, 5 seeds, before the stochastic-rounding seed
#: fix): rounding always 96.27 ± 0.51 %, noise on half the steps 96.93 ± 0.51 %, on every step
#: 96.53 ± 0.70 % (fp32 97.16 ± 0.29 %). Not at 1 bit, where one level is the whole range (16:1
#: fell from 96.36 to 95.42 %). Evaluation and export always round.
NOISE_FRACTION = 0.5
#: Training steps before the noise starts (the encoder first learns features from plain codes).
#: Measured on digits (16:2, 30 epochs, seeds 5-9, fp32 96.89 %): noise from the first step
#: 96.36 %, after 200 steps 96.98 %, after 430 (10 epochs) 96.58 %; on seeds 0-4 96.58 vs
#: 96.53 % — within the spread, kept for the held-out seeds.
NOISE_WARMUP_STEPS = 200
#: Training steps before the rate penalty starts: the encoder first learns useful features
#: (a penalty from step 0 collapsed every code to one level in a prototype on digits).
RATE_WARMUP_STEPS = 200


@dataclass(frozen=True)
class BottleneckSpec:
    """``D[:BITS[:RATE]]``: ``width`` channels quantized to ``bits`` bits each (default 2);
    ``rate`` weighs a penalty on the codes' estimated entropy (bits per value; default
    :data:`DEFAULT_RATE`, ``:0`` turns it off)."""

    width: int
    bits: int = 2
    rate: float = DEFAULT_RATE

    @classmethod
    def parse(cls, text: str) -> BottleneckSpec:
        parts = str(text).split(":")
        try:
            width = int(parts[0])
            bits = int(parts[1]) if len(parts) > 1 and parts[1] else 2
            rate = float(parts[2]) if len(parts) > 2 else DEFAULT_RATE
        except ValueError:
            raise ConfigError(
                f"--bottleneck {text!r} must look like D, D:BITS or D:BITS:RATE, e.g. 16:2"
            ) from None
        if len(parts) > 3 or not rate >= 0:
            raise ConfigError(
                f"--bottleneck {text!r}: at most D:BITS:RATE, with RATE >= 0 (e.g. 16:2:0.01)"
            )
        if width < 1:
            raise ConfigError(f"--bottleneck width must be at least 1, got {width}")
        if not 1 <= bits <= 8:
            raise ConfigError(f"--bottleneck bits must be 1..8, got {bits}")
        return cls(width, bits, rate)

    @property
    def codec(self) -> str:
        """The activation codec that sends this bottleneck: fixed levels, entropy-coded."""
        return f"fq:{self.bits},ans"

    @property
    def grad_codec(self) -> str:
        """Gradients of D values: 4-bit with stochastic (unbiased) rounding, zstd-free."""
        return "q4:stochastic"

    def __str__(self) -> str:
        return f"{self.width}:{self.bits}:{self.rate:g}"


def default_codecs(bottleneck: str | None) -> tuple[str, str]:
    """(activation codec, gradient codec) a run uses when the user names none."""
    if not bottleneck:
        return "fp32", "fp32"
    spec = BottleneckSpec.parse(bottleneck)
    return spec.codec, spec.grad_codec


class _RoundSTE(torch.autograd.Function):
    """floor(x * L + 0.5) / L forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, levels: float) -> torch.Tensor:  # noqa: ARG004
        scale = torch.tensor(levels, dtype=x.dtype)
        return torch.floor(torch.clamp(x, 0.0, 1.0) * scale + 0.5) / scale

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ARG004
        return grad, None


class FixedRangeQuantizer(nn.Module):
    """Quantize [0, 1] values to ``2**bits`` fixed levels; straight-through gradient. In
    training, after :data:`NOISE_WARMUP_STEPS` steps, :data:`NOISE_FRACTION` of the steps add
    uniform noise of one level instead of rounding (2+ bits).

    The evaluation forward pass is :func:`edgesplit.codecs.fixed.quantize_codes` then
    :func:`~edgesplit.codecs.fixed.dequantize_codes` in torch, operation for operation.
    """

    def __init__(self, bits: int, rate: float = 0.0) -> None:
        super().__init__()
        self.bits = bits
        self.rate_weight = rate
        self.steps = 0  # training forwards seen (the noise and the rate penalty wait for them)
        #: ``rate_weight`` × the batch's estimated code entropy (bits per value), or ``None``.
        self.rate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rate = None
        if self.training:
            self.steps += 1
            if self.rate_weight > 0 and self.steps > RATE_WARMUP_STEPS:
                self.rate = self.rate_weight * soft_entropy(x, self.bits)
        levels = float((1 << self.bits) - 1)
        noisy = self.training and self.bits > 1 and self.steps > NOISE_WARMUP_STEPS
        if noisy and float(torch.rand(())) < NOISE_FRACTION:
            # the decoder learns to tolerate any error up to half a level, and the encoder gets
            # the true gradient of a smooth function on these steps
            return torch.clamp(x, 0.0, 1.0) + (torch.rand_like(x) - 0.5) / levels
        out: torch.Tensor = _RoundSTE.apply(x, levels)
        return out

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def soft_entropy(x: torch.Tensor, bits: int, temperature: float = 0.2) -> torch.Tensor:
    """Differentiable estimate of the entropy (bits per value) of the codes of ``x`` in [0, 1]:
    each value is softly assigned to the levels, a histogram per channel (axis 1) is the batch
    mean, and the channels' entropies are averaged."""
    levels = (1 << bits) - 1
    channels = x.shape[1]
    values = x.transpose(0, 1).reshape(channels, -1, 1) * levels
    grid = torch.arange(levels + 1, dtype=x.dtype)
    soft = torch.softmax(-((values - grid) ** 2) / temperature, dim=-1).mean(dim=1)
    return -(soft * torch.log2(soft + 1e-9)).sum(dim=-1).mean()


def rate_loss(module: nn.Module) -> torch.Tensor | None:
    """The rate penalties of ``module``'s quantizers from their last forward (or ``None``)."""
    terms = [m.rate for m in module.modules() if isinstance(m, FixedRangeQuantizer)]
    present = [t for t in terms if t is not None]
    return torch.stack(present).sum() if present else None


def _projection(shape: tuple[int, ...], channels_in: int, channels_out: int) -> nn.Module:
    """A linear map over the channel axis: Linear for (C,), 1×1 convolution for (C, ...)."""
    if len(shape) == 1:
        return nn.Linear(channels_in, channels_out)
    if len(shape) == 2:
        return nn.Conv1d(channels_in, channels_out, 1)
    if len(shape) == 3:
        return nn.Conv2d(channels_in, channels_out, 1)
    raise ConfigError(f"a bottleneck needs a cut tensor of 1 to 3 dims per sample, got {shape}")


def encoder(spec: BottleneckSpec, cut_shape: tuple[int, ...]) -> nn.Sequential:
    """Projection to ``spec.width`` channels, sigmoid, fixed-range quantizer."""
    return nn.Sequential(
        OrderedDict(
            [
                ("project", _projection(cut_shape, cut_shape[0], spec.width)),
                ("bound", nn.Sigmoid()),
                ("quantize", FixedRangeQuantizer(spec.bits, spec.rate)),
            ]
        )
    )


def decoder(spec: BottleneckSpec, cut_shape: tuple[int, ...]) -> nn.Sequential:
    """Projection back to the cut's channel count, then ReLU (the cut followed a non-linearity)."""
    return nn.Sequential(
        OrderedDict(
            [("project", _projection(cut_shape, spec.width, cut_shape[0])), ("act", nn.ReLU())]
        )
    )


def with_encoder(lower: nn.Module, spec: BottleneckSpec, cut_shape: tuple[int, ...]) -> nn.Module:
    """``lower`` followed by the bottleneck encoder (named ``bottleneck``)."""
    return nn.Sequential(OrderedDict([("lower", lower), ("bottleneck", encoder(spec, cut_shape))]))


def with_decoder(upper: nn.Module, spec: BottleneckSpec, cut_shape: tuple[int, ...]) -> nn.Module:
    """The bottleneck decoder (named ``unbottleneck``) followed by ``upper``."""
    return nn.Sequential(
        OrderedDict([("unbottleneck", decoder(spec, cut_shape)), ("upper", upper)])
    )


def param_groups(module: nn.Module, lr: float) -> list[dict[str, object]]:
    """Optimizer groups: the bottleneck's own layers at ``lr × LR_SCALE``, the rest at ``lr``."""
    fast: list[nn.Parameter] = []
    slow: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        part = name.split(".")
        (fast if "bottleneck" in part or "unbottleneck" in part else slow).append(param)
    groups: list[dict[str, object]] = []
    if slow:
        groups.append({"params": slow, "lr": lr})
    if fast:
        groups.append({"params": fast, "lr": lr * LR_SCALE})
    return groups

