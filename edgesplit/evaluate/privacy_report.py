"""The privacy part of a sweep's report (``edgesplit evaluate --privacy``): a markdown section,
``privacy.png`` (leakage vs bytes and vs accuracy) and ``inversion_<cut>.png`` image grids of
originals vs reconstructions for the first and last cut.

Reads only the ``results.json`` document, like :mod:`edgesplit.evaluate.report`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgesplit.jsonable import as_number as _num

#: The leakage plot's file name, in ``--out``.
PLOT = "privacy.png"
#: Scalar privacy fields written to results.csv (as ``privacy.<field>``).
CSV_FIELDS = (
    "inversion_mse", "inversion_psnr_db", "inversion_ssim", "mean_baseline_mse",
    "mean_baseline_psnr_db", "mean_baseline_ssim", "inversion_gain_db", "dcor", "dcor_biased",
    "dcor_noise_floor", "dcor_biased_noise_floor", "label_norm_auc", "label_cosine_auc",
    "label_auc", "inference_inversion_psnr_db", "query_free_psnr_db", "query_free_ssim",
)


def has_privacy(doc: Mapping[str, Any]) -> bool:
    return any(isinstance(r.get("privacy"), Mapping) for r in doc.get("rows", []))


def grid_name(cut: str) -> str:
    return "inversion_" + re.sub(r"[^A-Za-z0-9._-]", "_", str(cut)) + ".png"


def grid_cuts(doc: Mapping[str, Any]) -> list[str]:
    """The first and last cut that have reconstructions (one cut: just it)."""
    cuts = list((doc.get("privacy_samples") or {}).get("reconstructions") or {})
    return list(dict.fromkeys([cuts[0], cuts[-1]])) if cuts else []


def write(doc: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Write ``privacy.png`` and the inversion grids; returns kind -> path."""
    paths: dict[str, Path] = {}
    if not has_privacy(doc):
        return paths
    paths["privacy_plot"] = out / PLOT
    plot_leakage(doc, paths["privacy_plot"])
    for cut in grid_cuts(doc):
        path = out / grid_name(cut)
        plot_grid(doc, cut, path)
        paths[f"grid:{cut}"] = path
    return paths


def markdown(doc: Mapping[str, Any]) -> list[str]:
    """The ``## Privacy`` section of report.md (empty without privacy results)."""
    if not has_privacy(doc):
        return []
    rows = [r for r in doc.get("rows", []) if isinstance(r.get("privacy"), Mapping)]
    aux = (rows[0]["privacy"] or {}).get("aux_fraction")
    lines = [
        "## Privacy: what the cut tensors and gradients leak", "",
        "Measured once per cut × codec, on its first seed (see `docs/privacy.md` for the "
        "threat models). **Inversion**: an MLP decoder trained on the attacker's data "
        f"({_pct(aux)} % of the training data) from decoded cut tensors to inputs, scored on "
        "the test inputs normalised to [0, 1] per feature; the **mean-input** baseline guesses "
        "the attacker's mean input for every sample — an attack near it learned nothing. "
        "**dCor**: bias-corrected squared distance correlation (≈ 0 when independent; its "
        "value against Gaussian noise of the cut's width in brackets). **Label AUC**: "
        "max(AUC, 1 − AUC) of the norm and cosine attacks on the gradients a party receives, "
        "mean one-vs-rest over classes, maximum over epochs (0.5 = no leak, 1 = labels "
        "fully revealed). These are attacks, not guarantees: a low number says these attacks "
        "failed, not that nothing leaks.", "",
    ]
    full = any("query_free_psnr_db" in r["privacy"] for r in rows)
    head = ["cut", "codec", "accuracy %", "B/sample", "PSNR dB (mean-input)",
            "SSIM (mean-input)", "dCor (noise)", "label AUC norm", "label AUC cosine",
            *(["query-free PSNR dB"] if full else [])]
    body = []
    for r in rows:
        p = r["privacy"]
        body.append([*_cells(r, p), *([_f(p.get("query_free_psnr_db"), 1)] if full else [])])
    lines += _table(head, body) + [""]
    if full:
        lines += ["**Query-free**: the server trains a shadow client on its labelled "
                  "auxiliary data through its own frozen layers, then inverts the real cut "
                  "tensors with a decoder trained on the shadow's features (no query to the "
                  "client).", ""]
    front = privacy_frontier(rows)
    if front:
        lines += ["**Privacy frontier** (least inversion PSNR for its accuracy and bytes: no "
                  "other cell is at least as accurate, with at most as many bytes and a lower "
                  "PSNR): " + ", ".join(f"{r.get('cut')} `{r.get('codec')}`" for r in front)
                  + ".", ""]
    lines += [f"![leakage vs bytes and accuracy]({PLOT})", ""]
    for cut in grid_cuts(doc):
        lines += [f"![originals vs reconstructions, cut {cut}]({grid_name(cut)})", ""]
    return lines


def _cells(r: Mapping[str, Any], p: Mapping[str, Any]) -> list[str]:
    return [
        str(r.get("cut")), f"`{r.get('codec')}`", _pct(r.get("accuracy_mean")),
        _f(r.get("bytes_per_sample"), 1),
        f"{_f(p.get('inversion_psnr_db'), 1)} ({_f(p.get('mean_baseline_psnr_db'), 1)})",
        f"{_f(p.get('inversion_ssim'), 3)} ({_f(p.get('mean_baseline_ssim'), 3)})",
        f"{_f(p.get('dcor'), 3)} ({_f(p.get('dcor_noise_floor'), 3)})",
        _f(p.get("label_norm_auc"), 3), _f(p.get("label_cosine_auc"), 3),
    ]


def privacy_frontier(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows no other row beats on all of accuracy (higher), bytes and PSNR (lower)."""
    def point(r: Mapping[str, Any]) -> tuple[float, float, float]:
        return (_num(r.get("accuracy_mean")), _num(r.get("bytes_per_sample")),
                _num((r.get("privacy") or {}).get("inversion_psnr_db")))

    pts = [point(r) for r in rows]
    out = []
    for i, a in enumerate(pts):
        if not all(math.isfinite(v) for v in a):
            continue
        beaten = any(
            b[0] >= a[0] and b[1] <= a[1] and b[2] <= a[2] and b != a
            for j, b in enumerate(pts) if j != i and all(math.isfinite(v) for v in b))
        if not beaten:
            out.append(rows[i])
    return sorted(out, key=lambda r: _num(r.get("bytes_per_sample")))


def csv_values(row: Mapping[str, Any]) -> list[Any]:
    p = row.get("privacy") or {}
    return [p.get(k) for k in CSV_FIELDS]


# ---------------------------------------------------------------------------------------------
# Plots


def plot_leakage(doc: Mapping[str, Any], path: Path) -> None:
    """Inversion PSNR vs bytes per sample, and accuracy vs inversion PSNR; marker size grows
    with the label-leak AUC. One colour per cut, the mean-input baseline dashed."""
    from edgesplit.evaluate.report import _colors, _figure, _save

    rows = [r for r in doc.get("rows", []) if isinstance(r.get("privacy"), Mapping)]
    fig, (ax1, ax2) = _figure(12.0, 5.0, ncols=2)
    cuts = list(dict.fromkeys(r.get("cut") for r in rows))
    for cut, color in zip(cuts, _colors(len(cuts)), strict=True):
        mine = sorted((r for r in rows if r.get("cut") == cut),
                      key=lambda r: _num(r.get("bytes_per_sample")))
        xs = [_num(r.get("bytes_per_sample")) for r in mine]
        ps = [_num(r["privacy"].get("inversion_psnr_db")) for r in mine]
        acc = [100 * _num(r.get("accuracy_mean")) for r in mine]
        size = [20 + 200 * max(0.0, _num(r["privacy"].get("label_auc")) - 0.5)
                if math.isfinite(_num(r["privacy"].get("label_auc"))) else 20 for r in mine]
        ax1.plot(xs, ps, "-", color=color, alpha=0.6, label=f"cut {cut}")
        ax1.scatter(xs, ps, s=size, color=color, edgecolors="black", zorder=3)
        ax2.scatter(ps, acc, s=size, color=color, edgecolors="black", zorder=3,
                    label=f"cut {cut}")
        for r, x, y in zip(mine, xs, ps, strict=True):
            ax1.annotate(str(r.get("codec")), (x, y), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    base = [_num(r["privacy"].get("mean_baseline_psnr_db")) for r in rows]
    base = [b for b in base if math.isfinite(b)]
    if base:
        for ax, horizontal in ((ax1, True), (ax2, False)):
            line = ax.axhline if horizontal else ax.axvline
            line(max(base), color="#c44e52", ls="--", lw=1.2, label="mean-input baseline")
    if any(_num(r.get("bytes_per_sample")) > 0 for r in rows):
        ax1.set_xscale("log")
    ax1.set_xlabel("bytes per training sample (up + down, log scale) [B]")
    ax1.set_ylabel("inversion PSNR [dB] (lower leaks less)")
    ax1.set_title("Leakage vs communication (marker size: label-leak AUC − 0.5)", fontsize=10)
    ax2.set_xlabel("inversion PSNR [dB]")
    ax2.set_ylabel("test accuracy [%]")
    ax2.set_title("Accuracy vs leakage", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)


def plot_grid(doc: Mapping[str, Any], cut: str, path: Path) -> None:
    """Originals (top row) and one row of reconstructions per codec for ``cut``."""
    from edgesplit.evaluate.privacy import image_shape
    from edgesplit.evaluate.report import _figure, _save

    samples = doc.get("privacy_samples") or {}
    originals = (samples.get("originals") or {}).get(cut) or []
    recons = (samples.get("reconstructions") or {}).get(cut) or {}
    rows = [("original", originals)] + [(str(c), v or []) for c, v in recons.items()]
    n = max((len(v) for _, v in rows), default=0)
    if n == 0:
        return
    width = len(originals[0]) if originals else 1
    shape = image_shape((width,))
    fig, axes = _figure(1.1 * n + 1.5, 1.2 * len(rows), nrows=len(rows), ncols=n)
    import numpy as np

    grid = np.asarray(axes).reshape(len(rows), n)
    for i, (name, images) in enumerate(rows):
        for j in range(n):
            ax = grid[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                img = np.asarray(images[j], dtype=float)
                img = img.reshape(shape) if len(shape) == 2 else img.reshape(1, -1)
                ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                          aspect="auto" if len(shape) == 1 else "equal")
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"Inversion at cut {cut}: originals vs reconstructions (test inputs)",
                 fontsize=9)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------



def _f(value: Any, digits: int) -> str:
    v = _num(value)
    return "—" if not math.isfinite(v) else f"{v:.{digits}f}"


def _pct(value: Any) -> str:
    v = _num(value)
    return "—" if not math.isfinite(v) else f"{100 * v:.2f}".rstrip("0").rstrip(".")


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return out
