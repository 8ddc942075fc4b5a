"""Privacy defenses at the cut, parsed from a spec such as ``"noise:0.5+nopeek:3+gradnoise:4"``.

Three pieces, each optional:

* ``noise:SIGMA[:CLIP]`` -- the client clips every sample's cut activation to L2 norm ``CLIP``
  (default 1) and, while training, adds Gaussian noise of expected L2 norm ``SIGMA x CLIP``.
  The clip fixes the activation scale, so the client cannot learn to out-scale a fixed noise.
  At inference (``eval()``, and so in ``client.onnx``) the layer clips only: exported
  inference is deterministic and matches the torch model.
* ``nopeek:ALPHA`` -- NoPeek (Vepakomma et al. 2020): the client adds ``ALPHA x dCor(x, act)``
  (the differentiable, biased sample distance correlation of the batch) to its loss.
* ``gradnoise:SIGMA`` -- the server perturbs the cut gradient it returns to a party without
  labels: every sample's gradient is rescaled to the batch's mean norm (defeats the norm attack)
  and isotropic Gaussian noise of expected norm ``SIGMA x`` that mean norm is added (drowns the
  shared class direction the cosine attack reads). Not a DP mechanism: no epsilon is claimed.

:func:`parse_defense` turns a spec into a :class:`Defense`; ``None`` or ``"none"`` gives one that
does nothing.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from edgesplit.errors import ConfigError

#: Defense names and the parameters they take, for error messages and ``--help``.
DEFENSES = {
    "noise": "noise:SIGMA[:CLIP]  clip each cut activation to L2 norm CLIP (default 1), add "
             "Gaussian noise of norm SIGMA*CLIP while training",
    "nopeek": "nopeek:ALPHA  add ALPHA * dCor(input, cut activation) to the client loss",
    "gradnoise": "gradnoise:SIGMA  equalise per-sample gradient norms and add noise of norm "
                 "SIGMA * mean norm to the returned cut gradient",
}
#: Name of the layer :meth:`Defense.wrap_lower` appends to a client segment.
LAYER_NAME = "defense_noise"


class ClipNoise(nn.Module):
    """Clip each sample to L2 norm ``clip``; in training mode add noise of norm ``sigma*clip``.

    ``is_defense`` marks it so an evaluator can switch the noise on while the rest of the
    segment is in ``eval()`` (to see what a training-time upload reveals).
    """

    is_defense = True

    def __init__(self, sigma: float, clip: float = 1.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.clip = float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        norm = torch.sqrt((flat * flat).sum(dim=1) + 1e-12)
        scale = torch.clamp(self.clip / norm, max=1.0)
        y = x * scale.reshape((-1,) + (1,) * (x.dim() - 1))
        if self.training and self.sigma > 0:
            # per-element std so the noise vector's expected norm is sigma * clip
            std = self.sigma * self.clip / math.sqrt(flat.shape[1])
            y = y + torch.randn_like(y) * std
        return y

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, clip={self.clip}"


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable sample distance correlation (biased V-statistic) of two batches."""
    a = _centred_distances(x.reshape(x.shape[0], -1))
    b = _centred_distances(y.reshape(y.shape[0], -1))
    ab = (a * b).mean()
    aa, bb = (a * a).mean(), (b * b).mean()
    denom = torch.sqrt(aa * bb)
    if float(denom.detach()) <= 0:
        return torch.zeros((), dtype=x.dtype)
    return torch.sqrt(torch.clamp(ab, min=0) / denom + 1e-12)


def _centred_distances(v: torch.Tensor) -> torch.Tensor:
    d2 = (v[:, None, :] - v[None, :, :]).pow(2).sum(-1)
    d = torch.sqrt(d2 + 1e-12)   # the epsilon keeps the gradient finite at d = 0
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


@dataclass
class Defense:
    """Parsed defenses; every piece defaults to off (see the module docstring).

    Attributes
    ----------
    spec: the text it was parsed from (``"none"`` when empty).
    noise_sigma, noise_clip: the ``noise`` piece (``sigma`` 0 = off).
    nopeek_alpha: weight of the NoPeek dCor loss (0 = off).
    grad_sigma: the ``gradnoise`` piece (``None`` = off).
    seed: seeds the server's gradient noise, so a run is reproducible.
    """

    spec: str = "none"
    noise_sigma: float = 0.0
    noise_clip: float = 1.0
    noise_on: bool = False
    nopeek_alpha: float = 0.0
    grad_sigma: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self._gen: torch.Generator | None = None

    @property
    def active(self) -> bool:
        return self.noise_on or self.nopeek_alpha > 0 or self.grad_sigma is not None

    def wrap_lower(self, lower: nn.Module) -> nn.Module:
        """``lower`` with a :class:`ClipNoise` layer appended (the same module when ``noise`` is
        off). A ``nn.Sequential`` keeps its layer names, so the exported client graph does."""
        if not self.noise_on:
            return lower
        layer = ClipNoise(self.noise_sigma, self.noise_clip)
        if isinstance(lower, nn.Sequential):
            return nn.Sequential(OrderedDict([*lower.named_children(), (LAYER_NAME, layer)]))
        return nn.Sequential(OrderedDict([("lower", lower), (LAYER_NAME, layer)]))

    def client_loss(self, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor | None:
        """The NoPeek term ``alpha * dCor(x, act)`` to add to the client's backward, or
        ``None`` when NoPeek is off (or the batch has fewer than 2 samples)."""
        if self.nopeek_alpha <= 0 or x.shape[0] < 2:
            return None
        return self.nopeek_alpha * distance_correlation(x.to(act.dtype), act)

    def backward(self, x: torch.Tensor, act: torch.Tensor, grad: torch.Tensor) -> None:
        """The client's backward: ``act.backward(grad)`` plus, with NoPeek, the gradient of
        :meth:`client_loss` -- one call for the engine to make instead of ``act.backward``."""
        extra = self.client_loss(x, act)
        if extra is None:
            act.backward(grad)
        else:
            torch.autograd.backward([act, extra], [grad, torch.ones_like(extra)])

    def server_grad(self, grad: torch.Tensor, labels: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The cut gradient to return: unchanged unless ``gradnoise`` is on.

        ``labels`` are unused by ``gradnoise`` (it perturbs every sample alike) and accepted
        so label-aware perturbations fit the same call.
        """
        if self.grad_sigma is None or grad.shape[0] == 0:
            return grad
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        flat = grad.reshape(grad.shape[0], -1)
        norms = flat.norm(dim=1, keepdim=True)
        mean = norms.mean()
        if not float(mean) > 0:
            return grad
        equal = flat * (mean / torch.clamp(norms, min=1e-12))
        std = self.grad_sigma * mean / math.sqrt(flat.shape[1])
        noise = torch.randn(flat.shape, generator=self._gen, dtype=flat.dtype) * std
        return (equal + noise).reshape(grad.shape)


def parse_defense(spec: str | None, seed: int = 0) -> Defense:
    """Parse ``"noise:0.5+nopeek:3+gradnoise:4"`` (pieces joined by ``+``, each at most once).

    Raises
    ------
    ConfigError
        An unknown piece (the message lists the valid ones), a missing or non-numeric
        parameter, a negative value or a piece given twice.
    """
    text = (spec or "").strip()
    if text.lower() in ("", "none"):
        return Defense(seed=seed)
    out = Defense(spec=text, seed=seed)
    seen: set[str] = set()
    for part in text.split("+"):
        name, *params = [p.strip() for p in part.strip().split(":")]
        if name not in DEFENSES:
            valid = "; ".join(DEFENSES.values())
            raise ConfigError(f"unknown defense {name!r} in {text!r}; valid: {valid}")
        if name in seen:
            raise ConfigError(f"defense {name!r} given twice in {text!r}")
        seen.add(name)
        values = [_number(p, name, text) for p in params]
        want = (1, 2) if name == "noise" else (1,)
        if len(values) not in want:
            raise ConfigError(f"defense {name!r} takes {DEFENSES[name].split()[0]}, got {part!r}")
        if name == "noise":
            out.noise_sigma, out.noise_on = values[0], True
            if len(values) == 2:
                if values[1] <= 0:
                    raise ConfigError(f"noise clip must be > 0, got {values[1]} in {text!r}")
                out.noise_clip = values[1]
        elif name == "nopeek":
            out.nopeek_alpha = values[0]
        else:
            out.grad_sigma = values[0]
    return out


def _number(text: str, name: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"defense {name!r} needs a number, got {text!r} in {spec!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"defense {name!r} needs a finite value >= 0, got {text!r} in {spec!r}")
    return value
