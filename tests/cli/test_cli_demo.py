"""`edgesplit demo` end to end (short): codec table, export, serve, torch-free edge client."""

from __future__ import annotations

import json


def test_demo_runs_the_whole_story(cli, tmp_path):
    out = cli(
        "demo",
        "--epochs",
        "2",
        "--codecs",
        "fp32,q4+zstd",
        "--out",
        str(tmp_path / "run"),
        "--bundle",
        str(tmp_path / "bundle"),
        "--json",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert [r["codec"] for r in doc["rows"]] == ["fp32", "q4+zstd"]
    fp32, q4 = doc["rows"]
    assert fp32["ratio_up"] == 1.0 and q4["ratio_up"] > 8
    deploy = doc["deployment"]
    assert (tmp_path / "bundle" / "client.onnx").exists()
    assert deploy["probes"] > 0 and (tmp_path / "run" / "metrics.jsonl").exists()
    modes = [(r["mode"], r["codec"]) for r in deploy["edge"]]
    assert modes == [("train", "q4+zstd"), ("infer", "fp32"), ("infer", "q4+zstd")]
    assert all(r["accuracy"] > 0.5 for r in deploy["edge"])
