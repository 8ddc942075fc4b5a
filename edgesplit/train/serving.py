"""What ``edgesplit serve`` runs: a :class:`SplitServer` built from a checkpoint (or fresh from
a spec), its on-disk state for restarts, and the compression metrics log."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from edgesplit.data import load_dataset
from edgesplit.errors import ConfigError
from edgesplit.split.defense import parse_defense
from edgesplit.train.checkpoint import load_checkpoint
from edgesplit.train.engine import build_split
from edgesplit.train.server import SplitServer
from edgesplit.train.server_drift import DriftGuard
from edgesplit.train.server_records import RecordLimits
from edgesplit.train.server_weights import Schema, schema_of
from edgesplit.train.spec import TrainSpec, jsonable
from edgesplit.train.state_file import StateFileError, previous_path, read_checked, write_checked

log = logging.getLogger(__name__)

STATE_FILE = "server-state.pt"


def server_from_checkpoint(
    path: str | Path, record_limits: RecordLimits | None = None, drift: str = "flag"
) -> tuple[SplitServer, dict[str, Any]]:
    """A server holding the trained server segment of a checkpoint (or of an export's
    ``<bundle>.server/`` directory, which holds only ``checkpoint.json`` and ``server.pt``);
    ``record_limits``: what it keeps for its clients (default :class:`RecordLimits`'s);
    ``drift``: ``flag``, ``refuse`` or ``off`` — how activations off the checkpoint's training
    distribution are met (:mod:`edgesplit.train.server_drift`)."""
    ck = load_checkpoint(path, segments=("server",))
    guard = None if drift == "off" else ck.drift_guard(drift)
    if guard is None and drift != "off":
        log.warning(
            "%s has no drift reference (trained before references existed, or over the "
            "network): incoming activations are not screened",
            path,
        )
    shapes = {"input_shape": list(ck.input_shape), "num_classes": ck.num_classes}
    # the lower segments are built (not loaded) from the checkpoint's spec, as export builds
    # them: their names, shapes and dtypes are all the weight schema needs
    server = _server(
        ck.spec, ck.parts.server, shapes, ck.parts.lowers, run_id=ck.run_id,
        record_limits=record_limits, drift=guard,
    )
    return server, shapes


def server_fresh(
    spec: TrainSpec, record_limits: RecordLimits | None = None
) -> tuple[SplitServer, dict[str, Any]]:
    """A server with freshly initialised upper layers, exactly as the in-process engine builds
    them for ``spec`` (the data is read only for its sample shape and class count)."""
    data = load_dataset(spec.data)
    torch.manual_seed(spec.seed)
    parts = build_split(spec, data.input_shape, data.num_classes)
    shapes = {"input_shape": list(data.input_shape), "num_classes": data.num_classes}
    return _server(spec, parts.server, shapes, parts.lowers, record_limits=record_limits), shapes


def weight_schema(spec: TrainSpec, lowers: list[torch.nn.Module]) -> Schema | None:
    """Names, shapes and dtypes of the weights a client of ``spec`` hands off (its lower
    segment's state dict, as the torch client encodes it), for ``vanilla`` and ``ushape``.

    ``None`` (the first accepted contribution fixes it) for ``vertical``, whose parties'
    segments differ and exchange no weights, and for ``splitfed``: a torch client averages its
    whole state dict, a torch-free trainer (:mod:`edgesplit.edge.trainer`) only its parameters
    (its input standardization lives outside its graphs), and both may join a run.
    """
    if spec.config not in ("vanilla", "ushape") or not lowers:
        return None
    return schema_of({n: t.detach().cpu().numpy() for n, t in lowers[0].state_dict().items()})


def _server(
    spec: TrainSpec,
    segment: torch.nn.Module,
    shapes: dict[str, Any],
    lowers: list[torch.nn.Module],
    run_id: str | None = None,
    record_limits: RecordLimits | None = None,
    drift: DriftGuard | None = None,
) -> SplitServer:
    return SplitServer(
        spec.config,
        segment,
        codec=spec.codec,
        grad_codec=spec.grad_codec,
        lr=spec.lr,
        spec={**asdict(spec), "shapes": shapes},
        defense=parse_defense(spec.defense, seed=spec.seed),
        run_id=run_id,
        # a deployed server: every session opens with HELLO, which binds its mode, codec and
        # client index (the in-process engine sends none, so it is not required there)
        require_hello=True,
        num_classes=int(shapes["num_classes"]),
        weight_schema=weight_schema(spec, lowers),
        record_limits=record_limits,
        drift=drift,
    )


class StateStore:
    """Saves the server's state after applied steps and loads it on start, so a restarted
    server neither loses nor repeats a step.

    Each save writes one checked file (:mod:`edgesplit.train.state_file`: a sha256 header, a
    temporary file renamed into place) and keeps the state it replaces beside it as
    ``server-state.pt.prev``. On load a file that fails its checksum is never used: the store
    falls back to the previous good state with a warning naming the bad file, and refuses only
    when neither is good. The save runs under the server lock right after a step's reply is
    recorded, before the reply leaves.
    """

    def __init__(self, directory: str | Path, server: SplitServer, every: int = 1) -> None:
        self.dir = Path(directory)
        self.server = server
        self.every = max(1, every)
        self._since = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"--state {self.dir}: cannot create the directory ({exc.strerror or exc})"
            ) from None
        self.path = self.dir / STATE_FILE
        #: Which file :meth:`load` restored from (``None``: nothing was restored).
        self.loaded_from: Path | None = None

    def load(self) -> bool:
        """Restore the newest good saved state; True when something was restored.

        Raises
        ------
        ConfigError
            A state exists but none of the saved files is good, or the good one was saved by a
            server with other settings.
        """
        candidates = [self.path, previous_path(self.path)]
        if not any(p.exists() for p in candidates):
            return False
        problems: list[str] = []
        for path in candidates:
            if not path.exists():
                continue
            try:
                saved = self._read(path)
            except StateFileError as exc:
                problems.append(str(exc))
                log.warning("state file %s is not usable: %s", path, exc)
                continue
            self._restore(path, saved)
            if path == self.path:
                self._check_fallback()
            if problems:
                log.warning(
                    "falling back to the previous good state %s (%s)", path, "; ".join(problems)
                )
                self._set_aside(self.path)
            self.loaded_from = path
            return True
        raise ConfigError(
            f"cannot restore server state from {self.dir}: no good state file "
            f"({'; '.join(problems)}); pass another --state DIR (or move this one away) to "
            "start fresh"
        )

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        payload = read_checked(path)
        try:
            saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or "meta" not in saved or "tensors" not in saved:
                raise ValueError("it holds no 'tensors' and 'meta' entries")
            saved["meta"] = json.loads(saved["meta"])
        except Exception as exc:  # noqa: BLE001 - checksum matched yet unreadable: say so, once
            raise StateFileError(f"{path} passed its checksum but cannot be read: {exc}") from None
        return saved

    def _restore(self, path: Path, saved: dict[str, Any]) -> None:
        meta = saved["meta"]
        if meta.get("spec") != jsonable(self.server.spec):
            raise ConfigError(
                f"cannot restore server state from {path}: it was saved by a server with other "
                "settings (model, cut, codec or data); pass another --state DIR (or move this "
                "one away) to start fresh"
            )
        try:
            self.server.import_state(saved["tensors"], meta)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot restore server state from {path}: {exc}; pass another --state DIR "
                "(or move this one away) to start fresh"
            ) from None

    def _check_fallback(self) -> None:
        # The newest state is good, but a damaged fallback would only be found when it is
        # needed; say so now (the next save replaces it).
        prev = previous_path(self.path)
        if not prev.exists():
            return
        try:
            read_checked(prev)
        except StateFileError as exc:
            log.warning(
                "the fallback state file is not usable (%s); using %s, and the next save "
                "replaces the fallback", exc, self.path,
            )

    @staticmethod
    def _set_aside(bad: Path) -> None:
        # Keep the bad file for inspection, and out of the way: the next save would otherwise
        # rotate it over the good ``.prev`` this store just loaded.
        if bad.exists():
            aside = bad.with_name(bad.name + ".corrupt")
            os.replace(bad, aside)
            log.warning("moved the unusable state file %s to %s", bad, aside)

    def on_applied(self) -> None:
        self._since += 1
        if self._since >= self.every:
            self.save()

    def save(self) -> None:
        """Write the current state (checked) and keep the one it replaces as ``.prev``."""
        tensors, meta = self.server.export_state()
        meta["spec"] = jsonable(self.server.spec)
        buffer = io.BytesIO()
        torch.save({"tensors": tensors, "meta": json.dumps(meta)}, buffer)
        write_checked(self.path, buffer.getvalue())
        self._since = 0


class MetricsLog:
    """Appends one JSON line per probe (what compression costs, per client and interval)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(jsonable(record), separators=(",", ":"))
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")
