"""The edge client: run an exported client segment on the device and talk to a split server.

torch-free by contract (setup.cfg): onnxruntime runs the segment, :mod:`edgesplit.codecs` and
:mod:`edgesplit.wire` make the frames, any :class:`~edgesplit.transport.base.Transport` carries
them. ``pip install edgesplit`` (no extras) is enough.

>>> bundle = load_bundle("export/out/digits-vanilla")                      # doctest: +SKIP
>>> with GrpcTransport("server:50051", token) as transport:                # doctest: +SKIP
...     report = EdgeClient(bundle, transport, mode="infer").run(x, y)
>>> report.accuracy, report.bytes_up, report.latency_ms["network"]        # doctest: +SKIP

Per batch, in order: onnxruntime runs the client segment (``compute``), the cut tensor is
encoded (``encode``), the request goes to the server and its reply comes back (``network``: the
transport's whole round trip, server compute included), the reply is decoded (``decode``; for a
ushape bundle this also runs the head locally, counted in ``compute``).

Message flow (docs/protocol.md):

* ``HELLO{mode, codec, runtime: "edge", bundle sha256}`` → ``WELCOME``, once per session.
* ``train``: ``FORWARD{act, y, [act_ref]} meta{train: true, want_grad: false}`` →
  ``GRADIENT`` without a ``grad``: a frozen client applies nothing, the server trains its own
  layers on what the codec let through. The last batch's FORWARD also carries ``report: true``,
  and its GRADIENT ``meta{loss, correct, n}``: the server's loss and correct count over the
  run's ``n`` trained samples (the other replies carry none). (A bundle exported with
  ``--trainable`` trains its own layers too: :class:`edgesplit.edge.trainer.EdgeTrainer`.)
* ``infer``: ``PREDICT{act, [y], [act_ref]}`` → ``PREDICTION{pred}``, or for a ushape
  bundle ``MIDDLE{mid}``, which the bundle's head turns into class ids on the device (labels of
  a ushape client never leave it).

Labels travel as ``y``, bare bit-packed class ids (:func:`edgesplit.wire.labels.pack_labels`),
when the WELCOME says ``labels: "y"``; else as a ``labels`` frame (:func:`labels_frame`).

Every ``probe_every``-th batch also carries ``act_ref``: the same activations as an fp32 frame,
so the server can measure what the codec costs in accuracy and SNR on real device data.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from edgesplit.codecs import Codec, parse_codec
from edgesplit.edge.bundle import Bundle
from edgesplit.errors import ConfigError, ProtocolError
from edgesplit.jsonable import jsonable
from edgesplit.transport.base import Transport
from edgesplit.transport.envelope import wire_size
from edgesplit.wire.frame import decode_frame, encode_frame, fp32_frame_size
from edgesplit.wire.labels import MAX_PACKED_CLASSES, PACKED_LABELS, pack_labels
from edgesplit.wire.messages import Kind, Message, expect, ids_digest

MODES = ("infer", "train")
#: Latency components, in the order tables show them; ``total`` is the measured wall time.
LATENCY_PARTS = ("compute", "encode", "network", "decode")
RUNTIME = "edge"
#: ``on_progress(label, samples_done, samples_total, info)`` (see :meth:`EdgeClient.run`)
EdgeProgress = Callable[[str, int, int, str], None]






@dataclass(kw_only=True)
class _Wire:
    """Bytes a run put on the wire (serialised envelopes), with the parts an
    :class:`EdgeReport` states: envelope overhead, fp32 reference, probe copies."""

    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_fp32: int = 0
    bytes_probe: int = 0
    envelope_up: int = 0
    envelope_down: int = 0

    def fp32_ratio(self) -> float | None:
        """fp32 over sent bytes; the fp32 probe copies measure the codec, so they are left out."""
        if self.bytes_up <= self.bytes_probe:
            return None
        return (self.bytes_up_fp32 - self.bytes_probe) / (self.bytes_up - self.bytes_probe)


@dataclass
class EdgeReport(_Wire):
    """What one :meth:`EdgeClient.run` did and measured.

    Attributes
    ----------
    mode, codec, config, bundle, session:
        What ran: ``infer``/``train``, the activation codec spec, the bundle's split
        configuration and name, and the session id used.
    samples, batches:
        Samples sent and requests made for them (HELLO not counted).
    accuracy:
        infer: predictions compared with the labels on the device; train: the server's
        training accuracy on the batches it was sent. ``None`` without labels.
    loss:
        Mean per-sample loss the server reported (train mode; infer mode when labels were
        sent), ``None`` otherwise.
    labelled:
        Samples that had labels (the denominator of ``accuracy``).
    bytes_up, bytes_down:
        Bytes of every serialised request and reply envelope of the batches (frames of
        activations, bit-packed labels, ``act_ref``, predictions, middle outputs, plus tensor
        names, step ids and meta): what the transport carried, counted as the torch client
        counts them (HELLO/WELCOME not included: see ``connect_ms``).
    envelope_up, envelope_down:
        The part of ``bytes_up`` / ``bytes_down`` that is not frames.
    bytes_up_fp32:
        ``bytes_up`` with each activation frame replaced by the fp32 frame of the same tensor
        (labels and ``act_ref`` unchanged): the traffic the same requests would cost uncompressed.
    bytes_probe:
        Part of ``bytes_up`` spent on ``act_ref`` probe frames (their envelope entries).
    ratio_up:
        ``(bytes_up_fp32 - bytes_probe) / (bytes_up - bytes_probe)``: how many times fewer
        bytes the codec sends (the fp32 probe copies, counted in both totals, left out).
    latency_ms:
        Mean milliseconds per batch: ``compute`` (onnxruntime, head included), ``encode``,
        ``network`` (request round trip, server time included), ``decode`` and ``total`` (wall
        time of the whole batch; about the sum of the parts).
    latency_ms_total:
        The same components summed over the run.
    connect_ms:
        The HELLO/WELCOME round trip (not part of any batch).
    predictions:
        Class ids received or computed (infer mode).
    probes:
        Batches that carried an ``act_ref`` probe.
    reconnects, resends:
        What the transport had to do during the run (0 for transports that do not reconnect).
    welcome:
        The session settings the server returned.
    pred:
        The predicted class ids, in the order of the input (infer mode); not in :meth:`to_json`.
    """

    mode: str
    codec: str
    config: str
    bundle: str
    session: str
    samples: int = 0
    batches: int = 0
    accuracy: float | None = None
    loss: float | None = None
    labelled: int = 0
    ratio_up: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_ms_total: dict[str, float] = field(default_factory=dict)
    connect_ms: float = 0.0
    predictions: int = 0
    probes: int = 0
    reconnects: int = 0
    resends: int = 0
    welcome: dict[str, Any] = field(default_factory=dict)
    pred: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Everything but ``pred``, as JSON-able values (NaN and inf become ``None``)."""
        out = asdict(self)
        out.pop("pred")
        return jsonable(out)


@dataclass
class _Totals:
    """Running sums of one run."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        (*LATENCY_PARTS, "total"), 0.0))
    wire: _Wire = field(default_factory=_Wire)
    correct: int = 0
    labelled: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    probes: int = 0


class EdgeClient:
    """Runs a bundle's client segment on local data and exchanges the cut with a server.

    Parameters
    ----------
    bundle:
        A loaded bundle (:func:`edgesplit.edge.bundle.load_bundle`).
    transport:
        How requests reach the server (a :class:`~edgesplit.transport.grpc_client.GrpcTransport`
        on a device). The caller owns it and closes it.
    codec:
        Activation codec spec; default the bundle manifest's (the codec the server trained on).
    mode:
        ``infer`` (PREDICT, class ids back) or ``train`` (FORWARD: the server trains its
        layers on this client's activations and labels; the segment here stays frozen).
    probe_every:
        Every K-th batch (the 1st, K+1-th, ...) also carries ``act_ref`` (fp32); 0 = never.
    batch_size:
        Samples per request.
    session:
        Session id; default a fresh random one. Reuse one to resume after a restart: the
        server's WELCOME says which step to continue from.
    name:
        The client name sent in messages (a server with tokens replaces it by the token's).
    group:
        Vertical only: the id grouping the parties of one run on the server.
    seed:
        Seed of the batch order in train mode (inference keeps the input order).

    Raises
    ------
    ConfigError
        Unknown mode, ``probe_every < 0``, ``batch_size < 1``.
    CodecError
        A bad codec spec.
    """

    #: Whether this client trains a ushape head (``edgesplit.edge.trainer.EdgeTrainer`` does).
    trains_head = False

    def __init__(
        self,
        bundle: Bundle,
        transport: Transport,
        *,
        codec: str | None = None,
        mode: str = "infer",
        probe_every: int = 0,
        batch_size: int = 32,
        session: str | None = None,
        name: str = "edge",
        group: str = "",
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 0:
            raise ConfigError(f"probe_every must be an integer >= 0, got {probe_every!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if mode == "train" and bundle.config == "ushape" and not self.trains_head:
            # The server's middle can only learn from the gradient of the client's head, and an
            # ONNX head has no autograd: a frozen ushape client can only infer.
            raise ConfigError(
                f"bundle {bundle.name} is ushape: a frozen edge client cannot train it (the "
                "server needs the gradient of the client's head); export it with `edgesplit "
                "export --trainable` so the device trains its layers, or use --mode infer"
            )
        self.bundle = bundle
        self.transport = transport
        self.codec: Codec = parse_codec(codec if codec is not None else bundle.codec)
        self.mode = mode
        self.probe_every = probe_every
        self.batch_size = batch_size
        self.session = session or uuid.uuid4().hex[:12]
        self.name = name
        self.group = group
        self.seed = seed
        self.step = 0
        self.welcome: dict[str, Any] | None = None
        self._last: _Exchange   # the last request and its wire bytes (set by _request)

    # ------------------------------------------------------------------ checks
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample the data must have (vertical: all features, this party's are
        selected on the device)."""
        if self.bundle.feature_block is not None:
            return tuple(int(d) for d in self.bundle.manifest["full_input_shape"])
        return self.bundle.input.shape

    def check_data(self, x: Any, y: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate data against the bundle before anything is sent.

        Returns
        -------
        x, y
            ``x`` as float32 (real numbers are converted), ``y`` as int64 or ``None``.

        Raises
        ------
        ConfigError
            ``x`` is not a non-empty array of the bundle's per-sample shape, holds NaN/inf or
            non-numbers; ``y`` is not one class id in ``0..num_classes-1`` per sample; train
            mode without labels (except a vertical party: another party may hold them).
        """
        expected = self.sample_shape
        want = f"(N, {', '.join(map(str, expected))})"
        where = f"bundle {self.bundle.name!r} (manifest input {self.bundle.input.describe()})"
        if not isinstance(x, np.ndarray):
            raise ConfigError(f"data must be a numpy array of shape {want}, "
                              f"got {type(x).__name__}")
        if x.dtype.kind not in "fiu":
            raise ConfigError(f"data must hold real numbers, got dtype {x.dtype}")
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ConfigError(
                f"data samples have shape {tuple(x.shape[1:])} (array {tuple(x.shape)}), but "
                f"{where} expects samples of shape {expected}, i.e. an array {want}; "
                "use the data the model was trained on"
            )
        if len(x) == 0:
            raise ConfigError("data holds no samples")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ConfigError(f"data holds {int((~np.isfinite(x)).sum())} NaN or infinite "
                              "values; clean them first")
        if y is None:
            if self.mode == "train" and self.bundle.feature_block is None:
                raise ConfigError("train mode needs labels: the server trains on them "
                                  "(pass data with y)")
            return x, None
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ConfigError(f"labels must be one class id per sample: got shape "
                              f"{tuple(y.shape)} for {len(x)} samples")
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        if y.dtype.kind not in "iu":
            raise ConfigError(f"labels must be integer class ids, got dtype {y.dtype}")
        y = y.astype(np.int64)
        classes = self.bundle.num_classes
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise ConfigError(
                f"labels must be class ids 0..{classes - 1} (the bundle has {classes} classes), "
                f"got values in {int(y.min())}..{int(y.max())}"
            )
        return x, y

    # ------------------------------------------------------------------ protocol
    def _meta(self, **extra: Any) -> dict[str, Any]:
        meta: dict[str, Any] = dict(extra)
        if self.bundle.feature_block is not None:
            meta.update(party=self.bundle.party, parties=int(self.bundle.manifest["parties"]))
            if self.group:
                meta["group"] = self.group
        return meta

    def _request(self, kind: str, tensors: dict[str, bytes], **meta: Any) -> Message:
        message = Message(kind, self.session, self.name, self.step, tensors, self._meta(**meta))
        up0, down0 = _wire_counters(self.transport)
        reply = self.transport.request(message)
        up1, down1 = _wire_counters(self.transport)
        # what went over the wire: the transport's own count of serialised envelopes (retries
        # and compacted ids included), or the envelopes' size for a transport that keeps none
        self._last = _Exchange(
            message, reply,
            up1 - up0 if up0 is not None and up1 is not None else wire_size(message),
            down1 - down0 if down0 is not None and down1 is not None else wire_size(reply))
        self.step += 1
        return reply

    def hello(self) -> dict[str, Any]:
        """Open the session: HELLO → WELCOME. Returns the WELCOME meta.

        Raises
        ------
        ConfigError
            The server refuses this client's settings (a ``FAILED_PRECONDITION`` reply to the
            HELLO: another split configuration, training run, codec, ...; the message is one
            line quoting the server), or its WELCOME names another configuration than the
            bundle was trained in.
        ProtocolError
            The server found the HELLO malformed (``INVALID_ARGUMENT``).
        TransportError
            Any other refusal (a token without the role, ...), or the server is unreachable.
        """
        files = self.bundle.manifest["files"]
        sha = self.bundle.manifest["sha256"].get(files["client"], "")
        answer = self._request(
            Kind.HELLO,
            {},
            config=self.bundle.config,
            mode=self.mode,
            codec=self.codec.spec,
            grad_codec=self.bundle.grad_codec,
            runtime=RUNTIME,
            bundle=self.bundle.name,
            bundle_sha256=sha,
            # the server refuses a bundle of another training run than its own
            **({"run_id": self.bundle.run_id} if self.bundle.run_id else {}),
        )
        if answer.kind == Kind.ERROR and answer.meta.get("code") == "FAILED_PRECONDITION":
            # not a fault of the link or of the message: this bundle or these settings do not
            # fit the run the server serves, and asking again will not change that
            said = " ".join(str(answer.meta.get("message", "")).split()) or "no reason given"
            raise ConfigError(f"the server refused bundle {self.bundle.name!r} "
                              f"({self.bundle.config}, {self.mode}, {self.codec.spec}): {said}")
        reply = expect(answer, Kind.WELCOME)
        welcome = dict(reply.meta)
        server_config = welcome.get("config")
        if server_config is not None and server_config != self.bundle.config:
            raise ConfigError(
                f"bundle {self.bundle.name!r} was trained as {self.bundle.config}, but the "
                f"server runs {server_config}: serve the checkpoint this bundle came from"
            )
        # A restarted client reusing its session continues after the server's last applied step.
        resume = welcome.get("resume_step")
        if isinstance(resume, int) and not isinstance(resume, bool):
            self.step = max(self.step, resume)
        self.welcome = welcome
        return welcome

    # ------------------------------------------------------------------ running
    def run(self, x: Any, y: Any = None,
            on_progress: EdgeProgress | None = None) -> EdgeReport:
        """Send ``x`` (and ``y``) to the server batch by batch and report.

        Parameters
        ----------
        x:
            Samples, shape ``(N, *input shape)`` of the bundle (vertical: all features).
        y:
            Class ids, one per sample; required in train mode.
        on_progress:
            Called after every batch as ``on_progress(label, samples_done, samples_total,
            info)``; ``info`` is the running accuracy / bytes sent. The CLI draws its progress
            bar from it (:func:`edgesplit.cli.progress.edge_progress`); ``None`` reports nothing.

        Returns
        -------
        EdgeReport

        Raises
        ------
        ConfigError
            Data that does not fit the bundle (raised before anything is sent); a server that
            runs another configuration.
        ProtocolError, TransportError
            The server refused a request or cannot be reached (after the transport's retries).
        ExportError
            onnxruntime failed to run the segment.
        """
        x, y = self.check_data(x, y)
        t0 = time.perf_counter()
        transport_before = _transport_counters(self.transport)
        welcome = self.welcome if self.welcome is not None else self.hello()
        connect_ms = (time.perf_counter() - t0) * 1e3
        n = len(x)
        if self.mode == "train" and self.bundle.feature_block is None:
            # shuffled so the server's SGD does not see the data in file order
            order = np.random.default_rng(self.seed).permutation(n)
        else:
            order = np.arange(n)  # predictions come back in input order; vertical parties align
        pred = np.empty(n, dtype=np.int64) if self.mode == "infer" else None
        totals = _Totals()
        batches = 0
        label = f"{self.mode} {self.codec.spec} samples"
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yb = y[idx] if y is not None else None
            out = self._batch(x[idx], yb, idx, batches, totals,
                              last=start + self.batch_size >= n)
            if pred is not None and out is not None:
                pred[idx] = out
            batches += 1
            if on_progress is not None:
                on_progress(label, start + len(idx), n, _info(totals))
        after = _transport_counters(self.transport)
        t = totals
        report = EdgeReport(
            mode=self.mode,
            codec=self.codec.spec,
            config=self.bundle.config,
            bundle=self.bundle.name,
            session=self.session,
            samples=n,
            batches=batches,
            accuracy=t.correct / t.labelled if t.labelled else None,
            loss=t.loss_sum / t.loss_n if t.loss_n else None,
            labelled=t.labelled,
            **asdict(t.wire),
            ratio_up=t.wire.fp32_ratio(),
            latency_ms={k: v * 1e3 / max(batches, 1) for k, v in t.seconds.items()},
            latency_ms_total={k: v * 1e3 for k, v in t.seconds.items()},
            connect_ms=connect_ms,
            predictions=n if pred is not None else 0,
            probes=t.probes,
            reconnects=after[0] - transport_before[0],
            resends=after[1] - transport_before[1],
            welcome=welcome,
            pred=pred,
        )
        return report

    def labels_tensor(self, y: np.ndarray) -> tuple[str, bytes]:
        """The tensor name and bytes ``y`` travels as: packed ``y`` when the server's WELCOME
        says it reads them (``labels: "y"``), else a bit-packed labels frame."""
        classes = self.bundle.num_classes
        if (self.welcome or {}).get("labels") == PACKED_LABELS and classes <= MAX_PACKED_CLASSES:
            return PACKED_LABELS, pack_labels(y, classes)
        return "labels", labels_frame(y, self.bundle)

    def _batch(
        self, xb: np.ndarray, yb: np.ndarray | None, ids: np.ndarray, index: int, t: _Totals,
        last: bool = False,
    ) -> np.ndarray | None:
        """One request; returns the batch's class ids in infer mode. ``last``: the run's last
        batch (a training FORWARD then asks for the server's report)."""
        start = time.perf_counter()
        act = self.bundle.run(self.bundle.select_features(xb))
        t_compute = time.perf_counter()
        act_frame = encode_frame(act, self.codec)
        tensors = {"act": act_frame}
        ushape = self.bundle.config == "ushape"
        # ushape keeps its labels on the device: that is the point of the configuration
        if yb is not None and not ushape:
            name, data = self.labels_tensor(yb)
            tensors[name] = data
        probe = self.probe_every > 0 and index % self.probe_every == 0
        if probe:
            tensors["act_ref"] = encode_frame(act, "fp32")
        # vertical parties prove they send the same samples in the same order (row positions)
        extra: dict[str, Any] = (
            {"ids": ids_digest(ids)} if self.bundle.feature_block is not None else {})
        if self.mode == "train" and last:
            # the server's loss and correct count over this session's steps, once a run
            extra["report"] = True
        t_encode = time.perf_counter()
        if self.mode == "train":
            reply = expect(
                self._request(Kind.FORWARD, tensors, train=True, want_grad=False, **extra),
                Kind.GRADIENT,
            )
        else:
            reply = expect(
                self._request(Kind.PREDICT, tensors, **extra), Kind.PREDICTION, Kind.MIDDLE
            )
        t_network = time.perf_counter()
        if isinstance(reply.meta.get("codec"), str):
            # the server's bitrate controller moved this client along its ladder
            self.codec = parse_codec(reply.meta["codec"])
        out, head_seconds = self._read_reply(reply, len(xb))
        end = time.perf_counter()

        t.seconds["compute"] += (t_compute - start) + head_seconds
        t.seconds["encode"] += t_encode - t_compute
        t.seconds["network"] += t_network - t_encode
        t.seconds["decode"] += (end - t_network) - head_seconds
        t.seconds["total"] += end - start
        sent = self._last
        wire = t.wire
        wire.bytes_up += sent.up
        wire.envelope_up += sent.up - sent.message.tensor_bytes()
        wire.bytes_up_fp32 += sent.up + _resized(sent.message, "act", fp32_frame_size(act.shape))
        wire.bytes_down += sent.down
        wire.envelope_down += sent.down - sent.reply.tensor_bytes()
        if probe:
            t.probes += 1
            wire.bytes_probe += -_resized(sent.message, "act_ref", None)
        if self.mode == "train":
            # a reply carries the server's report only when asked (report: true); it covers
            # the session's steps since its previous report, and a reply without one none
            if yb is not None and "loss" in reply.meta:
                t.correct += int(reply.meta.get("correct", 0))
                t.labelled += int(reply.meta.get("n", len(xb)))
            self._add_loss(t, reply, len(xb))
            return None
        if yb is not None and out is not None:
            t.correct += int((out == yb).sum())
            t.labelled += len(yb)
        if "loss" in reply.meta:
            self._add_loss(t, reply, len(xb))
        return out

    @staticmethod
    def _add_loss(t: _Totals, reply: Message, n: int) -> None:
        loss = reply.meta.get("loss")
        if isinstance(loss, int | float) and not isinstance(loss, bool) and math.isfinite(loss):
            n = int(reply.meta.get("n", n))
            t.loss_sum += float(loss) * n
            t.loss_n += n

    def _read_reply(self, reply: Message, n: int) -> tuple[np.ndarray | None, float]:
        """Class ids from a PREDICTION or (ushape) MIDDLE reply, and the head's run time."""
        if reply.kind == Kind.GRADIENT:
            # want_grad was false, so there should be no tensor; one that comes anyway (a
            # server that ignores want_grad) is not applied, only counted in bytes_down
            return None, 0.0
        if reply.kind == Kind.MIDDLE:
            if not self.bundle.has_head:
                raise ProtocolError(f"server sent a ushape middle output, but bundle "
                                    f"{self.bundle.name!r} ({self.bundle.config}) has no head")
            mid = decode_frame(reply.frame("mid"))
            start = time.perf_counter()
            logits = self.bundle.run_head(np.ascontiguousarray(mid, dtype=np.float32))
            pred = logits.argmax(axis=1).astype(np.int64)
            head_seconds = time.perf_counter() - start
        else:
            pred = decode_frame(reply.frame("pred"))
            if pred.dtype.kind not in "iu":
                raise ProtocolError(f"prediction frame holds {pred.dtype} values; expected "
                                    "integer class ids")
            pred = pred.astype(np.int64)
            head_seconds = 0.0
        if pred.shape != (n,):
            raise ProtocolError(f"server answered {tuple(pred.shape)} predictions for a batch "
                                f"of {n} samples")
        return pred, head_seconds



def labels_frame(y: np.ndarray, bundle: Bundle) -> bytes:
    """Class ids as the torch client sends them: a frame of the bundle's label dtype, bit-packed
    at ``ceil(log2(classes))`` bits when that is at most 8 (10 classes: 4 bits, not a byte)."""
    bits = max(1, (bundle.num_classes - 1).bit_length())
    return encode_frame(y.astype(bundle.label_dtype), "fp32", int_bits=bits if bits <= 8 else None)


@dataclass
class _Exchange:
    """The last request, its reply and the wire bytes each took."""

    message: Message
    reply: Message
    up: int
    down: int


def _wire_counters(transport: Transport) -> tuple[int | None, int | None]:
    up = getattr(transport, "wire_bytes_up", None)
    down = getattr(transport, "wire_bytes_down", None)
    return (int(up) if up is not None else None, int(down) if down is not None else None)


def _resized(message: Message, name: str, length: int | None) -> int:
    """Bytes ``message``'s envelope gains with tensor ``name`` at ``length`` bytes (``None``:
    without it; negative: it loses them)."""
    tensors = {n: f for n, f in message.tensors.items() if n != name or length is not None}
    if length is not None:
        tensors[name] = bytes(length)
    return wire_size(replace(message, tensors=tensors)) - wire_size(message)


def _transport_counters(transport: Transport) -> tuple[int, int]:
    return int(getattr(transport, "reconnects", 0)), int(getattr(transport, "resends", 0))


def _info(t: _Totals) -> str:
    parts = []
    if t.labelled:
        parts.append(f"acc {t.correct / t.labelled:.3f}")
    parts.append(f"↑ {t.wire.bytes_up / 1024:.1f} KiB")
    return "  ".join(parts)


