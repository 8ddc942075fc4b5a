"""What an export starts from: the segments of one split model and the facts about them.

:class:`SplitModel` is independent of where the segments came from, so this package needs no
import of ``edgesplit.train`` (a sibling layer): the CLI loads a checkpoint or trains, and hands
the pieces over with :meth:`SplitModel.from_checkpoint` / :meth:`SplitModel.from_trained`, which
read those objects by attribute.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesplit.data import Dataset, label_dtype
from edgesplit.errors import ExportError

CONFIGS = ("vanilla", "ushape", "vertical", "splitfed")


@dataclass
class SplitModel:
    """The segments of a split model and what an export records about them.

    Attributes
    ----------
    config: ``vanilla``, ``ushape``, ``vertical`` or ``splitfed``.
    lowers: client segment(s): one, or one per vertical party.
    server: the server segment (ushape: the middle).
    head: ushape only: the client's last layers.
    input_shape: one full sample (all features), no batch axis.
    num_classes: number of classes.
    codec, grad_codec: the activation and gradient codec specs the model was trained with.
    cuts: the cut layer name(s).
    feature_blocks: vertical only: ``(start, stop)`` of the last feature axis per party.
    dataset: data for parity samples, int8 calibration and the int8 accuracy (optional for
        fp32 exports: parity then runs on random inputs).
    meta: the checkpoint's ``checkpoint.json`` contents, copied beside the bundle.
    server_state: a ``server.pt`` to copy beside the bundle as is (else the state dict of
        :attr:`server` is saved).
    trained: ``False`` for an initialised-but-untrained export (recorded in the manifest).
    checkpoint: the checkpoint directory it came from, if any.
    accuracy: test accuracy the checkpoint reported, if any.
    run_id: the checkpoint's run id (``meta["run_id"]``); a model trained in this process (or
        an old checkpoint) gets a fresh one, so every bundle names the run it belongs to.
    """

    config: str
    lowers: list[nn.Module]
    server: nn.Module
    head: nn.Module | None
    input_shape: tuple[int, ...]
    num_classes: int
    codec: str = "fp32"
    grad_codec: str = "fp32"
    cuts: tuple[str, ...] = ()
    feature_blocks: list[tuple[int, int]] = field(default_factory=list)
    dataset: Dataset | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    server_state: Path | None = None
    trained: bool = True
    checkpoint: str | None = None
    accuracy: float | None = None
    run_id: str = ""

    def __post_init__(self) -> None:
        if not self.run_id:
            self.run_id = str(self.meta.get("run_id") or uuid.uuid4().hex)
        self.meta = {**self.meta, "run_id": self.run_id}
        if self.config not in CONFIGS:
            raise ExportError(f"unknown config {self.config!r}; valid: {', '.join(CONFIGS)}")
        if self.config == "vertical" and len(self.feature_blocks) != len(self.lowers):
            raise ExportError(f"vertical model has {len(self.lowers)} parties but "
                              f"{len(self.feature_blocks)} feature blocks")
        if self.config == "ushape" and self.head is None:
            raise ExportError("a ushape model needs its head (the client's last layers)")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(cls, checkpoint: Any, dataset: Dataset | None = None) -> SplitModel:
        """From an ``edgesplit.train.checkpoint.Checkpoint`` (read by attribute)."""
        spec, parts, meta = checkpoint.spec, checkpoint.parts, checkpoint.meta
        result = meta.get("result") or {}
        root = Path(checkpoint.path)
        return cls(
            config=spec.config, lowers=list(parts.lowers), server=parts.server, head=parts.head,
            input_shape=tuple(meta["input_shape"]), num_classes=int(meta["num_classes"]),
            codec=spec.codec, grad_codec=spec.grad_codec, cuts=tuple(parts.cuts),
            feature_blocks=[tuple(b) for b in parts.blocks], dataset=dataset, meta=dict(meta),
            server_state=root / "server.pt" if (root / "server.pt").is_file() else None,
            trained=bool(meta.get("trained", True)), checkpoint=str(root),
            accuracy=result.get("accuracy"),
        )

    @classmethod
    def from_trained(cls, trained: Any) -> SplitModel:
        """From an ``edgesplit.train.engine.TrainedSplit`` (read by attribute).

        As :func:`save_checkpoint` does, the last client's segment is exported for vanilla,
        ushape and splitfed (it holds the freshest weights), every party's for vertical.
        """
        spec, data = trained.spec, trained.dataset
        lowers = trained.client_segments if spec.config == "vertical" \
            else trained.client_segments[-1:]
        return cls(
            config=spec.config, lowers=list(lowers), server=trained.server_segment,
            head=trained.head, input_shape=tuple(data.input_shape), num_classes=data.num_classes,
            codec=spec.codec, grad_codec=spec.grad_codec, cuts=tuple(trained.cuts),
            feature_blocks=[tuple(b) for b in trained.feature_blocks], dataset=data,
            # the fields save_checkpoint writes to checkpoint.json (schema 1), so the server
            # folder beside the bundle reads the same whichever way the model came
            meta={"schema": 1, "spec": asdict(spec), "dataset": data.name,
                  "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                  "cuts": list(trained.cuts),
                  "feature_blocks": [list(b) for b in trained.feature_blocks],
                  "parties": len(lowers), "result": trained.result.to_json(),
                  **trained.meta},
            trained=True, accuracy=trained.result.accuracy,
        )

    # ------------------------------------------------------------------ views
    @property
    def parties(self) -> int:
        return len(self.lowers)

    @property
    def dataset_name(self) -> str:
        if self.dataset is not None:
            return self.dataset.name
        return str(self.meta.get("dataset") or "model")

    @property
    def label_dtype(self) -> str:
        return np.dtype(label_dtype(self.num_classes)).name

    def party_codec(self, party: int) -> str:
        """The codec party ``party`` sends with: the one it trained with last (a learned entropy
        model named by id), else the run's codec."""
        codecs = self.meta.get("codecs") or []
        return str(codecs[party]) if party < len(codecs) else self.codec

    def check_party(self, party: int) -> None:
        if not 0 <= party < self.parties:
            which = "parties" if self.config == "vertical" else "client segment"
            raise ExportError(f"--party {party} is out of range: this {self.config} model has "
                              f"{self.parties} {which} (0..{self.parties - 1})")

    def feature_block(self, party: int) -> tuple[int, int] | None:
        return self.feature_blocks[party] if self.config == "vertical" else None

    def party_shape(self, party: int) -> tuple[int, ...]:
        """Per-sample input shape of ``party``'s client segment."""
        block = self.feature_block(party)
        if block is None:
            return self.input_shape
        return (*self.input_shape[:-1], block[1] - block[0])

    def party_x(self, x: np.ndarray, party: int) -> np.ndarray:
        """``party``'s features of full samples ``x``."""
        block = self.feature_block(party)
        if block is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        return np.ascontiguousarray(x[..., block[0]:block[1]], dtype=np.float32)

    def samples(self, party: int, n: int = 256, seed: int = 0) -> tuple[np.ndarray, str]:
        """Inputs for ``party``: the first ``n`` training samples, or standard-normal noise
        when there is no dataset. Returns (array, ``"train"`` or ``"random"``)."""
        if self.dataset is not None and len(self.dataset.x_train):
            return self.party_x(self.dataset.x_train[:n], party), "train"
        rng = np.random.default_rng(seed)
        return rng.standard_normal((n, *self.party_shape(party)), dtype=np.float32), "random"

    # ------------------------------------------------------------------ torch forward
    @torch.no_grad()
    def cut(self, x: np.ndarray, party: int) -> np.ndarray:
        """``party``'s cut tensor in torch eager (fp32) for full samples ``x``."""
        lower = self.lowers[party].eval()
        return lower(torch.from_numpy(self.party_x(x, party))).numpy()

    @torch.no_grad()
    def predict_from_cuts(self, cuts: list[np.ndarray]) -> np.ndarray:
        """Class ids from every party's cut tensor, through the server (and the head)."""
        self.server.eval()
        if self.config == "vertical":
            joined = torch.cat([torch.from_numpy(c).flatten(1) for c in cuts], dim=1)
        else:
            joined = torch.from_numpy(cuts[0])
        out = self.server(joined)
        if self.head is not None:
            out = self.head.eval()(out)
        return out.argmax(1).numpy()

    def mid_shape(self) -> list[int]:
        """ushape: per-sample shape of the server's middle output (the head's input)."""
        from edgesplit.split.profile import profile_segment

        cut_shape = profile_segment(self.lowers[0], self.party_shape(0)).output_shape
        return profile_segment(self.server, tuple(cut_shape)).output_shape
