"""``edgesplit serve --max-record-mib / --max-records-total-mib``: what the server keeps for its
clients (replies to resend, pending forwards), per client and in total."""

from __future__ import annotations

import pytest
from netutil import Server, write_tokens

from edgesplit.cli.main import build_parser, main
from edgesplit.cli.serve import DEFAULT_RECORDS
from edgesplit.train.server_records import RecordLimits
from edgesplit.transport.grpc_client import fetch_status


def _serve_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["serve"].format_help()


def test_defaults_are_record_limits_and_the_help_says_them():
    assert DEFAULT_RECORDS.client_bytes == RecordLimits().client_bytes
    assert DEFAULT_RECORDS.total_bytes == RecordLimits().total_bytes
    text = " ".join(_serve_help().split())
    assert "--max-record-mib MIB" in text and "(default: 128," in text
    assert "--max-records-total-mib MIB" in text and "(default: 1024)" in text


@pytest.mark.parametrize(("args", "expected"), [
    (["--max-record-mib", "0"], "--max-record-mib must be at least 1, got 0"),
    (["--max-records-total-mib", "0"], "--max-records-total-mib must be at least 1, got 0"),
    (["--max-record-mib", "2048"], "--max-record-mib 2048 is more than "
                                   "--max-records-total-mib 1024"),
])
def test_bad_record_limits_are_one_line(args, expected, capsys):
    rc = main(["serve", "--data", "digits", "--no-auth", "--port", "0", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("edgesplit serve: error: ") and expected in err[0]


def test_the_flags_set_the_servers_record_budget(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.txt", ["ops"])
    with Server("--tokens", str(tmp_path / "tokens.txt"), "--max-record-mib", "3",
                "--max-records-total-mib", "5") as server:
        records = fetch_status(server.address, tokens["ops"])["records"]
    assert records["client_bytes_limit"] == 3 << 20
    assert records["total_bytes_limit"] == 5 << 20
