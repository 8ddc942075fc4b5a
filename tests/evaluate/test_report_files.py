"""The report writer turns a results document into valid files, from synthetic rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from edgesplit.devices import load_device, load_link
from edgesplit.evaluate import fl_compare, latency, pareto, recommend
from edgesplit.evaluate.report import FILES, render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CODECS = {
    "fp32": (1.0, 0.95),
    "q8+zstd": (0.27, 0.949),
    "q4+zstd": (0.14, 0.945),
    "q2+zstd": (0.08, 0.90),
    "topk:0.1+q8+zstd": (0.05, 0.85),
}
DEVICES = ["rpi4", "jetson-nano"]
LINKS = ["wifi", "lte", "lora"]


def synthetic_doc(with_fl: bool = True) -> dict:
    server, host = load_device("server-cpu"), load_device("server-cpu")
    rows = []
    for cut, elems in (("relu1", 128), ("relu2", 64)):
        for codec, (frac, acc) in CODECS.items():
            up = 4 * elems * frac + 1
            down = 4 * elems + 1
            row = {
                "cut": cut,
                "codec": codec,
                "grad_codec": "fp32",
                "n_seeds": 2,
                "accuracy_mean": acc - (0.01 if cut == "relu2" else 0),
                "accuracy_std": 0.004,
                "accuracies": [acc - 0.003, acc + 0.003],
                "bytes_up_per_sample": up,
                "bytes_down_per_sample": down,
                "bytes_per_sample": up + down,
                "ratio_up": 4 * elems / up,
                "ratio_down": 1.0,
                "snr_db": None if codec == "fp32" else 30 * frac + 5,
                "client_params": 8320,
                "server_params": 8906,
                "client_flops": 16512,
                "server_flops": 17728,
                "cut_shape": [elems],
                "cut_elements": elems,
                "client_memory_bytes": 140_000,
                "encode_ms_per_batch": 0.3,
                "decode_ms_per_batch": 0.2,
                "frame_bytes_up": 32 * up,
                "frame_bytes_down": 32 * down,
                "latency": {},
                "latency_ms": {},
            }
            for d in DEVICES:
                row["latency"][d], row["latency_ms"][d] = {}, {}
                for lk in LINKS:
                    b = latency.estimate(
                        client_flops=16512,
                        server_flops=17728,
                        batch_size=32,
                        bytes_up=32 * up,
                        bytes_down=32 * down,
                        device=load_device(d),
                        link=load_link(lk),
                        server=server,
                        host=host,
                        encode_s=3e-4,
                        decode_s=2e-4,
                    )
                    row["latency"][d][lk] = b.to_json()
                    row["latency_ms"][d][lk] = b.total_ms if b.feasible else None
            rows.append(row)
    for row, on in zip(rows, pareto.mark_pareto(rows), strict=True):
        row["pareto"] = on
    base = recommend.reference_accuracy(rows)
    for row, ok in zip(rows, recommend.within_budget(rows, 1.0, base), strict=True):
        row["within_budget"] = ok
        row["drop_points"] = recommend.drop_points(row["accuracy_mean"], base)
    recs = recommend.recommend(rows, DEVICES, LINKS, max_drop=1.0, baseline=base)
    doc = {
        "edgesplit_version": "test",
        "created": "now",
        "command": "edgesplit evaluate --data digits --cuts relu1,relu2 --out runs/x",
        "args": {
            "data": "digits",
            "model": "auto",
            "config": "vanilla",
            "epochs": 3,
            "seeds": 2,
            "batch_size": 32,
            "grad_codec": "fp32",
        },
        "baseline": {"accuracy": base.accuracy, "description": base.description, "cut": base.cut},
        "max_drop": 1.0,
        "objective": "latency",
        "latency_mode": "train",
        "devices": {d: {"effective_gflops_fp32": 1.0, "memory_mib": 1} for d in DEVICES},
        "links": {lk: {"uplink_mbps": 1.0, "max_payload_bytes": None} for lk in LINKS},
        "server": {"name": "server-cpu"},
        "host": {"name": "server-cpu"},
        "rows": rows,
        "recommendations": [r.to_json() for r in recs],
    }
    if with_fl:
        doc["fl_comparison"] = fl_compare.compare(
            total_samples=1347,
            model_params=17226,
            client_params=8320,
            model_forward_flops=34240,
            client_forward_flops=16512,
            cut_elements=128,
            codec="q4+zstd",
            codec_bytes_up_per_sample=rows[2]["bytes_up_per_sample"],
            codec_bytes_down_per_sample=rows[2]["bytes_down_per_sample"],
        ).to_json()
    from edgesplit.train.spec import jsonable

    return jsonable(doc)


def test_writes_every_file(tmp_path: Path) -> None:
    doc = synthetic_doc()
    paths = write_report(doc, tmp_path / "out")
    assert set(paths) == set(FILES)
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    for key in ("accuracy_plot", "latency_plot"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC, key
        assert len(data) > 10_000, (key, len(data))

    back = json.loads(paths["json"].read_text())
    assert back["rows"] == doc["rows"]
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(doc["rows"])  # one row per cut x codec
    assert table[0]["cut"] == "relu1" and table[0]["codec"] == "fp32"
    assert "latency_ms:rpi4:lora" in table[0]
    assert table[0]["latency_ms:rpi4:lora"] == ""  # infeasible: no number

    md = paths["markdown"].read_text()
    for section in (
        "## Results",
        "## Pareto frontier",
        "## Recommendations per device × link",
        "## Split learning vs federated learning",
        "### Latency model",
        doc["command"],
        "accuracy_vs_bytes.png",
        "latency.png",
    ):
        assert section in md, section
    assert md.count("| relu") >= len(doc["rows"])


def test_markdown_without_fl_or_latency() -> None:
    doc = synthetic_doc(with_fl=False)
    md = render_markdown(doc)
    assert "federated" not in md
    empty = render_markdown({"rows": [], "recommendations": []})
    assert "## Results" in empty


def test_plots_survive_an_empty_sweep(tmp_path: Path) -> None:
    paths = write_report({"rows": [], "recommendations": []}, tmp_path)
    assert paths["accuracy_plot"].read_bytes()[:8] == PNG_MAGIC
    assert paths["latency_plot"].read_bytes()[:8] == PNG_MAGIC


def test_json_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_report({"rows": [{"snr_db": float("inf")}]}, tmp_path)


# ---------------------------------------------------------------------------------------------
# Numbers in the report are the sweep's numbers


def _md_table(md: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after ``heading``, as dicts keyed by its header cells."""
    lines = md[md.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    out = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        out.append(dict(zip(head, cells, strict=True)))
    return out


def test_results_table_holds_each_rows_numbers() -> None:
    doc = synthetic_doc(with_fl=False)
    table = _md_table(render_markdown(doc), "## Results")
    assert len(table) == len(doc["rows"])
    for row, cells in zip(doc["rows"], table, strict=True):
        assert cells["cut"] == row["cut"] and cells["codec"] == f"`{row['codec']}`"
        mean, std = (float(v) for v in cells["accuracy %"].split(" ± "))
        assert mean == pytest.approx(100 * row["accuracy_mean"], abs=0.005)
        assert std == pytest.approx(100 * row["accuracy_std"], abs=0.005)
        assert float(cells["drop (pts)"]) == pytest.approx(row["drop_points"], abs=0.005)
        assert float(cells["B up/sample"].replace(",", "")) == pytest.approx(
            row["bytes_up_per_sample"], abs=0.05
        )
        assert float(cells["ratio up"]) == pytest.approx(row["ratio_up"], abs=0.005)
        assert cells["Pareto"] == ("★" if row["pareto"] else "")


def test_recommendation_table_holds_the_recommendations() -> None:
    doc = synthetic_doc(with_fl=False)
    md = render_markdown(doc)
    table = _md_table(md, "| device | link | cut | codec | ms/step")
    assert len(table) == len(doc["recommendations"]) == len(DEVICES) * len(LINKS)
    for rec, cells in zip(doc["recommendations"], table, strict=True):
        assert (cells["device"], cells["link"]) == (rec["device"], rec["link"])
        if rec["found"]:
            assert cells["codec"] == f"`{rec['codec']}`" and cells["cut"] == rec["cut"]
            assert float(cells["ms/step"].removesuffix(" ms").replace(",", "")) == (
                pytest.approx(rec["latency_ms"], abs=0.05)
            )
            assert float(cells["accuracy %"]) == pytest.approx(
                100 * rec["accuracy_mean"], abs=0.005
            )
        else:  # lora: nothing fits, and the table says so
            assert cells["codec"] == "—" and "exceeds the lora max payload" in cells["why"]
    assert any(r["found"] for r in doc["recommendations"])


def test_csv_values_are_the_rows_values(tmp_path: Path) -> None:
    doc = synthetic_doc(with_fl=False)
    paths = write_report(doc, tmp_path)
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    for row, line in zip(doc["rows"], table, strict=True):
        for key in ("accuracy_mean", "bytes_up_per_sample", "bytes_down_per_sample", "ratio_up"):
            assert float(line[key]) == row[key], key
        assert float(line["latency_ms:rpi4:wifi"]) == row["latency_ms"]["rpi4"]["wifi"]


# ---------------------------------------------------------------------------------------------
# Plots a person reads


def _diverged_doc() -> dict:
    """The synthetic sweep plus one codec that diverged (12 % accuracy)."""
    doc = synthetic_doc(with_fl=False)
    bad = dict(
        doc["rows"][-1],
        codec="q1+zstd",
        accuracy_mean=0.12,
        accuracy_std=0.05,
        diverged=True,
        pareto=True,
        bytes_per_sample=20.0,
    )
    doc["rows"].append(bad)
    return doc


def test_accuracy_axis_is_not_stretched_by_a_diverged_codec() -> None:
    from edgesplit.evaluate.report import accuracy_figure, accuracy_ylim, off_scale

    doc = _diverged_doc()
    gone = off_scale(doc)
    assert "q1+zstd" in [r["codec"] for r in gone]
    on_scale = [r for r in doc["rows"] if not any(r is g for g in gone)]
    lo, hi = accuracy_ylim(doc)
    floor = 100 * doc["baseline"]["accuracy"] - doc["max_drop"]
    worst = min(100 * (r["accuracy_mean"] - r["accuracy_std"]) for r in on_scale)
    best = max(100 * (r["accuracy_mean"] + r["accuracy_std"]) for r in on_scale)
    assert lo <= min(worst, floor) and hi >= best  # every row that trained is shown
    assert lo > 80  # the 12 % codec does not stretch it

    fig = accuracy_figure(doc)
    ax = fig.axes[0]
    assert ax.get_ylim() == pytest.approx((lo, hi))
    notes = [t.get_text() for t in ax.texts]
    assert any("q1+zstd" in t and "diverged" in t and "12.00 %" in t for t in notes), notes


def test_far_below_budget_is_off_scale_but_a_row_near_it_is_not() -> None:
    from edgesplit.evaluate.report import accuracy_ylim, off_scale

    doc = synthetic_doc(with_fl=False)
    # synthetic rows reach down to 84 % (topk at relu2, 11 points below a 1-point budget)
    gone = {(r["cut"], r["codec"]) for r in off_scale(doc)}
    assert gone == {
        (r["cut"], r["codec"])
        for r in doc["rows"]
        if 100 * r["accuracy_mean"] < 100 * doc["baseline"]["accuracy"] - 1 - 3
    }
    lo, _ = accuracy_ylim(doc)
    assert lo < 100 * doc["baseline"]["accuracy"] - 1  # the budget line stays in view


def test_accuracy_legends_are_outside_the_axes_and_markers_opaque() -> None:
    from matplotlib.legend import Legend

    from edgesplit.evaluate.report import accuracy_figure

    fig = accuracy_figure(_diverged_doc())
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    legends = [a for a in ax.get_children() if isinstance(a, Legend)]
    assert len(legends) == 2
    for legend in legends:
        assert legend.get_window_extent(renderer).x0 >= box.x1  # beside the plot, not on it
    markers = [line for line in ax.get_lines() if line.get_marker() not in ("None", "", None)]
    assert markers and all(line.get_alpha() in (None, 1.0) for line in markers)


def test_latency_labels_do_not_overlap_and_fit(tmp_path: Path) -> None:
    from edgesplit.evaluate.report import latency_figure

    doc = synthetic_doc(with_fl=False)
    for rec in doc["recommendations"]:  # long ACT/GRAD codec names: the labels that collided
        if rec["found"]:
            rec["codec"] = "topk:0.1+q8:channel+zstd/q4:stochastic+zstd"
    fig = latency_figure(doc)
    renderer = fig.canvas.get_renderer()
    checked = 0
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        box = ax.get_window_extent(renderer)
        labels = [t for t in ax.texts if "·" in t.get_text() or "none" in t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        for b in boxes:
            assert box.y0 - 1 <= b.y0 and b.y1 <= box.y1 + 1, "label outside its panel"
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not a.overlaps(b), "bar labels overlap"
        checked += len(labels)
    assert checked == len(DEVICES) * 2  # wifi and lte have bars; lora explains instead
    # the reason lora has nothing is printed whole, not cut after some lines
    lora = next(r for r in doc["recommendations"] if r["link"] == "lora")
    texts = [" ".join(t.get_text().split()) for ax in fig.axes for t in ax.texts]
    assert any(" ".join(lora["reason"].split()) in t for t in texts)
