"""Write a sweep's outputs: ``results.json``, ``results.csv``, ``report.md``,
``accuracy_vs_bytes.png`` and ``latency.png``.

Everything here reads the ``results.json`` document (plain dicts; non-finite numbers are
``None``), so a report can be regenerated from a saved ``results.json`` and tested on synthetic
rows. Plots use matplotlib's object API with the Agg canvas: no pyplot global state, no display.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgesplit.evaluate import privacy_report, recommend
from edgesplit.jsonable import as_number as _num

#: Output file names, in ``--out``.
FILES = {
    "json": "results.json",
    "csv": "results.csv",
    "markdown": "report.md",
    "accuracy_plot": "accuracy_vs_bytes.png",
    "latency_plot": "latency.png",
}

#: Stacked latency segments: (label, breakdown keys summed into it, colour).
SEGMENTS = (
    ("client compute", ("client_compute_ms",), "#4c72b0"),
    ("encode + decode", ("encode_ms", "decode_ms"), "#dd8452"),
    ("uplink", ("uplink_ms",), "#55a868"),
    ("RTT", ("rtt_ms",), "#8c8c8c"),
    ("server", ("server_ms",), "#c44e52"),
    ("downlink", ("downlink_ms",), "#8172b3"),
    ("duty-cycle wait", ("duty_cycle_wait_ms",), "#ccb974"),
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")

#: Scalar row fields written to results.csv, in order (latency columns follow).
CSV_FIELDS = (
    "cut",
    "codec",
    "grad_codec",
    "n_seeds",
    "accuracy_mean",
    "accuracy_std",
    "drop_points",
    "within_budget",
    "bytes_up_per_sample",
    "bytes_down_per_sample",
    "bytes_per_sample",
    "ratio_up",
    "ratio_down",
    "snr_db",
    "client_params",
    "server_params",
    "client_flops",
    "server_flops",
    "cut_elements",
    "client_memory_bytes",
    "encode_ms_per_batch",
    "decode_ms_per_batch",
    "frame_bytes_up",
    "frame_bytes_down",
    "pareto",
)


def write_report(doc: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write every output file for the ``results.json`` document ``doc`` into ``out_dir``.

    Returns
    -------
    dict
        Output kind (see :data:`FILES`) -> path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in FILES.items()}
    write_json(doc, paths["json"])
    write_csv(doc, paths["csv"])
    plot_accuracy_vs_bytes(doc, paths["accuracy_plot"])
    plot_latency(doc, paths["latency_plot"])
    paths.update(privacy_report.write(doc, out))
    write_markdown(doc, paths["markdown"])
    return paths


def write_json(doc: Mapping[str, Any], path: Path) -> None:
    """``results.json``: strict JSON (``allow_nan=False`` refuses a stray NaN loudly)."""
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_csv(doc: Mapping[str, Any], path: Path) -> None:
    """``results.csv``: one row per cut x codec; ``latency_ms:<device>:<link>`` columns (empty
    when infeasible)."""
    rows = list(doc.get("rows", []))
    pairs = _device_links(doc)
    private = privacy_report.has_privacy(doc)
    header = [
        *CSV_FIELDS,
        "accuracies",
        "cut_shape",
        *(f"latency_ms:{d}:{lk}" for d, lk in pairs),
        *(f"privacy.{k}" for k in (privacy_report.CSV_FIELDS if private else ())),
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            lat = r.get("latency_ms") or {}
            w.writerow(
                [
                    *(_csv(r.get(k)) for k in CSV_FIELDS),
                    ";".join(_csv(a) for a in r.get("accuracies") or []),
                    "x".join(str(d) for d in r.get("cut_shape") or []),
                    *(_csv((lat.get(d) or {}).get(lk)) for d, lk in pairs),
                    *(_csv(v) for v in (privacy_report.csv_values(r) if private else ())),
                ]
            )


# ---------------------------------------------------------------------------------------------
# Markdown


def write_markdown(doc: Mapping[str, Any], path: Path) -> None:
    """``report.md``: settings, all rows, the frontier, recommendations, FL comparison."""
    path.write_text(render_markdown(doc))


def render_markdown(doc: Mapping[str, Any]) -> str:
    rows = list(doc.get("rows", []))
    args = doc.get("args") or {}
    base = doc.get("baseline") or {}
    lines: list[str] = ["# edgesplit evaluate report", ""]
    if doc.get("command"):
        lines += ["Produced by:", "", "```", str(doc["command"]), "```", ""]
    settings = [
        ("data", args.get("data")),
        ("model", args.get("model")),
        ("config", args.get("config")),
        ("clients", args.get("clients")),
        ("epochs", args.get("epochs")),
        ("batch size", args.get("batch_size")),
        ("lr", args.get("lr")),
        ("seeds", args.get("seeds")),
        ("gradient codec", args.get("grad_codec")),
        ("defense", args.get("defense")),
        ("edgesplit", doc.get("edgesplit_version")),
        ("created", doc.get("created")),
    ]
    lines += [", ".join(f"**{k}** {v}" for k, v in settings if v is not None), ""]
    if base:
        lines += [
            f"**Reference accuracy** {_pct(base.get('accuracy'))} % ({base.get('description')}); "
            f"**budget** at most {_g(doc.get('max_drop'))} points below it; "
            f"**objective** {doc.get('objective')}; **latency** per "
            f"{doc.get('latency_mode', 'train')} step.",
            "",
        ]

    lines += [
        "## Results",
        "",
        "One row per cut × codec; mean ± sample std over seeds. Bytes are real frame "
        "bytes per training sample (headers included); ratio = fp32 bytes / bytes; SNR of "
        "decoded vs original activations (∞ = lossless); client memory is a lower-bound "
        "estimate; encode/decode measured on this machine per batch.",
        "",
    ]
    head = [
        "cut",
        "codec",
        "accuracy %",
        "drop (pts)",
        "B up/sample",
        "B down/sample",
        "ratio up",
        "SNR dB",
        "client params",
        "client MFLOPs",
        "client mem",
        "encode ms",
        "decode ms",
        "Pareto",
    ]
    body = [
        [
            str(r.get("cut")),
            f"`{r.get('codec')}`",
            f"{_pct(r.get('accuracy_mean'))} ± {_num(r.get('accuracy_std')) * 100:.2f}",
            _f(r.get("drop_points"), 2),
            _f(r.get("bytes_up_per_sample"), 1),
            _f(r.get("bytes_down_per_sample"), 1),
            _f(r.get("ratio_up"), 2),
            _snr(r.get("snr_db")),
            _int(r.get("client_params")),
            _f(_num(r.get("client_flops")) / 1e6, 3),
            _mib(r.get("client_memory_bytes")),
            _f(r.get("encode_ms_per_batch"), 3),
            _f(r.get("decode_ms_per_batch"), 3),
            "★" if r.get("pareto") else "",
        ]
        for r in rows
    ]
    lines += _table(head, body) + [""]

    lines += [
        "## Pareto frontier: accuracy vs bytes",
        "",
        "A configuration is on the frontier when no other one is at least as accurate "
        "with at most as many bytes per sample (up + down) and strictly better in one of "
        "the two; exact ties all stay on it.",
        "",
    ]
    front = sorted(
        (r for r in rows if r.get("pareto")), key=lambda r: _num(r.get("bytes_per_sample"))
    )
    lines += _table(
        ["cut", "codec", "accuracy %", "bytes/sample", "ratio up"],
        [
            [
                str(r.get("cut")),
                f"`{r.get('codec')}`",
                _pct(r.get("accuracy_mean")),
                _f(r.get("bytes_per_sample"), 1),
                _f(r.get("ratio_up"), 2),
            ]
            for r in front
        ],
    ) + ["", f"![accuracy vs bytes]({FILES['accuracy_plot']})", ""]
    lines += privacy_report.markdown(doc)

    recs = list(doc.get("recommendations", []))
    goal = "fewest bytes" if doc.get("objective") == "bytes" else "lowest end-to-end latency"
    lines += [
        "## Recommendations per device × link",
        "",
        f"For each device and link, the configuration with the {goal}"
        f" whose accuracy stays within the budget; infeasible configurations (a frame "
        f"larger than the link's maximum payload, or not enough memory) never qualify.",
        "",
    ]
    devices = list(dict.fromkeys(r.get("device") for r in recs))
    links = list(dict.fromkeys(r.get("link") for r in recs))
    by = {(r.get("device"), r.get("link")): r for r in recs}
    grid = []
    for d in devices:
        cells = [str(d)]
        for lk in links:
            rec = by.get((d, lk)) or {}
            cells.append(
                f"{rec.get('cut')} `{rec.get('codec')}` {_ms(rec.get('latency_ms'))}"
                if rec.get("found")
                else "—"
            )
        grid.append(cells)
    lines += _table(["device \\ link", *map(str, links)], grid) + [""]
    lines += _table(
        ["device", "link", "cut", "codec", "ms/step", "B/sample", "accuracy %", "drop", "why"],
        [
            [
                str(r.get("device")),
                str(r.get("link")),
                str(r.get("cut") or "—"),
                f"`{r.get('codec')}`" if r.get("codec") else "—",
                _ms(r.get("latency_ms")),
                _f(r.get("bytes_per_sample"), 1),
                _pct(r.get("accuracy_mean")),
                _f(r.get("drop_points"), 2),
                _esc(str(r.get("reason"))),
            ]
            for r in recs
        ],
    ) + ["", f"![latency]({FILES['latency_plot']})", ""]

    lines += [
        "### Latency model",
        "",
        "Neurosurgeon-style (Kang et al., ASPLOS 2017): client FLOPs / device effective "
        "throughput (x3 when training: forward + backward) + encode + (frame + protocol "
        "overhead) bytes / uplink + RTT + server FLOPs / server throughput + decode + "
        "downlink (gradients when training, predictions when inferring) + the duty-cycle "
        "off-time on duty-cycled links when training. **Encode/decode in the "
        "recommendations and the latency plot are modelled, not measured**: each codec "
        "stage's work per cut element (per byte for zstd) in fp32-FLOP equivalents, "
        "calibrated once with `python bench/codecs.py` (constants and their derivation: "
        "`edgesplit.evaluate.latency.CODEC_OPS`), divided by the effective fp32 throughput "
        "of the device that runs it (encode: the client, decode: the server profile "
        f"`{(doc.get('server') or {}).get('name', '?')}`). So a recommendation depends on "
        "accuracy, bytes and profiles only, never on how busy this machine was during the "
        "sweep. The encode/decode times in the results table are what this machine "
        f"measured (host profile `{(doc.get('host') or {}).get('name', '?')}`), for "
        "reference. A frame over the link's maximum payload is infeasible: fragmentation "
        "is not modelled. Per-call overheads are not modelled. Profiles and their sources: "
        "`devices/`.",
        "",
    ]

    fl = doc.get("fl_comparison")
    if fl:
        lines += _fl_section(fl)

    dev = doc.get("devices") or {}
    lk = doc.get("links") or {}
    if dev or lk:
        lines += ["## Devices and links used", ""]
        lines += _table(
            ["device", "fp32 GFLOPS", "int8 GOPS", "memory MiB", "max opset", "EP"],
            [
                [
                    n,
                    _g(p.get("effective_gflops_fp32")),
                    _g(p.get("effective_gflops_int8")),
                    _int(p.get("memory_mib")),
                    _int(p.get("max_onnx_opset")),
                    str(p.get("execution_provider")),
                ]
                for n, p in dev.items()
            ],
        ) + [""]
        lines += _table(
            ["link", "up Mbit/s", "down Mbit/s", "RTT ms", "max payload B", "duty cycle"],
            [
                [
                    n,
                    _g(p.get("uplink_mbps")),
                    _g(p.get("downlink_mbps")),
                    _g(p.get("rtt_ms")),
                    _int(p.get("max_payload_bytes")) if p.get("max_payload_bytes") else "—",
                    _g(p.get("duty_cycle")),
                ]
                for n, p in lk.items()
            ],
        ) + [""]
    return "\n".join(lines)


def _fl_section(fl: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Split learning vs federated learning",
        "",
        f"Per client and per epoch, for cut {fl.get('cut')} with `{fl.get('codec')}` "
        f"(SplitNN) vs FedAvg sending full fp32 weights: model {_int(fl.get('model_params'))}"
        f" parameters, client segment {_int(fl.get('client_params'))}, "
        f"{_int(fl.get('cut_elements'))} cut elements, {_g(fl.get('total_samples'))} "
        "training samples shared by the clients (the comparison of Vepakomma et al., "
        "'Split learning for health', 2018).",
        "",
    ]
    rows = list(fl.get("rows", []))
    # one unit per quantity for the whole table (the seed paper: TFLOPs and GB), chosen so the
    # largest value reads naturally
    fu, fs = _unit(
        [_num(r.get(k)) for r in rows for k in ("splitnn_flops", "fedavg_flops")], "FLOPs"
    )
    bu, bs = _unit(
        [
            _num(r.get(k))
            for r in rows
            for k in ("splitnn_bytes_fp32", "splitnn_bytes_codec", "fedavg_bytes")
        ],
        "B",
    )
    body = [
        [
            _int(r.get("clients")),
            _f(r.get("samples_per_client"), 1),
            _sci(_num(r.get("splitnn_flops")) / fs),
            _sci(_num(r.get("fedavg_flops")) / fs),
            _sci(_num(r.get("splitnn_bytes_fp32")) / bs),
            _sci(_num(r.get("splitnn_bytes_codec")) / bs),
            _sci(_num(r.get("fedavg_bytes")) / bs),
            str(r.get("cheaper_codec")),
        ]
        for r in rows
    ]
    lines += _table(
        [
            "clients",
            "samples/client",
            f"SplitNN {fu}",
            f"FedAvg {fu}",
            f"SplitNN {bu} (fp32)",
            f"SplitNN {bu} ({fl.get('codec')})",
            f"FedAvg {bu}",
            "fewer bytes",
        ],
        body,
    ) + [""]
    k32, kc = fl.get("crossover_fp32"), fl.get("crossover_codec")
    flops_ratio = _num(fl.get("model_forward_flops")) / max(_num(fl.get("client_forward_flops")), 1)
    lines += [
        f"**Crossover.** SplitNN sends fewer bytes per client than FedAvg once there are more "
        f"than K* = {_f(k32, 2)} clients at fp32 (from {_int(fl.get('first_clients_fp32'))} "
        f"clients on) and more than K* = {_f(kc, 2)} with `{fl.get('codec')}` (from "
        f"{_int(fl.get('first_clients_codec'))} clients on): compression divides the bytes per "
        f"sample by {_f(fl.get('compression_factor'), 2)} and moves the crossover by the same "
        f"factor. Computation per client is always lower for SplitNN here by "
        f"{_f(flops_ratio, 1)}x (client segment vs whole model), whatever the number of "
        "clients.",
        "",
        f"_Conventions:_ {fl.get('conventions', '')}",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# Plots


def plot_accuracy_vs_bytes(doc: Mapping[str, Any], path: Path) -> None:
    """Accuracy vs bytes per sample (log x): one line per cut, one marker per codec, the Pareto
    frontier drawn, the accuracy budget line; legends beside the axes, never over points.

    The y-axis spans the rows that matter (:func:`accuracy_ylim`); a row off that scale (it
    diverged, or lies far below the budget) is drawn as a ▼ on the bottom edge at its bytes and
    labelled with its accuracy, so it neither stretches the axis nor disappears.
    """
    _save(accuracy_figure(doc), path)


#: Rows more than this many budgets (and at least :data:`OFF_SCALE_MIN_PTS` points) below the
#: budget line are drawn off scale: they fail the budget by far, and the axis is for the rows
#: that compete.
OFF_SCALE_BUDGETS = 3.0
OFF_SCALE_MIN_PTS = 2.0


def off_scale(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Plotted rows the accuracy axis leaves out: diverged ones (``"diverged": true``) and
    those whose mean accuracy is more than ``max(OFF_SCALE_BUDGETS x budget,
    OFF_SCALE_MIN_PTS)`` points below the budget line. Empty when that would leave nothing."""
    rows = _plotted_rows(doc)
    floor = _budget_floor(doc)
    margin = max(OFF_SCALE_BUDGETS * _num(doc.get("max_drop")), OFF_SCALE_MIN_PTS)

    def out(r: Mapping[str, Any]) -> bool:
        low = floor is not None and 100 * _num(r.get("accuracy_mean")) < floor - margin
        return bool(r.get("diverged")) or low

    gone = [r for r in rows if out(r)]
    return gone if len(gone) < len(rows) else []


def accuracy_ylim(doc: Mapping[str, Any]) -> tuple[float, float]:
    """Y-axis limits (accuracy %) of the accuracy plot: mean ± std of every plotted row on
    scale (not in :func:`off_scale`) and the budget line, padded by 5 % of that span (at least
    0.5 points).

    One codec that diverged or trains badly would otherwise squeeze every difference that
    matters into a few pixels.
    """
    rows = _plotted_rows(doc)
    gone = off_scale(doc)
    kept = [r for r in rows if not any(r is g for g in gone)]
    values: list[float] = []
    for r in kept:
        mean, std = 100 * _num(r.get("accuracy_mean")), 100 * _num(r.get("accuracy_std"))
        std = std if math.isfinite(std) else 0.0
        values += [mean - std, mean + std]
    floor = _budget_floor(doc)
    if floor is not None and values:
        values.append(floor)
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    pad = max(0.05 * (hi - lo), 0.5)
    return max(lo - pad, 0.0), min(hi + pad, 100.0)


def accuracy_figure(doc: Mapping[str, Any]) -> Any:
    """The accuracy-vs-bytes figure (matplotlib ``Figure``; see :func:`plot_accuracy_vs_bytes`)."""
    from matplotlib.lines import Line2D

    fig, ax = _figure(10.5, 6.0)
    rows = _plotted_rows(doc)
    cuts = list(dict.fromkeys(r.get("cut") for r in rows))
    codecs = list(dict.fromkeys(r.get("codec") for r in rows))
    colors = dict(zip(cuts, _colors(len(cuts)), strict=True))
    markers = {c: _MARKERS[i % len(_MARKERS)] for i, c in enumerate(codecs)}
    lo, hi = accuracy_ylim(doc)
    gone = off_scale(doc)
    trained = [r for r in rows if not r.get("diverged")]
    for cut in cuts:
        mine = sorted(
            (r for r in trained if r.get("cut") == cut),
            key=lambda r: _num(r.get("bytes_per_sample")),
        )
        xs = [_num(r.get("bytes_per_sample")) for r in mine]
        ys = [100 * _num(r.get("accuracy_mean")) for r in mine]
        ax.plot(xs, ys, "-", color=colors[cut], lw=1.5, zorder=2, label=f"cut {cut}")
        for r, x, y in zip(mine, xs, ys, strict=True):
            std = 100 * _num(r.get("accuracy_std"))
            # opaque markers with a dark edge: readable over lines and grid; the frontier's
            # points get a thick black edge
            ax.errorbar(
                x,
                y,
                yerr=std if std > 0 else None,
                fmt=markers[r.get("codec")],
                color=colors[cut],
                ms=8,
                alpha=1.0,
                mec="black",
                mew=1.8 if r.get("pareto") else 0.6,
                ecolor=colors[cut],
                capsize=3,
                zorder=4,
            )
    front = sorted(
        (r for r in trained if r.get("pareto")), key=lambda r: _num(r.get("bytes_per_sample"))
    )
    if front:
        fx = [_num(r.get("bytes_per_sample")) for r in front]
        fy = [100 * _num(r.get("accuracy_mean")) for r in front]
        ax.step(
            fx, fy, where="post", color="black", ls="--", lw=1.2, zorder=3, label="Pareto frontier"
        )
    floor = _budget_floor(doc)
    if floor is not None:
        ax.axhline(
            floor,
            color="#c44e52",
            ls=":",
            lw=1.2,
            zorder=1,
            label=f"budget: {_g(doc['max_drop'])} pts below best fp32",
        )
    diverged = any(r.get("diverged") for r in gone)
    ax.set_xscale("log")
    x0, x1 = (math.log(v) for v in ax.get_xlim())  # autoscaled to every row by now
    for i, r in enumerate(sorted(gone, key=lambda r: _num(r.get("bytes_per_sample")))):
        # on the bottom edge at its bytes: marked, not plotted as an outlier; labels staggered
        # so neighbours do not overlap, and kept inside the axes near its sides
        x = _num(r.get("bytes_per_sample"))
        where = (math.log(x) - x0) / (x1 - x0) if x1 > x0 else 0.5
        ha = "left" if where < 0.2 else "right" if where > 0.8 else "center"
        color = "#c44e52" if r.get("diverged") else colors[r.get("cut")]
        what = "diverged" if r.get("diverged") else "far below the budget"
        ax.plot(
            [x],
            [lo],
            marker="v",
            ms=11,
            color=color,
            mec="black",
            mew=0.8,
            ls="",
            clip_on=False,
            zorder=5,
        )
        ax.annotate(
            f"{r.get('codec')} @ {r.get('cut')}: {what}\n"
            f"({_pct(r.get('accuracy_mean'))} %, off scale)",
            (x, lo),
            xytext=(0, 12 + 26 * (i % 3)),
            textcoords="offset points",
            ha=ha,
            va="bottom",
            fontsize=7.5,
            color="black",
            zorder=6,
            arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.6},
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 1.0},
        )
    ax.set_xscale("log")
    ax.set_ylim(lo, hi)
    ax.set_xlabel("bytes per training sample crossing the cut (up + down, log scale) [B]")
    ax.set_ylabel("test accuracy [%]")
    args = doc.get("args") or {}
    sub = ", ".join(
        f"{k} {args[k]}"
        for k in ("data", "model", "config", "epochs", "seeds")
        if args.get(k) is not None
    )
    ax.set_title(
        "Accuracy vs communication per cut and codec" + (f"\n({sub})" if sub else ""), fontsize=11
    )
    ax.grid(True, which="both", alpha=0.25)
    if not rows:
        ax.text(0.5, 0.5, "no results", transform=ax.transAxes, ha="center", va="center")
    # two legends beside the axes (the saved image grows to hold them): cuts and lines, codecs
    if ax.get_legend_handles_labels()[0]:
        first = ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            fontsize=8,
            title="cuts and lines",
            title_fontsize=8,
            framealpha=1.0,
        )
        ax.add_artist(first)
    handles = [
        Line2D(
            [], [], ls="", marker=markers[c], color="0.35", mec="black", mew=0.6, ms=8, label=str(c)
        )
        for c in codecs
    ]
    if gone:
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="v",
                color="#c44e52" if diverged else "0.35",
                mec="black",
                mew=0.8,
                ms=9,
                label="off scale (labelled)",
            )
        )
    if handles:
        ax.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(1.02, 0.0),
            borderaxespad=0.0,
            fontsize=8,
            title="codecs (marker)",
            title_fontsize=8,
            framealpha=1.0,
        )
    return fig


def _plotted_rows(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Rows with bytes and a finite accuracy (the others cannot be placed on the plot)."""
    return [
        r
        for r in doc.get("rows", [])
        if _num(r.get("bytes_per_sample")) > 0 and math.isfinite(_num(r.get("accuracy_mean")))
    ]


def _budget_floor(doc: Mapping[str, Any]) -> float | None:
    """The budget line in accuracy %, or None without a baseline or budget."""
    base = doc.get("baseline") or {}
    if base.get("accuracy") is None or doc.get("max_drop") is None:
        return None
    return 100 * _num(base["accuracy"]) - _num(doc["max_drop"])


def plot_latency(doc: Mapping[str, Any], path: Path) -> None:
    """Stacked bars of the recommended configuration's step latency: one panel per link (each
    with its own scale), one bar per device; devices with no qualifying configuration say so."""
    _save(latency_figure(doc), path)


def latency_figure(doc: Mapping[str, Any]) -> Any:
    """The latency figure (matplotlib ``Figure``; see :func:`plot_latency`).

    Each bar is labelled with its cut and codec written upwards from the bar's top, so labels
    of neighbouring bars cannot overlap however long the codec; each panel's y-axis is raised
    until its tallest label fits inside it. The reason a link has no configuration is wrapped
    to the panel's width, never cut.
    """
    recs = list(doc.get("recommendations", []))
    rows = list(doc.get("rows", []))
    links = list(dict.fromkeys(r.get("link") for r in recs)) or ["(none)"]
    devices = list(dict.fromkeys(r.get("device") for r in recs))
    ncols = min(len(links), 3)
    nrows = math.ceil(len(links) / ncols)
    fig, axes = _figure(4.8 * ncols, 4.2 * nrows + 0.9, nrows=nrows, ncols=ncols)
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    by = {(r.get("device"), r.get("link")): r for r in recs}
    tops: dict[int, list[float]] = {}
    for n, (ax, link) in enumerate(zip(flat, links, strict=False)):
        bottoms = [0.0] * len(devices)
        xs = list(range(len(devices)))
        for label, keys, color in SEGMENTS:
            heights = []
            for d in devices:
                b = _breakdown(rows, by.get((d, link)))
                heights.append(sum(_num(b.get(k)) for k in keys) if b else 0.0)
            heights = [h if math.isfinite(h) else 0.0 for h in heights]
            ax.bar(xs, heights, bottom=bottoms, color=color, label=label, width=0.65)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        tops[n] = bottoms
        if not any((by.get((d, link)) or {}).get("found") for d in devices):
            why = next((str(r.get("reason")) for r in recs if r.get("link") == link), "")
            ax.text(
                0.5,
                0.5,
                _wrap(f"no configuration qualifies: {why}", 56),
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=6.5,
                color="#c44e52",
                bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "#c44e52", "alpha": 1.0},
            )
        ax.set_xticks(xs)
        ax.set_xticklabels([str(d) for d in devices], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"link: {link}", fontsize=10)
        ax.set_ylabel("time per step [ms]")
        ax.grid(True, axis="y", alpha=0.25)
    for ax in flat[len(links) :]:
        ax.set_visible(False)
    handles, names = flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="upper center",
        ncol=min(len(SEGMENTS), 2 + 2 * ncols),
        fontsize=8,
        bbox_to_anchor=(0.5, 0.995),
        framealpha=1.0,
    )
    mode = doc.get("latency_mode", "train")
    title = (
        f"Latency of the recommended configuration per device × link ({mode} step, "
        f"objective: {doc.get('objective', 'latency')})"
    )
    fig.suptitle(_wrap(title, 40 + 40 * (ncols - 1)), y=0.94 if ncols > 1 else 0.9, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.9 if ncols > 1 else 0.84))
    # bar labels after the layout (they live inside the axes once the limits are raised)
    for n, (ax, link) in enumerate(zip(flat, links, strict=False)):
        if not any((by.get((d, link)) or {}).get("found") for d in devices):
            ax.set_ylim(0, 1)  # the message above says why; no empty bars to label
            continue
        labels = []
        for x, (d, h) in enumerate(zip(devices, tops[n], strict=True)):
            rec = by.get((d, link)) or {}
            found = bool(rec.get("found"))
            text = f"{rec.get('cut')} · {rec.get('codec')}" if found else "none qualifies"
            t = ax.annotate(
                text,
                (x, h),
                xytext=(0, 3),
                textcoords="offset points",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=7,
                color="black" if found else "#c44e52",
            )
            labels.append((t, h))
        _fit_labels(fig, ax, labels)
    return fig


def _fit_labels(fig: Any, ax: Any, labels: Sequence[tuple[Any, float]]) -> None:
    """Raise ``ax``'s y-limit until every upright bar label ``(text, bar top)`` fits inside.

    A label's height in pixels does not depend on the limits, so one pass suffices: a bar of
    height ``h`` with a label ``t`` pixels tall needs ``top >= h / (1 - t / axes height)``.
    """
    renderer = fig.canvas.get_renderer()
    height = ax.get_window_extent(renderer).height
    top = max((h for _, h in labels), default=0.0) or 1.0
    for text, h in labels:
        need = (text.get_window_extent(renderer).height + 6) / height
        if need >= 0.9:  # a label taller than the panel: shrink it rather than the bars
            text.set_fontsize(text.get_fontsize() * 0.85 / need)
            need = 0.85
        top = max(top, (h or top * 0.02) / (1 - need))
    ax.set_ylim(0, top * 1.02)


def _breakdown(
    rows: Sequence[Mapping[str, Any]], rec: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The breakdown the recommendation ``rec`` was ranked by (codec time modelled)."""
    if not rec or not rec.get("found") or rec.get("row") is None:
        return None
    i = int(rec["row"])
    if not 0 <= i < len(rows):
        return None
    return recommend.ranked_latency(rows[i], str(rec.get("device")), str(rec.get("link")))


def _figure(w: float, h: float, nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def _save(fig: Any, path: Path) -> None:
    from matplotlib.legend import Legend

    # a legend kept with ax.add_artist is not in the tight box by itself: name every legend
    legends = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, Legend)]
    fig.savefig(
        path, format="png", bbox_inches="tight", bbox_extra_artists=[*legends, *fig.legends]
    )


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Formatting


def _device_links(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs: dict[tuple[str, str], None] = {}
    for r in doc.get("rows", []):
        for d, per in (r.get("latency_ms") or {}).items():
            for lk in per or {}:
                pairs[(d, lk)] = None
    return list(pairs)


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    if not body:
        out.append("| " + " | ".join("—" for _ in head) + " |")
    return out


def _f(value: Any, digits: int) -> str:
    v = _num(value)
    return f"{v:,.{digits}f}" if math.isfinite(v) else "—"


def _g(value: Any) -> str:
    v = _num(value)
    return f"{v:g}" if math.isfinite(v) else "—"


def _int(value: Any) -> str:
    v = _num(value)
    return f"{int(v):,}" if math.isfinite(v) else "—"


def _unit(values: Sequence[float], base: str) -> tuple[str, float]:
    """(unit name, divisor) among k/M/G/T ``base`` for the largest finite value."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    top = max(finite, default=0.0)
    for prefix, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if top >= div:
            return prefix + base, div
    return base, 1.0


def _sci(v: float) -> str:
    if not math.isfinite(v):
        return "—"
    return f"{v:.3g}"


def _pct(value: Any) -> str:
    v = _num(value)
    return f"{100 * v:.2f}" if math.isfinite(v) else "—"


def _ms(value: Any) -> str:
    v = _num(value)
    return f"{v:,.1f} ms" if math.isfinite(v) else "—"


def _mib(value: Any) -> str:
    v = _num(value)
    return f"{v / 2**20:,.2f} MiB" if math.isfinite(v) else "—"


def _snr(value: Any) -> str:
    # results.json writes the fp32 SNR (inf) as null
    v = _num(value)
    return f"{v:.1f}" if math.isfinite(v) else "∞"


def _csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
