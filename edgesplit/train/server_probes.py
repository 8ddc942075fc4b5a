"""Probes: a batch a client also sends at fp32, so the server measures what compression costs
on real data (and, with a bitrate controller, moves that client along a ladder of codecs)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgesplit.train.controller import BitrateController
from edgesplit.train.probe import compare
from edgesplit.wire.frame import fp32_frame_size
from edgesplit.wire.messages import Message

log = logging.getLogger(__name__)


class ProbeLog:
    """The latest probe records (bounded), per client and overall.

    Parameters
    ----------
    controller:
        Moves each probing client along a ladder of codecs (``serve --ladder --max-drop``).
    on_probe:
        Called with each record (outside the server lock).
    """

    def __init__(
        self,
        controller: BitrateController | None = None,
        on_probe: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.controller = controller
        self.on_probe = on_probe
        self.records: deque[dict[str, Any]] = deque(maxlen=1000)
        self.latest: dict[str, dict[str, Any]] = {}

    def measure(
        self,
        segment: nn.Module,
        message: Message,
        act: torch.Tensor,
        ref: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        logits: bool,
        interval: dict[str, int],
    ) -> dict[str, Any]:
        """Compare the decoded batch with its fp32 copy (call under the server lock: it runs the
        shared segment). Returns the record; ``record.get("switch")`` is the codec switch this
        probe caused, if any."""
        costs = compare(segment, act, ref, labels, logits=logits)
        record: dict[str, Any] = {
            "time": time.time(),
            "client": message.client,
            "step": message.step,
            "n": len(act),
            **costs,
            "bytes_act": len(message.tensors["act"]),
            "bytes_act_fp32": fp32_frame_size(tuple(act.shape)),
            **interval,
        }
        switch = self.controller.observe(message.client, record) if self.controller else None
        if switch is not None:
            record["switch"] = switch
            log.info(
                "client %s: codec %s -> %s (%s)",
                message.client,
                switch["from"],
                switch["to"],
                switch["why"],
            )
        self.records.append(record)
        self.latest[message.client] = record
        return record

    def publish(self, record: dict[str, Any]) -> None:
        """Hand a record to ``on_probe`` (outside the lock: it may write a file)."""
        if self.on_probe:
            self.on_probe(record)
