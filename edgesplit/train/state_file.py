"""Checked state files: a payload behind a one-line header carrying its length and sha256.

A server restarts from its state file, so a flipped bit on disk must never load silently: the
header lets :func:`read_checked` tell a good file from a truncated or altered one before a single
byte of the payload is unpickled. :func:`write_checked` writes a temporary file, fsyncs it and
renames it into place, keeping the file it replaces as ``<name>.prev`` so there is always a
previous good state to fall back to.

Header (ASCII, one line): ``EDGESPLIT-STATE 1 <payload length> <sha256 hex>\\n``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgesplit.errors import ConfigError

MAGIC = b"EDGESPLIT-STATE"
VERSION = 1
#: The header is short; anything longer than this before a newline is not our header.
_MAX_HEADER = 128


class StateFileError(ConfigError):
    """A state file that is missing, truncated, altered or not a state file at all."""


def previous_path(path: Path) -> Path:
    """Where the state a save replaced is kept (``server-state.pt`` -> ``server-state.pt.prev``)."""
    return path.with_name(path.name + ".prev")


def write_checked(path: Path, payload: bytes) -> None:
    """Write ``payload`` with its checksum header, atomically; keep the old file as ``.prev``.

    A crash at any point leaves a good file at ``path``, or at ``path.prev``, or both.
    """
    digest = hashlib.sha256(payload).hexdigest()
    header = b"%s %d %d %s\n" % (MAGIC, VERSION, len(payload), digest.encode())
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_checked(path: Path) -> bytes:
    """The payload of a file written by :func:`write_checked`, verified.

    Raises
    ------
    StateFileError
        The file is missing, has no header, is shorter or longer than its header says, or its
        sha256 does not match (one flipped bit is enough).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateFileError(f"{path} does not exist") from None
    except OSError as exc:
        raise StateFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    end = data.find(b"\n", 0, _MAX_HEADER)
    fields = data[:end].split(b" ") if end > 0 else []
    if len(fields) != 4 or fields[0] != MAGIC:
        raise StateFileError(
            f"{path} has no 'EDGESPLIT-STATE' checksum header (not a state file, written by an "
            "older edgesplit, or its first bytes are damaged)"
        )
    try:
        version, length = int(fields[1]), int(fields[2])
        expected = fields[3].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise StateFileError(f"{path} has a damaged checksum header") from None
    if version != VERSION:
        raise StateFileError(
            f"{path} is state format version {version}; this edgesplit reads version {VERSION}"
        )
    payload = data[end + 1 :]
    if len(payload) != length:
        raise StateFileError(
            f"{path} is truncated or padded: its header promises {length} payload bytes, "
            f"the file holds {len(payload)}"
        )
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise StateFileError(
            f"{path} is corrupt: sha256 of its payload is {actual[:16]}..., "
            f"the header says {expected[:16]}..."
        )
    return payload


def _fsync_dir(directory: Path) -> None:
    # The renames must reach the disk too, or a power cut could bring back the old names.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
