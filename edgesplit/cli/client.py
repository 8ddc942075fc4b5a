"""``edgesplit client``: run an exported client bundle against ``edgesplit serve``.

The default path is the torch-free edge runtime (:mod:`edgesplit.edge.runtime`): it needs only
the base install. With ``--mode train`` and a bundle exported with ``--trainable``, the device
trains its own layers (:mod:`edgesplit.edge.trainer`, still torch-free).
``--trainable`` hands over to the torch client that trains its own lower layers
(``edgesplit.train.remote.run_trainable_client``, needs ``edgesplit[train]``).

Only the standard library is imported at module level: ``edgesplit client --help`` must work on a
device without torch, and ``edgesplit --help`` imports every command module.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

#: Environment variable read when ``--token`` is not given (keeps the token out of ``ps``).
TOKEN_ENV = "EDGESPLIT_TOKEN"


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)`` with ``0 <= I < N`` (an argparse ``type``)."""
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must be I/N, e.g. 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= I < N")
    return i, n


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def add_connection_options(parser: argparse.ArgumentParser, *, sessions: bool = True) -> None:
    """``--token`` and the TLS options every command that dials a server takes.

    ``sessions`` adds what only a session stream uses (message size, retries, timeout).
    """
    g = parser.add_argument_group("connection")
    # the environment is read in resolve_token, not here: a default would print in --help
    g.add_argument(
        "--token",
        default=None,
        help=f"this client's bearer token (else ${TOKEN_ENV}; omit both only for a server "
        "run without a token file)",
    )
    g.add_argument("--tls-ca", metavar="PEM", default=None,
                   help="CA that signed the server's certificate (turns TLS on)")
    g.add_argument("--tls-cert", metavar="PEM", default=None,
                   help="this client's certificate, for servers that require mutual TLS")
    g.add_argument("--tls-key", metavar="PEM", default=None, help="key of --tls-cert")
    g.add_argument("--tls-server-name", metavar="NAME", default=None,
                   help="name the server certificate must carry when it differs from HOST "
                   "(e.g. when dialling an IP address)")
    if not sessions:
        return
    g.add_argument("--max-message-bytes", type=_positive, default=64 * 1024 * 1024,
                   metavar="N", help="largest message sent or accepted; set it to the server's")
    g.add_argument("--retries", type=_non_negative, default=8, metavar="N",
                   help="reconnect attempts (jittered exponential backoff, 0.5 s doubling to "
                   "15 s) before giving up on one request; 8 wait about 60 s in all")
    g.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="wait at most this long for one reply")


def resolve_token(args: argparse.Namespace) -> None:
    """Fill ``args.token`` from ``$EDGESPLIT_TOKEN`` when ``--token`` was not given."""
    if not getattr(args, "token", None):
        args.token = os.environ.get(TOKEN_ENV) or None


def client_tls(args: argparse.Namespace) -> Any:
    """The :class:`~edgesplit.transport.tokens.TlsConfig` of the ``--tls-*`` options."""
    from edgesplit.transport.tokens import TlsConfig

    return TlsConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                     server_name=args.tls_server_name)


def open_transport(args: argparse.Namespace) -> Any:
    """A :class:`~edgesplit.transport.grpc_client.GrpcTransport` from the connection options."""
    from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy

    return GrpcTransport(args.server, args.token, max_message_bytes=args.max_message_bytes,
                         retry=RetryPolicy(attempts=args.retries), timeout=args.timeout,
                         tls=client_tls(args))


def add_parser(sub: argparse._SubParsersAction,
               formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "client",
        formatter_class=formatter,
        help="run an exported client bundle against `edgesplit serve` (no torch needed)",
        description="Run the client segment of an exported bundle on local data with ONNX "
        "Runtime, encode the cut tensor with the bundle's codec and exchange it with a split "
        "server. Needs only the base install (no torch).\n\n"
        "modes:\n"
        "  infer  the server returns class ids (ushape: its middle output, finished on this\n"
        "         device by the bundle's head); uses x_test/y_test of an .npz when present,\n"
        "         else x[/y]; the test split of a built-in dataset\n"
        "  train  the server trains its layers on this client's activations and labels; a\n"
        "         bundle exported with --trainable trains its own layers too, here, from the\n"
        "         gradients it receives (then reports the test accuracy), any other bundle\n"
        "         stays frozen; uses x/y of an .npz, the training split of a built-in dataset\n\n"
        "With --trainable a torch client (edgesplit[train]) trains its own lower layers "
        "instead.\n\n"
        "example: edgesplit client --bundle export/out/digits-vanilla --server host:50051 "
        "--data digits-test.npz --mode infer --probe-every 10",
    )
    p.add_argument("--bundle", metavar="DIR", default=None,
                   help="bundle directory written by `edgesplit export` (not with --trainable)")
    p.add_argument("--server", metavar="HOST:PORT", required=True, help="the split server")
    p.add_argument("--data", required=True,
                   help="an .npz with x[, y][, x_test, y_test], an image folder "
                   "root/<class>/<image>, or a built-in dataset name (digits, digits_images, "
                   "breast_cancer; needs scikit-learn, so on a device use an .npz)")
    p.add_argument("--mode", choices=("infer", "train"), default="infer",
                   help="infer: get predictions; train: the server trains on this data")
    p.add_argument("--codec", default=None,
                   help="activation codec (default: the bundle's, the one the server trained "
                   "with), e.g. q8+zstd, q4+zstd, topk:0.1+q8+zstd")
    p.add_argument("--probe-every", type=_non_negative, default=0, metavar="K",
                   help="every K-th batch also sends the activations at fp32 so the server "
                   "measures what the codec costs (0: never)")
    p.add_argument("--batch-size", type=_positive, default=32, metavar="N",
                   help="samples per request")
    p.add_argument("--limit", type=_positive, default=None, metavar="N",
                   help="use only the first N samples")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                   help="use only the I-th of N IID shards of the data (simulates several data "
                   "holders from one dataset); default all data")
    p.add_argument("--session", default=None,
                   help="session id (default random); reuse it to resume after a restart")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (samples, accuracy, bytes, latency_ms, ...)")
    add_connection_options(p)
    g = p.add_argument_group(
        "trainable client (--trainable, needs edgesplit[train])",
        "A torch client that trains its own lower layers with the gradients the server returns. "
        "--index, --clients and --epochs also apply to on-device training (splitfed: this "
        "client's index and the number of clients whose layers are averaged each epoch).",
    )
    g.add_argument("--trainable", action="store_true",
                   help="train this client's lower layers (torch) instead of running a bundle")
    g.add_argument("--config", default=None,
                   help="split configuration (default: the server's)")
    g.add_argument("--index", type=_non_negative, default=0, metavar="I",
                   help="this client's index among --clients")
    g.add_argument("--clients", type=_positive, default=None, metavar="N",
                   help="number of clients taking part (default: the server's)")
    g.add_argument("--epochs", type=_positive, default=None,
                   help="passes over this client's data (default: the server's --epochs; on-device "
                   "training of a trainable bundle: 1)")
    g.add_argument("--from", dest="source", metavar="CHECKPOINT", default=None,
                   help="initial weights of the lower layers (a checkpoint directory)")
    t = p.add_argument_group(
        "on-device training (a bundle exported with --trainable; no torch needed)",
        "With --mode train, a trainable bundle trains its own layers on this device from the "
        "gradients the server returns (ONNX forward/backward graphs + a numpy optimizer), then "
        "reports the test accuracy (x_test/y_test of the .npz).",
    )
    t.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="numpy optimizer (sgd has momentum, like the torch client's)")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the one the model was trained with; adam 1e-3)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    t.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    t.add_argument("--state", metavar="DIR", default=None,
                   help="checkpoint parameters, optimizer state and position here (atomic); "
                   "an existing state is resumed after a reboot")
    t.add_argument("--checkpoint-every", type=_positive, default=1, metavar="STEPS",
                   help="steps between checkpoints (each epoch's end is always saved)")
    t.add_argument("--save-bundle", metavar="DIR", default=None,
                   help="write the trained client as an ordinary inference bundle")
    t.add_argument("--frozen", action="store_true",
                   help="train mode with a trainable bundle, but keep its layers frozen")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgesplit.transport.grpc_client import check_target

    resolve_token(args)
    # the address and TLS files are refused before the bundle, the data or torch load
    check_target(args.server)
    client_tls(args).load("client")
    if args.trainable:
        from edgesplit.cli.trainable import run_trainable_client

        return run_trainable_client(args)
    return run_edge(args)


def run_edge(args: argparse.Namespace) -> int:
    """The torch-free path: bundle + data + gRPC."""
    from edgesplit.cli.progress import edge_progress
    from edgesplit.data import iid_shard_indices
    from edgesplit.edge.bundle import load_bundle
    from edgesplit.edge.runtime import EdgeClient
    from edgesplit.errors import ConfigError

    if args.bundle is None:
        raise ConfigError("--bundle DIR is required (the directory `edgesplit export` wrote); "
                          "or pass --trainable for a torch client")
    bundle = load_bundle(args.bundle)
    if args.mode == "train" and not args.frozen and "trainable" in bundle.manifest:
        return run_edge_train(args, bundle)
    x, y = load_client_data(args.data, args.mode)
    if args.shard is not None:
        keep = iid_shard_indices(len(x), *args.shard)
        x, y = x[keep], (y[keep] if y is not None else None)
    if args.limit is not None:
        x, y = x[: args.limit], (y[: args.limit] if y is not None else None)
    with open_transport(args) as transport:
        client = EdgeClient(bundle, transport, codec=args.codec, mode=args.mode,
                            probe_every=args.probe_every, batch_size=args.batch_size,
                            session=args.session)
        # check before connecting: a wrong data file should not cost a round trip
        x, y = client.check_data(x, y)
        with edge_progress(not args.json) as on_progress:
            report = client.run(x, y, on_progress=on_progress)
    if args.json:
        from edgesplit.cli.common import print_json

        out = report.to_json()
        out["server"] = args.server
        out["data"] = args.data
        print_json(out)
        return 0
    print_report(report, args.server)
    return 0


def run_edge_train(args: argparse.Namespace, bundle: Any) -> int:
    """On-device training of a trainable bundle (torch-free), then test accuracy."""
    from edgesplit.cli.progress import edge_progress
    from edgesplit.data import iid_shard_indices
    from edgesplit.edge.optim import make_optimizer
    from edgesplit.edge.trainer import EdgeTrainer, load_trainable

    model = load_trainable(bundle)
    x, y = load_client_data(args.data, "train")
    x_test, y_test = load_client_data(args.data, "infer")
    if args.shard is not None:
        keep = iid_shard_indices(len(x), *args.shard)
        x, y = x[keep], (y[keep] if y is not None else None)
    if args.limit is not None:
        x, y = x[: args.limit], (y[: args.limit] if y is not None else None)
    default_lr = 1e-3 if args.optimizer == "adam" else float(
        (model.section.get("optimizer") or {}).get("lr", 0.02))
    optimizer = make_optimizer(args.optimizer, args.lr if args.lr is not None else default_lr,
                               args.momentum)
    with open_transport(args) as transport:
        trainer = EdgeTrainer(model, transport, optimizer=optimizer, codec=args.codec,
                              batch_size=args.batch_size, seed=args.seed, session=args.session,
                              state_dir=args.state, checkpoint_every=args.checkpoint_every,
                              index=args.index, clients=args.clients)
        x, y = trainer.check_data(x, y)
        has_test = y_test is not None and x_test is not x
        with edge_progress(not args.json) as on_progress:
            report = trainer.fit(x, y, epochs=args.epochs or 1,
                                 x_test=x_test if y_test is not None else None, y_test=y_test,
                                 on_progress=on_progress, save_bundle=args.save_bundle)
    out = report.to_json()
    out["accuracy_on"] = "test" if has_test else "train"
    out["server"] = args.server
    out["data"] = args.data
    if args.json:
        from edgesplit.cli.common import print_json

        print_json(out)
        return 0
    from rich.table import Table

    from edgesplit.cli.console import console

    table = Table(title=f"on-device training · bundle {report.bundle} ({report.config}) · "
                  f"{report.optimizer['name']} lr {report.optimizer['lr']:g}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    acc = "—" if report.accuracy is None else f"{report.accuracy:.4f} ({out['accuracy_on']})"
    for key, value in (("epochs / steps", f"{report.epochs} / {report.steps}"),
                       ("accuracy after training", acc),
                       ("server loss (last epoch)", f"{report.loss}"),
                       ("bytes up / down", f"{report.bytes_up} / {report.bytes_down}"),
                       ("ms per step", f"{report.latency_ms.get('total', 0.0):.2f}"),
                       ("peak RSS (MiB)", f"{report.peak_rss_mib:.1f}"),
                       ("saved bundle", report.saved_bundle or "—")):
        table.add_row(key, value)
    console().print(table)
    return 0


def load_client_data(source: str, mode: str) -> tuple[Any, Any]:
    """The samples (and labels, if any) the client sends, torch-free.

    infer: ``x_test``/``y_test`` of an .npz when present, else ``x``/``y`` (``y`` optional);
    a built-in dataset's test split. train: ``x``/``y`` of an .npz (``y`` required); a
    built-in's training split. An image folder: all its images in both modes.

    Raises
    ------
    ConfigError
        Missing file, unreadable or malformed .npz, train data without labels, or a built-in
        name on a device without scikit-learn (the message suggests an .npz).
    """
    from pathlib import Path

    from edgesplit.data import BUILTIN, load_dataset, load_image_folder, load_npz
    from edgesplit.errors import ConfigError

    path = Path(source)
    if path.is_dir():
        return load_image_folder(path)
    if path.is_file():
        if path.suffix != ".npz":
            raise ConfigError(f"data file {source!r} must be an .npz (arrays x[, y][, x_test, "
                              "y_test])")
        arrays = load_npz(path, require_labels=False)
        if mode == "infer" and "x_test" in arrays:
            return arrays["x_test"], arrays.get("y_test")
        if mode == "train" and "y" not in arrays:
            raise ConfigError(f"{path} has no array 'y': train mode sends labels to the server")
        return arrays["x"], arrays.get("y")
    if source in BUILTIN:
        data = load_dataset(source)
        return (data.x_test, data.y_test) if mode == "infer" else (data.x_train, data.y_train)
    raise ConfigError(
        f"data {source!r} is neither an existing .npz file or image folder nor a built-in "
        f"dataset ({', '.join(BUILTIN)})"
    )


def print_report(report: Any, server: str) -> None:
    """A human summary of an :class:`~edgesplit.edge.runtime.EdgeReport` on stdout."""
    from rich.table import Table

    from edgesplit.cli.common import human_bytes
    from edgesplit.cli.console import console as make_console

    console = make_console()
    title = (f"{report.mode} · bundle {report.bundle} ({report.config}) · codec {report.codec} "
             f"· server {server}")
    summary = Table(title=title, show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    acc = "—" if report.accuracy is None else f"{report.accuracy:.4f} ({report.labelled} labelled)"
    summary.add_row("samples / batches", f"{report.samples} / {report.batches}")
    summary.add_row("accuracy", acc)
    if report.loss is not None:
        summary.add_row("server loss", f"{report.loss:.4f}")
    ratio = "—" if report.ratio_up is None else f"{report.ratio_up:.1f}×"
    summary.add_row("bytes up", f"{human_bytes(report.bytes_up)}  (fp32 would be "
                    f"{human_bytes(report.bytes_up_fp32)}: {ratio} fewer)")
    if report.probes:
        summary.add_row("of which probes", f"{human_bytes(report.bytes_probe)} in "
                        f"{report.probes} batch(es)")
    summary.add_row("bytes down", human_bytes(report.bytes_down))
    summary.add_row("reconnects / resends", f"{report.reconnects} / {report.resends}")
    console.print(summary)
    latency = Table(title="latency (ms)")
    latency.add_column("")
    parts = [k for k in report.latency_ms if k != "total"] + ["total"]
    for part in parts:
        latency.add_column(part, justify="right")
    latency.add_row("per batch", *(f"{report.latency_ms[k]:.2f}" for k in parts))
    latency.add_row("whole run", *(f"{report.latency_ms_total[k]:.1f}" for k in parts))
    console.print(latency)
    console.print(f"session {report.session}; connect {report.connect_ms:.1f} ms")
