"""Checkpoints: a directory of state dicts and JSON that ``export`` and ``serve`` load.

Layout::

    CHECKPOINT/
      checkpoint.json    schema version, run_id (uuid hex, new at each save), the TrainSpec,
                         shapes, cuts, feature blocks, result, and the drift reference: per
                         client segment (vertical: per party), statistics of the decoded cut
                         activations of the training data (:mod:`.server_drift`)
      client-<k>.pt      client segment k (one, or one per vertical party)
      head.pt            ushape only: the client's last layers
      server.pt          the server segment

State dicts load with ``torch.load(weights_only=True)``: no pickle of anything a peer sent.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgesplit.codecs.entropy import register_json
from edgesplit.errors import CodecError, ConfigError
from edgesplit.train.engine import SplitParts, TrainedSplit, build_split
from edgesplit.train.server_drift import DriftGuard
from edgesplit.train.spec import TrainSpec

SCHEMA_VERSION = 1
META_FILE = "checkpoint.json"


def save_checkpoint(path: str | Path, trained: TrainedSplit) -> Path:
    """Write ``trained`` to the directory ``path`` (created if needed)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    data = trained.dataset
    # vanilla/splitfed: the last client holds the freshest weights; vertical: one per party
    segments = (
        trained.client_segments
        if trained.spec.config == "vertical"
        else trained.client_segments[-1:]
    )
    for k, segment in enumerate(segments):
        torch.save(segment.state_dict(), out / f"client-{k}.pt")
    torch.save(trained.server_segment.state_dict(), out / "server.pt")
    if trained.head is not None:
        torch.save(trained.head.state_dict(), out / "head.pt")
    meta = {
        "schema": SCHEMA_VERSION,
        # identifies this run's weights: the bundle and server segment exported from it carry
        # it, so a server can refuse a client bundle from another run
        "run_id": uuid.uuid4().hex,
        "spec": asdict(trained.spec),
        "dataset": data.name,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "cuts": list(trained.cuts),
        "feature_blocks": [list(b) for b in trained.feature_blocks],
        "parties": len(segments),
        "result": trained.result.to_json(),
        **trained.meta,  # per-client codecs, their entropy models, the drift reference
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out


@dataclass
class Checkpoint:
    """A loaded checkpoint: its metadata and the segments with their trained weights."""

    path: Path
    meta: dict[str, Any]
    spec: TrainSpec
    parts: SplitParts

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def run_id(self) -> str | None:
        """The run id written at save time (``None`` for checkpoints older than it)."""
        value = self.meta.get("run_id")
        return str(value) if value else None

    def drift_guard(self, policy: str = "flag") -> DriftGuard | None:
        """A :class:`~edgesplit.train.server_drift.DriftGuard` screening a served server's
        incoming activations against this run's training reference; ``None`` for a checkpoint
        without one (saved before references existed, or from a run that diverged).

        Raises
        ------
        ConfigError
            An unknown policy, or a malformed reference (naming the file).
        """
        try:
            return DriftGuard.from_json(self.meta.get("drift_reference"), policy)
        except ConfigError as exc:
            raise ConfigError(f"{self.path / META_FILE}: {exc}") from None


def load_checkpoint(
    path: str | Path, segments: tuple[str, ...] = ("client", "server", "head")
) -> Checkpoint:
    """Rebuild the segments a checkpoint describes and load the weights of ``segments``
    (``serve`` needs only the server's, which an export's ``.server`` directory holds)."""
    root = Path(path)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise ConfigError(
            f"{root} is not a checkpoint (no {META_FILE}); write one with "
            "`edgesplit train --save DIR`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{meta_path} is not valid JSON: {exc}") from None
    if meta.get("schema") != SCHEMA_VERSION:
        raise ConfigError(
            f"{meta_path} has schema {meta.get('schema')!r}; this edgesplit reads "
            f"schema {SCHEMA_VERSION}"
        )
    spec = TrainSpec(**meta["spec"])
    try:
        register_json(meta.get("entropy_models"))  # trusted: our own checkpoint
    except CodecError as exc:
        raise ConfigError(f"{meta_path}: {exc}") from None
    parts = build_split(spec, tuple(meta["input_shape"]), int(meta["num_classes"]))
    if "client" in segments:
        for k, lower in enumerate(parts.lowers):
            lower.load_state_dict(_load_state(root / f"client-{k}.pt"))
    if "server" in segments:
        parts.server.load_state_dict(_load_state(root / "server.pt"))
    if parts.head is not None and "head" in segments:
        parts.head.load_state_dict(_load_state(root / "head.pt"))
    return Checkpoint(root, meta, spec, parts)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing")
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or hostile file
        raise ConfigError(f"cannot load {path}: {type(exc).__name__}: {exc}") from None
