"""Write a small tabular ``.npz`` in the layout ``edgesplit --data FILE.npz`` reads.

Arrays ``x`` (samples × features, float32) and ``y`` (integer class labels); ``x_test`` and
``y_test`` may be added, else edgesplit holds out part of ``x`` itself. The 12 features are
deliberately on raw, very different scales (1 to 1000): each client segment standardizes its
inputs itself, so a device can feed raw readings.

usage: python examples/make_npz.py [OUT.npz]   (default: my.npz)
"""

from __future__ import annotations

import sys

import numpy as np


def make(path: str, samples: int = 600, seed: int = 0) -> None:
    """Write ``samples`` rows of 12 features and a label that depends on two of them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 12)) * np.tile([1, 10, 100, 1000], 3)
    y = (x[:, 0] + x[:, 3] / 1000 > 0).astype("int64")
    np.savez(path, x=x.astype("float32"), y=y)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "my.npz"
    make(out)
    print(f"wrote {out}: x (600, 12) float32, y (600,) int64")
