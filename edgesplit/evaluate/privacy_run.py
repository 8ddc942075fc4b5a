"""Run the privacy attacks of one sweep cell (``edgesplit evaluate --privacy``).

One training run per cut x codec (the cell's first seed) goes through the real engine with a
transport that records, next to every training step, the cut gradient the server returned as
the client decodes it (after the gradient codec). Then, on the trained client segment:

* **inversion** -- the attacker (the server, or anyone who reads the uplink) holds an auxiliary
  sample of the input distribution (``aux_fraction`` of the training data), runs it through
  the trained client segment and the cell's codec, and trains an MLP decoder from the decoded
  cut tensors back to the inputs; it is scored on the held-out test inputs next to the
  *mean-input baseline* (predicting the auxiliary mean for every input);
* **dependence** -- bias-corrected dCor between test inputs and their decoded cut tensors, with
  the same statistic against Gaussian noise of the cut's width as its noise floor;
* **label leakage** -- norm and cosine attacks on the recorded gradients of every party that
  receives gradients (:mod:`edgesplit.evaluate.privacy`), per epoch, maximum over epochs.

Inputs are scored after a per-feature min-max normalisation over the whole data set (train and
test), so PSNR and SSIM use a peak of 1 (for digits that is pixel / 16). This only sets the
scale of the score; the attacker itself sees nothing but its auxiliary data.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgesplit.errors import ConfigError
from edgesplit.evaluate import privacy
from edgesplit.train.spec import TrainResult, TrainSpec
from edgesplit.transport.base import Handler, Transport
from edgesplit.transport.inprocess import InProcessTransport
from edgesplit.wire.frame import decode_frame, encode_frame
from edgesplit.wire.labels import PACKED_LABELS, unpack_labels
from edgesplit.wire.messages import Kind, Message

#: Reconstructions kept per cell for the report's image grid.
GRID_SAMPLES = 8


@dataclass
class PrivacyOptions:
    """How hard the attacker tries (the defaults keep ``--privacy`` within 2x of a sweep)."""

    aux_fraction: float = 0.2
    decoder_hidden: int = 256
    decoder_steps: int = 100
    decoder_lr: float = 3e-3
    dcor_samples: int = 300
    #: also run the query-free attack (a shadow client trained through the frozen server)
    query_free: bool = False
    shadow_steps: int = 300
    #: training steps per client and epoch whose gradients are kept for the label attacks
    #: (the first ones of each shuffled epoch; bounds memory on large data sets)
    label_batches: int = 48
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.aux_fraction < 1:
            raise ConfigError(f"--privacy-aux must be in (0, 1), got {self.aux_fraction}")
        if self.label_batches < 1:
            raise ConfigError(f"label_batches must be >= 1, got {self.label_batches}")
        if self.decoder_steps < 1 or self.decoder_hidden < 1:
            raise ConfigError("the inversion decoder needs >= 1 step and >= 1 hidden unit")
        if self.dcor_samples < 4:
            raise ConfigError(f"dCor needs >= 4 samples, got {self.dcor_samples}")


@dataclass
class CellPrivacy:
    """What the attacks measured on one cell; :meth:`row` goes into ``results.json``."""

    metrics: dict[str, Any]
    originals: list[list[float]] = field(default_factory=list)   # normalised test inputs
    reconstructions: list[list[float]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return dict(self.metrics)


# ---------------------------------------------------------------------------------------------
# Recording the gradients a client receives


class GradientLog:
    """Per epoch, per client name: the ``(gradient, labels or None)`` of every training step.
    Labels sent packed (``y``) are kept as their bytes and decoded by :meth:`batches`."""

    def __init__(self, max_batches: int | None = None) -> None:
        self.max_batches = max_batches
        self.epoch = 0
        self._lock = threading.Lock()
        self.steps: list[dict[str, list[tuple[np.ndarray, np.ndarray | bytes | None]]]] = [{}]

    def next_epoch(self) -> None:
        with self._lock:
            self.epoch += 1
            self.steps.append({})

    def full(self, client: str) -> bool:
        """Whether ``client`` already has its batches for this epoch (skip decoding)."""
        with self._lock:
            mine = self.steps[self.epoch].get(client, [])
            return self.max_batches is not None and len(mine) >= self.max_batches

    def add(self, client: str, grad: np.ndarray, labels: np.ndarray | bytes | None) -> None:
        with self._lock:
            mine = self.steps[self.epoch].setdefault(client, [])
            if self.max_batches is None or len(mine) < self.max_batches:
                mine.append((grad, labels))

    def batches(self, label_holder: str, receivers: list[str], num_classes: int | None = None
                ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per epoch, the receivers' ``(gradient, labels)`` batches; a receiver that sent no
        labels (a vertical passive party) is paired with the label holder's i-th batch.
        Packed labels need ``num_classes``."""
        out = []
        for epoch in self.steps:
            holder = epoch.get(label_holder, [])
            batches = []
            for name in receivers:
                for i, (grad, sent) in enumerate(epoch.get(name, [])):
                    if sent is None and i < len(holder):
                        sent = holder[i][1]
                    labels = sent
                    if isinstance(sent, bytes):
                        labels = (unpack_labels(sent, len(grad), num_classes)
                                  if num_classes is not None else None)
                    if isinstance(labels, np.ndarray) and len(labels) == len(grad):
                        batches.append((grad, labels))
            if batches:
                out.append(batches)
        return out


class RecordingTransport:
    """An in-process transport that also logs each training gradient the server returns."""

    def __init__(self, handler: Handler, name: str, log: GradientLog) -> None:
        self.inner = InProcessTransport(handler)
        self.name = name
        self.log = log

    @property
    def wire_bytes_up(self) -> int:
        return self.inner.wire_bytes_up

    @property
    def wire_bytes_down(self) -> int:
        return self.inner.wire_bytes_down

    def request(self, message: Message) -> Message:
        reply = self.inner.request(message)
        # a training FORWARD asks for the gradient unless it says want_grad: false
        if (message.kind == Kind.FORWARD and message.meta.get("want_grad", True) is not False
                and reply.kind == Kind.GRADIENT and "grad" in reply.tensors
                and not self.log.full(self.name)):
            grad = np.asarray(decode_frame(reply.tensors["grad"]), dtype=np.float32)
            labels: np.ndarray | bytes | None = None
            if "labels" in message.tensors:
                labels = np.asarray(decode_frame(message.tensors["labels"])).astype(np.int64)
            elif PACKED_LABELS in message.tensors:
                # decoded after training, when the class count is known (no second data load)
                labels = bytes(message.tensors[PACKED_LABELS])
            self.log.add(self.name, grad, labels)
        return reply

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------------------------
# One cell


def train_and_attack(spec: TrainSpec, options: PrivacyOptions | None = None
                     ) -> tuple[TrainResult, CellPrivacy]:
    """Train ``spec`` once while recording gradients, then run every attack on it."""
    from edgesplit.train.engine import run_training

    options = options or PrivacyOptions()
    options.validate()
    log = GradientLog(options.label_batches)

    def factory(handler: Handler, name: str) -> Transport:
        return RecordingTransport(handler, name, log)

    trained = run_training(spec, transport_factory=factory,
                           on_epoch=lambda *_: log.next_epoch())
    started = time.perf_counter()
    result = trained.result
    metrics: dict[str, Any] = {}
    inv = invert(trained, options)
    metrics.update(inv.metrics)
    metrics.update(_label_metrics(trained, log))
    metrics["attack_seconds"] = time.perf_counter() - started
    metrics["attacked_seed"] = spec.seed
    inv.metrics = metrics
    return result, inv


def _label_metrics(trained: Any, log: GradientLog) -> dict[str, Any]:
    spec = trained.spec
    names = [f"client-{i}" for i in range(len(trained.client_segments))]
    if spec.config == "ushape":
        # the client holds the labels and the head: no party receives gradients without them
        return {"label_norm_auc": None, "label_cosine_auc": None, "label_auc": None,
                "label_auc_note": "ushape: labels never leave the client"}
    receivers = names[1:] if spec.config == "vertical" else names
    classes = trained.dataset.num_classes
    leak = privacy.label_leak(log.batches(names[0], receivers, classes), classes)
    return {
        "label_norm_auc": leak.norm_auc,
        "label_cosine_auc": leak.cosine_auc,
        "label_auc": leak.label_auc,
        "label_norm_auc_per_epoch": leak.norm_auc_per_epoch,
        "label_cosine_auc_per_epoch": leak.cosine_auc_per_epoch,
        "label_parties": receivers,
    }


def invert(trained: Any, options: PrivacyOptions) -> CellPrivacy:
    """Inversion and dCor on a trained split (a :class:`~edgesplit.train.engine.TrainedSplit`)."""
    import torch

    spec, data = trained.spec, trained.dataset
    # the last client holds the final weights (vanilla hand-off); vertical: the last party
    lower = trained.client_segments[-1]
    x_train, x_test = data.x_train, data.x_test
    if spec.config == "vertical" and trained.feature_blocks:
        lo, hi = trained.feature_blocks[-1]
        x_train, x_test = x_train[..., lo:hi], x_test[..., lo:hi]
    rng = np.random.default_rng([options.seed, 7])
    n_aux = max(8, int(round(options.aux_fraction * len(x_train))))
    aux = rng.choice(len(x_train), size=min(n_aux, len(x_train)), replace=False)
    x_aux = x_train[aux]

    was_training = lower.training
    lower.eval()
    # a defense's noise is on while training: the attacker sees training-time uploads
    noisy = [m for m in lower.modules() if getattr(m, "is_defense", False)]
    for module in noisy:
        module.train()
    try:
        z_aux = cut_tensors(lower, x_aux, spec.codec, spec.batch_size)
        z_test = cut_tensors(lower, x_test, spec.codec, spec.batch_size)
        if noisy:   # and what inference-time uploads (clip only, no noise) give the same attack
            lower.eval()
            clean = (cut_tensors(lower, x_aux, spec.codec, spec.batch_size),
                     cut_tensors(lower, x_test, spec.codec, spec.batch_size))
    finally:
        lower.train(was_training)

    # the score's scale: each feature's range over the whole data set (for digits, pixel /
    # 16); a range from the small auxiliary set alone would make rare pixels explode
    everything = np.concatenate([x_train.reshape(len(x_train), -1),
                                 x_test.reshape(len(x_test), -1)])
    lo_f = everything.min(0)
    span = everything.max(0) - lo_f
    span = np.where(span > 0, span, 1.0)

    def norm(v: np.ndarray) -> np.ndarray:
        return ((v.reshape(len(v), -1) - lo_f) / span).astype(np.float32)

    t_aux, t_test = norm(x_aux), norm(x_test)
    recon = fit_decoder(z_aux, t_aux, z_test, options, torch)
    base = np.broadcast_to(t_aux.mean(0), t_test.shape)
    shape = privacy.image_shape(x_test.shape[1:])
    m: dict[str, Any] = {
        "aux_fraction": options.aux_fraction,
        "aux_samples": len(aux),
        "inversion_mse": float(np.mean((recon - t_test) ** 2)),
        "inversion_psnr_db": privacy.psnr(t_test, recon),
        "inversion_ssim": privacy.ssim(t_test, recon, shape),
        "mean_baseline_mse": float(np.mean((base - t_test) ** 2)),
        "mean_baseline_psnr_db": privacy.psnr(t_test, base),
        "mean_baseline_ssim": privacy.ssim(t_test, base, shape),
    }
    m["inversion_gain_db"] = m["inversion_psnr_db"] - m["mean_baseline_psnr_db"]
    if noisy:
        m["inference_inversion_psnr_db"] = privacy.psnr(
            t_test, fit_decoder(clean[0], t_aux, clean[1], options, torch))
    sub = rng.choice(len(x_test), size=min(options.dcor_samples, len(x_test)), replace=False)
    xs, zs = x_test[sub].reshape(len(sub), -1), z_test[sub].reshape(len(sub), -1)
    m["dcor"] = privacy.dcor_unbiased(xs, zs)
    m["dcor_biased"] = privacy.dcor_biased(xs, zs)
    noise = rng.standard_normal(zs.shape)
    m["dcor_noise_floor"] = privacy.dcor_unbiased(xs, noise)
    m["dcor_biased_noise_floor"] = privacy.dcor_biased(xs, noise)
    if options.query_free:
        m.update(query_free(trained, lower, x_aux, data.y_train[aux], t_aux, z_test, t_test,
                            options))
    k = min(GRID_SAMPLES, len(t_test))
    return CellPrivacy(m, t_test[:k].round(4).tolist(),
                       np.clip(recon[:k], 0, 1).round(4).tolist())


def query_free(trained: Any, lower: Any, x_aux: np.ndarray, y_aux: np.ndarray,
               t_aux: np.ndarray, z_test: np.ndarray, t_test: np.ndarray,
               options: PrivacyOptions) -> dict[str, Any]:
    """The query-free attack (He et al., ACSAC 2019): the server never queries the client.

    It trains a *shadow* client -- the client segment's architecture, fresh weights -- on its
    labelled auxiliary data through its own frozen server segment, so the shadow learns
    features the server reads like the real client's; a decoder trained from the shadow's
    features to inputs then inverts the **real** cut tensors. Vertical and ushape have no
    server segment that maps one party's cut to the labels: ``None`` there.
    """
    import copy

    import torch

    spec = trained.spec
    if spec.config in ("vertical", "ushape"):
        return {"query_free_psnr_db": None, "query_free_ssim": None}
    server = copy.deepcopy(trained.server_segment).eval()
    for p in server.parameters():
        p.requires_grad_(False)
    shadow = copy.deepcopy(lower)
    torch.manual_seed(options.seed)
    for module in shadow.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    shadow.train()
    opt = torch.optim.Adam(shadow.parameters(), lr=3e-3)
    xa = torch.from_numpy(np.ascontiguousarray(x_aux))
    ya = torch.from_numpy(np.asarray(y_aux, dtype=np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(options.shadow_steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(server(shadow(xa)), ya).backward()
        opt.step()
    shadow.eval()
    z_shadow = cut_tensors(shadow, x_aux, spec.codec, spec.batch_size)
    # the shadow's features match the real ones up to scale: standardise each on its own, and
    # keep reconstructions in the input range the attacker knows from its data
    recon = np.clip(fit_decoder(z_shadow, t_aux, z_test, options, torch, own_stats=True), 0, 1)
    shape = privacy.image_shape(trained.dataset.x_test.shape[1:])
    return {"query_free_psnr_db": privacy.psnr(t_test, recon),
            "query_free_ssim": privacy.ssim(t_test, recon, shape)}


def cut_tensors(lower: Any, x: np.ndarray, codec: str, batch_size: int) -> np.ndarray:
    """What the server decodes: ``lower(x)`` through ``codec``, encoded batch by batch as in
    training (a codec's scales are per frame)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            act = lower(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])))
            frame = encode_frame(act.numpy().astype(np.float32), codec)
            out.append(np.asarray(decode_frame(frame), dtype=np.float32))
    return np.concatenate(out)


def fit_decoder(z_aux: np.ndarray, t_aux: np.ndarray, z_test: np.ndarray,
                options: PrivacyOptions, torch: Any, *, own_stats: bool = False) -> np.ndarray:
    """Train an MLP ``cut -> input`` on the attacker's pairs; return its test reconstructions.

    Full-batch Adam on standardised cut tensors: a few hundred steps of a 2-hidden-layer MLP
    take well under a second on a few hundred samples.
    """
    from torch import nn

    za = z_aux.reshape(len(z_aux), -1)
    mu, sd = za.mean(0), _spread(za)
    gen = torch.Generator().manual_seed(options.seed)
    h = options.decoder_hidden
    dec = nn.Sequential(nn.Linear(za.shape[1], h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                        nn.Linear(h, t_aux.shape[1]))
    with torch.no_grad():
        for p in dec.parameters():   # seeded init, independent of the global torch RNG
            bound = 1.0 / math.sqrt(p.shape[-1])
            p.uniform_(-bound, bound, generator=gen)
    opt = torch.optim.Adam(dec.parameters(), lr=options.decoder_lr)
    zin = torch.from_numpy(((za - mu) / sd).astype(np.float32))
    target = torch.from_numpy(t_aux)
    for _ in range(options.decoder_steps):
        opt.zero_grad(set_to_none=True)
        loss = ((dec(zin) - target) ** 2).mean()
        loss.backward()
        opt.step()
    zt = z_test.reshape(len(z_test), -1)
    if own_stats:   # features of another model: match their statistics, not the aux ones
        mu, sd = zt.mean(0), _spread(zt)
    zt = torch.from_numpy(((zt - mu) / sd).astype(np.float32))
    with torch.no_grad():
        return dec(zt).numpy()


def _spread(z: np.ndarray) -> np.ndarray:
    """Per-feature std for standardising; a feature (nearly) constant here gets an infinite
    spread, so it enters as 0 -- a coarse codec can make a feature constant on the attacker's
    few samples and vary elsewhere, which would otherwise blow up the decoder's input."""
    sd = z.std(0)
    floor = 1e-4 * float(sd.max()) if sd.size and sd.max() > 0 else 1.0
    return np.where(sd > floor, sd, np.inf)


def options_json(options: PrivacyOptions) -> dict[str, Any]:
    return asdict(options)
