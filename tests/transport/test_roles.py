"""Tokens bound to roles (issue 9, defect 4): a token file line says what its holder may do, and
the servicer enforces it on a real gRPC server before the handler sees anything."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgesplit.errors import ConfigError, TransportError
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy, fetch_status
from edgesplit.transport.grpc_server import RunningServer, serve_handler
from edgesplit.transport.tokens import MAX_PARTY, Role, TokenGrant, parse_tokens, read_token_file
from edgesplit.wire.messages import Kind, Message

TOK = {
    "hospital-a": "tok-hospital-a-0123456789",
    "lab-b": "tok-lab-b-0123456789abcd",
    "kiosk": "tok-kiosk-0123456789abcd",
    "ops": "tok-ops-0123456789abcdef",
    "legacy": "tok-legacy-0123456789abc",
    "free": "tok-free-0123456789abcde",
}
TOKEN_FILE = f"""\
# name      token                       fields
hospital-a  {TOK["hospital-a"]}  role=train party=0
lab-b       {TOK["lab-b"]}  party=1
kiosk       {TOK["kiosk"]}  role=infer
ops         {TOK["ops"]}  role=admin
legacy      {TOK["legacy"]}
free        {TOK["free"]}  role=train,admin
"""
NO_RETRY = RetryPolicy(attempts=0)


class Recorder:
    """A handler that answers ACK and keeps what it was given (kind, client, meta)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, object]]] = []
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> Message:
        with self._lock:
            self.seen.append((message.kind, message.client, dict(message.meta)))
        return Message(
            Kind.ACK,
            message.session,
            message.client,
            message.step,
            {},
            {"party": message.meta.get("party")},
        )

    def kinds(self, client: str) -> list[str]:
        with self._lock:
            return [kind for kind, who, _ in self.seen if who == client]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RunningServer, Recorder]]:
    path = tmp_path / "tokens.txt"
    path.write_text(TOKEN_FILE)
    path.chmod(0o600)
    handler = Recorder()
    srv = serve_handler(
        handler, "127.0.0.1", 0, tokens=read_token_file(path), status=lambda: {"alive": True}
    )
    yield srv, handler
    srv.stop(None)


def connect(srv: RunningServer, name: str) -> GrpcTransport:
    return GrpcTransport(srv.address, TOK[name], retry=NO_RETRY, timeout=10)


def msg(kind: str, step: int, **meta: object) -> Message:
    return Message(kind, "s", "", step, {}, dict(meta))


# -- the token file ---------------------------------------------------------------------------


def test_token_file_grammar() -> None:
    grants = parse_tokens(TOKEN_FILE)
    assert grants["hospital-a"] == TokenGrant(TOK["hospital-a"], frozenset({Role.TRAIN}), 0)
    assert grants["lab-b"] == TokenGrant(TOK["lab-b"], frozenset({Role.TRAIN}), 1)
    assert grants["kiosk"].roles == {Role.INFER} and grants["kiosk"].party is None
    assert grants["ops"].roles == {Role.ADMIN}
    assert grants["legacy"] == TokenGrant(TOK["legacy"])  # a bare line trains
    assert grants["free"].roles == {Role.TRAIN, Role.ADMIN}
    # the token keeps its fixed position, so it may itself contain '='
    assert (
        parse_tokens("a abc=def=ghi-0123456789 role=infer")["a"].token == "abc=def=ghi-0123456789"
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ("rol=train", "unknown field 'rol=train'"),
        ("admin", "unknown field 'admin'"),
        (
            "role=trainer",
            "role 'trainer' of client 'a' is not valid; use one or more of train, infer, admin",
        ),
        ("role=", "role '' of client 'a' is not valid"),
        ("role=train,,admin", "is not valid"),
        ("party=-1", f"party '-1' of client 'a' is not valid; use a party index 0..{MAX_PARTY}"),
        ("party=1.0", "party '1.0'"),
        (f"party={MAX_PARTY + 1}", f"party '{MAX_PARTY + 1}'"),
        ("party=٣", "party '٣'"),  # a Unicode digit is not a party index
        ("role=train role=infer", "role= is given twice"),
        ("role=admin party=0", "a party index needs role train or infer"),
    ],
)
def test_bad_fields_name_the_line_and_the_allowed_values(fields: str, words: str) -> None:
    text = f"# ok\nok tok-ok-0123456789abcd\na tok-a-0123456789abcdef {fields}\n"
    with pytest.raises(ConfigError) as info:
        parse_tokens(text, source="tokens.txt")
    assert "tokens.txt:3:" in str(info.value)
    assert words in str(info.value)
    assert "tok-a-0123456789abcdef" not in str(info.value)


def test_unknown_field_lists_what_is_allowed() -> None:
    with pytest.raises(
        ConfigError,
        match=r"only role=ROLE\[,ROLE\] \(ROLE one of train, infer, "
        r"admin\) and party=N",
    ):
        parse_tokens("a tok-a-0123456789abcdef run=3\n")


# -- roles over a real server -----------------------------------------------------------------


def test_infer_token_predicts_but_never_trains(served: tuple[RunningServer, Recorder]) -> None:
    srv, handler = served
    with connect(srv, "kiosk") as t:
        for step, kind in enumerate((Kind.HELLO, Kind.PREDICT, Kind.BYE)):
            assert t.request(msg(kind, step)).kind == Kind.ACK
    for kind in (Kind.FORWARD, Kind.MIDDLE_GRAD, Kind.WEIGHTS, Kind.STATUS, "made-up"):
        with connect(srv, "kiosk") as t, pytest.raises(TransportError) as info:
            t.request(msg(kind, 7))
        text = str(info.value)
        assert "PERMISSION_DENIED" in text and "role infer" in text, text
        assert "may send bye, hello, predict" in text and repr(kind) in text, text
    # the handler saw only what the role allows
    assert handler.kinds("kiosk") == [Kind.HELLO, Kind.PREDICT, Kind.BYE]


def test_training_tokens_train_and_read_no_status(served: tuple[RunningServer, Recorder]) -> None:
    srv, handler = served
    for name in ("legacy", "hospital-a"):
        with connect(srv, name) as t:
            for step, kind in enumerate((Kind.HELLO, Kind.FORWARD, Kind.WEIGHTS, Kind.PREDICT)):
                assert t.request(msg(kind, step)).kind == Kind.ACK
            with pytest.raises(TransportError, match="PERMISSION_DENIED.*role train.*not 'status'"):
                t.request(msg(Kind.STATUS, 9))
        with pytest.raises(TransportError, match="PERMISSION_DENIED.*Status needs role admin"):
            fetch_status(srv.address, TOK[name])
        assert Kind.STATUS not in handler.kinds(name)


def test_status_needs_admin(served: tuple[RunningServer, Recorder]) -> None:
    srv, handler = served
    assert fetch_status(srv.address, TOK["ops"]) == {"alive": True}
    assert fetch_status(srv.address, TOK["free"]) == {"alive": True}
    with pytest.raises(TransportError, match="role infer; Status needs role admin"):
        fetch_status(srv.address, TOK["kiosk"])
    with connect(srv, "ops") as t:
        assert t.request(msg(Kind.STATUS, 1)).kind == Kind.ACK  # a status message too
    with connect(srv, "ops") as t, pytest.raises(TransportError, match="role admin.*not 'forward'"):
        t.request(msg(Kind.FORWARD, 2))  # an operator's token cannot train
    with connect(srv, "free") as t:  # train,admin does both
        assert t.request(msg(Kind.FORWARD, 1)).kind == Kind.ACK
        assert t.request(msg(Kind.STATUS, 2)).kind == Kind.ACK
    assert handler.kinds("ops") == [Kind.STATUS]


def test_a_party_bound_token_speaks_only_for_its_party(
    served: tuple[RunningServer, Recorder],
) -> None:
    srv, handler = served
    with connect(srv, "hospital-a") as t:
        # no party in meta: the server fills in the token's
        assert t.request(msg(Kind.FORWARD, 1)).meta["party"] == 0
        assert t.request(msg(Kind.FORWARD, 2, party=0)).meta["party"] == 0
    for claim in (1, "0", 0.0, True):
        with connect(srv, "hospital-a") as t, pytest.raises(TransportError) as info:
            t.request(msg(Kind.FORWARD, 3, party=claim))
        assert "PERMISSION_DENIED" in str(info.value)
        assert "bound to party 0" in str(info.value)
    assert [m["party"] for k, c, m in handler.seen if c == "hospital-a"] == [0, 0]


def test_a_bound_party_cannot_be_claimed_by_an_unbound_token(
    served: tuple[RunningServer, Recorder],
) -> None:
    srv, handler = served
    for claim in (0, 1, 1.0, "1", True):
        with connect(srv, "legacy") as t, pytest.raises(TransportError) as info:
            t.request(msg(Kind.FORWARD, 1, party=claim))
        assert "PERMISSION_DENIED" in str(info.value), claim
    with connect(srv, "legacy") as t:
        # a party nobody is bound to, and no party at all, still pass (unbound tokens)
        assert t.request(msg(Kind.FORWARD, 1, party=2)).meta["party"] == 2
        assert t.request(msg(Kind.FORWARD, 2)).meta["party"] is None
    assert [m.get("party") for k, c, m in handler.seen if c == "legacy"] == [2, None]


def test_a_refused_client_does_not_disturb_the_others(
    served: tuple[RunningServer, Recorder],
) -> None:
    srv, _ = served
    with connect(srv, "lab-b") as good:
        assert good.request(msg(Kind.FORWARD, 1)).meta["party"] == 1
        with connect(srv, "kiosk") as bad, pytest.raises(TransportError):
            bad.request(msg(Kind.FORWARD, 1))
        assert good.request(msg(Kind.FORWARD, 2)).meta["party"] == 1


def test_grants_and_bare_tokens_mix_in_serve_handler() -> None:
    handler = Recorder()
    tokens = {
        "a": "tok-a-0123456789abcdef",
        "b": TokenGrant("tok-b-0123456789abcdef", frozenset({Role.INFER})),
    }
    srv = serve_handler(handler, "127.0.0.1", 0, tokens=tokens)
    try:
        with GrpcTransport(srv.address, "tok-a-0123456789abcdef", retry=NO_RETRY) as t:
            assert t.request(msg(Kind.FORWARD, 1)).kind == Kind.ACK
        with (
            GrpcTransport(srv.address, "tok-b-0123456789abcdef", retry=NO_RETRY) as t,
            pytest.raises(TransportError, match="role infer"),
        ):
            t.request(msg(Kind.FORWARD, 1))
    finally:
        srv.stop(None)


def test_without_tokens_there_are_no_roles() -> None:
    srv = serve_handler(Recorder(), "127.0.0.1", 0, status=lambda: {"open": True})
    try:
        assert fetch_status(srv.address, None) == {"open": True}
        with GrpcTransport(srv.address, None, retry=NO_RETRY) as t:
            assert t.request(msg(Kind.STATUS, 1)).kind == Kind.ACK
            assert t.request(msg(Kind.FORWARD, 2, party=1)).meta["party"] == 1
    finally:
        srv.stop(None)
