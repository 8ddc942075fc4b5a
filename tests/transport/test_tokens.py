"""Token files and TLS file loading: good input parses, bad input names the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesplit.errors import ConfigError
from edgesplit.transport.grpc_server import TokenTable
from edgesplit.transport.tokens import (
    Role,
    TokenGrant,
    check_token,
    generate_token,
    load_tls,
    parse_tokens,
    read_pem,
    read_token_file,
)

GOOD = """\
# edgesplit clients
hospital-a   aaaaaaaaaaaaaaaaaaaaaaaa

  # indented comment
pi.kitchen\tbbbbbbbbbbbbbbbbbbbbbbbb
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tokens.txt"
    p.write_text(text)
    p.chmod(0o600)
    return p


def test_read_good_file(tmp_path: Path) -> None:
    tokens = read_token_file(write(tmp_path, GOOD))
    # bare 'name token' lines: training clients, as before roles existed
    assert tokens == {"hospital-a": TokenGrant("a" * 24), "pi.kitchen": TokenGrant("b" * 24)}
    assert all(g.roles == {Role.TRAIN} and g.party is None for g in tokens.values())


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a aaaaaaaaaaaaaaaaaaaa\nlonely\n", 2, "got 1 field"),
        ("a aaaaaaaaaaaaaaaaaaaa extra\n", 1, "unknown field 'extra'"),
        ("# c\na aaaaaaaaaaaaaaaaaaaa\na bbbbbbbbbbbbbbbbbbbbbbbb\n", 3, "listed twice"),
        ("a aaaaaaaaaaaaaaaaaaaa\nb aaaaaaaaaaaaaaaaaaaa\n", 2, "same token as 'a'"),
        ("bad/name aaaaaaaaaaaaaaaaaaaa\n", 1, "client name 'bad/name'"),
        ("a tokén-with-accent-aaaaaaa\n", 1, "printable ASCII"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_token_file(path)
    assert f"{path}:{line}:" in str(info.value)
    assert words in str(info.value)


def test_error_never_echoes_a_token(tmp_path: Path) -> None:
    secret = "s3cret-s3cret-s3cret"
    with pytest.raises(ConfigError) as info:
        read_token_file(write(tmp_path, f"a {secret}\nb {secret}\n"))
    assert secret not in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_token_file(tmp_path / "absent.txt")
    with pytest.raises(ConfigError, match="lists no clients"):
        read_token_file(write(tmp_path, "# nothing here\n\n"))


def test_weak_and_world_readable_are_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = write(tmp_path, "a short\n")
    p.chmod(0o644)
    assert read_token_file(p) == {"a": TokenGrant("short")}
    assert "only 5 characters" in caplog.text and "chmod 600" in caplog.text


def test_generate_token_is_valid_and_unique() -> None:
    a, b = generate_token(), generate_token()
    assert a != b and len(a) >= 32
    assert check_token(a) == a
    assert parse_tokens(f"x {a}\ny {b}\n") == {"x": TokenGrant(a), "y": TokenGrant(b)}


def test_interceptor_refuses_shared_or_empty_tables() -> None:
    with pytest.raises(ConfigError, match="share a token"):
        TokenTable({"a": "same-token-123", "b": "same-token-123"})
    with pytest.raises(ConfigError, match="at least one"):
        TokenTable({})
    auth = TokenTable({"a": "token-of-a-12345", "b": "token-of-b-12345"})
    assert auth.client_for("token-of-b-12345") == "b"
    assert auth.client_for("token-of-b-1234") is None
    assert auth.client_for(None) is None


def test_pem_loading(tmp_path: Path) -> None:
    pem = tmp_path / "c.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert read_pem(pem, "TLS certificate").startswith(b"-----BEGIN")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match=r"junk\.pem is not PEM"):
        read_pem(junk, "TLS certificate")
    with pytest.raises(ConfigError, match="TLS CA certificate file .*absent.pem does not exist"):
        load_tls(ca=tmp_path / "absent.pem", role="client")
    with pytest.raises(ConfigError, match="without its certificate"):
        load_tls(key=pem, role="client")
    with pytest.raises(ConfigError, match="needs the server's own"):
        load_tls(ca=pem, role="server")
    files = load_tls(pem, pem, pem, role="server")
    assert files.enabled and files.ca is not None
    assert not load_tls(role="client").enabled
