"""gRPC client side: :class:`GrpcTransport`, one long-lived ``Session`` stream to a split server.

``request()`` puts one envelope on the stream and waits for its reply. When the connection is
lost (``UNAVAILABLE``, a stream cut by a server restart) the transport reconnects with jittered
exponential backoff and sends the unanswered request again, with the same session and step.
The server's engine answers a step it already applied from its record, so a resend is never
applied twice; that deduplication lives in the engine, not here.

Backoff is for a session that existed: a transport that never got a reply and whose first
connection attempt is refused (nothing listens on the port) gives up at once, in one line
asking whether ``edgesplit serve`` is running, instead of retrying for a minute.

Statuses that retrying cannot fix become typed errors at once: ``UNAUTHENTICATED`` and
``PERMISSION_DENIED`` -> :class:`~edgesplit.errors.TransportError` (check the token and its
role), ``INVALID_ARGUMENT`` -> :class:`~edgesplit.errors.ProtocolError`, ``RESOURCE_EXHAUSTED``
(message too big) -> :class:`~edgesplit.errors.TransportError` naming the limit.

An envelope larger than ``max_message_bytes`` goes out as chunks and a chunked reply is joined
(:func:`~edgesplit.transport.envelope.split_envelope`); both are bounded by
``max_envelope_bytes``.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc

from edgesplit.errors import ConfigError, ProtocolError, TransportError
from edgesplit.transport import split_pb2, split_pb2_grpc
from edgesplit.transport.envelope import (
    CHUNK_OVERHEAD,
    DEFAULT_MAX_ENVELOPE_BYTES,
    ChunkAssembler,
    StreamIds,
    envelope_to_message,
    message_to_envelope,
    parse_envelope,
    split_serialized,
)
from edgesplit.transport.grpc_server import (
    AUTH_METADATA_KEY,
    CONCURRENCY_LIMIT_TEXT,
    DEFAULT_MAX_MESSAGE_BYTES,
    SESSION_METHOD,
)
from edgesplit.transport.tokens import TlsConfig, TlsFiles, check_token
from edgesplit.wire.messages import Message

log = logging.getLogger(__name__)

# Ping the server every 30 s even when idle so NATs and firewalls keep the connection and a dead
# server is noticed within ~40 s rather than at the next request. The server allows pings every
# 10 s (grpc_server._SERVER_KEEPALIVE_OPTIONS); staying above that avoids a GOAWAY.
_CLIENT_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Codes after which the same request may succeed on a new connection. CANCELLED is included
# only when we did not cancel ourselves: a server shutting down cancels its open streams.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
# grpc reports an oversized message as "... larger than max (<size> vs. <limit>)".
_SIZE_RE = re.compile(r"\((\d+) vs\. (\d+)\)")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try to reach the server again.

    Parameters
    ----------
    attempts:
        Reconnect attempts for one request before giving up (0: fail at the first break).
    initial_backoff:
        Seconds before the first reconnect.
    max_backoff:
        Cap on the wait between attempts.
    multiplier:
        Growth of the wait per attempt.
    jitter:
        Each wait is scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so many clients
        cut off by one server restart do not all come back in the same instant.
    """

    attempts: int = 8
    initial_backoff: float = 0.5
    max_backoff: float = 15.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ConfigError(f"retry attempts must be >= 0, got {self.attempts}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ConfigError(
                f"need 0 <= initial_backoff <= max_backoff, got {self.initial_backoff} "
                f"and {self.max_backoff}"
            )
        if self.multiplier < 1:
            raise ConfigError(f"backoff multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"jitter must be in [0, 1), got {self.jitter}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before reconnect ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        r = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return base * r

    @property
    def budget(self) -> float:
        """Seconds all reconnect waits for one request add up to (before jitter)."""
        return sum(
            min(self.max_backoff, self.initial_backoff * self.multiplier**k)
            for k in range(self.attempts)
        )


_END = object()  # request-queue sentinel: half-close the stream


class _Stream:
    """One ``Session`` call: a request queue feeding grpc, a thread reading replies.

    grpc's blocking response iterator has no per-item timeout, so a reader thread moves replies
    (or the terminating error) into a queue the caller can wait on with a timeout.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: list[tuple[str, str]],
        max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
    ) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self.replies: queue.Queue[Any] = queue.Queue()
        self.cancelled_by_us = False
        #: Session and client this stream's first request fixed (later ones leave them out).
        self.ids = StreamIds()
        #: Joins a chunked reply (a reply over the server's message limit).
        self.assembler = ChunkAssembler(max_envelope_bytes, "reply")
        # Raw bytes both ways: requests are serialized once by the transport (which measures
        # and chunks them), replies are parsed (and measured) by the transport.
        session = channel.stream_stream(
            SESSION_METHOD, request_serializer=None, response_deserializer=None
        )
        self.call = session(self._request_iter(), metadata=metadata)
        self._reader = threading.Thread(
            target=self._read, name="edgesplit-grpc-reader", daemon=True
        )
        self._reader.start()

    def _request_iter(self) -> Iterator[bytes]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item

    def _read(self) -> None:
        try:
            for data in self.call:
                self.replies.put(data)
            self.replies.put(_END)
        except grpc.RpcError as exc:
            self.replies.put(exc)
        except Exception as exc:  # e.g. a reply that does not parse as an Envelope
            self.replies.put(exc)

    def send(self, data: bytes) -> None:
        self._requests.put(data)

    def close(self, *, graceful: bool, wait: float = 1.0) -> None:
        # Always end the request iterator: grpc consumes it on its own thread, which would
        # otherwise block on the queue forever.
        self._requests.put(_END)
        if graceful:
            self._reader.join(wait)
        if self._reader.is_alive():
            self.cancelled_by_us = True
            self.call.cancel()
            self._reader.join(wait)


class GrpcTransport:
    """Client transport over one long-lived bidirectional gRPC stream.

    Parameters
    ----------
    target:
        ``host:port`` of the server.
    token:
        This client's bearer token (``None`` only for servers run without tokens).
    tls:
        TLS settings (:class:`~edgesplit.transport.tokens.TlsConfig`): a CA, a client
        certificate or ``system_roots`` switch the channel to TLS. ``None``: plaintext.
    max_message_bytes:
        Largest gRPC message sent or accepted; set it to the server's. A larger request goes
        out as chunks of at most this size, and the server chunks its replies the same way.
    max_envelope_bytes:
        Largest request envelope sent or reply envelope joined from chunks. A request over it
        fails before anything is sent.
    retry:
        Reconnect policy for broken connections (not for a first connection that is refused).
    timeout:
        Seconds to wait for one reply (``None``: forever). A timeout is not retried: the server
        may still be working on the step.

    Attributes
    ----------
    bytes_up, bytes_down:
        Tensor frame bytes of requests sent and replies received (``Message.tensor_bytes()``),
        counted once per request like the in-process transport; comparable across transports.
    wire_bytes_up, wire_bytes_down:
        Serialized envelope bytes handed to the stream and read from it; a chunked envelope
        counts its chunk carriers as sent (its bytes plus a few of framing per chunk). Every
        send counts, resends and attempts while the server was unreachable included, so this
        is an upper
        bound on what crossed; HTTP/2, gRPC (5 bytes a message) and TLS framing are excluded.
    messages, reconnects, resends:
        Completed requests, new connections opened after a break, and extra sends of a request
        after a break (attempts against an unreachable server included).
    reached:
        Whether the server ever answered: before it has, a refused first connection fails at
        once (``TransportError``: is the server running?); after it, breaks are retried.

    Notes
    -----
    ``request`` is serialised with a lock: one stream carries one request at a time, which is
    what lets replies be matched to requests by order. Use one transport per thread for
    parallel clients.
    """

    def __init__(
        self,
        target: str,
        token: str | None,
        *,
        tls: TlsConfig | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
        retry: RetryPolicy | None = None,
        timeout: float | None = 300.0,
    ) -> None:
        if max_message_bytes <= CHUNK_OVERHEAD:
            raise ConfigError(
                f"max_message_bytes must be over {CHUNK_OVERHEAD} (room for a chunk), got "
                f"{max_message_bytes}"
            )
        if max_envelope_bytes <= 0:
            raise ConfigError(f"max_envelope_bytes must be positive, got {max_envelope_bytes}")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be positive or None, got {timeout}")
        self.target = check_target(target)
        self.max_message_bytes = max_message_bytes
        self.max_envelope_bytes = max_envelope_bytes
        self.retry = retry if retry is not None else RetryPolicy()
        self.timeout = timeout
        self._tls = tls.load("client") if tls is not None else None
        self._tls_server_name = tls.server_name if tls is not None else None
        self._metadata = _auth_metadata(token)
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._channel: grpc.Channel | None = None
        self._stream: _Stream | None = None
        self._closed = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.wire_bytes_up = 0
        self.wire_bytes_down = 0
        self.messages = 0
        self.reconnects = 0
        self.resends = 0
        #: Whether the server ever answered on this transport: until it has, a refused
        #: connection means nothing listens there (no backoff), after it a restart (backoff).
        self.reached = False

    # -- connection management ---------------------------------------------------------------

    def _open(self) -> _Stream:
        if self._channel is None:
            self._channel = _make_channel(
                self.target,
                self._tls,
                self._tls_server_name,
                self.max_message_bytes,
                # Our own backoff decides when to try again; grpc's channel backoff (1 s
                # growing to 120 s by default) would otherwise make fresh attempts fail fast.
                reconnect_backoff_ms=max(1, int(self.retry.initial_backoff * 1000)),
            )
        self._stream = _Stream(self._channel, self._metadata, self.max_envelope_bytes)
        return self._stream

    def _drop(self, *, channel: bool) -> None:
        if self._stream is not None:
            self._stream.close(graceful=False, wait=0.5)
            self._stream = None
        if channel and self._channel is not None:
            self._channel.close()
            self._channel = None

    # -- Transport protocol ------------------------------------------------------------------

    def request(self, message: Message) -> Message:
        """Send ``message`` and return the server's reply.

        Raises
        ------
        TransportError
            Server unreachable after the retry budget, token refused or not allowed to send
            this kind (``PERMISSION_DENIED``), envelope too large, reply timeout, or the
            transport is closed.
        ProtocolError
            The server ended the stream with ``INVALID_ARGUMENT`` (it could not use the request),
            answered with a reply that does not match the request, or sent chunks that do not
            join (:class:`~edgesplit.transport.envelope.ChunkError`).
        """
        with self._lock:
            if self._closed:
                raise TransportError(f"transport to {self.target} is closed")
            reply = self._exchange(message)
            # Replies are matched to requests by order on the stream; checking the ids catches
            # a server (or a replay) that answers something else.
            if reply.step != message.step or reply.session != message.session:
                self._drop(channel=False)  # the stream is out of step; start a clean one
                raise ProtocolError(
                    f"reply {reply.kind} for session {reply.session!r} step {reply.step} does "
                    f"not answer request {message.kind} session {message.session!r} step "
                    f"{message.step}"
                )
            self.bytes_up += message.tensor_bytes()
            self.bytes_down += reply.tensor_bytes()
            self.messages += 1
            return reply

    def _exchange(self, message: Message) -> Message:
        failures = 0
        sent_before = False
        while True:
            if self._stream is not None and not self._stream.replies.empty():
                # Requests and replies alternate, so anything queued before we send is the end
                # of a stream the server closed while we were idle (its idle timeout, say).
                # Start a fresh one; nothing was lost, nothing is resent.
                ended = self._stream.replies.get_nowait()
                reason = ended.details() if hasattr(ended, "details") else "closed"
                log.info(
                    "stream to %s ended while idle (%s); opening a new one", self.target, reason
                )
                self._drop(channel=False)
            stream = self._stream if self._stream is not None else self._open()
            # a fresh stream (after a reconnect) gets the ids in full again
            # Serialized once: what is measured, checked, cut into chunks and sent. The ids are
            # fixed on a copy first, so a refused request does not bind a stream it never used.
            ids = replace(stream.ids)
            data = message_to_envelope(ids.compact(message)).SerializeToString()
            if len(data) > self.max_envelope_bytes:
                raise TransportError(
                    f"{message.kind} step {message.step} is {len(data)} bytes serialized, over "
                    f"the envelope size limit of {self.max_envelope_bytes} bytes "
                    "(max_envelope_bytes); use a stronger codec, a smaller batch, or raise the "
                    "limit on both sides"
                )
            stream.ids = ids
            for piece in split_serialized(data, self.max_message_bytes):
                stream.send(piece)
                self.wire_bytes_up += len(piece)
            if sent_before:
                self.resends += 1
            sent_before = True
            item = self._reply(stream, message)
            if isinstance(item, split_pb2.Envelope):
                self.reached = True
                return stream.ids.complete(envelope_to_message(item, kind_from_stream=True))
            # The stream is over: an RpcError, a clean end without a reply, or a bad reply.
            # Classify before dropping: dropping cancels the call, which must not be mistaken
            # for the cause.
            try:
                reason = self._classify(item, message, stream)
            finally:
                self._drop(channel=False)
            failures += 1
            if failures == 1 and not self.reached and _connection_refused(reason):
                # the very first connection of this transport: nothing listens there, and
                # retrying for a minute would only hide that
                self._drop(channel=True)
                raise TransportError(
                    f"cannot reach {self.target} (connection refused): is `edgesplit serve` "
                    "running?"
                )
            if failures > self.retry.attempts:
                self._drop(channel=True)
                raise TransportError(
                    f"cannot reach server {self.target} for {message.kind} step {message.step} "
                    f"after {failures} attempt(s): {reason}{self._closed_socket_hint(reason)}"
                )
            delay = self.retry.delay(failures, self._rng)
            if failures == 1:
                # one warning per request that needs retries; the attempts after it are INFO
                log.warning(
                    "stream to %s broke (%s); retrying in %.2f s (up to %d attempts over "
                    "~%.0f s, will resend session %r step %d)",
                    self.target,
                    reason,
                    delay,
                    self.retry.attempts,
                    self.retry.budget,
                    message.session,
                    message.step,
                )
            else:
                log.info(
                    "stream to %s still down (%s); retrying in %.2f s (attempt %d/%d)",
                    self.target,
                    reason,
                    delay,
                    failures,
                    self.retry.attempts,
                )
            time.sleep(delay)
            # A fresh channel, not just a fresh call: the old one may sit in its own
            # reconnect backoff or hold a connection to a server that is gone.
            self._drop(channel=True)
            self.reconnects += 1

    def _reply(self, stream: _Stream, message: Message) -> Any:
        """The reply envelope (chunks joined), or what ended the stream instead."""
        while True:
            try:
                item = stream.replies.get(timeout=self.timeout)
            except queue.Empty:
                self._drop(channel=False)
                raise TransportError(
                    f"no reply from {self.target} to {message.kind} step {message.step} within "
                    f"{self.timeout} s (timeout)"
                ) from None
            if not isinstance(item, bytes):
                return item
            self.wire_bytes_down += len(item)
            try:
                whole = stream.assembler.feed(parse_envelope(item))
            except ProtocolError:
                self._drop(channel=False)  # the stream is out of step; start a clean one
                raise
            if whole is not None:
                return whole

    def _classify(self, item: Any, message: Message, stream: _Stream) -> str:
        """Raise for a non-retryable end of stream; return a reason string for a retryable one."""
        if item is _END:
            # The server closed the stream cleanly without answering (e.g. graceful shutdown).
            return "stream closed by the server without a reply"
        if not isinstance(item, grpc.RpcError):
            raise ProtocolError(f"unreadable reply from {self.target}: {item}") from None
        code = item.code() if hasattr(item, "code") else grpc.StatusCode.UNKNOWN
        details = (item.details() if hasattr(item, "details") else "") or ""
        if code == grpc.StatusCode.UNAVAILABLE and "handshake failed" in details.lower():
            # Our side rejected the server's certificate: a new attempt sees the same one.
            raise TransportError(_handshake_failed(self.target, details))
        if code in _RETRYABLE and not stream.cancelled_by_us:
            return f"{code.name}: {details}"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and CONCURRENCY_LIMIT_TEXT in details:
            return "server is at its limit of concurrent sessions"
        who = message.client or "this client"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise TransportError(
                f"server {self.target} refused the token for client {who!r} "
                f"(unauthenticated: {details}): check --token"
            )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise TransportError(
                f"server {self.target} does not let client {who!r} send {message.kind} "
                f"(PERMISSION_DENIED: {details}): use a token whose role allows it"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise ProtocolError(
                f"server {self.target} rejected {message.kind} step {message.step} "
                f"(INVALID_ARGUMENT): {details}"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise TransportError(self._size_error(message, details))
        raise TransportError(
            f"server {self.target} failed {message.kind} step {message.step} "
            f"({code.name}: {details})"
        )

    def _closed_socket_hint(self, reason: str) -> str:
        return closed_socket_hint(reason, self._tls)

    def _size_error(self, message: Message, details: str) -> str:
        """Say which side's limit a RESOURCE_EXHAUSTED hit, from grpc's "(N vs. M)" text."""
        m = _SIZE_RE.search(details)
        size, limit = (m.group(1), m.group(2)) if m else ("?", "?")
        if "SERVER: Received" in details:
            what = f"the server refused the {size}-byte request: its limit is {limit} bytes"
        elif "SERVER: Sent" in details:
            what = f"the {size}-byte reply is over the server's own limit of {limit} bytes"
        elif "CLIENT: Received" in details:
            what = (
                f"the {size}-byte reply is over this client's limit of {limit} bytes "
                "(max_message_bytes)"
            )
        else:
            what = f"a message is over a size limit (this client's: {self.max_message_bytes} bytes)"
        return (
            f"{message.kind} step {message.step}: {what} (RESOURCE_EXHAUSTED: {details}); "
            "use a stronger codec or a smaller batch, or raise max_message_bytes on both sides"
        )

    def close(self) -> None:
        """Half-close the stream (the server sees a clean end of session) and the channel."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._stream is not None:
                self._stream.close(graceful=True, wait=1.0)
                self._stream = None
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connection_refused(reason: str) -> bool:
    """Whether a retryable failure says the peer refused the TCP connection (nothing listens
    on the port), as grpc words it: "... Failed to connect to remote host: Connection
    refused"."""
    return reason.startswith("UNAVAILABLE") and "connection refused" in reason.lower()


def _auth_metadata(token: str | None) -> list[tuple[str, str]]:
    if token is None:
        return []
    check_token(token, where="--token")
    return [(AUTH_METADATA_KEY, f"Bearer {token}")]


def _handshake_failed(target: str, details: str) -> str:
    return (
        f"TLS handshake with {target} failed ({details}): check --tls-ca (the CA that signed "
        "the server's certificate) and the name the certificate was made for "
        "(--tls-server-name)"
    )


def closed_socket_hint(reason: str, tls: TlsFiles | None) -> str:
    """What to check when the server closed the socket during the handshake, or "".

    Such a server looks like one that is down; the usual cause is a TLS mismatch, so say so.
    """
    if "Socket closed" not in reason:
        return ""
    if tls is None:
        return " (if the server uses TLS, pass --tls-ca)"
    if tls.cert is None:
        return " (if the server requires client certificates, pass --tls-cert and --tls-key)"
    return " (the server may not trust this client's certificate: check --tls-cert)"


#: gRPC target schemes (``dns:///host:port``, ``unix:/path``, ...) passed through unchecked.
_TARGET_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock")


def check_target(target: str) -> str:
    """``target`` itself when it names a port: ``host:port``, ``[v6addr]:port`` or a gRPC URI.

    Raises
    ------
    ConfigError
        No port (gRPC would silently dial 443), a port outside 1..65535, an empty host, or an
        IPv6 address without brackets.
    """
    if target.split(":", 1)[0] in _TARGET_SCHEMES:
        return target
    host, sep, port = target.rpartition(":")
    example = f"{host or target or 'localhost'}:50051"
    if not sep or not host or not port:
        raise ConfigError(
            f"server address {target!r} has no port: give HOST:PORT, e.g. "
            f"{example} (without one gRPC would dial port 443)"
        )
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(
            f"server address {target!r}: an IPv6 address needs brackets, e.g. [::1]:50051"
        )
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"server address {target!r}: the port must be a number in 1..65535, e.g. {host}:50051"
        )
    return target


def _make_channel(
    target: str,
    tls: TlsFiles | None,
    server_name: str | None,
    max_message_bytes: int,
    *,
    reconnect_backoff_ms: int = 1000,
) -> grpc.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *_CLIENT_KEEPALIVE_OPTIONS,
        ("grpc.initial_reconnect_backoff_ms", reconnect_backoff_ms),
        ("grpc.min_reconnect_backoff_ms", reconnect_backoff_ms),
        # A private subchannel pool: a new channel must really dial again instead of reusing
        # a shared subchannel that is still in backoff from the failed connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
    return grpc.secure_channel(target, credentials, options=options)


def fetch_status(
    target: str,
    token: str | None,
    *,
    tls: TlsConfig | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Ask a server for its status table (the ``Status`` RPC).

    Raises
    ------
    TransportError
        Server unreachable, token refused, or any other failure of the call.
    ProtocolError
        The status is not a JSON object.
    """
    check_target(target)
    files = tls.load("client") if tls is not None else None
    metadata = _auth_metadata(token)
    channel = _make_channel(
        target, files, tls.server_name if tls is not None else None, DEFAULT_MAX_MESSAGE_BYTES
    )
    try:
        stub = split_pb2_grpc.SplitStub(channel)
        reply = stub.Status(split_pb2.StatusRequest(), metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise TransportError(
                f"server {target} refused the token (unauthenticated: {details}): check --token"
            ) from None
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise TransportError(
                f"server {target} does not show its status to this token (PERMISSION_DENIED: "
                f"{details}): use a token with role=admin"
            ) from None
        if code == grpc.StatusCode.UNAVAILABLE and "handshake failed" in details.lower():
            raise TransportError(_handshake_failed(target, details)) from None
        raise TransportError(
            f"status request to {target} failed ({code.name}: {details})"
            f"{closed_socket_hint(details, files)}"
        ) from None
    finally:
        channel.close()
    try:
        table = json.loads(reply.status_json) if reply.status_json else {}
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"status from {target} is not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ProtocolError(f"status from {target} is a JSON {type(table).__name__}, not an object")
    return table
