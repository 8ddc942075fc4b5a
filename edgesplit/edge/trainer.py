"""The torch-free edge client trains its own layers: ONNX forward/backward graphs + numpy.

A *trainable* bundle (``edgesplit export --trainable``, see
``edgesplit.onnx_export.trainable``) holds the client segment's forward graph (parameters as
inputs; outputs the cut tensor and the residuals), its backward graph (residuals + cut gradient
in; one gradient per parameter out), an inference template and the initial parameters. Per
batch the device:

1. runs the forward graph with its current parameters → cut, residuals;
2. sends ``FORWARD{act, y} meta{train: true, want_grad: true}`` (labels packed as ``y`` when
   the WELCOME says ``labels: "y"``, else a ``labels`` frame); the server trains its layers and
   answers ``GRADIENT{grad}`` (the gradient of the loss w.r.t. the decoded cut). The last batch
   of each epoch also asks ``report: true``: that reply's ``loss``/``correct``/``n`` cover the
   session's steps since its previous report (the epoch), the others carry none;
3. runs the backward graph (residuals, grad) → parameter gradients; the residuals are dropped
   here, so they only live between one step's forward and backward;
4. updates the parameters with a numpy optimizer (:mod:`edgesplit.edge.optim`).

With a state directory, parameters, optimizer state and the position in the data are saved
atomically (one file, written aside and renamed) after every ``checkpoint_every`` steps: a device
that reboots resumes from there, with the same step ids, so the server answers a step it already
applied from its record instead of applying it twice.

Import rule: numpy + onnxruntime only (no torch, no onnx).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgesplit.codecs import parse_codec
from edgesplit.edge.bundle import (
    CLIENT_FILE,
    MANIFEST_FILE,
    Bundle,
    load_bundle,
    sha256_bytes,
    standardize,
    validate_manifest,
)
from edgesplit.edge.optim import Optimizer, make_optimizer
from edgesplit.edge.runtime import EdgeClient, EdgeProgress, _Exchange, _resized
from edgesplit.errors import ConfigError, ExportError, ProtocolError, TrainingDiverged
from edgesplit.jsonable import jsonable
from edgesplit.transport.base import Transport
from edgesplit.wire.frame import decode_frame, encode_frame, fp32_frame_size
from edgesplit.wire.messages import Kind, Message, expect, ids_digest

STATE_FILE = "edge-trainer-state.npz"
STATE_SCHEMA = 1
_TRAIN_PARTS = ("forward", "encode", "network", "decode", "backward", "update")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status (``ru_maxrss`` would carry over the peak of a fat
    parent that forked and exec'd this process); elsewhere ``getrusage``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource  # Unix only, hence not at module level

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------------------------- the model
@dataclass
class TrainableGraphs:
    """The training graphs of one trained part: the client segment, or a ushape head.

    Attributes
    ----------
    section: its manifest section (``trainable``, or ``trainable.head``).
    first, count: where its parameters sit in :attr:`TrainableModel.params`.
    """

    section: dict[str, Any]
    first: int
    count: int
    forward: Any = field(repr=False)
    backward: Any = field(repr=False)
    template: bytes = field(repr=False)

    def run_forward(self, params: list[np.ndarray], x: np.ndarray
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
        mine = params[self.first:self.first + self.count]
        feeds = {p["input"]: v for p, v in zip(self.section["params"], mine, strict=True)}
        feeds[self.section["forward"]["inputs"][-1]] = x
        out = _run(self.forward, feeds, "a forward graph")
        return out[0], out[1:]

    def run_backward(self, residuals: list[np.ndarray], grad: np.ndarray) -> list[np.ndarray]:
        names = self.section["backward"]["inputs"]
        feeds = dict(zip(names[:-1], residuals, strict=True))
        feeds[names[-1]] = grad
        return _run(self.backward, feeds, "a backward graph")

    def model_bytes(self, params: list[np.ndarray]) -> bytes:
        """The inference template with the current parameters written over its initializers."""
        data = bytearray(self.template)
        mine = params[self.first:self.first + self.count]
        for spec, value in zip(self.section["params"], mine, strict=True):
            raw = np.ascontiguousarray(value, dtype="<f4").tobytes()
            if len(raw) != spec["nbytes"]:
                raise ConfigError(f"parameter {spec['name']!r} has {len(raw)} bytes, the "
                                  f"template holds {spec['nbytes']}")
            data[spec["offset"]: spec["offset"] + len(raw)] = raw
        return bytes(data)


@dataclass
class TrainableModel:
    """A trainable bundle's graphs and its current parameters.

    Attributes
    ----------
    bundle: the ordinary bundle (manifest, ``client.onnx`` for frozen inference).
    section: the manifest's ``trainable`` section.
    names: parameter names, in graph order (a ushape head's prefixed ``head.``).
    params: current parameters (float32 arrays, updated in place by the optimizer): the
        segment's, then the head's.
    lower, head: the segment's training graphs, and the ushape head's (else ``None``).
    """

    bundle: Bundle
    section: dict[str, Any]
    names: list[str]
    params: list[np.ndarray]
    lower: TrainableGraphs
    head: TrainableGraphs | None = None

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Cut tensor and residuals for a batch ``x`` (this party's features)."""
        x = self.bundle.input.check(x, f"input of {self.bundle.name}")
        if self.bundle.drift is not None:
            self.bundle.drift.check(x)   # the same warning as Bundle.run: training data too
        return self.lower.run_forward(self.params, self.preprocess(x))

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """The input standardization the training graphs expect (outside them: fixed)."""
        return standardize(x, self.section.get("preprocess"))

    def backward(self, residuals: list[np.ndarray], grad: np.ndarray) -> list[np.ndarray]:
        """The segment's parameter gradients from a step's residuals and the cut gradient."""
        return self.lower.run_backward(residuals, grad)

    def head_forward(self, mid: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """ushape: logits and residuals of the head for the server's middle output."""
        if self.head is None or self.bundle.head_input is None:
            raise ConfigError(f"bundle {self.bundle.name} has no trainable head")
        mid = self.bundle.head_input.check(mid, f"head input of {self.bundle.name}")
        return self.head.run_forward(self.params, mid)

    def head_backward(self, residuals: list[np.ndarray], grad_logits: np.ndarray
                      ) -> tuple[list[np.ndarray], np.ndarray]:
        """ushape: the head's parameter gradients and the gradient of its input."""
        if self.head is None:
            raise ConfigError(f"bundle {self.bundle.name} has no trainable head")
        out = self.head.run_backward(residuals, grad_logits)
        return out[:-1], out[-1]

    def client_onnx(self) -> bytes:
        """An ordinary ``client.onnx`` (input ``x``, output ``cut``) holding the current
        parameters: the template with each parameter's bytes written over its initializer."""
        return self.lower.model_bytes(self.params)

    def head_onnx(self) -> bytes | None:
        """ushape: an ordinary ``head.onnx`` with the current head parameters."""
        return self.head.model_bytes(self.params) if self.head is not None else None

    def inference_session(self, head: bool = False) -> Any:
        """An ONNX Runtime session of :meth:`client_onnx` (or :meth:`head_onnx`) with the
        current parameters."""
        data = self.head_onnx() if head else self.client_onnx()
        try:
            return ort.InferenceSession(data, providers=self.bundle.providers)
        except Exception as exc:   # onnxruntime's pybind errors have no common base class
            raise ExportError(f"onnxruntime cannot load the trained client: {exc}") from None

    def parameters(self) -> dict[str, np.ndarray]:
        """Current parameters by name."""
        return dict(zip(self.names, self.params, strict=True))

    def check_destination(self, dest: str | Path) -> Path:
        """Raise :class:`ConfigError` unless ``dest`` may receive the trained bundle."""
        dest = Path(dest)
        if dest.resolve() == self.bundle.path.resolve():
            raise ConfigError(f"--save-bundle {dest} is the trainable bundle itself; write the "
                              "trained client to another directory")
        if dest.exists() and (not dest.is_dir() or (any(dest.iterdir())
                                                     and not (dest / MANIFEST_FILE).is_file())):
            raise ConfigError(f"{dest} exists and is not a bundle: refusing to overwrite it")
        return dest

    def write_inference_bundle(self, dest: str | Path, *, note: dict[str, Any] | None = None
                               ) -> Path:
        """Write the trained client as an ordinary inference bundle (no training graphs).

        The new ``client.onnx`` (and ushape ``head.onnx``) replace the exported ones; the
        manifest's sha256 follows, the ``trainable`` section is dropped and
        ``device_training`` records what happened. Written aside and renamed into place.

        Raises
        ------
        ConfigError: ``dest`` exists and is not a bundle (it is never overwritten then).
        """
        dest = self.check_destination(dest)
        manifest = json.loads(json.dumps(self.bundle.manifest))
        manifest.pop("trainable", None)
        # the trained client.onnx is the training graphs' segment: standardization outside it
        if self.section.get("preprocess"):
            manifest["preprocess"] = self.section["preprocess"]
        files = {CLIENT_FILE: self.client_onnx()}
        head = manifest["files"].get("head")
        if head:
            head_bytes = self.head_onnx()
            files[head] = head_bytes if head_bytes is not None else \
                (self.bundle.path / head).read_bytes()
        manifest["files"]["client"] = CLIENT_FILE
        manifest["sha256"] = {name: sha256_bytes(data) for name, data in files.items()}
        manifest["client"]["file_bytes"] = {name: len(data) for name, data in files.items()}
        manifest["name"] = dest.name
        manifest["device_training"] = {"from_bundle": self.bundle.name, **(note or {})}
        validate_manifest(manifest, f"{dest}/{MANIFEST_FILE} (about to be written)")
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n",
                                         encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return dest


def _run(session: Any, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    try:
        return [np.asarray(o) for o in session.run(None, feeds)]
    except Exception as exc:   # onnxruntime's pybind errors have no common base class
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"onnxruntime failed to run {what}: {first}") from None


def load_trainable(path: str | Path | Bundle, *, intra_op_threads: int | None = None
                   ) -> TrainableModel:
    """Open a trainable bundle: verify every file's sha256, open its graphs, read the params.

    ``intra_op_threads`` limits the threads ONNX Runtime uses inside one operator.

    Raises
    ------
    ConfigError
        Not a bundle, not a trainable bundle (the message says how to export one), a file
        missing or changed since export, parameters that do not match the manifest.
    """
    bundle = path if isinstance(path, Bundle) else load_bundle(path)
    section = bundle.manifest.get("trainable")
    if not isinstance(section, dict):
        raise ConfigError(f"bundle {bundle.name} has no training graphs: export it with "
                          "`edgesplit export --trainable` to train it on the device")
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    names: list[str] = []
    params: list[np.ndarray] = []
    lower = _load_part(bundle, section, "trainable", options, names, params, "")
    head = None
    if isinstance(section.get("head"), dict):
        head = _load_part(bundle, section["head"], "trainable.head", options, names, params,
                          "head.")
    elif bundle.config == "ushape":
        raise ConfigError(f"bundle {bundle.name} is ushape but its head has no training graphs;"
                          " export it again with --trainable")
    return TrainableModel(bundle, section, names, params, lower, head)


def _load_part(bundle: Bundle, section: dict[str, Any], where: str, options: Any,
               names: list[str], params: list[np.ndarray], prefix: str) -> TrainableGraphs:
    """Open one part's graphs and append its parameters to ``names``/``params``."""
    try:
        files = section["files"]
        specs = section["params"]
        own = [prefix + str(p["name"]) for p in specs]
    except (KeyError, TypeError):
        raise ConfigError(f"{bundle.path / MANIFEST_FILE}: malformed '{where}' section "
                          "(needs files and params)") from None

    def read(role: str) -> bytes:
        name = files.get(role)
        if not isinstance(name, str) or Path(name).name != name:
            raise ConfigError(f"{bundle.path / MANIFEST_FILE}: key '{where}.files.{role}' "
                              f"must be a file name inside the bundle, got {name!r}")
        try:
            data = (bundle.path / name).read_bytes()
        except OSError as exc:
            raise ConfigError(f"bundle file {bundle.path / name} cannot be read: {exc}") from None
        want = bundle.manifest["sha256"].get(name)
        if want != sha256_bytes(data):
            raise ConfigError(f"bundle file changed since export: sha256 mismatch for "
                              f"{bundle.path / name}; export it again")
        return data

    def session(data: bytes, what: str) -> Any:
        try:
            return ort.InferenceSession(data, sess_options=options, providers=bundle.providers)
        except Exception as exc:   # onnxruntime's pybind errors have no common base class
            raise ConfigError(f"onnxruntime cannot load the {what} graph of {bundle.name}: "
                              f"{str(exc).strip().splitlines()[0]}") from None

    forward = session(read("forward"), f"{where} forward")
    backward = session(read("backward"), f"{where} backward")
    template = read("infer")
    first = len(params)
    # never allow_pickle: the parameters are plain arrays
    with np.load(io.BytesIO(read("params")), allow_pickle=False) as arrays:
        for spec in specs:
            if spec["key"] not in arrays:
                raise ConfigError(f"{files['params']} has no array {spec['key']!r} "
                                  f"(parameter {spec['name']})")
            value = np.array(arrays[spec["key"]], dtype=np.float32)
            if list(value.shape) != list(spec["shape"]):
                raise ConfigError(f"parameter {spec['name']!r} has shape {list(value.shape)}, "
                                  f"the manifest says {spec['shape']}")
            params.append(value)
    names.extend(own)
    return TrainableGraphs(section, first, len(specs), forward, backward, template)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``logits`` (N, C) against class ids, and its gradient w.r.t. the
    logits (``torch.nn.CrossEntropyLoss``'s: (softmax - one-hot) / N), float32."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    exp = np.exp(z)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(total[:, 0]) - z[rows, labels]))
    grad = exp / total
    grad[rows, labels] -= 1.0
    return loss, (grad / np.float32(len(labels))).astype(np.float32)


# ---------------------------------------------------------------------------------- state
def save_state(directory: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]
               ) -> Path:
    """Write the trainer state as one .npz, atomically (aside, fsync, rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / STATE_FILE
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(tmp, "wb") as fh:
        # numpy's stub lets **arrays fill savez's allow_pickle; keys here are param_*/optimizer
        # names, never that
        np.savez(fh, __meta__=blob, **arrays)  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def load_state(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The saved trainer state, or ``None`` when there is none.

    Raises
    ------
    ConfigError: the state file is unreadable or malformed.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        # numpy's own message suggests unpickling: never, so only the error type is quoted
        raise ConfigError(f"trainer state {path} is unreadable or not an edgesplit trainer "
                          f"state ({type(exc).__name__}); delete it to start over") from None
    if not isinstance(meta, dict) or meta.get("schema") != STATE_SCHEMA:
        raise ConfigError(f"trainer state {path} has schema {meta.get('schema')!r}; this "
                          f"edgesplit reads {STATE_SCHEMA}")
    return arrays, meta


# ---------------------------------------------------------------------------------- training
@dataclass
class TrainReport:
    """What an on-device training run did and measured.

    Attributes
    ----------
    accuracy: test accuracy after training (class ids from the server for the trained cut),
        ``None`` without test data.
    train_accuracy, loss: the server's accuracy and mean loss on the training batches.
    bytes_up, bytes_down: serialised envelopes sent / received while training (activation
        and bit-packed label frames up, gradients down, with names, ids and meta), counted as
        the torch client counts them; evaluation (``bytes_eval``) and splitfed
        weight averaging (``bytes_weights``) are counted apart.
    latency_ms: mean ms per step: forward, encode, network, decode, backward, update, total.
    peak_rss_mib: peak resident memory of this process.
    resumed_from: the step a saved state resumed from (``None``: a fresh start).
    """

    config: str
    bundle: str
    session: str
    codec: str
    optimizer: dict[str, Any]
    epochs: int
    steps: int = 0
    samples: int = 0
    accuracy: float | None = None
    test_samples: int = 0
    train_accuracy: float | None = None
    loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_fp32: int = 0
    bytes_eval: int = 0
    bytes_weights: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    resumed_from: int | None = None
    state: str | None = None
    saved_bundle: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "train"
    trainable: bool = True

    def to_json(self) -> dict[str, Any]:
        return jsonable(asdict(self))


class EdgeTrainer(EdgeClient):
    """Trains a trainable bundle's client segment against a split server.

    Parameters
    ----------
    model:
        :func:`load_trainable`'s result.
    transport:
        How requests reach the server (the caller owns it).
    optimizer:
        A numpy optimizer; default SGD with the bundle's lr and momentum 0.9.
    batch_size, seed, session, name, group, codec:
        As :class:`~edgesplit.edge.runtime.EdgeClient`; the batch order of epoch ``e`` is
        ``default_rng([seed, e]).permutation(n)``.
    state_dir:
        Where to checkpoint (``None``: no checkpoints). An existing state of the same bundle is
        resumed.
    checkpoint_every:
        Steps between checkpoints (the end of every epoch is always saved).
    index, clients:
        splitfed: this client's index and the number of clients whose parameters are averaged
        (FedAvg, weighted by samples) at the end of every epoch; default the server's.
    """

    def __init__(self, model: TrainableModel, transport: Transport, *,
                 optimizer: Optimizer | None = None, batch_size: int = 32, seed: int = 0,
                 session: str | None = None, name: str = "edge", group: str = "",
                 codec: str | None = None, state_dir: str | Path | None = None,
                 checkpoint_every: int = 1, index: int = 0, clients: int | None = None
                 ) -> None:
        self.trains_head = model.head is not None
        super().__init__(model.bundle, transport, codec=codec, mode="train",
                         batch_size=batch_size, session=session, name=name, group=group,
                         seed=seed)
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
                or checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be an integer >= 1, got "
                              f"{checkpoint_every!r}")
        self.model = model
        self.grad_codec = parse_codec(model.bundle.grad_codec)
        self.index = index
        self.clients = clients
        opt = model.section.get("optimizer") or {}
        self.optimizer = optimizer or make_optimizer("sgd", float(opt.get("lr", 0.02)),
                                                     float(opt.get("momentum", 0.9)))
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.epoch = 0          # position: next epoch and batch to run
        self.batch = 0
        self.resumed_from: int | None = None
        self._seconds = dict.fromkeys((*_TRAIN_PARTS, "total"), 0.0)
        self._bytes = {"up": 0, "down": 0, "up_fp32": 0, "eval": 0, "weights": 0}
        self._history: list[dict[str, Any]] = []
        self._epoch_sums = [0.0, 0, 0]   # loss·n, correct, n
        if self.state_dir is not None:
            self._resume()

    # ------------------------------------------------------------------ state
    def _bundle_sha(self) -> str:
        files = self.bundle.manifest["files"]
        return str(self.bundle.manifest["sha256"].get(files["client"], ""))

    def _resume(self) -> None:
        saved = load_state(self.state_dir) if self.state_dir is not None else None
        if saved is None:
            return
        arrays, meta = saved
        if meta.get("bundle_sha256") != self._bundle_sha():
            raise ConfigError(f"trainer state in {self.state_dir} belongs to another bundle "
                              f"({meta.get('bundle')!r}); use another --state directory")
        if meta.get("optimizer", {}).get("name") != self.optimizer.name:
            raise ConfigError(f"trainer state in {self.state_dir} was made with the "
                              f"{meta.get('optimizer', {}).get('name')} optimizer, not "
                              f"{self.optimizer.name}")
        for i, current in enumerate(self.model.params):
            value = arrays.get(f"param_{i}")
            if value is None or value.shape != current.shape:
                raise ConfigError(f"trainer state in {self.state_dir} lacks parameter "
                                  f"{self.model.names[i]!r} of shape {list(current.shape)}")
            self.model.params[i] = np.array(value, dtype=np.float32)
        self.optimizer.load_state(arrays)
        self.session = str(meta["session"])
        self.step = int(meta["step"])
        self.epoch, self.batch = int(meta["epoch"]), int(meta["batch"])
        self._history = list(meta.get("history", []))
        self._epoch_sums = list(meta.get("epoch_sums", [0.0, 0, 0]))
        self.resumed_from = self.step

    def save(self) -> Path | None:
        """Checkpoint parameters, optimizer state and position (``None`` without a state dir)."""
        if self.state_dir is None:
            return None
        arrays = {f"param_{i}": p for i, p in enumerate(self.model.params)}
        arrays.update(self.optimizer.state())
        meta = {"schema": STATE_SCHEMA, "bundle": self.bundle.name,
                "bundle_sha256": self._bundle_sha(), "session": self.session, "step": self.step,
                "epoch": self.epoch, "batch": self.batch, "optimizer": self.optimizer.config(),
                "history": self._history, "epoch_sums": self._epoch_sums,
                "names": self.model.names}
        return save_state(self.state_dir, arrays, meta)

    # ------------------------------------------------------------------ one step
    def train_step(self, xb: np.ndarray, yb: np.ndarray | None,
                   ids: np.ndarray | None = None, *, report: bool = True
                   ) -> tuple[float, int, int]:
        """Forward, exchange, backward, update. Returns (loss, correct, n) from the server.

        ``report``: ask the server for its loss and correct count over this session's steps
        since its previous report (``n`` samples; :meth:`fit` asks on the last batch of each
        epoch). A reply without a report returns ``(0.0, 0, 0)``. ushape computes its loss
        here, so each of its steps returns its own batch's.

        Raises
        ------
        ProtocolError: no gradient or a gradient of the wrong shape in the reply.
        TrainingDiverged: a non-finite gradient (nothing is applied).
        """
        s = self._seconds
        t0 = time.perf_counter()
        cut, residuals = self.model.forward(self.bundle.select_features(xb))
        t1 = time.perf_counter()
        tensors = {"act": encode_frame(cut, self.codec)}
        if yb is not None and self.model.head is None:   # ushape labels stay on the device
            name, data = self.labels_tensor(yb)   # packed y, or a bit-packed labels frame
            tensors[name] = data
        extra: dict[str, Any] = {"ids": ids_digest(ids)} \
            if self.bundle.feature_block is not None and ids is not None else {}
        if report and self.model.head is None:
            extra["report"] = True
        t2 = time.perf_counter()
        step = self.step
        reply = expect(self._request(Kind.FORWARD, tensors, train=True, want_grad=True, **extra),
                       Kind.GRADIENT, Kind.MIDDLE)
        self._count(self._last, "act", cut.shape)
        head_grads: list[np.ndarray] = []
        if self.model.head is not None:
            reply, head_grads, result = self._ushape_head(reply, yb, step, tensors, s)
        t3 = time.perf_counter()
        if "grad" not in reply.tensors:
            raise ProtocolError("the server answered without a gradient: it does not train "
                                "this client's layers (is it a frozen-client server?)")
        grad = np.ascontiguousarray(decode_frame(reply.frame("grad")), dtype=np.float32)
        if grad.shape != cut.shape:
            raise ProtocolError(f"server gradient has shape {tuple(grad.shape)}, the cut "
                                f"{tuple(cut.shape)}")
        if not np.isfinite(grad).all():
            raise TrainingDiverged(f"the server's gradient at step {self.step - 1} is not "
                                   "finite; nothing was applied (lower the lr)")
        t4 = time.perf_counter()
        grads = self.model.backward(residuals, grad)
        del residuals   # they live only between this step's forward and backward
        t5 = time.perf_counter()
        self.optimizer.step(self.model.params, [*grads, *head_grads])
        t6 = time.perf_counter()
        for part, dt in zip(_TRAIN_PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5),
                            strict=True):
            s[part] += dt
        s["total"] += t6 - t0
        if self.model.head is not None:
            return result
        meta = reply.meta
        loss = meta.get("loss")
        if "loss" not in meta:
            return 0.0, 0, 0   # not asked for a report: it comes with a later step
        return (float(loss) if isinstance(loss, int | float) else float("nan"),
                int(meta.get("correct", 0)), int(meta.get("n", len(xb))))

    def _ushape_head(self, reply: Message, yb: np.ndarray | None, step: int,
                     tensors: dict[str, bytes], seconds: dict[str, float]
                     ) -> tuple[Message, list[np.ndarray], tuple[float, int, int]]:
        """ushape: the head runs here on the server's middle output, the loss is computed here
        (labels never leave the device), and the gradient of the middle goes back
        (MIDDLE_GRAD, same step id) for the cut gradient. Returns the GRADIENT reply, the
        head's parameter gradients and (loss, correct, n)."""
        if yb is None:
            raise ConfigError("ushape training needs this device's labels")
        if "mid" not in reply.tensors:
            raise ProtocolError("the ushape server answered FORWARD without a middle output")
        t0 = time.perf_counter()
        mid = np.ascontiguousarray(decode_frame(reply.frame("mid")), dtype=np.float32)
        logits, residuals = self.model.head_forward(mid)
        loss, grad_logits = cross_entropy(logits, yb)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged at step {step} (loss {loss:.4g}); "
                                   "lower the lr or use a finer codec")
        head_grads, grad_mid = self.model.head_backward(residuals, grad_logits)
        frame = encode_frame(np.ascontiguousarray(grad_mid, dtype=np.float32), self.grad_codec)
        seconds["backward"] += time.perf_counter() - t0
        self.step = step   # MIDDLE_GRAD answers the FORWARD of the same step
        second = expect(self._request(Kind.MIDDLE_GRAD, {"grad": frame}), Kind.GRADIENT)
        self._count(self._last, "grad", grad_mid.shape)
        correct = int((logits.argmax(axis=1) == yb).sum())
        return second, head_grads, (loss, correct, len(yb))

    # ------------------------------------------------------------------ whole runs
    def fit(self, x: Any, y: Any, *, epochs: int = 1, x_test: Any = None, y_test: Any = None,
            on_progress: EdgeProgress | None = None,
            save_bundle: str | Path | None = None) -> TrainReport:
        """Train ``epochs`` passes over ``(x, y)``, then measure test accuracy.

        A resumed trainer continues at its saved epoch and batch. ``on_progress(label, done,
        total, info)`` is called after every batch (the CLI draws its bar from it:
        :func:`edgesplit.cli.progress.edge_progress`). Returns a :class:`TrainReport`.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        x, y = self.check_data(x, y)
        if save_bundle is not None:
            self.model.check_destination(save_bundle)   # before the training, not after
        start = time.perf_counter()
        if self.welcome is None:
            self.hello_keep_step()
        n = len(x)
        steps = samples = 0
        label, total = f"train {self.codec.spec} samples", n * max(epochs - self.epoch, 0)
        while self.epoch < epochs:
            order = self.epoch_order(n, self.epoch)
            batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
            while self.batch < len(batches):
                idx = batches[self.batch]
                loss, correct, count = self.train_step(
                    x[idx], y[idx] if y is not None else None, idx,
                    report=self.batch == len(batches) - 1)   # the epoch's report
                self._epoch_sums[0] += loss * count
                self._epoch_sums[1] += correct
                self._epoch_sums[2] += count
                self.batch += 1
                steps += 1
                samples += len(idx)
                if on_progress is not None:
                    on_progress(label, samples, total, "")
                if self.batch < len(batches) and steps % self.checkpoint_every == 0:
                    self.save()
            if self.bundle.config == "splitfed":
                self.federated_average(self.epoch, n)
            loss_sum, n_correct, n_seen = self._epoch_sums
            self._history.append({
                "epoch": self.epoch, "loss": loss_sum / n_seen if n_seen else None,
                "train_accuracy": n_correct / n_seen if n_seen else None})
            self._epoch_sums = [0.0, 0, 0]
            self.epoch += 1
            self.batch = 0
            self.save()
        seconds = time.perf_counter() - start
        accuracy = None
        test_n = 0
        if x_test is not None and y_test is not None:
            accuracy, test_n = self.evaluate(x_test, y_test)
        saved = None
        if save_bundle is not None:
            saved = str(self.model.write_inference_bundle(
                save_bundle, note={"epochs": epochs, "steps": self.step,
                                   "optimizer": self.optimizer.config(),
                                   "test_accuracy": accuracy}))
        last = self._history[-1] if self._history else {}
        ran = max(steps, 1)
        return TrainReport(
            config=self.bundle.config, bundle=self.bundle.name, session=self.session,
            codec=self.codec.spec, optimizer=self.optimizer.config(), epochs=epochs,
            steps=steps, samples=samples, accuracy=accuracy, test_samples=test_n,
            train_accuracy=last.get("train_accuracy"), loss=last.get("loss"),
            bytes_up=self._bytes["up"], bytes_down=self._bytes["down"],
            bytes_up_fp32=self._bytes["up_fp32"], bytes_eval=self._bytes["eval"],
            bytes_weights=self._bytes["weights"],
            latency_ms={k: v * 1e3 / ran for k, v in self._seconds.items()}, seconds=seconds,
            peak_rss_mib=peak_rss_mib(), resumed_from=self.resumed_from,
            state=str(self.state_dir / STATE_FILE) if self.state_dir else None,
            saved_bundle=saved, history=self._history)

    def federated_average(self, round_: int, n_samples: int) -> None:
        """splitfed: send the parameters, load back the FedAvg of every client's (the server
        waits for all of them). The reply is recorded on the server, so a resend after a reboot
        gets the same average."""
        spec = (self.welcome or {}).get("spec") or {}
        clients = self.clients or int(spec.get("clients", 1))
        if not 0 <= self.index < clients:
            raise ConfigError(f"splitfed client index {self.index} is outside 0..{clients - 1}")
        frames = {name: encode_frame(p, "fp32") for name, p in self.model.parameters().items()}
        group = str((self.welcome or {}).get("group", ""))
        reply = expect(self._request(Kind.WEIGHTS, frames, mode="average", round=round_,
                                     index=self.index, clients=clients, n_samples=n_samples,
                                     group=group), Kind.WEIGHTS)
        if set(reply.tensors) != set(frames):
            raise ProtocolError(f"the average carries {sorted(reply.tensors)}, this client has "
                                f"{sorted(frames)}")
        for i, name in enumerate(self.model.names):
            value = np.asarray(decode_frame(reply.frame(name)), dtype=np.float32)
            if value.shape != self.model.params[i].shape:
                raise ProtocolError(f"averaged {name} has shape {value.shape}, expected "
                                    f"{self.model.params[i].shape}")
            self.model.params[i] = np.array(value)
        self._bytes["weights"] = self._bytes.get("weights", 0) + self._last.up + self._last.down

    def _count(self, sent: _Exchange, name: str, shape: tuple[int, ...]) -> None:
        """Training traffic of one exchange: its wire bytes both ways, and the request as it
        would be with tensor ``name`` (of ``shape``) as an fp32 frame."""
        self._bytes["up"] += sent.up
        self._bytes["up_fp32"] += sent.up + _resized(sent.message, name, fp32_frame_size(shape))
        self._bytes["down"] += sent.down

    def epoch_order(self, n: int, epoch: int) -> np.ndarray:
        """Sample order of ``epoch`` (shuffled, deterministic in seed and epoch; vertical
        parties of one run share it, so their rows align)."""
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def hello_keep_step(self) -> dict[str, Any]:
        """HELLO without jumping to the server's resume step: after a reboot the steps since the
        last checkpoint are sent again with their old ids, and the server answers them from its
        record (the same gradient) instead of applying them twice."""
        step = self.step
        welcome = self.hello()
        self.step = step
        return welcome

    def evaluate(self, x: Any, y: Any, batch_size: int = 256) -> tuple[float, int]:
        """Test accuracy of the current parameters: the trained cut goes to the server
        (PREDICT), class ids come back. Returns (accuracy, samples)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y).astype(np.int64)
        session = self.model.inference_session()
        head = self.model.inference_session(head=True) if self.model.head is not None else None
        correct = 0
        for s in range(0, len(x), batch_size):
            xb = self.bundle.select_features(x[s:s + batch_size])
            (cut,) = session.run(None, {"x": self.model.preprocess(xb)})
            tensors = {"act": encode_frame(np.asarray(cut), self.codec)}
            reply = expect(self._request(Kind.PREDICT, tensors), Kind.PREDICTION, Kind.MIDDLE)
            if reply.kind == Kind.MIDDLE:
                if head is None:
                    raise ProtocolError("the server sent a ushape middle output, but this "
                                        "bundle has no head")
                mid = np.ascontiguousarray(decode_frame(reply.frame("mid")), dtype=np.float32)
                (logits,) = head.run(None, {self.bundle.head_input.name: mid}) \
                    if self.bundle.head_input else (None,)
                pred = np.asarray(logits).argmax(axis=1).astype(np.int64)
            else:
                pred = decode_frame(reply.frame("pred")).astype(np.int64)
            if pred.shape != (len(xb),):
                raise ProtocolError(f"server answered {tuple(pred.shape)} predictions for "
                                    f"{len(xb)} samples")
            correct += int((pred == y[s:s + batch_size]).sum())
            self._bytes["eval"] += self._last.up + self._last.down
        return correct / max(len(x), 1), len(x)
