"""Tables printed into a pipe are never cut at 80 columns (rich's default without a terminal)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A summary far wider than 80 columns: long codec names, a long reason, 6-digit numbers.
SCRIPT = textwrap.dedent(
    """
    from edgesplit.cli.evaluate import _print_summary
    from edgesplit.cli.status import print_status

    row = dict(cut="relu2", codec="topk:0.1+q8:channel,stochastic+zstd:19/q4:stochastic",
               accuracy_mean=0.987654, accuracy_std=0.001234, bytes_up_per_sample=123456.7,
               bytes_down_per_sample=654321.9, ratio_up=12.34, snr_db=44.56, pareto=True)
    rec = dict(device="jetson-orin-nano", link="lora-sf12-125khz", found=False,
               reason="no configuration within 1.0 points fits a 222-byte LoRa payload at "
                      "batch 32 (smallest frame 4,321 B)")
    doc = dict(rows=[row], recommendations=[rec], max_drop=1.0, objective="latency",
               baseline=dict(accuracy=0.991234, description="fp32 at relu2, mean of 3 seeds"))
    _print_summary(doc, "runs/a-rather-long-output-directory-name/evaluate", 42, 0)
    print_status({"config": "vanilla", "clients": {"hospital-a-ward-3-bedside-monitor": {
        "steps": 123456, "samples": 3950592, "loss": 0.123456, "accuracy": 0.987654,
        "bytes_in": 123456789, "bytes_out": 987654321, "repeats": 3, "errors": 0,
        "last_seen": 1796000000.0}}}, "split-server.example.org:50051", now=1796000012.0)
    """
)


def test_piped_tables_are_not_truncated() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "TERM": "xterm", "COLUMNS": "80"},
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) > 80  # would have been cut at 80
    # every cell in full, each on one line
    for cell in (
        "topk:0.1+q8:channel,stochastic+zstd:19/q4:stochastic",
        "98.77",
        "123,456.7",
        "654,321.9",
        "12.34",
        "44.6",
        "jetson-orin-nano",
        "lora-sf12-125khz",
        "no configuration within 1.0 points fits a 222-byte LoRa payload at batch 32 "
        "(smallest frame 4,321 B)",
        "hospital-a-ward-3-bedside-monitor",
        "123456",
        "3950592",
        "0.9877",
        "117.7 MiB",
        "941.9 MiB",
        "(12 s ago)",
    ):
        assert cell in text, f"{cell!r} not printed whole:\n{text}"
    # titles are not wrapped either
    assert "recommendations (device × link)" in text
    assert "runs/a-rather-long-output-directory-name/evaluate/results.json" in text
