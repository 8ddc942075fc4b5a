"""TLS through the command line: ``serve --tls-cert/--tls-key/--tls-ca`` (mutual TLS) with
``client`` and ``status`` dialling it with ``--tls-*``, as real processes on loopback, with
certificates made in the test (the ``pki`` fixture of tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netutil import ENV, ROOT, Server, client, finish, write_tokens

from edgesplit.cli.main import main

TOKEN_NAME = "ward-7"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls-export") / "bundle"
    # untrained: this test is about the connection, not the accuracy
    assert main(["export", "--untrained", "--data", "digits", "--out", str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def served(bundle: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Server, str]]:
    token_file = tmp_path_factory.mktemp("tls-tokens") / "tokens.txt"
    tokens = write_tokens(token_file, [TOKEN_NAME])
    with Server("--from", f"{bundle}.server", "--tokens", str(token_file),
                "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                "--tls-ca", str(pki / "ca.pem")) as server:
        yield server, tokens[TOKEN_NAME]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesplit.cli.main", *args],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_client_and_status_over_mutual_tls(served: tuple[Server, str], bundle: Path,
                                           pki: Path) -> None:
    server, token = served
    tls = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
           "--tls-key", str(pki / "client.key")]
    report = finish(client("--bundle", str(bundle), "--server", server.address, "--data",
                           "digits", "--mode", "infer", "--limit", "40", "--token", token,
                           "--json", *tls), timeout=180)
    assert report["server"] == server.address
    assert report["samples"] == 40, report
    status = _cli("status", server.address, "--token", token, "--json", *tls)
    assert status.returncode == 0, status.stderr
    assert TOKEN_NAME in json.loads(status.stdout)["clients"]


def test_client_without_a_certificate_is_refused_in_one_line(
        served: tuple[Server, str], bundle: Path, pki: Path) -> None:
    server, token = served
    proc = _cli("client", "--bundle", str(bundle), "--server", server.address, "--data",
                "digits", "--limit", "8", "--token", token, "--retries", "0", "--timeout", "10",
                "--tls-ca", str(pki / "ca.pem"))
    assert "--tls-cert" in _one_line(proc)


def test_status_without_tls_is_refused_in_one_line(served: tuple[Server, str]) -> None:
    server, token = served
    assert "--tls-ca" in _one_line(_cli("status", server.address, "--token", token,
                                        "--timeout", "10"))


def test_status_with_an_untrusted_ca_is_refused_in_one_line(served: tuple[Server, str],
                                                            pki: Path) -> None:
    server, token = served
    line = _one_line(_cli("status", server.address, "--token", token, "--timeout", "10",
                          "--tls-ca", str(pki / "other-ca.pem"), "--tls-cert",
                          str(pki / "client.pem"), "--tls-key", str(pki / "client.key")))
    assert "TLS handshake with" in line and "check --tls-ca" in line, line


def test_serve_refuses_bad_tls_files_before_building_the_server(
        pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["serve", "--data", "digits", "--no-auth", "--port", "0",
               "--tls-cert", str(pki / "server.pem"), "--tls-key", str(tmp_path / "nope.key")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("edgesplit serve: error: TLS server private key file")
    assert "does not exist" in err[0]
