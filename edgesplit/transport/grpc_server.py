"""gRPC server side: serve a protocol :data:`~edgesplit.transport.base.Handler` over the network.

Each client session is one bidirectional ``Session`` stream. Every request envelope becomes a
:class:`~edgesplit.wire.messages.Message`, goes through the handler, and its reply goes back on
the same stream, in order. The transport does no deduplication: answering a repeated step from
record is the engine's job.

The server is ``grpc.aio``: an open session is a coroutine waiting for its next request, not a
thread. Only a request being handled takes a thread, from a compute pool of ``max_workers``
(the handler is blocking torch code). So idle streams cost a little memory, not a worker, and
``Status`` runs on its own small pool: no number of open sessions can starve it. What one client
may hold is capped: at most ``max_streams_per_client`` open sessions per token, a stream that
sends nothing for ``idle_timeout`` seconds is closed (``UNAVAILABLE``, which clients treat as
"reconnect"), and ``max_sessions`` open sessions in total.

Authentication is a per-client bearer token checked before any request is read. The token
decides who the client is: the servicer overwrites ``message.client`` with the token's name, so
a client cannot speak for another. It also decides what the client may do
(:class:`~edgesplit.transport.tokens.TokenGrant`): each request's kind is checked against the
token's role and its ``meta.party`` against the token's party before the handler sees it, and
``Status`` needs an admin token; a refusal ends the stream with ``PERMISSION_DENIED``.

An envelope over ``max_message_bytes`` arrives and leaves as chunks
(:func:`~edgesplit.transport.envelope.split_envelope`); what half-received chunks may hold is
bounded per token and in total. When a stream ends, however it ends, ``on_stream_closed`` is
told each (client, session) it carried, so the engine can release that session's memory.

Failure isolation: an envelope that does not parse, breaks an :class:`EnvelopeLimits` limit,
carries non-finite meta or chunks that do not join, and a handler reply
``ERROR{code: INVALID_ARGUMENT}``, end *that* stream with status ``INVALID_ARGUMENT``; an
exception escaping the handler ends it with ``INTERNAL`` (and is logged). Other streams keep
running.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio

from edgesplit.errors import ConfigError, ProtocolError, TransportError
from edgesplit.transport import split_pb2
from edgesplit.transport.base import Handler
from edgesplit.transport.envelope import (
    ChunkAssembler,
    EnvelopeLimits,
    EnvelopeTooLarge,
    StreamIds,
    envelope_to_message,
    message_to_envelope,
    parse_envelope,
    split_envelope,
)
from edgesplit.transport.tokens import (
    TlsConfig,
    TlsFiles,
    TokenGrant,
    TokenMap,
    as_grant,
    check_token,
)
from edgesplit.wire.messages import Kind, Message

log = logging.getLogger(__name__)

#: Default limit on one serialized envelope, both directions (gRPC's own default is 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Full method name of the Session stream (both ends move raw envelope bytes on it).
SESSION_METHOD = "/edgesplit.v1.Split/Session"
#: Metadata key carrying ``Bearer <token>`` (gRPC metadata keys are lower case).
AUTH_METADATA_KEY = "authorization"
#: Text clients recognise as "the server is full, try again later" (grpc's own wording).
CONCURRENCY_LIMIT_TEXT = "Concurrent RPC limit exceeded"
_SERVICE = "edgesplit.v1.Split"

# Server pings an idle client every 60 s and drops it after 20 s without an answer, so half-open
# connections (a device that lost power) are noticed. Clients may ping every 10 s without data;
# their own keepalive (30 s) stays well above that so they never get a GOAWAY.
_SERVER_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]
# grpc binds with SO_REUSEPORT by default: a second server on a busy port would then bind too and
# share its connections. Off, a busy port is an error.
_NO_REUSEPORT = ("grpc.so_reuseport", 0)

T = TypeVar("T")


@dataclass(frozen=True)
class SessionLimits:
    """What clients may hold open on one server.

    Parameters
    ----------
    max_sessions:
        Open ``Session`` streams, all clients together.
    max_streams_per_client:
        Open ``Session`` streams per token (a shipped client opens one).
    idle_timeout:
        Seconds a stream may wait for its client's next request before the server closes it.
    envelope:
        Per-request limits (meta bytes, tensors, name lengths, joined envelope bytes).
    max_assembly_bytes:
        Bytes of partly received chunked requests all streams together may hold; a chunk
        beyond it ends its stream with ``RESOURCE_EXHAUSTED`` "Concurrent RPC limit exceeded"
        (clients retry with backoff).
    max_assembly_bytes_per_client:
        The same, for the streams of one token; ``None``: ``envelope.max_envelope_bytes``, one
        largest request at a time, so one token cannot take the whole shared budget.
    """

    max_sessions: int = 1024
    max_streams_per_client: int = 8
    idle_timeout: float = 300.0
    envelope: EnvelopeLimits = field(default_factory=EnvelopeLimits)
    max_assembly_bytes: int = 1024 * 1024 * 1024
    max_assembly_bytes_per_client: int | None = None

    def __post_init__(self) -> None:
        if self.max_sessions <= 0 or self.max_streams_per_client <= 0:
            raise ConfigError(
                "max_sessions and max_streams_per_client must be positive, got "
                f"{self.max_sessions} and {self.max_streams_per_client}"
            )
        per_client = self.max_assembly_bytes_per_client
        if self.max_assembly_bytes <= 0 or (per_client is not None and per_client <= 0):
            raise ConfigError(
                "max_assembly_bytes and max_assembly_bytes_per_client must be positive, got "
                f"{self.max_assembly_bytes} and {per_client}"
            )
        if not self.idle_timeout > 0:
            raise ConfigError(f"idle_timeout must be positive seconds, got {self.idle_timeout}")

    @property
    def client_assembly_bytes(self) -> int:
        """What one token's half-received chunked requests may hold (the resolved default)."""
        if self.max_assembly_bytes_per_client is not None:
            return self.max_assembly_bytes_per_client
        return self.envelope.max_envelope_bytes


def _bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class TokenTable:
    """Who a bearer token belongs to and what it may do (checked on every call).

    Parameters
    ----------
    tokens:
        Client name -> :class:`~edgesplit.transport.tokens.TokenGrant`, or -> a bare token
        string (a training client, as a ``name token`` line). Tokens must be unique (else two
        clients could not be told apart).
    """

    def __init__(self, tokens: TokenMap) -> None:
        if not tokens:
            raise ConfigError("token authentication needs at least one 'name token' entry")
        owners: dict[str, str] = {}
        self._grants: dict[str, TokenGrant] = {}
        for name, value in tokens.items():
            grant = as_grant(value)
            check_token(grant.token, where=f"token of client {name!r}")
            if grant.token in owners:
                raise ConfigError(
                    f"clients {owners[grant.token]!r} and {name!r} share a token; "
                    "every client needs its own"
                )
            owners[grant.token] = name
            self._grants[name] = grant
        self._tokens = [(token.encode(), name) for token, name in owners.items()]
        #: Party indices some token is bound to: no other token may claim them.
        self.bound_parties = frozenset(
            g.party for g in self._grants.values() if g.party is not None
        )

    def grant(self, client: str) -> TokenGrant:
        """What ``client`` (a name from :meth:`client_for`) may do."""
        return self._grants[client]

    def client_for(self, token: str | None) -> str | None:
        """The client name that owns ``token``, or ``None``."""
        if token is None:
            return None
        presented = token.encode("utf-8", "replace")
        found = None
        # Compare against every entry in constant time so the reply timing does not reveal how
        # much of a guessed token was right.
        for known, name in self._tokens:
            if hmac.compare_digest(presented, known):
                found = name
        return found

    def authenticate(self, metadata: Any) -> tuple[str | None, str | None]:
        """(client name, None) for a good ``authorization`` header, else (None, why not)."""
        token = _bearer_token(metadata)
        if token is None:
            return None, "missing bearer token: send metadata 'authorization: Bearer <token>'"
        client = self.client_for(token)
        if client is None:
            return None, "unknown bearer token"
        return client, None

    def refusal(self, client: str, message: Message) -> str | None:
        """Why ``client`` may not send ``message``, or ``None``; fills in a bound party.

        Checked before the handler sees the message: the role must allow its kind, and a token
        bound to a party speaks only for that party (``meta.party`` is set to it when absent).
        A party bound to some token cannot be claimed by a token bound to none.
        """
        grant = self._grants[client]
        if not grant.may_send(message.kind):
            return (
                f"token of client {client!r} has role {grant.role_text}: it may send "
                f"{grant.allowed_text()}, not {message.kind[:40]!r} (roles are set in the "
                "server's token file)"
            )
        claimed = message.meta.get("party")
        if grant.party is not None:
            if claimed is None:
                message.meta["party"] = grant.party
            elif type(claimed) is not int or claimed != grant.party:
                return (
                    f"token of client {client!r} is bound to party {grant.party}; its "
                    f"{message.kind[:40]} message claims party {str(claimed)[:20]!r}"
                )
        elif claimed is not None and self.bound_parties:
            # The engine reads int(meta["party"]): 1.0, "1" or true would reach party 1 too.
            if type(claimed) is not int:
                return (
                    f"{message.kind[:40]} message of client {client!r} claims party "
                    f"{str(claimed)[:20]!r}; meta party must be an integer"
                )
            if claimed in self.bound_parties:
                return (
                    f"party {claimed} is bound to another client's token; client {client!r} "
                    "has no party= in the server's token file and may not speak for it"
                )
        return None


class _Admission:
    """Counts open sessions, in total and per client (touched only on the event loop)."""

    def __init__(self, limits: SessionLimits) -> None:
        self._limits = limits
        self._open: dict[str | None, int] = {}
        self.total = 0

    def enter(self, client: str | None) -> str | None:
        """Admit one more session of ``client``; return why not when over a limit."""
        if self.total >= self._limits.max_sessions:
            return (
                f"{CONCURRENCY_LIMIT_TEXT}: the server has {self.total} open sessions, its "
                f"limit (max_sessions={self._limits.max_sessions}); try again later"
            )
        held = self._open.get(client, 0)
        # Without tokens there are no identities to cap; the total limit still holds.
        if client is not None and held >= self._limits.max_streams_per_client:
            return (
                f"{CONCURRENCY_LIMIT_TEXT}: client {client!r} already has {held} open sessions "
                f"(max_streams_per_client={self._limits.max_streams_per_client}); close one first"
            )
        self._open[client] = held + 1
        self.total += 1
        return None

    def leave(self, client: str | None) -> None:
        held = self._open.get(client, 0) - 1
        if held > 0:
            self._open[client] = held
        else:
            self._open.pop(client, None)
        self.total -= 1


#: A stream may name at most this many sessions (the shipped clients name one): the servicer
#: remembers each to release it when the stream closes.
MAX_SESSIONS_PER_STREAM = 64

#: Called once per (client, session) a closed stream carried; see :func:`serve_handler`.
StreamClosed = Callable[[str | None, str | None], None]


class SplitServicer:
    """Runs ``handler`` on each request of a ``Session`` stream; serves ``Status``.

    Parameters
    ----------
    handler:
        Blocking; run on ``compute`` threads.
    status:
        Builds the ``Status`` table; run on ``status_pool`` so sessions never delay it.
    tokens:
        ``None``: no authentication (and no roles).
    limits:
        Session caps and per-request limits.
    compute, status_pool:
        Thread pools for the two kinds of work.
    max_message_bytes:
        Largest gRPC message sent: a bigger reply goes out as chunks.
    on_stream_closed:
        Told ``(client, session)`` for each session a stream carried once the stream is over
        (end of stream, abort, idle timeout, cancellation); run on ``compute``.
    """

    def __init__(
        self,
        handler: Handler,
        status: Callable[[], dict[str, Any]] | None,
        tokens: TokenTable | None,
        limits: SessionLimits,
        compute: futures.ThreadPoolExecutor,
        status_pool: futures.ThreadPoolExecutor,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_stream_closed: StreamClosed | None = None,
    ) -> None:
        self._handler = handler
        self._status = status
        self._tokens = tokens
        self._limits = limits
        self._compute = compute
        self._status_pool = status_pool
        self._max_message_bytes = max_message_bytes
        self._on_stream_closed = on_stream_closed
        self._admission = _Admission(limits)
        #: Bytes of half-received chunked requests held by all streams, and per token (touched
        #: only on the event loop, so no lock).
        self.assembling = 0
        self._assembling_by: dict[str | None, int] = {}

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The method table to register on a server."""
        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                # Raw bytes in: a request that is not an Envelope must become INVALID_ARGUMENT,
                # and grpc's own deserializer failure would be INTERNAL.
                # Raw bytes out: replies are serialized once, by split_envelope (which also
                # measures them and cuts one over max_message_bytes into chunks).
                "Session": grpc.stream_stream_rpc_method_handler(
                    self.Session,
                    request_deserializer=None,
                    response_serializer=None,
                ),
                "Status": grpc.unary_unary_rpc_method_handler(
                    self.Status,
                    request_deserializer=split_pb2.StatusRequest.FromString,
                    response_serializer=split_pb2.StatusReply.SerializeToString,
                ),
            },
        )

    async def _authenticate(self, context: grpc.aio.ServicerContext, what: str) -> str | None:
        if self._tokens is None:
            return None
        client, problem = self._tokens.authenticate(context.invocation_metadata())
        if problem is not None:
            log.warning("refused %s from %s: %s", what, context.peer(), problem)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        return client

    async def Session(  # noqa: N802 - the name is fixed by split.proto
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        client = await self._authenticate(context, "Session")
        refusal = self._admission.enter(client)
        if refusal is not None:
            log.warning("refused a session of %r (%s): %s", client, context.peer(), refusal)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        carried: set[tuple[str | None, str]] = set()
        assembler = ChunkAssembler(self._limits.envelope.max_envelope_bytes)
        try:
            await self._serve_stream(client, context, carried, assembler)
        finally:
            self._admission.leave(client)
            self._hold(client, -assembler.pending_bytes)
            assembler.reset()
            self._stream_closed(carried)

    def _over_budget(self, client: str | None) -> str | None:
        """Why the half-received chunks now held are too many, or ``None``."""
        limits = self._limits
        mine = self._assembling_by.get(client, 0)
        if mine > limits.client_assembly_bytes:
            return (
                f"{CONCURRENCY_LIMIT_TEXT}: client {client!r} holds {mine} bytes of partly "
                "received chunked requests, its limit (max_assembly_bytes_per_client="
                f"{limits.client_assembly_bytes}); finish one first"
            )
        if self.assembling > limits.max_assembly_bytes:
            return (
                f"{CONCURRENCY_LIMIT_TEXT}: the server holds {self.assembling} bytes of partly "
                f"received chunked requests, its limit (max_assembly_bytes="
                f"{limits.max_assembly_bytes}); try again later"
            )
        return None

    def _hold(self, client: str | None, delta: int) -> None:
        """Count ``delta`` bytes more (or fewer) of ``client``'s half-received chunks."""
        if not delta:
            return
        self.assembling += delta
        mine = self._assembling_by.get(client, 0) + delta
        if mine > 0:
            self._assembling_by[client] = mine
        else:
            self._assembling_by.pop(client, None)

    def _stream_closed(self, carried: set[tuple[str | None, str]]) -> None:
        """Tell ``on_stream_closed`` about each session the stream carried, off the loop."""
        if self._on_stream_closed is None:
            return
        callback = self._on_stream_closed
        for client, session in sorted(carried, key=lambda pair: (pair[0] or "", pair[1])):
            try:
                future = self._compute.submit(callback, client, session)
            except RuntimeError:  # the server is shutting down: its pools take no more work
                log.info("not releasing session %r of %r: server shutting down", session, client)
                return
            future.add_done_callback(functools.partial(_log_close_failure, client, session))

    async def _next_request(
        self, client: str | None, context: grpc.aio.ServicerContext, assembler: ChunkAssembler
    ) -> split_pb2.Envelope | None:
        """The next whole request envelope (chunks joined), ``None`` at the end of the stream."""
        idle = self._limits.idle_timeout
        limits = self._limits.envelope
        while True:
            try:
                data = await asyncio.wait_for(context.read(), idle)
            except asyncio.TimeoutError:
                log.info(
                    "closing the idle session of %r (%s) after %.0f s", client, context.peer(), idle
                )
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"session idle for more than {idle:g} s (idle_timeout): closed by the "
                    "server; reconnect to go on",
                )
            if data is grpc.aio.EOF:
                return None
            if len(data) > limits.max_envelope_bytes:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request of {len(data)} bytes is larger than max ({len(data)} vs. "
                    f"{limits.max_envelope_bytes}) (max_envelope_bytes)",
                )
            try:
                carrier = parse_envelope(data)
                before = assembler.pending_bytes
                try:
                    whole = assembler.feed(carrier)
                finally:
                    self._hold(client, assembler.pending_bytes - before)
                # Checked once the piece is counted (exact, no extra copy of it); a refused
                # stream's pieces are released when it ends, right below.
                over = self._over_budget(client) if whole is None else None
                if over is not None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, over)
            except EnvelopeTooLarge as exc:
                log.warning("stream from %r (%s): %s", client, context.peer(), exc)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except ProtocolError as exc:
                log.warning("stream from %r (%s): bad envelope: %s", client, context.peer(), exc)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if whole is not None:
                return whole

    async def _serve_stream(
        self,
        client: str | None,
        context: grpc.aio.ServicerContext,
        carried: set[tuple[str | None, str]],
        assembler: ChunkAssembler,
    ) -> None:
        loop = asyncio.get_running_loop()
        ids = StreamIds()  # the session and client this stream's first request named
        while True:
            envelope = await self._next_request(client, context, assembler)
            if envelope is None:
                return
            try:
                message = ids.complete(
                    envelope_to_message(envelope, self._limits.envelope, kind_from_stream=True)
                )
            except ProtocolError as exc:
                log.warning("stream from %r (%s): bad envelope: %s", client, context.peer(), exc)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if client is not None and self._tokens is not None:
                # The token, not the message, says who is speaking and what it may do.
                message.client = client
                denied = self._tokens.refusal(client, message)
                if denied is not None:
                    log.warning(
                        "stream from %r (%s): permission denied: %s", client, context.peer(), denied
                    )
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)
            if message.session:
                pair = (message.client or None, message.session)
                if pair not in carried and len(carried) >= MAX_SESSIONS_PER_STREAM:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"stream already carried {len(carried)} sessions; one stream may carry "
                        f"at most {MAX_SESSIONS_PER_STREAM} (open a new stream per session)",
                    )
                carried.add(pair)
            try:
                reply = await loop.run_in_executor(self._compute, self._handler, message)
            except Exception:
                log.exception(
                    "handler failed on %s step %d of session %r from client %r; "
                    "ending that stream only",
                    message.kind,
                    message.step,
                    message.session,
                    message.client,
                )
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"server failed to handle {message.kind} step {message.step} "
                    "(see the server log)",
                )
            if reply.kind == Kind.ERROR and reply.meta.get("code") == "INVALID_ARGUMENT":
                text = str(reply.meta.get("message", "invalid request"))
                log.warning(
                    "client %r session %r step %d: invalid argument: %s",
                    message.client,
                    message.session,
                    message.step,
                    text,
                )
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, text)
            try:
                pieces = split_envelope(
                    message_to_envelope(ids.compact(reply)), self._max_message_bytes
                )
            except ProtocolError as exc:
                log.error("handler produced an unsendable reply: %s", exc)
                await context.abort(grpc.StatusCode.INTERNAL, f"server produced a bad reply: {exc}")
            for piece in pieces:
                await context.write(piece)

    async def Status(  # noqa: N802 - the name is fixed by split.proto
        self, request: split_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> split_pb2.StatusReply:
        client = await self._authenticate(context, "Status")
        if client is not None and self._tokens is not None:
            grant = self._tokens.grant(client)
            if not grant.may_read_status:
                text = (
                    f"token of client {client!r} has role {grant.role_text}; Status needs role "
                    "admin (add role=admin to a token's line in the server's token file)"
                )
                log.warning("refused Status from %s: %s", context.peer(), text)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, text)
        loop = asyncio.get_running_loop()
        try:
            table = (
                await loop.run_in_executor(self._status_pool, self._status)
                if self._status is not None
                else {}
            )
            text = json.dumps(table, sort_keys=True, default=str)
        except Exception:
            log.exception("status callback failed")
            await context.abort(grpc.StatusCode.INTERNAL, "server failed to build its status")
        return split_pb2.StatusReply(status_json=text)


def _log_close_failure(
    client: str | None, session: str | None, future: futures.Future[None]
) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error(
            "releasing session %r of client %r failed", session, client, exc_info=future.exception()
        )


class _EventLoopThread:
    """An asyncio event loop running on its own daemon thread, driven from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="edgesplit-grpc-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class RunningServer:
    """A started server. ``port`` is the bound port (the real one when 0 was asked for)."""

    server: grpc.aio.Server
    host: str
    port: int
    tls: bool = False
    authenticated: bool = True
    _loop: _EventLoopThread | None = field(default=None, repr=False)
    _pools: tuple[futures.ThreadPoolExecutor, ...] = field(default=(), repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)
    _stop_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it."""
        return _join_host_port(self.host, self.port)

    def stop(self, grace: float | None = None) -> None:
        """Stop serving and wait until the server has shut down (idempotent).

        Parameters
        ----------
        grace:
            Seconds in-flight calls get to finish before they are cancelled; ``None`` cancels
            them at once. New calls are refused immediately either way.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if self._loop is not None:
                self._loop.run(self.server.stop(grace))
                self._loop.close()
            for pool in self._pools:
                # A handler still running (e.g. waiting at a barrier) finishes on its own.
                pool.shutdown(wait=False, cancel_futures=True)
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` passes); True when it stopped."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(None)


def _join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # a bare IPv6 address
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def serve_handler(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tokens: TokenMap | None = None,
    tls: TlsConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    status: Callable[[], dict[str, Any]] | None = None,
    max_workers: int = 16,
    limits: SessionLimits | None = None,
    on_stream_closed: StreamClosed | None = None,
) -> RunningServer:
    """Start a gRPC server that answers ``Session`` streams with ``handler``.

    Parameters
    ----------
    handler:
        One request :class:`Message` in, one reply out. Called from several threads at once:
        it must be thread-safe.
    host, port:
        Where to listen. ``port=0`` picks a free port; read it from ``RunningServer.port``.
        A port another process (or server) already listens on is refused.
    tokens:
        Client name -> :class:`~edgesplit.transport.tokens.TokenGrant` (token, roles, party;
        what :func:`~edgesplit.transport.tokens.read_token_file` returns) or -> a bare token
        string, which is a training client (``role=train``). With tokens, ``Status`` and
        ``status`` messages need ``role=admin``, an infer-only token may send only ``hello``,
        ``predict`` and ``bye``, and a party-bound token only its own party; anything else
        ends the stream with ``PERMISSION_DENIED`` before ``handler`` sees it. ``None`` turns
        authentication and roles off (local tests only; a warning is logged unless ``host``
        is a loopback address).
    tls:
        TLS settings (:class:`~edgesplit.transport.tokens.TlsConfig`): ``cert`` and ``key``
        turn TLS on, ``ca`` (client certificates must chain to it) mutual TLS. ``None``:
        plaintext.
    max_message_bytes:
        Largest gRPC message accepted or sent. An envelope larger than this travels as chunks
        (both ways); a single message over it ends its stream with ``RESOURCE_EXHAUSTED``.
        Joined envelopes are bounded by ``limits.envelope.max_envelope_bytes``.
    status:
        Returns the JSON-serialisable status table served by the ``Status`` RPC.
    max_workers:
        Threads running ``handler``: requests handled at the same time. Open sessions do not
        hold one; a request beyond this waits for a free thread. Vertical parties wait for each
        other inside the handler, so keep this above the number of parties.
    limits:
        Session caps (total, per client, idle timeout) and per-request limits; defaults of
        :class:`SessionLimits`.
    on_stream_closed:
        Called as ``on_stream_closed(client, session)`` on a compute thread once a ``Session``
        stream is over (the client half-closed, the server aborted it, the idle timeout, a
        cancellation or a broken connection), once for each session a request on that stream
        named and the handler was given; ``client`` is the token's name (the request's
        ``client`` without tokens, ``None`` when empty). Use it to release per-session memory.
        A client that reconnects may already be on a new stream of the same session when this
        runs, so release caches, not what a resent step needs. Exceptions are logged.

    Returns
    -------
    RunningServer
        Already serving.

    Raises
    ------
    ConfigError
        Bad TLS files or token table.
    TransportError
        The address cannot be bound (in use, or not local).
    """
    if max_message_bytes <= 0:
        raise ConfigError(f"max_message_bytes must be positive, got {max_message_bytes}")
    if max_workers <= 0:
        raise ConfigError(f"max_workers must be positive, got {max_workers}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {port}")
    limits = limits if limits is not None else SessionLimits()
    tls_files = (tls.load("server") if tls is not None else None) or TlsFiles()
    table = TokenTable(tokens) if tokens is not None else None
    if table is None and host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        log.warning("serving on %s without client tokens: anyone who can reach it can train", host)
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        _NO_REUSEPORT,
        *_SERVER_KEEPALIVE_OPTIONS,
    ]
    compute = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="edgesplit-handler")
    status_pool = futures.ThreadPoolExecutor(2, thread_name_prefix="edgesplit-status")
    servicer = SplitServicer(
        handler, status, table, limits, compute, status_pool, max_message_bytes, on_stream_closed
    )
    address = _join_host_port(host, port)
    loop = _EventLoopThread()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=None)
        server.add_generic_rpc_handlers((servicer.generic_handler(),))
        try:
            if tls_files.cert is not None and tls_files.key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(tls_files.key, tls_files.cert)],
                    root_certificates=tls_files.ca,
                    require_client_auth=tls_files.ca is not None,
                )
                bound = server.add_secure_port(address, credentials)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError:  # grpc >= 1.5x raises instead of returning 0
            bound = 0
        if not bound or (port and bound != port):
            await server.stop(None)
            return server, 0
        await server.start()
        return server, bound

    try:
        server, bound = loop.run(start())
    except BaseException:
        loop.close()
        raise
    if not bound:
        loop.close()
        compute.shutdown(wait=False)
        status_pool.shutdown(wait=False)
        raise TransportError(
            f"cannot listen on {address}: the port is in use (another server?) or the address "
            "is not local; pick another --port or stop the other server"
        )
    log.info(
        "serving on %s (tls=%s, mtls=%s, tokens=%s, max message %d bytes, %s)",
        _join_host_port(host, bound),
        tls_files.cert is not None,
        tls_files.ca is not None,
        "on" if table is not None else "off",
        max_message_bytes,
        limits,
    )
    return RunningServer(
        server=server,
        host=host,
        port=bound,
        tls=tls_files.cert is not None,
        authenticated=table is not None,
        _loop=loop,
        _pools=(compute, status_pool),
    )
