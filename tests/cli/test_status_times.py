"""``edgesplit status`` prints timestamps as ISO-8601 UTC, not as "1.7e+09"."""

from __future__ import annotations

import pytest

from edgesplit.cli.status import print_status, timestamp

T = 1_700_000_000.0   # 2023-11-14T22:13:20Z, a well-known Unix time


def test_timestamp_is_iso8601_utc_with_its_age() -> None:
    assert timestamp(T, now=T + 12.4) == "2023-11-14T22:13:20Z (12 s ago)"
    assert timestamp(T + 86_400 + 3_661, now=T) == "2023-11-15T23:14:21Z (0 s ago)"
    assert timestamp(0, now=T) == "never"


def test_status_tables_show_probe_time_and_last_seen_as_iso(
        capsys: pytest.CaptureFixture[str]) -> None:
    status = {
        "config": "vanilla",
        "clients": {"edge": {"steps": 3, "last_seen": T - 5}},
        "last_probe": {"time": T - 60, "client": "edge", "step": 2},
    }
    print_status(status, "h:1", now=T)
    out = capsys.readouterr().out
    assert "2023-11-14T22:12:20Z (60 s ago)" in out   # the probe's time
    assert "2023-11-14T22:13:15Z (5 s ago)" in out    # the client's last_seen
    assert "e+09" not in out and "1700000000" not in out
