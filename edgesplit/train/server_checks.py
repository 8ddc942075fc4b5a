"""Explicit checks of what a peer sends, so that a peer's mistake is refused with a sentence
naming the field and the value expected, and anything else that goes wrong is known to be the
server's own fault (INTERNAL, logged) instead of being blamed on the client.

Meta arrives as JSON from the gRPC envelope (strictly parsed there) or as a Python dict from the
in-process transport (not parsed at all): these readers accept only what the protocol sends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from edgesplit.codecs import parse_codec
from edgesplit.errors import CodecError, EdgesplitError, ProtocolError
from edgesplit.wire.frame import FrameLimits, read_header
from edgesplit.wire.messages import Message

#: Largest meta integer the protocol uses (a uint64 step id).
_INT_MAX = 2**64 - 1
#: Modes a HELLO may name.
MODES = ("train", "infer")


class PreconditionFailed(ProtocolError):
    """A well-formed request that the server's state does not allow (wrong configuration,
    an infer session that tries to train, a run that is full or finished)."""

    code = "FAILED_PRECONDITION"


class InternalFault(EdgesplitError):
    """Something failed that no peer input should be able to cause: the server's fault."""

    code = "INTERNAL"


def error_code(exc: BaseException) -> str:
    """The gRPC-style status name a refusal carries (``INVALID_ARGUMENT`` by default)."""
    code = getattr(exc, "code", "INVALID_ARGUMENT")
    return code if isinstance(code, str) else "INVALID_ARGUMENT"


def meta_int(
    message: Message, name: str, default: int | None = None, *, lo: int = 0, hi: int = _INT_MAX
) -> int:
    """Meta ``name`` as an integer in ``lo..hi``; ``default`` when absent (required if None).

    Raises
    ------
    ProtocolError
        Absent and required, not an integer (a bool, a float such as ``Infinity``, a string),
        or out of range.
    """
    value = message.meta.get(name, default)
    if value is None:
        raise ProtocolError(f"{message.kind} message needs meta {name!r} (an integer {lo}..{hi})")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # JSON writers may send 3.0 for 3
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(
            f"{message.kind} meta {name!r} must be an integer {lo}..{hi}, got {_show(value)}"
        )
    if not lo <= value <= hi:
        raise ProtocolError(f"{message.kind} meta {name!r} must be in {lo}..{hi}, got {value}")
    return value


def meta_float(message: Message, name: str, default: float, *, positive: bool = False) -> float:
    """Meta ``name`` as a finite float (``positive``: > 0); ``default`` when absent."""
    value = message.meta.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{message.kind} meta {name!r} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or (positive and number <= 0):
        raise ProtocolError(
            f"{message.kind} meta {name!r} must be a finite "
            f"{'positive ' if positive else ''}number, got {_show(value)}"
        )
    return number


def meta_flag(message: Message, name: str, default: bool) -> bool:
    """Meta ``name`` as a bool (``true``/``false``); ``default`` when absent."""
    value = message.meta.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(
            f"{message.kind} meta {name!r} must be true or false, got {_show(value)}"
        )
    return value


def meta_str(message: Message, name: str, *, limit: int = 256) -> str | None:
    """Meta ``name`` as a short string, ``None`` when absent."""
    value = message.meta.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(
            f"{message.kind} meta {name!r} must be a string of at most {limit} characters, "
            f"got {_show(value)}"
        )
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class HelloTerms:
    """What a HELLO binds for its session (``None``: the client did not say; not bound)."""

    mode: str | None
    config: str | None
    codec: str | None
    family: tuple[str, ...] | None  # the codec's stage names (parameters may change: refits)


def hello_terms(message: Message, server_config: str) -> HelloTerms:
    """Read and check HELLO's ``mode``, ``config`` and ``codec``.

    Raises
    ------
    PreconditionFailed
        HELLO names another configuration than the server runs.
    ProtocolError
        An unknown mode, or a codec spec that does not parse.
    """
    mode = meta_str(message, "mode")
    if mode is not None and mode not in MODES:
        raise ProtocolError(f"HELLO meta 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    config = meta_str(message, "config")
    if config is not None and config != server_config:
        raise PreconditionFailed(
            f"this client was trained as {config}, but the server runs {server_config}: "
            f"connect to a {config} server, or use a {server_config} bundle"
        )
    codec = meta_str(message, "codec")
    family = None
    if codec is not None:
        try:
            family = codec_family(codec)
        except CodecError as exc:
            raise ProtocolError(
                f"HELLO meta 'codec' {codec!r} is not a codec spec: {exc}"
            ) from None
    return HelloTerms(mode, config, codec, family)


def codec_family(spec: str) -> tuple[str, ...]:
    """The stage names of a codec spec (``"q8+zstd:3"`` -> ``("q8", "zstd")``)."""
    return tuple(stage.name for stage in parse_codec(spec).stages)


def frame_family(frame: bytes, limits: FrameLimits) -> tuple[str, ...]:
    """The stage names in a frame's header (the header is validated, the payload not read)."""
    return tuple(stage.name for stage in read_header(frame, limits).stages)


def check_labels(labels: torch.Tensor, classes: int, what: str = "labels") -> None:
    """Labels must be class ids in ``0..classes-1`` (torch silently ignores -100 and fails on
    others with a message about CUDA asserts: refuse them with one that names the range).

    Raises
    ------
    ProtocolError
    """
    if len(labels) == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise ProtocolError(f"{what} must be class ids in 0..{classes - 1}; got {bad}")


def first_layer_inputs(segment: torch.nn.Module) -> str | None:
    """What the segment's first layer takes, in words (for a cut-width refusal), or None."""
    for module in segment.modules():
        if isinstance(module, torch.nn.Linear):
            return f"its first layer takes {module.in_features} features"
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return f"its first layer takes {module.in_channels} channels"
    return None


def cut_mismatch(
    segment: torch.nn.Module, got: tuple[int, ...], known: tuple[int, ...] | None
) -> ProtocolError:
    """The refusal for activations the server segment cannot take."""
    if known is not None:
        expected = f"expected per-sample shape {known} (what accepted steps sent)"
    else:
        expected = first_layer_inputs(segment) or "the server segment cannot take them"
    return ProtocolError(
        f"activations of per-sample shape {got} do not fit the server segment: {expected}; "
        "cut the model where the server was cut, with the same bottleneck"
    )
