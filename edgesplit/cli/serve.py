"""``edgesplit serve``: the gRPC split server."""

from __future__ import annotations

import argparse
from collections.abc import Callable

#: The defaults of ``--max-record-mib`` / ``--max-records-total-mib`` (RecordLimits'), kept here
#: so ``serve --help`` does not import torch.
DEFAULT_RECORDS = argparse.Namespace(client_bytes=128 << 20, total_bytes=1 << 30)


def add_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    from edgesplit.cli.common import add_training_options

    p = sub.add_parser(
        "serve",
        formatter_class=formatter,
        help="run the gRPC split server that trains the upper layers",
        description="Serve split learning over gRPC: decode each client's compressed cut "
        "tensors, train the full-precision upper layers on them, answer "
        "predictions, and log what compression costs (probes from clients run with "
        "--probe-every). Prints 'listening on HOST:PORT' once it accepts "
        "connections.\n\n"
        "From a checkpoint (train --save, or an export's <bundle>.server/):\n"
        "  edgesplit serve --from runs/digits --port 50051 --tokens tokens.txt\n"
        "Fresh, for split training of trainable clients from scratch:\n"
        "  edgesplit serve --data digits --config vanilla --clients 3 --tokens "
        "tokens.txt\n\n"
        "Token file: one `name token [role=ROLE[,ROLE]] [party=N]` per line; the name is "
        "the client's identity. ROLE: train (the default: every training and inference "
        "message), infer (hello, predict, bye only), admin (the Status RPC; `edgesplit status` "
        "needs it). party=N binds a vertical party index to the token. See docs/security.md.",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="CHECKPOINT",
        default=None,
        help="checkpoint whose server segment to serve (default: build a fresh one "
        "from the training options below)",
    )
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to bind")
    g.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one")
    g.add_argument(
        "--tokens",
        metavar="FILE",
        default=None,
        help="bearer tokens, one `name token [role=train|infer|admin] [party=N]` per line "
        "(required unless --no-auth)",
    )
    g.add_argument(
        "--no-auth",
        action="store_true",
        help="accept clients without tokens (loopback experiments only)",
    )
    g.add_argument("--tls-cert", metavar="PEM", default=None, help="server certificate (TLS)")
    g.add_argument("--tls-key", metavar="PEM", default=None, help="key of --tls-cert")
    g.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=None,
        help="CA of client certificates: turns on mutual TLS",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest gRPC message accepted or sent; a larger request or reply travels as "
        "chunks of this size",
    )
    g.add_argument(
        "--ladder",
        default=None,
        metavar="CODECS",
        help="adaptive bitrate: codecs cheapest first, e.g. q2+zstd,q4+zstd,q8+zstd; clients "
        "sending probes (--probe-every) are moved along it, each switch logged in --metrics "
        "(default: off, clients keep their codec)",
    )
    g.add_argument(
        "--drift",
        choices=("flag", "refuse", "off"),
        default="flag",
        help="with --from: screen incoming cut activations against the checkpoint's training "
        "distribution — flag (apply, mark the reply and --metrics, warn), refuse (refuse "
        "drifted training steps before they are applied) or off (default: flag)",
    )
    g.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        help="with --ladder: accuracy points a probe may lose (decoded vs fp32 copy) before "
        "the client moves to more bits (default: 0.5)",
    )
    g.add_argument(
        "--max-tensor-mib",
        type=int,
        default=64,
        help="largest tensor one frame may decode to (a tiny zstd frame can claim a huge "
        "one); raise it for big cut tensors",
    )
    g.add_argument(
        "--max-workers",
        type=int,
        default=16,
        help="requests handled at the same time (threads); open sessions do not hold one. "
        "Keep it above the number of vertical parties, which wait for each other",
    )
    g.add_argument(
        "--max-sessions",
        type=int,
        default=1024,
        help="open client sessions (streams) in total; beyond it clients are told to retry",
    )
    g.add_argument(
        "--max-streams-per-client",
        type=int,
        default=8,
        metavar="N",
        help="open sessions one token may hold, so one client cannot lock the others out",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="close a session that sends nothing for this long (clients reconnect on their "
        "next request)",
    )
    g.add_argument(
        "--max-meta-kib",
        type=int,
        default=64,
        metavar="KIB",
        help="largest JSON meta one request may carry",
    )
    g.add_argument(
        "--max-request-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="largest request envelope, whole or joined from chunks (a request over "
        "--max-message-bytes travels as chunks)",
    )
    g.add_argument(
        "--max-record-mib",
        type=int,
        default=DEFAULT_RECORDS.client_bytes >> 20,
        metavar="MIB",
        help="what the server keeps for one client (token): replies it may have to send again "
        "after a reconnect and forwards waiting for their second half; beyond it the oldest "
        f"are dropped (default: {DEFAULT_RECORDS.client_bytes >> 20}, which holds a reply of "
        "the largest default frame)",
    )
    g.add_argument(
        "--max-records-total-mib",
        type=int,
        default=DEFAULT_RECORDS.total_bytes >> 20,
        metavar="MIB",
        help="the same over all clients together, so many clients cannot exhaust the "
        f"server's memory (default: {DEFAULT_RECORDS.total_bytes >> 20}); at least "
        "--max-record-mib",
    )
    g = p.add_argument_group("state and metrics")
    g.add_argument(
        "--metrics",
        metavar="PATH",
        default=None,
        help="append one JSON line per probe: accuracy and loss on decoded vs fp32 "
        "activations, SNR dB, bytes",
    )
    g.add_argument(
        "--state",
        metavar="DIR",
        default=None,
        help="where the server checkpoints its segment, optimizer and step counters; "
        "a restart with the same DIR resumes (default: no persistence)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="save the state every N applied steps (1: no applied step is ever lost)",
    )
    g.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long vertical parties / FedAvg clients / turn-takers wait for the others",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="print the listening line as JSON ({host, port, config, ...})",
    )
    add_training_options(p)
    p.set_defaults(run=run)


def stream_closed_hook(server: object) -> Callable[[str | None, str | None], None] | None:
    """What ``serve_handler`` calls when a client's stream closes: ``server.close_session``.

    Looked up by name so ``serve`` works with an engine that has no ``close_session`` (then
    ``None``: nothing to release). ``client`` is ``None`` only without tokens, where the engine
    knows an unnamed client as ``""``; a stream that named no session releases nothing.
    """
    close_session = getattr(server, "close_session", None)
    if not callable(close_session):
        return None

    def closed(client: str | None, session: str | None) -> None:
        if session:
            close_session(client or "", session)

    return closed


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from edgesplit.cli.common import print_json, set_threads, spec_from_args
    from edgesplit.errors import ConfigError
    from edgesplit.train.server_records import RecordLimits
    from edgesplit.train.serving import MetricsLog, StateStore, server_fresh, server_from_checkpoint
    from edgesplit.transport.envelope import EnvelopeLimits
    from edgesplit.transport.grpc_server import SessionLimits, serve_handler
    from edgesplit.transport.tokens import TlsConfig, read_token_file
    from edgesplit.wire.frame import FrameLimits

    set_threads(args)
    given = [
        flag
        for flag, value in (("--codec", args.codec), ("--grad-codec", args.grad_codec))
        if value
    ]
    if args.source and given:
        raise ConfigError(
            f"{' and '.join(given)}: only for a fresh server; a server from --from uses the "
            f"codecs its checkpoint was trained with (drop {'them' if len(given) > 1 else 'it'})"
        )
    if args.tokens is None and not args.no_auth:
        raise ConfigError(
            "--tokens FILE is required (one `name token` per line); pass "
            "--no-auth only for loopback experiments"
        )
    tokens = read_token_file(args.tokens) if args.tokens else None
    tls = TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    tls.load("server")  # bad TLS files are refused before the server is built (or trained)
    limits = SessionLimits(
        max_sessions=args.max_sessions,
        max_streams_per_client=args.max_streams_per_client,
        idle_timeout=args.idle_timeout,
        envelope=EnvelopeLimits(
            max_meta_bytes=args.max_meta_kib * 1024, max_envelope_bytes=args.max_request_mib << 20
        ),
    )
    for flag, value in (
        ("--max-record-mib", args.max_record_mib),
        ("--max-records-total-mib", args.max_records_total_mib),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.max_record_mib > args.max_records_total_mib:
        raise ConfigError(
            f"--max-record-mib {args.max_record_mib} is more than --max-records-total-mib "
            f"{args.max_records_total_mib}: one client may not keep more than all together"
        )
    records = RecordLimits(
        client_bytes=args.max_record_mib << 20, total_bytes=args.max_records_total_mib << 20
    )
    if args.source:
        server, shapes = server_from_checkpoint(args.source, records, drift=args.drift)
    else:
        server, shapes = server_fresh(spec_from_args(args), records)
    server.wait_timeout = args.wait_timeout
    if args.ladder:
        from edgesplit.train.controller import BitrateController

        server.controller = BitrateController.parse(args.ladder, args.max_drop)
    server.set_limits(
        FrameLimits(
            max_elements=args.max_tensor_mib << 18, max_decoded_bytes=args.max_tensor_mib << 20
        )
    )
    if args.metrics:
        server.on_probe = MetricsLog(args.metrics)
    store = None
    if args.state:
        store = StateStore(args.state, server, every=args.checkpoint_every)
        resumed = store.load()
        server.on_applied = store.on_applied
    running = serve_handler(
        server.handle,
        args.host,
        args.port,
        tokens=tokens,
        tls=tls,
        max_message_bytes=args.max_message_bytes,
        status=server.status,
        max_workers=args.max_workers,
        limits=limits,
        on_stream_closed=stream_closed_hook(server),
    )
    info = {
        "host": args.host,
        "port": running.port,
        "config": server.config,
        "codec": server.act_codec.codec.spec,
        "grad_codec": server.grad_codec.codec.spec,
        "input_shape": shapes["input_shape"],
        "clients": sorted(tokens or {}),
        "resumed_steps": server.steps_applied if store and resumed else 0,
        "resumed_from": str(store.loaded_from) if store and store.loaded_from else None,
        "drift": server.drift.policy if server.drift else "off",
    }
    if args.json:
        print_json({"listening": f"{args.host}:{running.port}", **info})
    else:
        print(f"listening on {args.host}:{running.port}", flush=True)
        print(
            f"  config {server.config}, codec {info['codec']}, grad codec {info['grad_codec']}, "
            f"{len(tokens or {})} client token(s)"
            + (
                f", resumed at step {server.steps_applied} from {info['resumed_from']}"
                if info["resumed_from"]
                else ""
            ),
            flush=True,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop(grace=2.0)
    if store is not None:
        store.save()
    return 0
