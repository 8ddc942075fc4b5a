"""Load and run an exported client bundle on the device (torch-free: numpy + onnxruntime).

A bundle is the directory ``edgesplit export`` writes::

    BUNDLE/
      manifest.json   what the model expects and what the client must do with its output
      client.onnx     the client segment (one self-contained file, dynamic batch axis)
      head.onnx       ushape only: the client's last layers (they run on the device too)

The server segment is never part of a bundle: the exporter writes it beside, as ``BUNDLE.server``.

>>> bundle = load_bundle("export/out/digits-vanilla")        # doctest: +SKIP
>>> cut = bundle.run(x)               # x: float32, shape (batch, *input shape)  # doctest: +SKIP
>>> bundle.codec                      # encode ``cut`` with this before it travels  # doctest: +SKIP

Import rule: this module never imports torch or onnx (the import-linter contract in setup.cfg).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgesplit.codecs.entropy import register_json
from edgesplit.edge.drift import DriftMonitor, validate_ranges
from edgesplit.errors import CodecError, ConfigError, ExportError

#: Version of manifest.json this module reads and the exporter writes.
SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
CLIENT_FILE = "client.onnx"
HEAD_FILE = "head.onnx"
#: Symbolic name of the dynamic batch axis in every ``shape`` of the manifest.
BATCH = "batch"
WEIGHTS = ("fp32", "int8")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

#: Top-level manifest keys (schema 1) and the JSON types they must have (``None``: may be null).
REQUIRED_KEYS: dict[str, tuple[type | None, ...]] = {
    "schema": (int,),                   # SCHEMA_VERSION
    "name": (str,),                     # bundle name
    "created": (str,),                  # ISO 8601 UTC time of the export
    "config": (str,),                   # vanilla | ushape | vertical | splitfed
    "party": (int,),                    # which client segment this is (vertical party K, else 0)
    "parties": (int,),                  # how many client segments the model has
    "feature_block": (list, None),      # vertical: [start, stop) of the last feature axis
    "full_input_shape": (list,),        # one full sample (before the vertical feature slice)
    "files": (dict,),                   # {"client": "client.onnx", "head": "head.onnx" | null}
    "sha256": (dict,),                  # file name -> hex SHA-256, for every model file
    "input": (dict,),                   # {name, shape: ["batch", ...], dtype} of client.onnx
    "output": (dict,),                  # the same for its output (the cut tensor)
    "cuts": (list,),                    # cut layer name(s)
    "cut_shape": (list,),               # per-sample shape of the cut tensor
    "head": (dict, None),               # ushape: {file, input, output, parity, params, ...}
    "codec": (str,),                    # activation codec the client encodes the cut with
    "grad_codec": (str,),               # gradient codec (training against a live server)
    "num_classes": (int,),
    "label_dtype": (str,),              # dtype labels travel in (uint8 up to 256 classes)
    "opset": (int,),                    # ai.onnx opset of the model files
    "weights": (str,),                  # fp32 | int8
    "parity": (dict,),                  # PARITY_KEYS: ORT (the shipped file, int8 or fp32) vs
                                        # torch eager; "model" says which, int8 adds "fp32"
    "int8_accuracy_fp32": (float, int, None),    # int8 only: test accuracy, fp32 client
    "int8_accuracy": (float, int, None),         # int8 only: test accuracy, int8 client
    "int8_accuracy_change": (float, int, None),  # int8 only: difference in points
    "int8_cut_max_abs": (float, int, None),      # int8 only: max |int8 cut - fp32 cut|
    "client": (dict,),                  # params, flops_per_sample, file_bytes, ...
    "device": (dict, None),             # the device check (fits, opset, memory, ms/sample)
    "server_segment": (str,),           # relative path of the server folder (not shipped)
    "source": (dict,),                  # checkpoint, dataset, trained, accuracy
    "versions": (dict,),                # exporter, torch, onnx, onnxruntime, edgesplit
}
#: Keys a manifest may lack (older exports) but must type-check when present.
OPTIONAL_KEYS: dict[str, tuple[type | None, ...]] = {
    "run_id": (str,),                   # uuid hex of the training run; its server has the same
    "entropy_models": (dict,),          # hex id -> frequency table of the fq codec's models
    "preprocess": (dict, None),         # {mean, std}: standardize x before client.onnx (a
                                        # device-trained bundle; exports compile it in)
    "input_ranges": (dict, None),       # {min, max, mean, std, samples} per feature/channel of
                                        # the training inputs: the drift check (edge/drift.py)
}
#: Keys every tensor description (``input``, ``output``, ``head.input``, ``head.output``) holds.
TENSOR_KEYS = ("name", "shape", "dtype")
#: Keys of the parity record.
PARITY_KEYS = ("batch_sizes", "max_abs", "max_rel", "atol", "rtol", "passed")
#: Tensor dtypes a bundle may declare (the exporter writes float32 only).
_DTYPES = ("float32",)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the manifest declares it.

    Attributes
    ----------
    name: the ONNX graph input/output name.
    shape: per-sample shape, without the batch axis.
    dtype: numpy dtype name (``float32``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        """``(batch, 64) float32`` — how error messages show the expected tensor."""
        return f"({', '.join([BATCH, *map(str, self.shape)])}) {self.dtype}"

    def check(self, x: Any, what: str) -> np.ndarray:
        """Return ``x`` if it is an array of this spec (any batch size ≥ 1), else raise.

        Raises
        ------
        ConfigError: wrong type, dtype, rank or per-sample shape; the message names expected
            and got.
        """
        if not isinstance(x, np.ndarray):
            raise ConfigError(f"{what} must be a numpy array of shape {self.describe()}, "
                              f"got {type(x).__name__}")
        if x.dtype != np.dtype(self.dtype):
            # no silent cast: float64 data would lose precision the user may not expect
            raise ConfigError(f"{what} must have dtype {self.dtype}, got {x.dtype} "
                              f"(convert with x.astype(np.{self.dtype}))")
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ConfigError(f"{what} must have shape {self.describe()}, got "
                              f"{tuple(x.shape)} {x.dtype}")
        if x.shape[0] < 1:
            raise ConfigError(f"{what} has an empty batch (shape {tuple(x.shape)}); "
                              "pass at least one sample")
        return x


@dataclass
class Bundle:
    """A loaded, verified bundle with its ONNX Runtime session(s).

    Attributes
    ----------
    path: the bundle directory.
    manifest: manifest.json as a dict (see ``docs`` of :func:`load_bundle` for the keys).
    input, output: what ``client.onnx`` takes and returns.
    head_input, head_output: the same for ``head.onnx`` (ushape), else ``None``.
    providers: the execution providers the sessions use.
    """

    path: Path
    manifest: dict[str, Any]
    input: TensorSpec
    output: TensorSpec
    providers: list[str]
    head_input: TensorSpec | None = None
    head_output: TensorSpec | None = None
    _session: Any = field(default=None, repr=False)
    _head_session: Any = field(default=None, repr=False)
    #: checks inputs against the training ranges (``None``: the manifest recorded none)
    drift: DriftMonitor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ what the client needs
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def run_id(self) -> str | None:
        """The training run the weights come from (uuid hex); its server segment carries the
        same id. ``None`` for bundles exported before run ids existed."""
        value = self.manifest.get("run_id")
        return str(value) if value else None

    @property
    def config(self) -> str:
        """Split configuration the model was trained in (vanilla, ushape, vertical, splitfed)."""
        return str(self.manifest["config"])

    @property
    def codec(self) -> str:
        """Codec spec the client encodes its cut tensor with (the one the server trained on)."""
        return str(self.manifest["codec"])

    @property
    def grad_codec(self) -> str:
        return str(self.manifest["grad_codec"])

    @property
    def cut_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["cut_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def label_dtype(self) -> np.dtype:
        """Dtype labels travel in (smallest unsigned type that holds the class ids)."""
        return np.dtype(self.manifest["label_dtype"])

    @property
    def party(self) -> int:
        return int(self.manifest["party"])

    @property
    def feature_block(self) -> tuple[int, int] | None:
        """Vertical: the slice ``[lo, hi)`` of the last feature axis this party holds."""
        block = self.manifest["feature_block"]
        return None if block is None else (int(block[0]), int(block[1]))

    @property
    def has_head(self) -> bool:
        return self._head_session is not None

    def select_features(self, x: np.ndarray) -> np.ndarray:
        """This party's features of full samples (vertical); ``x`` itself otherwise.

        Raises
        ------
        ConfigError: ``x`` does not have the full per-sample shape the model was trained on.
        """
        if self.feature_block is None:
            return x
        full = tuple(int(d) for d in self.manifest["full_input_shape"])
        if not isinstance(x, np.ndarray) or tuple(x.shape[1:]) != full:
            got = tuple(x.shape) if isinstance(x, np.ndarray) else type(x).__name__
            raise ConfigError(f"full samples must have shape ({BATCH}, {', '.join(map(str, full))})"
                              f", got {got}")
        lo, hi = self.feature_block
        return np.ascontiguousarray(x[..., lo:hi])

    # ------------------------------------------------------------------ running
    def run(self, x: np.ndarray) -> np.ndarray:
        """The client segment's output (the cut tensor) for a batch ``x``.

        ``x`` is checked against the training inputs' ranges when the manifest recorded them
        (:mod:`edgesplit.edge.drift`): a batch far outside them logs a warning (at most one per
        :data:`~edgesplit.edge.drift.DEFAULT_EVERY` batches) and still runs.

        Raises
        ------
        ConfigError: ``x`` is not a float32 array of the manifest's input shape.
        ExportError: ONNX Runtime failed to run the model.
        """
        x = self.input.check(x, f"input {self.input.name!r} of {self.name}")
        if self.drift is not None:
            self.drift.check(x)   # warns (rate-limited) and carries on: the caller decides
        x = standardize(x, self.manifest.get("preprocess"))
        return _run(self._session, self.input.name, x, CLIENT_FILE)

    def run_head(self, mid: np.ndarray) -> np.ndarray:
        """ushape: the client's last layers on the server's middle output (returns logits).

        Raises
        ------
        ConfigError: the bundle has no head, or ``mid`` does not match ``head.input``.
        ExportError: ONNX Runtime failed to run the model.
        """
        if self._head_session is None or self.head_input is None:
            raise ConfigError(f"bundle {self.name} ({self.config}) has no head: only ushape "
                              "bundles run layers after the server's")
        mid = self.head_input.check(mid, f"head input {self.head_input.name!r} of {self.name}")
        return _run(self._head_session, self.head_input.name, mid, HEAD_FILE)


def standardize(x: np.ndarray, stats: dict[str, Any] | None) -> np.ndarray:
    """``(x - mean) / std`` with a manifest's recorded statistics (``x`` itself without)."""
    if not stats:
        return x
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.asarray(stats["std"], dtype=np.float32)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _run(session: Any, input_name: str, x: np.ndarray, what: str) -> np.ndarray:
    try:
        (out,) = session.run(None, {input_name: x})
    except Exception as exc:   # onnxruntime raises its own pybind types (Fail, InvalidArgument...)
        raise ExportError(f"onnxruntime failed to run {what}: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
                          ) from None
    return np.asarray(out)


# ---------------------------------------------------------------------------------- loading
def load_bundle(path: str | Path, *, providers: Sequence[str] | None = None,
                intra_op_threads: int | None = None) -> Bundle:
    """Read, validate and open a bundle directory.

    Parameters
    ----------
    path:
        The bundle directory (holding manifest.json and client.onnx).
    providers:
        ONNX Runtime execution providers, in order of preference; default CPU only.
    intra_op_threads:
        Threads ONNX Runtime may use inside one operator (default: its own choice).

    Returns
    -------
    Bundle
        With its session(s) created from the bytes whose SHA-256 was verified (the file is read
        once, so it cannot change between the check and the load).

    Raises
    ------
    ConfigError
        No such directory or manifest, invalid JSON, schema version or a required key missing or
        mistyped (the message names the key and the file), a model file missing, changed since
        export (sha256 mismatch) or rejected by ONNX Runtime, an unavailable provider.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not root.is_dir():
        raise ConfigError(f"bundle {root} does not exist or is not a directory")
    if not manifest_path.is_file():
        raise ConfigError(f"{root} is not a bundle: no {MANIFEST_FILE} (write one with "
                          "`edgesplit export`)")
    manifest = read_manifest(manifest_path)
    try:
        # side information the codec references by id: the device encodes with these
        register_json(manifest.get("entropy_models"))
    except CodecError as exc:
        raise ConfigError(f"{manifest_path}: {exc}") from None
    chosen = list(providers or DEFAULT_PROVIDERS)
    available = ort.get_available_providers()
    missing = [p for p in chosen if p not in available]
    if missing:
        raise ConfigError(f"execution provider(s) {', '.join(missing)} not available in this "
                          f"onnxruntime; available: {', '.join(available)}")
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    files = manifest["files"]
    session = _open(root, files["client"], manifest, options, chosen)
    bundle = Bundle(root, manifest, _tensor(manifest["input"]),
                    _tensor(manifest["output"]), chosen,
                    _session=session)
    if manifest.get("input_ranges"):
        bundle.drift = DriftMonitor(manifest["input_ranges"], bundle.name,
                                    sample_ndim=len(bundle.input.shape))
    head = manifest["head"]
    if head is not None:
        bundle.head_input = _tensor(head["input"])
        bundle.head_output = _tensor(head["output"])
        bundle._head_session = _open(root, files["head"], manifest, options, chosen)
    _check_session_io(bundle._session, bundle.input, bundle.output, files["client"])
    if bundle._head_session is not None and bundle.head_input and bundle.head_output:
        _check_session_io(bundle._head_session, bundle.head_input, bundle.head_output,
                          files["head"])
    return bundle


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and validate a manifest.json (no model is opened).

    Raises
    ------
    ConfigError: invalid JSON, unsupported schema, or a missing/mistyped key (named).
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: Any, where: str | Path = MANIFEST_FILE) -> None:
    """Raise :class:`ConfigError` naming the key and ``where`` unless ``manifest`` is valid."""
    if not isinstance(manifest, dict):
        raise ConfigError(f"{where}: manifest must be a JSON object, got {type(manifest).__name__}")
    schema = manifest.get("schema")
    if schema != SCHEMA_VERSION:
        newer = isinstance(schema, int) and schema > SCHEMA_VERSION
        raise ConfigError(f"{where}: bundle schema {schema!r}; this edgesplit reads schema "
                          f"{SCHEMA_VERSION}" + (" (upgrade edgesplit)" if newer else ""))
    for key, types in REQUIRED_KEYS.items():
        if key not in manifest:
            raise ConfigError(f"{where}: missing required key {key!r}")
        _typed(manifest[key], types, key, where)
    for key, types in OPTIONAL_KEYS.items():
        if key in manifest:
            _typed(manifest[key], types, key, where)
    for key in ("input", "output"):
        _check_tensor(manifest[key], key, where)
    if manifest["weights"] not in WEIGHTS:
        raise ConfigError(f"{where}: key 'weights' must be one of {', '.join(WEIGHTS)}, "
                          f"got {manifest['weights']!r}")
    for key in PARITY_KEYS:
        if key not in manifest["parity"]:
            raise ConfigError(f"{where}: missing required key 'parity.{key}'")
    files = manifest["files"]
    _file_name(files, "client", where)
    if manifest["head"] is not None:
        _file_name(files, "head", where)
        for key in ("input", "output"):
            if key not in manifest["head"]:
                raise ConfigError(f"{where}: missing required key 'head.{key}'")
            _check_tensor(manifest["head"][key], f"head.{key}", where)
    for role in ("client", "head") if manifest["head"] is not None else ("client",):
        digest = manifest["sha256"].get(files[role])
        if not isinstance(digest, str) or len(digest) != 64:
            raise ConfigError(f"{where}: missing required key 'sha256.{files[role]}' "
                              "(hex SHA-256 of the model file)")
    if manifest.get("input_ranges") is not None:
        validate_ranges(manifest["input_ranges"], tuple(manifest["input"]["shape"][1:]), str(where))
    block = manifest["feature_block"]
    if block is not None and (len(block) != 2 or not all(isinstance(v, int) for v in block)):
        raise ConfigError(f"{where}: key 'feature_block' must be [start, stop], got {block!r}")


def _typed(value: Any, types: tuple[type | None, ...], key: str, where: str | Path) -> None:
    if value is None and None in types:
        return
    real = tuple(t for t in types if t is not None)
    # bool is an int: `true` is not a schema version or a class count
    if isinstance(value, bool) or not isinstance(value, real):
        names = " or ".join("null" if t is None else _JSON_NAMES.get(t, t.__name__)
                            for t in types)
        raise ConfigError(f"{where}: key {key!r} must be {names}, got {value!r:.60}")


_JSON_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object"}


def _check_tensor(spec: Any, key: str, where: str | Path) -> None:
    _typed(spec, (dict,), key, where)
    for sub in TENSOR_KEYS:
        if sub not in spec:
            raise ConfigError(f"{where}: missing required key '{key}.{sub}'")
    shape = spec["shape"]
    ok = (isinstance(shape, list) and shape and shape[0] == BATCH
          and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:]))
    if not ok:
        raise ConfigError(f"{where}: key '{key}.shape' must be [\"{BATCH}\", d1, d2, ...] with "
                          f"positive sizes, got {shape!r}")
    if spec["dtype"] not in _DTYPES:
        raise ConfigError(f"{where}: key '{key}.dtype' must be one of {', '.join(_DTYPES)}, "
                          f"got {spec['dtype']!r}")
    if not isinstance(spec["name"], str) or not spec["name"]:
        raise ConfigError(f"{where}: key '{key}.name' must be a non-empty string")


def _file_name(files: dict[str, Any], role: str, where: str | Path) -> None:
    name = files.get(role)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: missing required key 'files.{role}'")
    # a manifest names files inside its own directory, never a path elsewhere on the device
    if Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"{where}: key 'files.{role}' must be a file name inside the bundle, "
                          f"got {name!r}")


def _tensor(spec: dict[str, Any]) -> TensorSpec:
    return TensorSpec(spec["name"], tuple(int(d) for d in spec["shape"][1:]), spec["dtype"])


def _open(root: Path, name: str, manifest: dict[str, Any], options: Any,
          providers: list[str]) -> Any:
    path = root / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"bundle file {path} is missing") from None
    except OSError as exc:
        raise ConfigError(f"cannot read bundle file {path}: {exc}") from None
    expected = manifest["sha256"][name]
    got = sha256_bytes(data)
    if got != expected:
        raise ConfigError(f"bundle file changed since export: sha256 mismatch for {path} "
                          f"(manifest {expected[:16]}…, file {got[:16]}…); export it again")
    try:
        return ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:   # onnxruntime's pybind errors have no common public base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"onnxruntime cannot load {path}: {first}") from None


def _check_session_io(session: Any, inp: TensorSpec, out: TensorSpec, name: str) -> None:
    """The model's graph must have the input and output the manifest promises."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [inp.name]:
        raise ConfigError(f"{name} has inputs {inputs}, the manifest says [{inp.name!r}]")
    if out.name not in outputs:
        raise ConfigError(f"{name} has outputs {outputs}, the manifest says {out.name!r}")
