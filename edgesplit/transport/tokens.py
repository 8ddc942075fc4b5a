"""Credentials from files: per-client bearer tokens and TLS certificates.

Token file format (one client per line)::

    # name   token
    hospital-a  9kQ...long-random-string
    pi-kitchen  Zr1...another-one

``#`` starts a comment line; blank lines are ignored. Names and tokens cannot contain
whitespace. A name or a token may appear only once: two clients sharing a token could
impersonate each other. Every error names the file and the line.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from edgesplit.errors import ConfigError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Names show up in logs, status tables and metric files: keep them boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
# Tokens go into an HTTP/2 header value: printable ASCII without spaces.
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
#: Tokens shorter than this are accepted (tests, demos) but logged as weak.
MIN_STRONG_TOKEN_CHARS = 16


def generate_token(nbytes: int = 32) -> str:
    """A new random token (``nbytes`` of entropy) for a token file.

    Hex, not URL-safe base64: a base64 token can start with ``-``, which a command line then
    reads as an option (``--token -x…`` fails to parse).
    """
    return secrets.token_hex(nbytes)


def check_token(token: str, *, where: str = "token") -> str:
    """Return ``token`` if it can travel in an ``authorization`` header, else raise.

    Raises
    ------
    ConfigError
        If the token is empty or holds whitespace or non-ASCII characters.
    """
    if not token or not _TOKEN_RE.match(token):
        raise ConfigError(
            f"{where} must be non-empty printable ASCII without spaces "
            f"(got {len(token)} characters)"
        )
    return token


def parse_tokens(text: str, *, source: str = "<tokens>") -> dict[str, str]:
    """Parse token-file text into ``{name: token}``.

    Parameters
    ----------
    text:
        File contents.
    source:
        What to call the text in error messages (usually the file path).

    Raises
    ------
    ConfigError
        On a malformed line, a bad name or token, or a duplicate name or token; the message
        names ``source`` and the line number.
    """
    tokens: dict[str, str] = {}
    seen_tokens: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(
                f"{where}: expected 'name token' (two fields separated by spaces), "
                f"got {len(fields)} field(s)"
            )
        name, token = fields
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"{where}: client name {name!r} must be 1-64 characters of letters, digits, "
                "'.', '_', '@' or '-', starting with a letter or digit"
            )
        check_token(token, where=f"{where}: token of {name!r}")
        if name in tokens:
            raise ConfigError(f"{where}: client {name!r} is listed twice")
        if token in seen_tokens:
            # Never echo the token itself: error messages end up in logs.
            raise ConfigError(
                f"{where}: client {name!r} has the same token as {seen_tokens[token]!r}; "
                "every client needs its own token"
            )
        if len(token) < MIN_STRONG_TOKEN_CHARS:
            log.warning(
                "%s: token of %r is only %d characters; use edgesplit.transport.tokens."
                "generate_token() for real deployments", where, name, len(token)
            )
        tokens[name] = token
        seen_tokens[token] = name
    return tokens


def read_token_file(path: PathLike) -> dict[str, str]:
    """Read a token file into ``{name: token}`` (format in the module docstring).

    Raises
    ------
    ConfigError
        If the file is missing, unreadable, empty of entries or malformed.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"token file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read token file {p}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users; consider chmod 600", p)
    tokens = parse_tokens(text, source=str(p))
    if not tokens:
        raise ConfigError(f"token file {p} lists no clients (expected 'name token' lines)")
    return tokens


@dataclass(frozen=True)
class TlsFiles:
    """PEM contents for TLS: ``cert``/``key`` are our own identity, ``ca`` verifies the peer."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.cert, self.key, self.ca))


def read_pem(path: PathLike, what: str) -> bytes:
    """Read a PEM file; ``what`` ("TLS certificate", ...) names it in errors.

    Raises
    ------
    ConfigError
        If the file is missing, unreadable, or holds no PEM block.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {p}: {exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} file {p} is not PEM (no '-----BEGIN' line)")
    return data


def load_tls(
    cert: PathLike | None = None,
    key: PathLike | None = None,
    ca: PathLike | None = None,
    *,
    role: str,
) -> TlsFiles:
    """Load TLS files and check they make sense together for ``role`` ("server" or "client").

    A server needs ``cert`` and ``key`` for TLS; adding ``ca`` makes it require client
    certificates signed by that CA (mTLS). A client needs ``ca`` (or the system roots) to verify
    the server; ``cert`` and ``key`` together give it an identity for mTLS.

    Raises
    ------
    ConfigError
        If a file is missing or not PEM, ``cert`` comes without ``key`` (or the other way), or
        a server is given a CA without its own certificate.
    """
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', got {role!r}")
    if (cert is None) != (key is None):
        have, missing = ("certificate", "key") if key is None else ("key", "certificate")
        raise ConfigError(
            f"TLS {role} {have} given without its {missing}: pass both --tls-cert and --tls-key"
        )
    if role == "server" and ca is not None and cert is None:
        raise ConfigError(
            "a server TLS CA (--tls-ca, for client certificates) needs the server's own "
            "--tls-cert and --tls-key"
        )
    return TlsFiles(
        cert=read_pem(cert, f"TLS {role} certificate") if cert is not None else None,
        key=read_pem(key, f"TLS {role} private key") if key is not None else None,
        ca=read_pem(ca, "TLS CA certificate") if ca is not None else None,
    )


@dataclass(frozen=True)
class TlsConfig:
    """The TLS settings of one endpoint, as paths: what ``--tls-*`` options give.

    One object for the three users: :class:`~edgesplit.transport.grpc_client.GrpcTransport`,
    :func:`~edgesplit.transport.grpc_client.fetch_status` (``role="client"``) and
    :func:`~edgesplit.transport.grpc_server.serve_handler` (``role="server"``).

    Attributes
    ----------
    ca:
        Client: the CA that signed the server's certificate (turns TLS on). Server: the CA
        client certificates must chain to (turns mutual TLS on).
    cert, key:
        This endpoint's own certificate and key, both or neither. A server needs them for TLS;
        a client gives them to servers that require mutual TLS.
    server_name:
        Client only: the name the server's certificate must carry when it differs from the
        dialled host (an IP address, a tunnel).
    system_roots:
        Client only: TLS verified by the system's root certificates when no ``ca`` is given.
    """

    ca: PathLike | None = None
    cert: PathLike | None = None
    key: PathLike | None = None
    server_name: str | None = None
    system_roots: bool = False

    def load(self, role: str) -> TlsFiles | None:
        """Read and check the files for ``role`` ("client" or "server"); None when TLS is off.

        Raises
        ------
        ConfigError
            A file is missing or not PEM, ``cert`` comes without ``key`` (or the other way),
            a server gets a CA without its own certificate, or client-only settings are given
            to a server.
        """
        if role == "server" and (self.server_name is not None or self.system_roots):
            raise ConfigError("server_name and system_roots are client TLS settings; a server "
                              "takes cert, key and (for mutual TLS) ca")
        files = load_tls(self.cert, self.key, self.ca, role=role)
        return files if files.enabled or self.system_roots else None
