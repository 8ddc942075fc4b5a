"""gRPC server side: serve a protocol :data:`~edgesplit.transport.base.Handler` over the network.

Each client session is one bidirectional ``Session`` stream. Every request envelope becomes a
:class:`~edgesplit.wire.messages.Message`, goes through the handler, and its reply goes back on
the same stream, in order. The transport does no deduplication: answering a repeated step from
record is the engine's job.

Authentication is a per-client bearer token checked by a server interceptor before any servicer
code runs. The token decides who the client is: the servicer overwrites ``message.client`` with
the token's name, so a client cannot speak for another.

Failure isolation: a malformed envelope or a handler reply ``ERROR{code: INVALID_ARGUMENT}`` ends
*that* stream with status ``INVALID_ARGUMENT``; an exception escaping the handler ends it with
``INTERNAL`` (and is logged). Other streams keep running.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from edgesplit.errors import ConfigError, ProtocolError, TransportError
from edgesplit.transport import split_pb2, split_pb2_grpc
from edgesplit.transport.base import Handler
from edgesplit.transport.envelope import envelope_to_message, message_to_envelope
from edgesplit.transport.tokens import PathLike, check_token, load_tls
from edgesplit.wire.messages import Kind

log = logging.getLogger(__name__)

#: Default limit on one serialized envelope, both directions (gRPC's own default is 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Metadata key carrying ``Bearer <token>`` (gRPC metadata keys are lower case).
AUTH_METADATA_KEY = "authorization"

# Server pings an idle client every 60 s and drops it after 20 s without an answer, so half-open
# connections (a device that lost power) free their worker thread. Clients may ping every 10 s
# without data; their own keepalive (30 s) stays well above that so they never get a GOAWAY.
_SERVER_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def _bearer_token(metadata: tuple[Any, ...] | None) -> str | None:
    for item in metadata or ():
        if item.key == AUTH_METADATA_KEY:
            value = item.value
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class _ClientContext:
    """A servicer context that also knows the authenticated client's name.

    grpc gives each RPC its own context object; wrapping it (rather than storing the name in a
    shared map) keeps the name tied to exactly this call.
    """

    def __init__(self, context: grpc.ServicerContext, client: str) -> None:
        self._context = context
        self.edgesplit_client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _with_client(handler: grpc.RpcMethodHandler, client: str) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour called on a context that carries ``client``."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        inner_ss = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(
            lambda it, ctx: inner_ss(it, _ClientContext(ctx, client)), **kwargs
        )
    if handler.request_streaming:
        inner_su = handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(
            lambda it, ctx: inner_su(it, _ClientContext(ctx, client)), **kwargs
        )
    if handler.response_streaming:
        inner_us = handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(
            lambda req, ctx: inner_us(req, _ClientContext(ctx, client)), **kwargs
        )
    inner_uu = handler.unary_unary
    return grpc.unary_unary_rpc_method_handler(
        lambda req, ctx: inner_uu(req, _ClientContext(ctx, client)), **kwargs
    )


def _refusal(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that aborts with UNAUTHENTICATED."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Check ``authorization: Bearer <token>`` on every call.

    Parameters
    ----------
    tokens:
        Client name -> token. Tokens must be unique (else two clients could not be told apart).
    """

    def __init__(self, tokens: dict[str, str]) -> None:
        if not tokens:
            raise ConfigError("token authentication needs at least one 'name token' entry")
        owners: dict[str, str] = {}
        for name, token in tokens.items():
            check_token(token, where=f"token of client {name!r}")
            if token in owners:
                raise ConfigError(
                    f"clients {owners[token]!r} and {name!r} share a token; "
                    "every client needs its own"
                )
            owners[token] = name
        self._tokens = [(token.encode(), name) for token, name in owners.items()]

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

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: let grpc answer UNIMPLEMENTED
            return None
        token = _bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            log.warning("refused %s: no bearer token", handler_call_details.method)
            return _refusal(
                handler,
                "missing bearer token: send metadata 'authorization: Bearer <token>'",
            )
        client = self.client_for(token)
        if client is None:
            log.warning("refused %s: unknown bearer token", handler_call_details.method)
            return _refusal(handler, "unknown bearer token")
        return _with_client(handler, client)


class SplitServicer(split_pb2_grpc.SplitServicer):
    """Runs ``handler`` on each request of a ``Session`` stream; serves ``Status``."""

    def __init__(
        self, handler: Handler, status: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self._handler = handler
        self._status = status

    def Session(  # noqa: N802 - the name is fixed by split.proto
        self, request_iterator: Iterator[split_pb2.Envelope], context: grpc.ServicerContext
    ) -> Iterator[split_pb2.Envelope]:
        client = getattr(context, "edgesplit_client", None)
        peer = context.peer()
        for envelope in request_iterator:
            try:
                message = envelope_to_message(envelope)
            except ProtocolError as exc:
                log.warning("stream from %s (%s): bad envelope: %s", client, peer, exc)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if client is not None:
                # The token, not the message, says who is speaking.
                message.client = client
            try:
                reply = self._handler(message)
            except Exception:
                log.exception(
                    "handler failed on %s step %d of session %r from client %r; "
                    "ending that stream only",
                    message.kind, message.step, message.session, message.client,
                )
                context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"server failed to handle {message.kind} step {message.step} "
                    "(see the server log)",
                )
            if reply.kind == Kind.ERROR and reply.meta.get("code") == "INVALID_ARGUMENT":
                text = str(reply.meta.get("message", "invalid request"))
                log.warning(
                    "client %r session %r step %d: invalid argument: %s",
                    message.client, message.session, message.step, text,
                )
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, text)
            try:
                out = message_to_envelope(reply)
            except ProtocolError as exc:
                log.error("handler produced an unsendable reply: %s", exc)
                context.abort(grpc.StatusCode.INTERNAL, f"server produced a bad reply: {exc}")
            yield out

    def Status(  # noqa: N802 - the name is fixed by split.proto
        self, request: split_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> split_pb2.StatusReply:
        try:
            table = self._status() if self._status is not None else {}
            text = json.dumps(table, sort_keys=True, default=str)
        except Exception:
            log.exception("status callback failed")
            context.abort(grpc.StatusCode.INTERNAL, "server failed to build its status")
        return split_pb2.StatusReply(status_json=text)


@dataclass
class RunningServer:
    """A started server. ``port`` is the bound port (the real one when 0 was asked for)."""

    server: grpc.Server
    host: str
    port: int
    tls: bool = False
    authenticated: bool = True

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it."""
        return _join_host_port(self.host, self.port)

    def stop(self, grace: float | None = None) -> None:
        """Stop serving and wait until the server has shut down.

        Parameters
        ----------
        grace:
            Seconds in-flight calls get to finish before they are cancelled; ``None`` cancels
            them at once. New calls are refused immediately either way.
        """
        self.server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` passes); True when it stopped."""
        return bool(self.server.wait_for_termination(timeout))

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
    tokens: dict[str, str] | None = None,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
    tls_ca: PathLike | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    status: Callable[[], dict[str, Any]] | None = None,
    max_workers: int = 16,
) -> RunningServer:
    """Start a gRPC server that answers ``Session`` streams with ``handler``.

    Parameters
    ----------
    handler:
        One request :class:`Message` in, one reply out. Called from several threads at once
        (one per client stream): it must be thread-safe.
    host, port:
        Where to listen. ``port=0`` picks a free port; read it from ``RunningServer.port``.
    tokens:
        Client name -> bearer token. ``None`` turns authentication off (local tests only; a
        warning is logged unless ``host`` is a loopback address).
    tls_cert, tls_key:
        PEM files of the server's certificate and key; both or neither.
    tls_ca:
        PEM CA that client certificates must chain to. Giving it turns on mutual TLS.
    max_message_bytes:
        Largest serialized envelope accepted or sent. Larger requests end their stream with
        ``RESOURCE_EXHAUSTED``.
    status:
        Returns the JSON-serialisable status table served by the ``Status`` RPC.
    max_workers:
        Threads serving calls. Each open client session holds one for its lifetime, so this
        is also the most concurrent calls (sessions + status) accepted; beyond it grpc answers
        ``RESOURCE_EXHAUSTED`` ("Concurrent RPC limit exceeded") and clients retry.

    Returns
    -------
    RunningServer
        Already serving.

    Raises
    ------
    ConfigError
        Bad TLS files or token table.
    TransportError
        The address cannot be bound.
    """
    if max_message_bytes <= 0:
        raise ConfigError(f"max_message_bytes must be positive, got {max_message_bytes}")
    if max_workers <= 0:
        raise ConfigError(f"max_workers must be positive, got {max_workers}")
    tls = load_tls(tls_cert, tls_key, tls_ca, role="server")
    interceptors: list[grpc.ServerInterceptor] = []
    if tokens is not None:
        interceptors.append(TokenAuthInterceptor(tokens))
    elif host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        log.warning(
            "serving on %s without client tokens: anyone who can reach it can train", host
        )
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *_SERVER_KEEPALIVE_OPTIONS,
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="edgesplit-grpc"),
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=max_workers,
    )
    split_pb2_grpc.add_SplitServicer_to_server(SplitServicer(handler, status), server)
    address = _join_host_port(host, port)
    try:
        if tls.cert is not None and tls.key is not None:
            credentials = grpc.ssl_server_credentials(
                [(tls.key, tls.cert)],
                root_certificates=tls.ca,
                require_client_auth=tls.ca is not None,
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc >= 1.5x raises instead of returning 0
        raise TransportError(f"cannot listen on {address}: {exc}") from None
    if not bound:
        raise TransportError(f"cannot listen on {address} (address in use or not local?)")
    server.start()
    log.info(
        "serving on %s (tls=%s, mtls=%s, tokens=%s, max message %d bytes)",
        _join_host_port(host, bound), tls.cert is not None, tls.ca is not None,
        "on" if tokens is not None else "off", max_message_bytes,
    )
    return RunningServer(
        server=server, host=host, port=bound, tls=tls.cert is not None,
        authenticated=tokens is not None,
    )
