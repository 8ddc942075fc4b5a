"""``edgesplit status``: ask a running split server for its status table and print it.

The status is whatever the server's ``Status`` RPC returns (``SplitServer.status()`` plus what
``edgesplit serve`` adds): known parts get their own table (clients, the latest probe), every
other key is printed generically, so a newer server's fields still show. Standard library only
at module level.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from typing import Any

from edgesplit.cli.client import add_connection_options, client_tls, resolve_token

#: Columns of the per-client table, in order, with their headings; other keys follow.
CLIENT_COLUMNS = {
    "steps": "steps",
    "samples": "samples",
    "loss": "loss",
    "accuracy": "accuracy",
    "bytes_in": "bytes in",
    "bytes_out": "bytes out",
    "repeats": "repeats",
    "errors": "errors",
    "last_seen": "last seen",
}
_BYTES_KEYS = {"bytes_in", "bytes_out", "bytes_act", "bytes_act_fp32"}
#: Keys whose numbers are Unix timestamps (seconds): printed as ISO-8601 UTC with their age.
_TIME_KEYS = {"time", "last_seen"}


def add_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "status",
        formatter_class=formatter,
        help="show a running server's clients, steps, bytes and latest probes",
        description="Ask a split server (`edgesplit serve`) for its status: per client the "
        "steps, samples, loss, accuracy, bytes in/out, repeated steps, errors and when it was "
        "last seen, and the latest probe (accuracy on decoded vs fp32 activations, SNR).\n\n"
        "example: edgesplit status host:50051 --token $TOKEN",
    )
    p.add_argument("server", metavar="HOST:PORT", help="the split server")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="give up after this long"
    )
    add_connection_options(p, sessions=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgesplit.transport.grpc_client import fetch_status

    resolve_token(args)
    status = fetch_status(args.server, args.token, timeout=args.timeout, tls=client_tls(args))
    if args.json:
        from edgesplit.cli.common import print_json

        print_json(status)
        return 0
    print_status(status, args.server)
    return 0


def print_status(status: dict[str, Any], server: str, *, now: float | None = None) -> None:
    """Render a status dict as tables on stdout."""
    from edgesplit.cli.console import console as make_console

    console = make_console()
    now = time.time() if now is None else now
    rest = dict(status)
    clients = rest.pop("clients", None)
    last_probe = rest.pop("last_probe", None)
    probes = rest.pop("probes", None)
    scalars = {k: v for k, v in rest.items() if not isinstance(v, dict | list)}
    head = "  ".join(f"{k} [bold]{_cell(k, v, now)}[/]" for k, v in scalars.items())
    console.print(f"server {server}" + (f"  {head}" if head else ""))
    if isinstance(clients, dict):
        console.print(_clients_table(clients, now))
    elif clients is not None:
        console.print(_generic("clients", clients, now))
    if isinstance(last_probe, dict):
        console.print(_probe_table(last_probe, now))
    elif last_probe is None and "last_probe" in status:
        console.print("no probe yet (clients send one with --probe-every K)")
    if isinstance(probes, dict) and probes and all(isinstance(v, dict) for v in probes.values()):
        console.print(_probes_table(probes))
    elif probes:
        console.print(_generic("probes", probes, now))
    for key, value in rest.items():
        if key not in scalars:
            console.print(_generic(key, value, now))


def _clients_table(clients: dict[str, Any], now: float) -> Any:
    from rich.table import Table

    table = Table(title=f"clients ({len(clients)})")
    rows = {name: row if isinstance(row, dict) else {"value": row} for name, row in clients.items()}
    extra = sorted({k for row in rows.values() for k in row} - set(CLIENT_COLUMNS))
    columns = [k for k in CLIENT_COLUMNS if any(k in row for row in rows.values())] + extra
    table.add_column("client")
    for key in columns:
        table.add_column(CLIENT_COLUMNS.get(key, key), justify="right")
    for name, row in rows.items():
        table.add_row(name, *(_cell(k, row.get(k), now) for k in columns))
    if not rows:
        table.add_row("(none yet)", *("" for _ in columns))
    return table


def _probe_table(probe: dict[str, Any], now: float) -> Any:
    from rich.table import Table

    table = Table(title="latest probe (same batch: decoded vs fp32 reference)", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    p = dict(probe)
    shown: set[str] = set()

    def pair(label: str, a: str, b: str, fmt: str = "{:.4f}") -> None:
        if a in p or b in p:
            table.add_row(label, f"{_fmt(p.get(a), fmt)} vs {_fmt(p.get(b), fmt)}")
            shown.update((a, b))

    for key in ("client", "step", "n"):
        if key in p:
            table.add_row(key, _cell(key, p[key], now))
            shown.add(key)
    pair("accuracy decoded vs reference", "accuracy_decoded", "accuracy_reference")
    pair("loss decoded vs reference", "loss_decoded", "loss_reference")
    if "snr_db" in p:
        snr = p["snr_db"]
        table.add_row("SNR", "lossless" if snr is None or snr == float("inf") else f"{snr:.1f} dB")
        shown.add("snr_db")
    if "bytes_act" in p:
        act, ref = p.get("bytes_act"), p.get("bytes_act_fp32")
        text = _cell("bytes_act", act, now)
        if isinstance(act, int | float) and isinstance(ref, int | float) and act:
            text += f" (fp32 {_cell('bytes_act_fp32', ref, now)}, {ref / act:.1f}× fewer)"
        table.add_row("activation bytes", text)
        shown.update(("bytes_act", "bytes_act_fp32"))
    for key, value in p.items():
        if key not in shown:
            table.add_row(key, _cell(key, value, now))
    return table


def _probes_table(probes: dict[str, Any]) -> Any:
    """One row per client: its latest interval's cost of compression."""
    from rich.table import Table

    table = Table(title="probes: what compression costs, latest interval per client")
    for col in (
        "client",
        "step",
        "acc decoded",
        "acc fp32",
        "agree",
        "SNR dB",
        "B act",
        "B fp32",
        "steps",
    ):
        table.add_column(col, justify="right")
    for name, p in sorted(probes.items()):
        snr = p.get("snr_db")
        table.add_row(
            name,
            str(p.get("step", "")),
            _fmt(p.get("accuracy_decoded"), "{:.4f}"),
            _fmt(p.get("accuracy_reference"), "{:.4f}"),
            _fmt(p.get("agreement"), "{:.3f}"),
            "lossless" if snr is None else f"{snr:.1f}",
            str(p.get("bytes_act", "")),
            str(p.get("bytes_act_fp32", "")),
            str(p.get("interval_steps", "")),
        )
    return table


def _generic(title: str, value: Any, now: float) -> Any:
    """A table for any JSON value: dict of dicts / list of dicts as rows, dict as key/value."""
    from rich.table import Table

    table = Table(title=title)
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        columns = sorted({k for v in value.values() for k in v})
        table.add_column("")
        for c in columns:
            table.add_column(c, justify="right")
        for name, row in value.items():
            table.add_row(str(name), *(_cell(c, row.get(c), now) for c in columns))
        return table
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = list(dict.fromkeys(k for v in value for k in v))
        for c in columns:
            table.add_column(c, justify="right")
        for row in value:
            table.add_row(*(_cell(c, row.get(c), now) for c in columns))
        return table
    if isinstance(value, dict):
        table.add_column("key")
        table.add_column("value", justify="right")
        for k, v in value.items():
            table.add_row(str(k), _cell(k, v, now))
        if not value:
            table.add_row("(empty)", "")
        return table
    table.add_column("value")
    for v in value if isinstance(value, list) else [value]:
        table.add_row(_cell(title, v, now))
    if isinstance(value, list) and not value:
        table.add_row("(empty)")
    return table


def _fmt(value: Any, fmt: str) -> str:
    if isinstance(value, float):
        return fmt.format(value)
    return "—" if value is None else str(value)


def _is_time_key(key: str) -> bool:
    return key in _TIME_KEYS or key.endswith(("_time", "_at"))


def timestamp(seconds: float, now: float) -> str:
    """Unix ``seconds`` as ISO-8601 UTC and its age: ``2026-12-02T02:20:05Z (12 s ago)``;
    ``never`` for 0 or less (a client that has not been seen)."""
    if seconds <= 0:
        return "never"
    when = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
    return f"{when.replace('+00:00', 'Z')} ({max(0.0, now - seconds):.0f} s ago)"


def _cell(key: str, value: Any, now: float) -> str:
    """One value as table text; bytes and timestamps made readable, nested values as JSON."""
    from edgesplit.cli.common import human_bytes

    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if _is_time_key(key) and isinstance(value, int | float):
        return timestamp(value, now)
    if key in _BYTES_KEYS and isinstance(value, int | float):
        return human_bytes(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)
