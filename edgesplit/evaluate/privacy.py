"""Leakage metrics of the cut: what the cut tensors and the returned gradients reveal.

Numpy only (the attacks that train a model live in :mod:`edgesplit.evaluate.privacy_run`), so
every number here can be checked on synthetic data:

* :func:`psnr`, :func:`ssim`: how close an inversion attack's reconstructions are to the inputs;
* :func:`dcor_unbiased` (bias-corrected squared distance correlation, Székely & Rizzo 2014) and
  :func:`dcor_biased` (the plain V-statistic, which is far from 0 even for independent data in
  high dimension): dependence between the inputs and the cut tensors;
* :func:`auc`, :func:`norm_attack_auc`, :func:`cosine_attack_auc`, :func:`label_leak`: label
  leakage from the cut gradients a party receives (Li et al., "Label Leakage and Protection in
  Two-party Split Learning", ICLR 2022), one-vs-rest for multi-class tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgesplit.errors import ConfigError

#: SSIM constants (Wang et al. 2004) for data in [0, 1].
_K1, _K2 = 0.01, 0.03
#: SSIM window side (scikit-image's default); smaller images use their smallest odd side.
SSIM_WINDOW = 7


# ---------------------------------------------------------------------------------------------
# Reconstruction quality


def psnr(x: np.ndarray, x_hat: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``x_hat`` against ``x`` (pooled over all samples).

    Both are expected on a scale where the signal spans ``[0, peak]``; ``inf`` when equal.
    """
    x, x_hat = _pair(x, x_hat)
    mse = float(np.mean((x - x_hat) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def image_shape(features: Sequence[int]) -> tuple[int, ...]:
    """The spatial shape SSIM is computed over for one sample of shape ``features``.

    ``(C, H, W)`` and ``(H, W)`` samples are images; a flat sample whose length is a perfect
    square (digits: 64 = 8 x 8) is taken as a square image; anything else is a 1-D signal.
    """
    shape = tuple(int(d) for d in features)
    if len(shape) >= 2:
        return shape[-2:] if len(shape) == 3 else shape
    n = math.prod(shape)
    side = math.isqrt(n)
    return (side, side) if side * side == n and side > 1 else (n,)


def ssim(x: np.ndarray, x_hat: np.ndarray, shape: Sequence[int], data_range: float = 1.0
         ) -> float:
    """Mean structural similarity of ``x_hat`` against ``x`` over samples.

    Parameters
    ----------
    x, x_hat:
        ``(n, ...)`` arrays; each sample is reshaped to ``shape`` (one or two spatial axes;
        channels first, if any, are averaged as separate images).
    shape:
        Spatial shape of one sample, from :func:`image_shape`.
    data_range:
        Span of the data (1 for inputs normalised to ``[0, 1]``).

    Uniform ``7 x 7`` windows (smaller for smaller images), sample covariances and the mean
    over every window position that fits -- scikit-image's ``structural_similarity`` with
    its defaults.
    """
    x, x_hat = _pair(x, x_hat)
    spatial = tuple(int(d) for d in shape)
    if len(spatial) not in (1, 2):
        raise ConfigError(f"SSIM takes 1 or 2 spatial axes, got shape {spatial}")
    size = math.prod(spatial)
    if x.shape[1] % size:
        raise ConfigError(f"samples of {x.shape[1]} values do not reshape to {spatial}")
    a = x.reshape(-1, *spatial)
    b = x_hat.reshape(-1, *spatial)
    win = min(SSIM_WINDOW, *spatial)
    win -= 1 - win % 2   # odd
    if win < 1:
        raise ConfigError(f"image {spatial} too small for SSIM")
    axes = tuple(range(1, 1 + len(spatial)))

    def local_mean(v: np.ndarray) -> np.ndarray:
        out = v
        for ax in axes:
            out = np.lib.stride_tricks.sliding_window_view(out, win, axis=ax).mean(axis=-1)
        return out

    n_win = win ** len(spatial)
    cov = n_win / (n_win - 1) if n_win > 1 else 1.0
    ma, mb = local_mean(a), local_mean(b)
    va = cov * (local_mean(a * a) - ma * ma)
    vb = cov * (local_mean(b * b) - mb * mb)
    vab = cov * (local_mean(a * b) - ma * mb)
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    s = ((2 * ma * mb + c1) * (2 * vab + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s.mean())


# ---------------------------------------------------------------------------------------------
# Dependence


def _distances(v: np.ndarray) -> np.ndarray:
    v = v.reshape(len(v), -1).astype(np.float64)
    sq = np.einsum("ij,ij->i", v, v)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (v @ v.T)
    return np.sqrt(np.maximum(d2, 0.0))


def _u_centre(d: np.ndarray) -> np.ndarray:
    n = len(d)
    rows = d.sum(1)
    total = rows.sum()
    u = d - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + total / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def dcor_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Bias-corrected squared distance correlation ``R*²(x, y)`` (Székely & Rizzo 2014).

    Built from U-centred distance matrices, so it is about 0 for independent samples whatever
    the dimension (it can be slightly negative) and 1 for ``y`` a similarity transform of ``x``.
    Vectorised: ``O(n²·d)`` time and ``O(n²)`` memory -- subsample large sets.

    Raises
    ------
    ConfigError
        Fewer than 4 samples, or ``x`` and ``y`` with different sample counts.
    """
    n = _check_samples(x, y)
    a, b = _u_centre(_distances(x)), _u_centre(_distances(y))
    scale = 1.0 / (n * (n - 3))
    ab = float((a * b).sum()) * scale
    aa = float((a * a).sum()) * scale
    bb = float((b * b).sum()) * scale
    if aa <= 0 or bb <= 0:
        return 0.0
    return ab / math.sqrt(aa * bb)


def dcor_biased(x: np.ndarray, y: np.ndarray) -> float:
    """The plain (V-statistic) distance correlation in ``[0, 1]``; biased upwards in high
    dimension, reported next to :func:`dcor_unbiased` because it is what NoPeek optimises."""
    _check_samples(x, y)
    a, b = _double_centre(_distances(x)), _double_centre(_distances(y))
    ab, aa, bb = float((a * b).mean()), float((a * a).mean()), float((b * b).mean())
    if aa <= 0 or bb <= 0:
        return 0.0
    return math.sqrt(max(ab, 0.0) / math.sqrt(aa * bb))


def _double_centre(d: np.ndarray) -> np.ndarray:
    return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()


def _check_samples(x: np.ndarray, y: np.ndarray) -> int:
    n = len(x)
    if len(y) != n:
        raise ConfigError(f"dCor needs paired samples: x has {n}, y has {len(y)}")
    if n < 4:
        raise ConfigError(f"dCor needs at least 4 samples, got {n}")
    return n


# ---------------------------------------------------------------------------------------------
# Label leakage


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count half:
    the Mann-Whitney U statistic). ``nan`` when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if len(scores) != len(pos):
        raise ConfigError(f"AUC: {len(scores)} scores for {len(pos)} labels")
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _ranks(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    starts = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, len(v)])
    avg = first + (counts + 1) / 2.0
    ranks = np.empty(len(v))
    ranks[order] = avg[group]
    return ranks


def _separation(value: float) -> float:
    # an attacker who knows which side is which gets max(AUC, 1 - AUC)
    return math.nan if math.isnan(value) else max(value, 1.0 - value)


def _classes(labels: np.ndarray, num_classes: int) -> list[int]:
    # binary: one class is enough (the other gives the complementary AUC)
    present = [c for c in range(num_classes) if (labels == c).any() and (labels != c).any()]
    return present[-1:] if num_classes == 2 else present


def norm_attack_auc(grads: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Norm attack: score each sample by its gradient's L2 norm.

    Returns the mean over classes (one-vs-rest; one class when binary) of ``max(AUC, 1-AUC)``.
    """
    norms = np.linalg.norm(grads.reshape(len(grads), -1), axis=1)
    vals = [_separation(auc(norms, labels == c)) for c in _classes(labels, num_classes)]
    return _nanmean(vals)


def cosine_attack_auc(batches: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int,
                      ) -> float:
    """Cosine attack: in each batch the attacker knows one example of the class (the first);
    every other sample is scored by the cosine of its gradient with that example's.

    ``batches`` holds ``(gradients, labels)`` per batch. Returns the mean over classes
    (one-vs-rest; one class when binary) of ``max(AUC, 1-AUC)`` of the pooled scores.
    """
    if not batches:
        return math.nan
    labels_all = np.concatenate([y for _, y in batches])
    vals = []
    for c in _classes(labels_all, num_classes):
        scores, truth = [], []
        for g, y in batches:
            hits = np.flatnonzero(y == c)
            if len(hits) == 0 or len(y) < 2:
                continue
            flat = g.reshape(len(g), -1).astype(np.float64)
            unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
            sim = unit @ unit[hits[0]]
            keep = np.arange(len(y)) != hits[0]
            scores.append(sim[keep])
            truth.append(y[keep] == c)
        if scores:
            vals.append(_separation(auc(np.concatenate(scores), np.concatenate(truth))))
    return _nanmean(vals)


@dataclass
class LabelLeak:
    """Label-leak AUCs (``max(AUC, 1 - AUC)``, one-vs-rest mean) per epoch and their maxima."""

    norm_auc_per_epoch: list[float]
    cosine_auc_per_epoch: list[float]

    @property
    def norm_auc(self) -> float:
        return _nanmax(self.norm_auc_per_epoch)

    @property
    def cosine_auc(self) -> float:
        return _nanmax(self.cosine_auc_per_epoch)

    @property
    def label_auc(self) -> float:
        """The stronger of the two attacks, maximum over epochs."""
        return _nanmax([self.norm_auc, self.cosine_auc])


def label_leak(epochs: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], num_classes: int
               ) -> LabelLeak:
    """Run both attacks on every epoch of recorded ``(gradients, labels)`` batches."""
    norm, cosine = [], []
    for batches in epochs:
        if not batches:
            continue
        g = np.concatenate([b[0].reshape(len(b[0]), -1) for b in batches])
        y = np.concatenate([b[1] for b in batches])
        norm.append(norm_attack_auc(g, y, num_classes))
        cosine.append(cosine_attack_auc(batches, num_classes))
    return LabelLeak(norm, cosine)


# ---------------------------------------------------------------------------------------------


def _pair(x: np.ndarray, x_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(x_hat, dtype=np.float64)
    if a.shape != b.shape:
        raise ConfigError(f"reconstruction shape {b.shape} does not match inputs {a.shape}")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _nanmax(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return max(vals) if vals else math.nan
