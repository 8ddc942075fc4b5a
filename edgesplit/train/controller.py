"""Adaptive bitrate: move each client along a ladder of codecs from the probes it sends.

A probe is a batch the client also sends at fp32 (``--probe-every K``); the server runs its
layers on both copies and measures how often their decisions disagree (and, with labels, the
accuracy of each). The controller keeps, per client, a window of those measurements and

* moves **up** the ladder (more bits) as soon as the window's cost is over the budget
  ``max_drop`` (accuracy points: disagreement or accuracy lost on the decoded batch), and
* moves **down** (fewer bytes) after ``patience`` probes in a row cost under half the budget.

The server tells the client in the reply (meta ``codec``) and logs every switch with its reason.
State is one small record per client, created by an accepted probe only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edgesplit.codecs import parse_codec
from edgesplit.errors import ConfigError


@dataclass
class _ClientState:
    rung: int
    costs: deque[float]
    calm: int = 0


@dataclass
class BitrateController:
    """Per-client codec choice from probe costs.

    Parameters
    ----------
    ladder:
        Codec specs, cheapest first (e.g. ``("q2+zstd", "q4+zstd", "q8+zstd")``).
    max_drop:
        Budget in accuracy points a probe may cost (decoded vs fp32 copy of the same batch).
    window:
        Probes averaged for the "over budget" decision.
    patience:
        Consecutive probes under half the budget before trying one rung cheaper.
    start:
        Rung a new client starts on (default: the top, the safest).
    """

    ladder: tuple[str, ...]
    max_drop: float = 0.5
    window: int = 4
    patience: int = 3
    start: int | None = None
    _clients: dict[str, _ClientState] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.ladder:
            raise ConfigError("a bitrate ladder needs at least one codec, cheapest first")
        for spec in self.ladder:
            parse_codec(spec)  # a CodecError naming the bad stage
        if not self.max_drop > 0:
            raise ConfigError(f"--max-drop must be positive (accuracy points), got {self.max_drop}")

    @classmethod
    def parse(cls, ladder: str, max_drop: float) -> BitrateController:
        """From ``--ladder q2+zstd,q4+zstd,q8+zstd --max-drop 0.5``."""
        return cls(tuple(s.strip() for s in ladder.split(",") if s.strip()), max_drop)

    def codec_for(self, client: str) -> str:
        """The codec ``client`` should send with now."""
        state = self._clients.get(client)
        return self.ladder[state.rung if state else self._start()]

    def _start(self) -> int:
        return len(self.ladder) - 1 if self.start is None else self.start

    @staticmethod
    def cost(probe: dict[str, Any]) -> float | None:
        """Accuracy points a probe lost: accuracy drop with labels, else disagreement."""
        if "accuracy_reference" in probe and "accuracy_decoded" in probe:
            return 100.0 * max(0.0, probe["accuracy_reference"] - probe["accuracy_decoded"])
        if "agreement" in probe:
            return 100.0 * (1.0 - float(probe["agreement"]))
        return None

    def observe(self, client: str, probe: dict[str, Any]) -> dict[str, Any] | None:
        """Record one probe of ``client``; return the switch made (``from``, ``to``, ``why``)
        or ``None``."""
        cost = self.cost(probe)
        if cost is None:
            return None
        state = self._clients.setdefault(
            client, _ClientState(self._start(), deque(maxlen=self.window))
        )
        state.costs.append(cost)
        mean = sum(state.costs) / len(state.costs)
        old = state.rung
        if mean > self.max_drop and state.rung < len(self.ladder) - 1:
            state.rung += 1
            why = (f"probes cost {mean:.2f} points on average (last {len(state.costs)}), over "
                   f"the budget of {self.max_drop:g}: more bits")
        elif cost < self.max_drop / 2:
            state.calm += 1
            if state.calm < self.patience or state.rung == 0:
                return None
            state.rung -= 1
            why = (f"{state.calm} probes in a row cost under {self.max_drop / 2:g} points: "
                   "fewer bytes")
        else:
            state.calm = 0
            return None
        state.calm = 0
        state.costs.clear()  # judge the new codec on its own probes
        return {"client": client, "from": self.ladder[old], "to": self.ladder[state.rung],
                "why": why}
