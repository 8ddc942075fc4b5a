"""Credentials from files: per-client bearer tokens bound to roles, and TLS certificates.

Token file format (one client per line)::

    # name      token                      fields (optional)
    hospital-a  9kQ...long-random-string   role=train party=0
    kiosk       Zr1...another-one          role=infer
    ops         Hh7...a-third-one          role=admin
    pi-kitchen  Qe2...a-fourth-one

Grammar (whitespace separates fields; names, tokens and fields cannot contain whitespace)::

    line   = name token *( field )
    field  = "role=" role *( "," role )  |  "party=" digits
    role   = "train" | "infer" | "admin"

* ``name`` is the client's identity (1-64 letters, digits, ``._@-``); ``token`` is printable
  ASCII. The token position is fixed (second field), so a token may itself contain ``=``.
* ``role=train``: a training client: every session message except ``status`` (it may also
  predict). ``role=infer``: ``hello``, ``predict`` and ``bye`` only. ``role=admin``: the
  ``Status`` RPC and ``status`` messages. Roles combine: ``role=train,admin``.
* A line without ``role=`` is ``role=train``: the ``name token`` files written before roles
  existed keep working, and their clients keep training; they no longer read ``Status``.
* ``party=N`` (0 <= N < 1024) binds a vertical party index: the server fills ``meta.party`` with
  N on every request of that token and refuses a request claiming another party; a party bound
  to some token cannot be claimed by a token without ``party=``.

``#`` starts a comment line (only at the start of a line: a token may contain ``#``); blank lines
are ignored. A name or a token may appear only once: two clients sharing a token could
impersonate each other. Every error names the file and the line.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from edgesplit.errors import ConfigError
from edgesplit.wire.messages import Kind

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


class Role(str, Enum):
    """What a token may do on a server (``role=`` in a token file)."""

    TRAIN = "train"
    INFER = "infer"
    ADMIN = "admin"


#: Largest ``party=`` index a token file accepts (a vertical run has a handful of parties).
MAX_PARTY = 1023

# Session messages each role may send. Infer and admin are allow-lists; train is everything but
# what admin adds, so a request kind the engine adds later is not silently open to infer tokens.
_INFER_KINDS = frozenset({Kind.HELLO, Kind.PREDICT, Kind.BYE})
_ADMIN_KINDS = frozenset({Kind.STATUS})
_TRAIN_DEFAULT = frozenset({Role.TRAIN})


@dataclass(frozen=True)
class TokenGrant:
    """One token and what its holder may do.

    Attributes
    ----------
    token:
        The bearer token.
    roles:
        :class:`Role` values; a bare ``name token`` line is ``{Role.TRAIN}``.
    party:
        The vertical party index this token speaks for, or ``None`` (unbound).
    """

    token: str
    roles: frozenset[Role] = _TRAIN_DEFAULT
    party: int | None = None

    def __post_init__(self) -> None:
        if not self.roles:
            raise ConfigError("a token needs at least one role (train, infer or admin)")
        if self.party is not None and not 0 <= self.party <= MAX_PARTY:
            raise ConfigError(f"party must be an integer in 0..{MAX_PARTY}, got {self.party}")

    @property
    def role_text(self) -> str:
        """The roles as a token file writes them (``train,admin``)."""
        return ",".join(r.value for r in Role if r in self.roles)

    @property
    def may_read_status(self) -> bool:
        """True when the holder may call ``Status`` (and send ``status`` messages)."""
        return Role.ADMIN in self.roles

    def may_send(self, kind: str) -> bool:
        """True when the holder may send a session message of ``kind``."""
        if kind in _ADMIN_KINDS:
            return Role.ADMIN in self.roles
        if Role.TRAIN in self.roles:
            return True
        return Role.INFER in self.roles and kind in _INFER_KINDS

    def allowed_text(self) -> str:
        """One phrase naming what this token may send (for refusals)."""
        kinds: list[str] = []
        if Role.TRAIN in self.roles:
            kinds.append("every training and inference message")
        elif Role.INFER in self.roles:
            kinds.append(", ".join(sorted(_INFER_KINDS)))
        if Role.ADMIN in self.roles:
            kinds.append("status")
        return " and ".join(kinds)


def as_grant(value: str | TokenGrant) -> TokenGrant:
    """``value`` as a :class:`TokenGrant`; a plain token string is a bare line (``role=train``)."""
    return value if isinstance(value, TokenGrant) else TokenGrant(value)


def _parse_fields(fields: list[str], where: str, name: str) -> tuple[frozenset[Role], int | None]:
    roles: frozenset[Role] | None = None
    party: int | None = None
    seen: set[str] = set()
    allowed_roles = ", ".join(r.value for r in Role)
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep or key not in ("role", "party"):
            raise ConfigError(
                f"{where}: unknown field {item[:40]!r} for client {name!r}; after 'name token' "
                f"a line takes only role=ROLE[,ROLE] (ROLE one of {allowed_roles}) and party=N"
            )
        if key in seen:
            raise ConfigError(f"{where}: {key}= is given twice for client {name!r}")
        seen.add(key)
        if key == "role":
            words = value.split(",")
            bad = [w for w in words if w not in {r.value for r in Role}]
            if bad or not value:
                raise ConfigError(
                    f"{where}: role {value[:40]!r} of client {name!r} is not valid; use one or "
                    f"more of {allowed_roles}, separated by commas (e.g. role=train,admin)"
                )
            roles = frozenset(Role(w) for w in words)
        else:
            if not value.isdigit() or not value.isascii() or int(value) > MAX_PARTY:
                raise ConfigError(
                    f"{where}: party {value[:40]!r} of client {name!r} is not valid; use a "
                    f"party index 0..{MAX_PARTY} (party=0 for the first vertical party)"
                )
            party = int(value)
    roles = roles if roles is not None else _TRAIN_DEFAULT
    if party is not None and not roles & {Role.TRAIN, Role.INFER}:
        raise ConfigError(
            f"{where}: client {name!r} has party={party} but role {','.join(sorted(roles))}; "
            "a party index needs role train or infer (it binds session messages)"
        )
    return roles, party


def parse_tokens(text: str, *, source: str = "<tokens>") -> dict[str, TokenGrant]:
    """Parse token-file text (grammar in the module docstring) into ``{name: TokenGrant}``.

    Parameters
    ----------
    text:
        File contents.
    source:
        What to call the text in error messages (usually the file path).

    Raises
    ------
    ConfigError
        On a malformed line, a bad name, token, role or party, an unknown field, or a duplicate
        name or token; the message names ``source`` and the line number.
    """
    grants: dict[str, TokenGrant] = {}
    seen_tokens: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        fields = line.split()
        if len(fields) < 2:
            raise ConfigError(
                f"{where}: expected 'name token [role=ROLE] [party=N]' (fields separated by "
                f"spaces), got {len(fields)} field(s)"
            )
        name, token = fields[:2]
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"{where}: client name {name!r} must be 1-64 characters of letters, digits, "
                "'.', '_', '@' or '-', starting with a letter or digit"
            )
        check_token(token, where=f"{where}: token of {name!r}")
        roles, party = _parse_fields(fields[2:], where, name)
        if name in grants:
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
                "generate_token() for real deployments",
                where,
                name,
                len(token),
            )
        grants[name] = TokenGrant(token, roles, party)
        seen_tokens[token] = name
    return grants


def read_token_file(path: PathLike) -> dict[str, TokenGrant]:
    """Read a token file into ``{name: TokenGrant}`` (format in the module docstring).

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
    grants = parse_tokens(text, source=str(p))
    if not grants:
        raise ConfigError(f"token file {p} lists no clients (expected 'name token' lines)")
    return grants


#: What a server takes as its token table: name -> grant, or name -> bare token (role=train).
TokenMap = Mapping[str, str | TokenGrant]


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
            raise ConfigError(
                "server_name and system_roots are client TLS settings; a server "
                "takes cert, key and (for mutual TLS) ca"
            )
        files = load_tls(self.cert, self.key, self.ca, role=role)
        return files if files.enabled or self.system_roots else None
