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
CODECS = {"fp32": (1.0, 0.95), "q8+zstd": (0.27, 0.949), "q4+zstd": (0.14, 0.945),
          "q2+zstd": (0.08, 0.90), "topk:0.1+q8+zstd": (0.05, 0.85)}
DEVICES = ["rpi4", "jetson-nano"]
LINKS = ["wifi", "lte", "lora"]


def synthetic_doc(with_fl: bool = True) -> dict:
    server, host = load_device("server-cpu"), load_device("server-cpu")
    rows = []
    for cut, elems in (("relu1", 128), ("relu2", 64)):
        for codec, (frac, acc) in CODECS.items():
            up = 4 * elems * frac + 1
            down = 4 * elems + 1
            row = {"cut": cut, "codec": codec, "grad_codec": "fp32", "n_seeds": 2,
                   "accuracy_mean": acc - (0.01 if cut == "relu2" else 0),
                   "accuracy_std": 0.004, "accuracies": [acc - 0.003, acc + 0.003],
                   "bytes_up_per_sample": up, "bytes_down_per_sample": down,
                   "bytes_per_sample": up + down, "ratio_up": 4 * elems / up, "ratio_down": 1.0,
                   "snr_db": None if codec == "fp32" else 30 * frac + 5,
                   "client_params": 8320, "server_params": 8906, "client_flops": 16512,
                   "server_flops": 17728, "cut_shape": [elems], "cut_elements": elems,
                   "client_memory_bytes": 140_000, "encode_ms_per_batch": 0.3,
                   "decode_ms_per_batch": 0.2, "frame_bytes_up": 32 * up,
                   "frame_bytes_down": 32 * down, "latency": {}, "latency_ms": {}}
            for d in DEVICES:
                row["latency"][d], row["latency_ms"][d] = {}, {}
                for lk in LINKS:
                    b = latency.estimate(
                        client_flops=16512, server_flops=17728, batch_size=32,
                        bytes_up=32 * up, bytes_down=32 * down, device=load_device(d),
                        link=load_link(lk), server=server, host=host, encode_s=3e-4,
                        decode_s=2e-4)
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
        "edgesplit_version": "test", "created": "now",
        "command": "edgesplit evaluate --data digits --cuts relu1,relu2 --out runs/x",
        "args": {"data": "digits", "model": "auto", "config": "vanilla", "epochs": 3,
                 "seeds": 2, "batch_size": 32, "grad_codec": "fp32"},
        "baseline": {"accuracy": base.accuracy, "description": base.description,
                     "cut": base.cut},
        "max_drop": 1.0, "objective": "latency", "latency_mode": "train",
        "devices": {d: {"effective_gflops_fp32": 1.0, "memory_mib": 1} for d in DEVICES},
        "links": {lk: {"uplink_mbps": 1.0, "max_payload_bytes": None} for lk in LINKS},
        "server": {"name": "server-cpu"}, "host": {"name": "server-cpu"},
        "rows": rows, "recommendations": [r.to_json() for r in recs],
    }
    if with_fl:
        doc["fl_comparison"] = fl_compare.compare(
            total_samples=1347, model_params=17226, client_params=8320,
            model_forward_flops=34240, client_forward_flops=16512, cut_elements=128,
            codec="q4+zstd", codec_bytes_up_per_sample=rows[2]["bytes_up_per_sample"],
            codec_bytes_down_per_sample=rows[2]["bytes_down_per_sample"]).to_json()
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
    assert len(table) == len(doc["rows"])                 # one row per cut x codec
    assert table[0]["cut"] == "relu1" and table[0]["codec"] == "fp32"
    assert "latency_ms:rpi4:lora" in table[0]
    assert table[0]["latency_ms:rpi4:lora"] == ""          # infeasible: no number

    md = paths["markdown"].read_text()
    for section in ("## Results", "## Pareto frontier", "## Recommendations per device × link",
                    "## Split learning vs federated learning", "### Latency model",
                    doc["command"], "accuracy_vs_bytes.png", "latency.png"):
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
