"""numpy optimizers for on-device training, with torch.optim's update rules (so a device and a
torch client from the same start and batches end with the same weights).

Import rule: numpy only (no torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgesplit.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")


class Optimizer:
    """Updates a list of float32 arrays in place from their gradients."""

    name = "optimizer"

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint (names are stable: ``<slot>_<index>``)."""
        raise NotImplementedError

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


class SGD(Optimizer):
    """``torch.optim.SGD`` (dampening 0, no Nesterov): ``b = m·b + g; p -= lr·b``.

    Parameters
    ----------
    lr: learning rate (> 0).
    momentum: in ``[0, 1)``; 0 is plain SGD.
    """

    name = "sgd"

    def __init__(self, lr: float, momentum: float = 0.9) -> None:
        if not lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
        self._config = {"name": self.name, "lr": float(lr), "momentum": float(momentum)}
        self.lr = np.float32(lr)
        self.momentum = np.float32(momentum)
        self._buf: list[np.ndarray] | None = None

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        if self.momentum == 0:
            for p, g in zip(params, grads, strict=True):
                p -= self.lr * g
            return
        if self._buf is None:   # torch: the first buffer is the gradient itself
            self._buf = [g.astype(np.float32, copy=True) for g in grads]
        else:
            for b, g in zip(self._buf, grads, strict=True):
                b *= self.momentum
                b += g
        for p, b in zip(params, self._buf, strict=True):
            p -= self.lr * b

    def state(self) -> dict[str, np.ndarray]:
        return {f"momentum_{i}": b for i, b in enumerate(self._buf or [])}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        keys = sorted((k for k in arrays if k.startswith("momentum_")),
                      key=lambda k: int(k.split("_")[1]))
        self._buf = [np.array(arrays[k], dtype=np.float32) for k in keys] or None

    def config(self) -> dict[str, Any]:
        return dict(self._config)


class Adam(Optimizer):
    """``torch.optim.Adam`` (no weight decay, no amsgrad)."""

    name = "adam"

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if not lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {lr!r}")
        if not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"Adam betas must be in [0, 1), got {betas!r}")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.t = 0
        self._m: list[np.ndarray] = []
        self._v: list[np.ndarray] = []

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        b1, b2 = self.betas
        if not self._m:
            self._m = [np.zeros_like(p) for p in params]
            self._v = [np.zeros_like(p) for p in params]
        self.t += 1
        c1 = 1 - b1 ** self.t
        c2 = 1 - b2 ** self.t
        for p, g, m, v in zip(params, grads, self._m, self._v, strict=True):
            m *= np.float32(b1)
            m += np.float32(1 - b1) * g
            v *= np.float32(b2)
            v += np.float32(1 - b2) * g * g
            denom = np.sqrt(v) / np.float32(np.sqrt(c2)) + np.float32(self.eps)
            p -= np.float32(self.lr / c1) * m / denom

    def state(self) -> dict[str, np.ndarray]:
        out = {f"adam_m_{i}": m for i, m in enumerate(self._m)}
        out.update({f"adam_v_{i}": v for i, v in enumerate(self._v)})
        out["adam_t"] = np.array(self.t, dtype=np.int64)
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        def slot(prefix: str) -> list[np.ndarray]:
            keys = sorted((k for k in arrays if k.startswith(prefix)),
                          key=lambda k: int(k.rsplit("_", 1)[1]))
            return [np.array(arrays[k], dtype=np.float32) for k in keys]

        self._m, self._v = slot("adam_m_"), slot("adam_v_")
        self.t = int(arrays.get("adam_t", np.array(0)))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "betas": list(self.betas), "eps": self.eps}


def make_optimizer(name: str, lr: float, momentum: float = 0.9) -> Optimizer:
    """``sgd`` (with ``momentum``) or ``adam``.

    Raises
    ------
    ConfigError: unknown name (the valid ones are listed) or a bad learning rate / momentum.
    """
    if name == "sgd":
        return SGD(lr, momentum)
    if name == "adam":
        return Adam(lr)
    raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
