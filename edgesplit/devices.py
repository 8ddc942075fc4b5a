"""Device and link profiles: the numbers the latency model and the export check run on.

Profiles are TOML files in the repository's ``devices/`` folder (one file per device, plus
``links.toml`` with one table per link); ``devices/README.md`` explains every field and where
each number comes from. This module is torch-free and standard-library only (``tomllib`` and
dataclasses), so the export command and the edge runtime can read profiles anywhere.

The folder is found relative to the package (``<repo>/devices``) and can be replaced with the
environment variable ``EDGESPLIT_DEVICES_DIR``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesplit.errors import ConfigError
from edgesplit.toml_compat import tomllib

#: Environment variable that replaces the built-in profile folder.
ENV_DIR = "EDGESPLIT_DEVICES_DIR"
#: File in the profile folder holding the link tables.
LINKS_FILE = "links.toml"
#: Device roles: ``client`` devices run the client segment, ``server`` profiles the server side.
ROLES = ("client", "server")

MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceProfile:
    """What one device can do for a client (or server) segment.

    Attributes
    ----------
    name:
        Short id, equal to the file stem (``rpi4`` for ``rpi4.toml``).
    description:
        Human description: board, SoC, cores, memory variant, runtime.
    role:
        ``client`` (a target for client segments) or ``server`` (a profile for the server side).
    effective_gflops_fp32, effective_gflops_int8:
        *Effective* throughput in GFLOP/s (GOP/s for int8) that small-batch DNN inference
        reaches through ONNX Runtime on this device -- not the vendor peak. The README explains
        how each value was derived from measured benchmarks.
    memory_mib:
        Memory available to the process in MiB (total RAM of the stated variant; shared with the
        GPU on Jetsons).
    max_onnx_opset:
        Highest ``ai.onnx`` opset the ONNX Runtime version typically deployed on the device
        implements; an exported client segment must not use a newer one.
    execution_provider:
        ONNX Runtime execution provider the client would use (``CPUExecutionProvider``,
        ``CUDAExecutionProvider``, ...).
    effective_gflops_fp16:
        Effective fp16 throughput where the device has a fast fp16 path (GPUs), else ``None``.
    onnxruntime_version:
        The ONNX Runtime version ``max_onnx_opset`` refers to (informational).
    sources:
        Field name -> where its number comes from (spec sheet, paper, benchmark, derivation).
    path:
        The file the profile was read from (empty for profiles built in code).
    """

    name: str
    description: str
    effective_gflops_fp32: float
    effective_gflops_int8: float
    memory_mib: int
    max_onnx_opset: int
    execution_provider: str
    role: str = "client"
    effective_gflops_fp16: float | None = None
    onnxruntime_version: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def memory_bytes(self) -> int:
        """``memory_mib`` in bytes."""
        return self.memory_mib * MIB

    def gflops(self, precision: str = "fp32") -> float:
        """Effective throughput for ``precision`` (``fp32``, ``fp16`` or ``int8``).

        ``fp16`` falls back to fp32 on devices without a fast fp16 path (CPUs run fp16 models
        no faster than fp32 ones through ONNX Runtime's CPU provider).
        """
        if precision == "fp32":
            return self.effective_gflops_fp32
        if precision == "int8":
            return self.effective_gflops_int8
        if precision == "fp16":
            return self.effective_gflops_fp16 or self.effective_gflops_fp32
        raise ConfigError(f"unknown precision {precision!r}; valid: fp32, fp16, int8")

    def numbers(self) -> dict[str, float | int]:
        """The profile's numeric fields (each of them should have an entry in ``sources``)."""
        out: dict[str, float | int] = {
            "effective_gflops_fp32": self.effective_gflops_fp32,
            "effective_gflops_int8": self.effective_gflops_int8,
            "memory_mib": self.memory_mib,
            "max_onnx_opset": self.max_onnx_opset,
        }
        if self.effective_gflops_fp16 is not None:
            out["effective_gflops_fp16"] = self.effective_gflops_fp16
        return out


@dataclass(frozen=True)
class LinkProfile:
    """A network link between a client device and the server.

    Attributes
    ----------
    name:
        Short id (the table name in ``links.toml``).
    description:
        What link this is (technology, band, conditions).
    uplink_mbps, downlink_mbps:
        Application-level throughput in Mbit/s (10^6 bit/s), client -> server and back.
    rtt_ms:
        Round-trip time in milliseconds for a small message (and its answer).
    max_payload_bytes:
        Largest application payload one message can carry, or ``None`` when the transport
        streams/fragments for us (TCP). A frame larger than this is *infeasible*: the latency
        model does not model application-level fragmentation.
    overhead_bytes_per_message:
        Protocol bytes added to every message on the air (e.g. the 13-byte LoRaWAN MAC header
        and MIC); they count towards air time, not towards ``max_payload_bytes``.
    duty_cycle:
        Fraction of time the client may transmit (1.0 = no limit; 0.01 for the EU868 1 % band).
        After sending for *t* seconds the client must stay silent for ``t * (1/duty_cycle - 1)``.
    sources:
        Field name -> where its number comes from.
    """

    name: str
    description: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    max_payload_bytes: int | None = None
    overhead_bytes_per_message: int = 0
    duty_cycle: float = 1.0
    sources: dict[str, str] = field(default_factory=dict)

    def numbers(self) -> dict[str, float | int]:
        """The link's numeric fields (each of them should have an entry in ``sources``)."""
        out: dict[str, float | int] = {
            "uplink_mbps": self.uplink_mbps,
            "downlink_mbps": self.downlink_mbps,
            "rtt_ms": self.rtt_ms,
            "overhead_bytes_per_message": self.overhead_bytes_per_message,
            "duty_cycle": self.duty_cycle,
        }
        if self.max_payload_bytes is not None:
            out["max_payload_bytes"] = self.max_payload_bytes
        return out


# ---------------------------------------------------------------------------------------------
# Finding and listing profiles


def devices_dir() -> Path:
    """The profile folder: ``$EDGESPLIT_DEVICES_DIR`` if set, else ``<repo>/devices``.

    Raises
    ------
    ConfigError
        If the folder does not exist (say which one and how to point elsewhere).
    """
    env = os.environ.get(ENV_DIR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{ENV_DIR}={env!r} is not a directory")
        return path
    # the package lives in <repo>/edgesplit; the profiles in <repo>/devices
    path = Path(__file__).resolve().parent.parent / "devices"
    if not path.is_dir():
        raise ConfigError(
            f"device profiles not found at {path}; set {ENV_DIR} to a folder of device "
            "*.toml files and links.toml"
        )
    return path


def list_devices(role: str | None = "client") -> list[str]:
    """Names of the device profiles in :func:`devices_dir`, sorted.

    Parameters
    ----------
    role:
        ``client`` (default: the targets a client segment can run on), ``server``, or ``None``
        for every profile. Reading the role parses each file; an unreadable file is an error.
    """
    if role is not None and role not in ROLES:
        raise ConfigError(f"unknown device role {role!r}; valid: {', '.join(ROLES)}")
    names = sorted(p.stem for p in devices_dir().glob("*.toml") if p.name != LINKS_FILE)
    if role is None:
        return names
    return [n for n in names if load_device(n).role == role]


def list_links() -> list[str]:
    """Names of the links in ``links.toml``, in file order."""
    return list(_read_toml(devices_dir() / LINKS_FILE))


# ---------------------------------------------------------------------------------------------
# Loading


def load_device(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a device profile by name (``rpi4``) or by path to a ``.toml`` file.

    Raises
    ------
    ConfigError
        Unknown name (the message lists the valid ones), unreadable or malformed TOML (the
        message names the file), a missing or mistyped field (names file and field).
    """
    text = os.fspath(name_or_path)
    if text.endswith(".toml") or os.sep in text or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"device profile file {text!r} does not exist")
    else:
        folder = devices_dir()
        path = folder / f"{text}.toml"
        if text == Path(LINKS_FILE).stem or not path.is_file():
            valid = sorted(p.stem for p in folder.glob("*.toml") if p.name != LINKS_FILE)
            raise ConfigError(
                f"unknown device {text!r}; valid devices: {', '.join(valid) or '(none)'} "
                f"(profiles in {folder}), or a path to a .toml profile"
            )
    doc = _read_toml(path)
    r = _Reader(doc, path, "")
    fp16 = r.opt_number("effective_gflops_fp16")
    return DeviceProfile(
        name=r.string("name", default=path.stem),
        description=r.string("description"),
        role=r.choice("role", ROLES, default="client"),
        effective_gflops_fp32=r.number("effective_gflops_fp32"),
        effective_gflops_int8=r.number("effective_gflops_int8"),
        effective_gflops_fp16=fp16,
        memory_mib=r.integer("memory_mib"),
        max_onnx_opset=r.integer("max_onnx_opset"),
        execution_provider=r.string("execution_provider"),
        onnxruntime_version=r.string("onnxruntime_version", default=""),
        sources=r.sources(),
        path=str(path),
    )


def load_link(name: str) -> LinkProfile:
    """Load one link from ``links.toml`` by name.

    Raises
    ------
    ConfigError
        Unknown name (lists the valid ones), malformed file or field (names file and field).
    """
    path = devices_dir() / LINKS_FILE
    doc = _read_toml(path)
    if name not in doc:
        raise ConfigError(
            f"unknown link {name!r}; valid links: {', '.join(doc) or '(none)'} (in {path})"
        )
    table = doc[name]
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table, got {type(table).__name__}")
    r = _Reader(table, path, f"{name}.")
    max_payload = r.opt_integer("max_payload_bytes")
    duty = r.opt_number("duty_cycle")
    duty = 1.0 if duty is None else duty
    if duty > 1.0:
        raise ConfigError(f"{path}: field {name}.duty_cycle must be in (0, 1], got {duty}")
    return LinkProfile(
        name=name,
        description=r.string("description"),
        uplink_mbps=r.number("uplink_mbps"),
        downlink_mbps=r.number("downlink_mbps"),
        rtt_ms=r.number("rtt_ms", allow_zero=True),
        max_payload_bytes=max_payload,
        overhead_bytes_per_message=r.opt_integer("overhead_bytes_per_message",
                                                 allow_zero=True) or 0,
        duty_cycle=duty,
        sources=r.sources(),
    )


def missing_sources(profile: DeviceProfile | LinkProfile) -> list[str]:
    """Numeric fields of ``profile`` that have no (non-empty) entry in its ``sources``."""
    return [k for k in profile.numbers() if not profile.sources.get(k, "").strip()]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"profile file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries line and column
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read profile {path}: {exc}") from None


class _Reader:
    """Typed field access with errors that name the file and the field."""

    def __init__(self, doc: dict[str, Any], path: Path, prefix: str) -> None:
        self.doc, self.path, self.prefix = doc, path, prefix

    def _missing(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: missing field {self.prefix}{key} ({what})")

    def _bad(self, key: str, what: str, value: Any) -> ConfigError:
        return ConfigError(
            f"{self.path}: field {self.prefix}{key} must be {what}, got {value!r}"
        )

    def string(self, key: str, *, default: str | None = None) -> str:
        if key not in self.doc:
            if default is None:
                raise self._missing(key, "a string")
            return default
        value = self.doc[key]
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def choice(self, key: str, valid: tuple[str, ...], *, default: str) -> str:
        value = self.string(key, default=default)
        if value not in valid:
            raise self._bad(key, f"one of {', '.join(valid)}", value)
        return value

    def _check_number(self, key: str, value: Any, allow_zero: bool) -> float:
        # bool is an int subclass: `true` is not a throughput
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number", value)
        value = float(value)
        ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            raise self._bad(key, "a finite number " + (">= 0" if allow_zero else "> 0"), value)
        return value

    def number(self, key: str, *, allow_zero: bool = False) -> float:
        if key not in self.doc:
            raise self._missing(key, "a positive number")
        return self._check_number(key, self.doc[key], allow_zero)

    def opt_number(self, key: str, *, allow_zero: bool = False) -> float | None:
        if key not in self.doc:
            return None
        return self._check_number(key, self.doc[key], allow_zero)

    def _check_integer(self, key: str, value: Any, allow_zero: bool) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        if value < 0 or (value == 0 and not allow_zero):
            raise self._bad(key, "an integer " + (">= 0" if allow_zero else "> 0"), value)
        return value

    def integer(self, key: str, *, allow_zero: bool = False) -> int:
        if key not in self.doc:
            raise self._missing(key, "a positive integer")
        return self._check_integer(key, self.doc[key], allow_zero)

    def opt_integer(self, key: str, *, allow_zero: bool = False) -> int | None:
        if key not in self.doc:
            return None
        return self._check_integer(key, self.doc[key], allow_zero)

    def sources(self) -> dict[str, str]:
        value = self.doc.get("sources", {})
        if not isinstance(value, dict):
            raise self._bad("sources", "a table of field = \"citation\"", value)
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                raise self._bad(f"sources.{k}", "a string", v)
            out[k] = v
        return out
