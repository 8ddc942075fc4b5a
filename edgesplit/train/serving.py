"""What ``edgesplit serve`` runs: a :class:`SplitServer` built from a checkpoint (or fresh from
a spec), its on-disk state for restarts, and the compression metrics log."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from edgesplit.data import load_dataset
from edgesplit.errors import ConfigError
from edgesplit.train.checkpoint import load_checkpoint
from edgesplit.train.engine import build_split
from edgesplit.train.server import SplitServer
from edgesplit.train.spec import TrainSpec, jsonable

STATE_FILE = "server-state.pt"


def server_from_checkpoint(path: str | Path) -> tuple[SplitServer, dict[str, Any]]:
    """A server holding the trained server segment of a checkpoint (or of an export's
    ``<bundle>.server/`` directory, which holds only ``checkpoint.json`` and ``server.pt``)."""
    ck = load_checkpoint(path, segments=("server",))
    shapes = {"input_shape": list(ck.input_shape), "num_classes": ck.num_classes}
    return _server(ck.spec, ck.parts.server, shapes), shapes


def server_fresh(spec: TrainSpec) -> tuple[SplitServer, dict[str, Any]]:
    """A server with freshly initialised upper layers, exactly as the in-process engine builds
    them for ``spec`` (the data is read only for its sample shape and class count)."""
    data = load_dataset(spec.data)
    torch.manual_seed(spec.seed)
    parts = build_split(spec, data.input_shape, data.num_classes)
    shapes = {"input_shape": list(data.input_shape), "num_classes": data.num_classes}
    return _server(spec, parts.server, shapes), shapes


def _server(spec: TrainSpec, segment: torch.nn.Module, shapes: dict[str, Any]) -> SplitServer:
    return SplitServer(
        spec.config,
        segment,
        codec=spec.codec,
        grad_codec=spec.grad_codec,
        lr=spec.lr,
        spec={**asdict(spec), "shapes": shapes},
    )


class StateStore:
    """Saves the server's state after applied steps and loads it on start, so a restarted
    server neither loses nor repeats a step.

    One file, written whole and then renamed over the old one: a crash leaves either the old
    state or the new one, never half of each. The save runs under the server lock right after
    a step's reply is recorded, before the reply leaves.
    """

    def __init__(self, directory: str | Path, server: SplitServer, every: int = 1) -> None:
        self.dir = Path(directory)
        self.server = server
        self.every = max(1, every)
        self._since = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_FILE

    def load(self) -> bool:
        """Restore a saved state if there is one; True when something was restored."""
        if not self.path.exists():
            return False
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            meta = json.loads(saved["meta"])
            if meta.get("spec") != jsonable(self.server.spec):
                raise ValueError(
                    "it was saved by a server with other settings (model, cut, codec or data)"
                )
            self.server.import_state(saved["tensors"], meta)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot restore server state from {self.path}: {exc}; pass "
                "another --state DIR (or move this one away) to start fresh"
            ) from None
        return True

    def on_applied(self) -> None:
        self._since += 1
        if self._since >= self.every:
            self.save()

    def save(self) -> None:
        tensors, meta = self.server.export_state()
        meta["spec"] = jsonable(self.server.spec)
        tmp = self.path.with_name(STATE_FILE + ".tmp")
        with tmp.open("wb") as f:
            torch.save({"tensors": tensors, "meta": json.dumps(meta)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
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
