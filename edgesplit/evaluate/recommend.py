"""Pick, for every device x link, the configuration to deploy.

**Accuracy budget.** ``--max-drop D`` allows a configuration whose mean accuracy is at most *D*
percentage points below the **reference accuracy = the best fp32 (uncompressed) accuracy over
all cuts** of the sweep. That is the question a user asks -- "what does it cost me compared to
the best model I could have without compression?" -- and it keeps a cut whose fp32 accuracy is
poor from qualifying just because compression does not make it any worse. (If the sweep has no
fp32 row the reference is the best accuracy of any row, and the baseline says so.) Accuracies
are fractions in [0, 1]; drops are reported in points (x100).

**Objective.** ``latency`` picks the lowest end-to-end step latency (ties: fewer bytes, then
higher accuracy); ``bytes`` picks the fewest bytes per sample (ties: lower latency, then higher
accuracy). Configurations that are infeasible on the device x link (frame too large for the
link, not enough memory) never qualify. When nothing qualifies the recommendation has no
configuration and its ``reason`` says why.

**Deterministic.** A recommendation depends only on accuracy, bytes and profiles: the latency
it ranks by is the row's breakdown with encode and decode taken from the codec cost model
(:func:`edgesplit.evaluate.latency.with_codec_model`), not from codec timings measured during
the sweep -- those vary with the load of the machine running it, and flipped recommendations
between two runs with identical accuracy and bytes.

Rows are plain dicts as in ``results.json`` (keys ``cut``, ``codec``, ``grad_codec``,
``accuracy_mean``, ``bytes_per_sample``, ``cut_elements`` and ``latency[device][link]`` = a
latency breakdown dict with ``total_ms``, ``feasible``, ``reason``, ``frame_bytes_up``), so
synthetic rows test it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgesplit.errors import ConfigError
from edgesplit.evaluate.latency import with_codec_model
from edgesplit.jsonable import as_number as _num

OBJECTIVES = ("latency", "bytes")
#: Codec spec of the uncompressed baseline.
BASELINE_CODEC = "fp32"


@dataclass(frozen=True)
class Baseline:
    """The accuracy drops are measured from."""

    accuracy: float
    description: str
    cut: str | None = None


@dataclass(frozen=True)
class Recommendation:
    """The configuration to use on one device over one link, or why there is none."""

    device: str
    link: str
    objective: str
    reason: str
    cut: str | None = None
    codec: str | None = None
    grad_codec: str | None = None
    accuracy_mean: float | None = None
    drop_points: float | None = None
    bytes_per_sample: float | None = None
    latency_ms: float | None = None
    row: int | None = None

    @property
    def found(self) -> bool:
        """Whether a configuration qualified."""
        return self.codec is not None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["found"] = self.found
        return out


def reference_accuracy(rows: Sequence[Mapping[str, Any]]) -> Baseline:
    """The best fp32 accuracy over all cuts (or the best accuracy of any row, said so)."""
    fp32 = [r for r in rows if r.get("codec") == BASELINE_CODEC and _finite(r.get("accuracy_mean"))]
    if fp32:
        best = max(fp32, key=lambda r: float(r["accuracy_mean"]))
        return Baseline(
            float(best["accuracy_mean"]),
            f"best fp32 accuracy over all cuts (cut {best.get('cut')})",
            best.get("cut"),
        )
    scored = [r for r in rows if _finite(r.get("accuracy_mean"))]
    if not scored:
        raise ConfigError("no row has an accuracy: nothing to measure a drop from")
    best = max(scored, key=lambda r: float(r["accuracy_mean"]))
    return Baseline(
        float(best["accuracy_mean"]),
        f"no fp32 row in the sweep: best accuracy of any row "
        f"({best.get('cut')}, {best.get('codec')})",
        best.get("cut"),
    )


def drop_points(accuracy: float, baseline: Baseline) -> float:
    """Accuracy drop below the baseline in percentage points (negative = better)."""
    return 100.0 * (baseline.accuracy - accuracy)


def within_budget(
    rows: Sequence[Mapping[str, Any]], max_drop: float, baseline: Baseline | None = None
) -> list[bool]:
    """For each row, whether its accuracy is within ``max_drop`` points of the baseline."""
    if not math.isfinite(max_drop) or max_drop < 0:
        raise ConfigError(f"--max-drop must be a number of points >= 0, got {max_drop}")
    if not rows:
        return []
    base = baseline or reference_accuracy(rows)
    # a hair of tolerance so 1.0 points is not lost to float rounding of 0.95 vs 0.96
    return [
        _finite(r.get("accuracy_mean"))
        and drop_points(float(r["accuracy_mean"]), base) <= max_drop + 1e-9
        for r in rows
    ]


def within_leakage(
    rows: Sequence[Mapping[str, Any]],
    max_psnr: float | None = None,
    max_label_auc: float | None = None,
) -> list[bool]:
    """For each row, whether its privacy results (``row["privacy"]``) are within the leakage
    budget: inversion PSNR at most ``max_psnr`` dB and label-leak AUC at most ``max_label_auc``.

    ``None`` = no limit. A row without the measurement does not qualify under a limit (an
    unmeasured leak is not a small one); a label AUC that does not apply (``null``: ushape,
    the labels never leave the client) passes.
    """
    for name, value, low in (
        ("--max-psnr", max_psnr, -math.inf),
        ("--max-label-auc", max_label_auc, 0.5),
    ):
        if value is not None and not (math.isfinite(value) and value >= low):
            raise ConfigError(
                f"{name} must be a finite number"
                + (f" >= {low}" if math.isfinite(low) else "")
                + f", got {value}"
            )
    out = []
    for r in rows:
        p = r.get("privacy")
        if not isinstance(p, Mapping):
            out.append(max_psnr is None and max_label_auc is None)
            continue
        ok = max_psnr is None or (
            _finite(p.get("inversion_psnr_db")) and float(p["inversion_psnr_db"]) <= max_psnr
        )
        if max_label_auc is not None and p.get("label_auc") is not None:
            ok = ok and _finite(p.get("label_auc")) and float(p["label_auc"]) <= max_label_auc
        out.append(bool(ok))
    return out


def recommend(
    rows: Sequence[Mapping[str, Any]],
    devices: Sequence[str],
    links: Sequence[str],
    *,
    max_drop: float,
    objective: str = "latency",
    baseline: Baseline | None = None,
    max_psnr: float | None = None,
    max_label_auc: float | None = None,
) -> list[Recommendation]:
    """One :class:`Recommendation` per device x link (devices outer, links inner).

    With ``max_psnr`` / ``max_label_auc`` only rows within that leakage budget
    (:func:`within_leakage`) qualify.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if not rows:
        return [
            Recommendation(d, lk, objective, "the sweep produced no results")
            for d in devices
            for lk in links
        ]
    base = baseline or reference_accuracy(rows)
    ok = within_budget(rows, max_drop, base)
    private = within_leakage(rows, max_psnr, max_label_auc)
    budget_rows = [i for i, good in enumerate(ok) if good and private[i]]
    if any(ok) and not budget_rows:
        limits = ", ".join(
            f"{n} {v:g}"
            for n, v in (("--max-psnr", max_psnr), ("--max-label-auc", max_label_auc))
            if v is not None
        )
        why = (
            f"no configuration within {max_drop:g} points of the reference is also within "
            f"the leakage budget ({limits}); measure with --privacy, add a --defense or "
            f"relax the budget"
        )
        return [Recommendation(d, lk, objective, why) for d in devices for lk in links]
    out: list[Recommendation] = []
    for device in devices:
        for link in links:
            out.append(_one(rows, budget_rows, device, link, objective, max_drop, base))
    return out


def _one(
    rows: Sequence[Mapping[str, Any]],
    budget_rows: list[int],
    device: str,
    link: str,
    objective: str,
    max_drop: float,
    base: Baseline,
) -> Recommendation:
    if not budget_rows:
        return Recommendation(device, link, objective, _over_budget_reason(rows, max_drop, base))
    feasible: list[int] = []
    infeasible: list[tuple[int, str]] = []
    unknown = 0
    for i in budget_rows:
        lat = ranked_latency(rows[i], device, link)
        if lat is None:
            unknown += 1
        elif lat.get("feasible", True) and _finite(lat.get("total_ms")):
            feasible.append(i)
        else:
            infeasible.append((i, str(lat.get("reason") or "infeasible")))
    if not feasible:
        if infeasible:
            # explain with the cheapest configuration: the one closest to fitting
            i, why = min(infeasible, key=lambda t: _num(rows[t[0]].get("bytes_per_sample")))
            r = rows[i]
            return Recommendation(
                device,
                link,
                objective,
                f"all {len(budget_rows)} configuration(s) within the {max_drop:g}-point budget "
                f"are infeasible on {device} over {link}; the smallest, cut {r.get('cut')} "
                f"with {r.get('codec')}: {why}",
            )
        return Recommendation(
            device,
            link,
            objective,
            f"no latency estimate for {device} over {link} "
            f"({unknown} configuration(s) within budget)",
        )

    def key(i: int) -> tuple[float, float, float]:
        lat = _num((ranked_latency(rows[i], device, link) or {}).get("total_ms"))
        nbytes = _num(rows[i].get("bytes_per_sample"))
        acc = -_num(rows[i].get("accuracy_mean"))
        return (lat, nbytes, acc) if objective == "latency" else (nbytes, lat, acc)

    best = min(feasible, key=key)
    r = rows[best]
    lat_ms = _num((ranked_latency(r, device, link) or {}).get("total_ms"))
    acc = float(r["accuracy_mean"])
    drop = drop_points(acc, base)
    what = (
        f"lowest latency ({lat_ms:,.1f} ms per step)"
        if objective == "latency"
        else f"fewest bytes ({_num(r.get('bytes_per_sample')):,.1f} B per sample)"
    )
    reason = (
        f"{what} of {len(feasible)} feasible configuration(s) within {max_drop:g} points "
        f"of the reference {100 * base.accuracy:.2f}% (drop {drop:.2f} points)"
    )
    return Recommendation(
        device=device,
        link=link,
        objective=objective,
        reason=reason,
        cut=r.get("cut"),
        codec=r.get("codec"),
        grad_codec=r.get("grad_codec"),
        accuracy_mean=acc,
        drop_points=drop,
        bytes_per_sample=_num(r.get("bytes_per_sample")),
        latency_ms=lat_ms,
        row=best,
    )


def _over_budget_reason(rows: Sequence[Mapping[str, Any]], max_drop: float, base: Baseline) -> str:
    scored = [r for r in rows if _finite(r.get("accuracy_mean"))]
    if not scored:
        return "no configuration has an accuracy (all runs failed)"
    best = max(scored, key=lambda r: float(r["accuracy_mean"]))
    drop = drop_points(float(best["accuracy_mean"]), base)
    return (
        f"no configuration is within {max_drop:g} points of the reference "
        f"{100 * base.accuracy:.2f}% ({base.description}); the closest, cut "
        f"{best.get('cut')} with {best.get('codec')}, is {drop:.2f} points below"
    )


def ranked_latency(row: Mapping[str, Any], device: str, link: str) -> Mapping[str, Any] | None:
    """The latency breakdown a recommendation ranks ``row`` by on ``device`` over ``link``:
    the row's, with the codec's encode and decode time modelled
    (:func:`edgesplit.evaluate.latency.with_codec_model`); None when the row has none."""
    lat = row.get("latency") or {}
    entry = lat.get(device, {}).get(link) if isinstance(lat, Mapping) else None
    if not isinstance(entry, Mapping):
        return None
    elements = _num(row.get("cut_elements"))
    if not (math.isfinite(elements) and elements > 0 and row.get("codec")):
        return entry
    return with_codec_model(entry, str(row["codec"]), elements)


def _finite(value: Any) -> bool:
    return math.isfinite(_num(value))
