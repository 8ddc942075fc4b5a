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
from edgesplit.train.checkpoint import META_FILE, load_checkpoint
from edgesplit.train.engine import build_split
from edgesplit.train.server import SplitServer
from edgesplit.train.spec import TrainSpec, jsonable

STATE_TENSORS = "server-state.pt"
STATE_META = "server-state.json"


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
    """Saves the server's state after applied steps (atomically: write, then rename) and loads
    it on start, so a restarted server neither loses nor repeats a step."""

    def __init__(self, directory: str | Path, server: SplitServer, every: int = 1) -> None:
        self.dir = Path(directory)
        self.server = server
        self.every = max(1, every)
        self._since = 0
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> bool:
        """Restore a saved state if there is one; True when something was restored."""
        tensors_path, meta_path = self.dir / STATE_TENSORS, self.dir / STATE_META
        if not meta_path.exists():
            return False
        try:
            meta = json.loads(meta_path.read_text())
            tensors = torch.load(tensors_path, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot restore server state from {self.dir}: {exc}; move it away to start fresh"
            ) from None
        self.server.import_state(tensors, meta)
        return True

    def on_applied(self) -> None:
        self._since += 1
        if self._since >= self.every:
            self.save()

    def save(self) -> None:
        tensors, meta = self.server.export_state()
        tmp_t, tmp_m = self.dir / (STATE_TENSORS + ".tmp"), self.dir / (STATE_META + ".tmp")
        torch.save(tensors, tmp_t)
        tmp_m.write_text(json.dumps(meta))
        os.replace(tmp_t, self.dir / STATE_TENSORS)  # tensors first: meta names a saved state
        os.replace(tmp_m, self.dir / STATE_META)
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


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()
