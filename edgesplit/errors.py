"""Typed exceptions. Every failure a user can cause is one of these, with a message that says
what was wrong and what would be right."""

from __future__ import annotations


class EdgesplitError(Exception):
    """Base class of every error edgesplit raises on purpose."""


class CodecError(EdgesplitError):
    """An unknown or malformed codec spec, or a payload a codec cannot decode."""


class FrameError(EdgesplitError):
    """A frame that is truncated, corrupted, over a limit or otherwise not what the format says."""


class ExportError(EdgesplitError):
    """An ONNX export that failed, failed its parity check, or does not fit the target device."""


class TransportError(EdgesplitError):
    """A peer that cannot be reached, refused us, or answered outside the protocol."""


class ConfigError(EdgesplitError):
    """A bad option: unknown configuration, cut, model, data file or device profile."""


class ProtocolError(TransportError):
    """A message that is well-formed bytes but breaks the protocol (wrong kind, session, step)."""


class TrainingDiverged(EdgesplitError):
    """A step whose loss or gradients are not finite: nothing was applied."""
