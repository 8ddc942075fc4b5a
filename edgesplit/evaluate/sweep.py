"""The evaluation sweep: train every cut x codec x seed, aggregate, estimate latency per device x
link, mark the Pareto frontier, recommend, and (optionally) compare with FedAvg.

**Cache.** Every finished cell (one cut, codec and seed) is written at once to
``<out>/.cache/<slug>-<hash>.json``, the hash covering every argument that changes what that cell
trains (data -- with the file's size and mtime when it is a file --, model, config, clients,
cut, codec, grad codec, epochs, batch size, lr, seed, feature split) and the edgesplit version.
A rerun with the same arguments trains nothing it already has, so an interrupted sweep resumes
where it stopped and loses at most the cell that was running. Devices, links, ``--max-drop`` and
the objective do not enter the key: changing them re-uses every cell. Files are written to a
temporary name and renamed, so an interrupt never leaves half a cache file; an unreadable or
stale file is ignored and its cell trained again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import edgesplit
from edgesplit.devices import (
    DeviceProfile,
    LinkProfile,
    list_devices,
    list_links,
    load_device,
    load_link,
)
from edgesplit.errors import ConfigError, EdgesplitError
from edgesplit.evaluate import fl_compare, latency, pareto, recommend
from edgesplit.train.spec import ClientBytes, TrainResult, TrainSpec, jsonable

log = logging.getLogger(__name__)

#: The codecs a sweep tries when ``--codecs`` is not given.
DEFAULT_CODECS = ("fp32", "fp16", "q8+zstd", "q4+zstd", "q2+zstd", "q1+zstd", "topk:0.1+q8+zstd")
#: Folder under ``--out`` holding one JSON file per finished cell.
CACHE_DIR = ".cache"
#: Bumped when the cache file layout changes (old files are then ignored).
CACHE_SCHEMA = 1
#: Bumped when the privacy attacks change what they measure (old privacy files are ignored).
PRIVACY_SCHEMA = 2
#: Bytes of one predicted class id (int64) in an inference answer frame.
PREDICTION_BYTES = 8

TrainFn = Callable[[TrainSpec], TrainResult]
#: ``on_progress(label, finished, total)`` (see :func:`run_sweep`)
SweepProgress = Callable[[str, int, int], None]


@dataclass
class SweepArgs:
    """Everything ``edgesplit evaluate`` was asked to do (defaults = the CLI's defaults)."""

    data: str = "digits"
    config: str = "vanilla"
    model: str = "auto"
    cuts: list[str] | None = None
    codecs: list[str] = field(default_factory=lambda: list(DEFAULT_CODECS))
    grad_codec: str = "fp32"
    seeds: int = 3
    seed: int = 0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.02
    clients: int = 1
    feature_split: str | None = None
    devices: list[str] | None = None
    links: list[str] | None = None
    server_device: str = "server-cpu"
    host_device: str = "server-cpu"
    max_drop: float = 1.0
    objective: str = "latency"
    latency_mode: str = "train"
    latency_batch: int | None = None
    out: str = "runs/evaluate"
    compare_fl: bool = False
    fl_clients: list[int] = field(default_factory=lambda: list(fl_compare.DEFAULT_CLIENTS))
    fl_codec: str | None = None
    command: str = ""
    fresh: bool = False
    #: run the privacy attacks once per cut x codec (:mod:`edgesplit.evaluate.privacy_run`)
    privacy: bool = False
    #: also the query-free attack (``--privacy full``)
    privacy_full: bool = False
    #: the attacker's auxiliary data, as a fraction of the training data
    privacy_aux: float = 0.2
    #: privacy defenses at the cut for every cell (:mod:`edgesplit.split.defense`)
    defense: str | None = None
    #: leakage budget of a recommendation: inversion PSNR (dB) and label-leak AUC limits
    max_psnr: float | None = None
    max_label_auc: float | None = None

    def seed_values(self) -> list[int]:
        """The training seeds: ``seed, seed + 1, ..., seed + seeds - 1``."""
        return [self.seed + i for i in range(self.seeds)]


@dataclass
class SweepResult:
    """What a sweep produced; :meth:`to_json` is the content of ``results.json``."""

    args: SweepArgs
    rows: list[dict[str, Any]]
    baseline: recommend.Baseline
    recommendations: list[recommend.Recommendation]
    devices: dict[str, DeviceProfile]
    links: dict[str, LinkProfile]
    server: DeviceProfile
    host: DeviceProfile
    fl_comparison: fl_compare.FLComparison | None = None
    trained_cells: int = 0
    cached_cells: int = 0
    elapsed_s: float = 0.0
    privacy_samples: dict[str, Any] | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.args.out)

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` document (strict JSON: non-finite numbers are ``null``)."""
        doc: dict[str, Any] = {
            "edgesplit_version": edgesplit.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": self.args.command,
            "args": asdict(self.args),
            "baseline": asdict(self.baseline),
            "max_drop": self.args.max_drop,
            "objective": self.args.objective,
            "latency_mode": self.args.latency_mode,
            "devices": {n: _profile_json(p) for n, p in self.devices.items()},
            "links": {n: _profile_json(p) for n, p in self.links.items()},
            "server": _profile_json(self.server),
            "host": _profile_json(self.host),
            "rows": self.rows,
            "frontier": [i for i, r in enumerate(self.rows) if r.get("pareto")],
            "recommendations": [r.to_json() for r in self.recommendations],
            "cache": {"trained_cells": self.trained_cells, "reused_cells": self.cached_cells},
            "elapsed_s": self.elapsed_s,
        }
        if self.fl_comparison is not None:
            doc["fl_comparison"] = self.fl_comparison.to_json()
        if self.privacy_samples is not None:
            doc["privacy_samples"] = self.privacy_samples
        return jsonable(doc)


# ---------------------------------------------------------------------------------------------
# Running


def run_sweep(args: SweepArgs, train_fn: TrainFn | None = None,
              on_progress: SweepProgress | None = None, *,
              write_report: bool = True) -> SweepResult:
    """Run (or resume) the sweep described by ``args``.

    Every cut x codec x seed is trained through ``train_fn`` (or taken from the cache), rows are
    aggregated over seeds, latency is modelled for every device x link, the Pareto frontier is
    marked and one recommendation per device x link is made.

    Parameters
    ----------
    args:
        What to sweep and how to judge it.
    train_fn:
        Trains one cell: ``TrainSpec -> TrainResult``. Default: the in-process engine,
        :func:`edgesplit.train.engine.run_training`. With ``args.privacy`` the first seed of
        every cut x codec is trained by :func:`edgesplit.evaluate.privacy_run.train_and_attack`
        instead (the same engine, with a transport that records the returned gradients), and
        its attacks fill ``row["privacy"]``.
    on_progress:
        Called as ``on_progress(label, finished, total)`` when a cell starts (``label`` names it)
        and when it is finished (trained or taken from the cache); ``finished`` counts the cells
        done so far out of ``total``. The CLI draws its progress bar from it
        (:func:`edgesplit.cli.progress.sweep_progress`); ``None`` reports nothing.
    write_report:
        Write ``results.json``, ``results.csv``, ``report.md`` and the plots to ``args.out``.

    Raises
    ------
    ConfigError
        Bad arguments, unknown devices or links, no cuts. Errors from a cell's training are
        re-raised with the cell named; cells finished before it stay cached.
    """
    started = time.perf_counter()
    _validate(args)
    # profiles first: a typo in --devices fails before an hour of training, not after
    # keyed by profile name, so a --devices path reports as the device it describes
    devices = {p.name: p for p in map(load_device, args.devices or list_devices("client"))}
    links = {lk.name: lk for lk in map(load_link, args.links or list_links())}
    device_names, link_names = list(devices), list(links)
    server = load_device(args.server_device)
    host = load_device(args.host_device)

    cuts = list(args.cuts) if args.cuts else default_cuts(args)
    if not cuts:
        raise ConfigError("no cuts to evaluate; pass --cuts")
    if train_fn is None:
        train_fn = default_train_fn

    out = Path(args.out)
    cache = out / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)

    cells = [(cut, codec, seed) for cut in cuts for codec in args.codecs
             for seed in args.seed_values()]
    results: dict[tuple[str, str], list[TrainResult]] = {}
    leaks: dict[tuple[str, str], dict[str, Any]] = {}
    trained = reused = 0
    finished = 0

    def advance(label: str, done: bool) -> None:
        nonlocal finished
        finished += 1 if done else 0
        if on_progress is not None:
            on_progress(label, finished, len(cells))

    for cut, codec, seed in cells:
        spec = make_spec(args, cut, codec, seed)
        key = cell_key(spec)
        path = cache / f"{_slug(cut, codec, seed)}-{_digest(key)}.json"
        result = None if args.fresh else load_cell(path, key)
        label = f"{cut} · {codec} · seed {seed}"
        fresh = None
        if args.privacy and seed == args.seed:
            # once per cut x codec: the attacked run is also the cell's first seed
            advance(label + " · privacy", False)
            leak, fresh = _privacy_cell(args, spec, key, cache, cut, codec, seed, path)
            leaks[(cut, codec)] = leak
        if fresh is not None:
            result = fresh
            trained += 1
        elif result is None:
            advance(label, False)
            try:
                result = _as_result(train_fn(spec))
            except EdgesplitError as exc:
                raise type(exc)(f"cut {cut!r}, codec {codec!r}, seed {seed}: {exc}") from exc
            save_cell(path, key, result)
            trained += 1
        else:
            reused += 1
        advance(label, True)
        results.setdefault((cut, codec), []).append(result)

    rows = [aggregate(cut, codec, results[(cut, codec)], args)
            for cut in cuts for codec in args.codecs]
    if args.privacy:
        for row in rows:
            row["privacy"] = leaks[(row["cut"], row["codec"])]["metrics"]
    for row in rows:
        add_latency(row, args, devices, links, server, host)
    for row, on in zip(rows, pareto.mark_pareto(rows), strict=True):
        row["pareto"] = on
    baseline = recommend.reference_accuracy(rows)
    budget = recommend.within_budget(rows, args.max_drop, baseline)
    for row, ok in zip(rows, budget, strict=True):
        row["drop_points"] = recommend.drop_points(row["accuracy_mean"], baseline)
        row["within_budget"] = ok
    for row, ok in zip(rows, recommend.within_leakage(rows, args.max_psnr, args.max_label_auc),
                       strict=True):
        if "privacy" in row:
            row["within_leakage_budget"] = ok
    recs = recommend.recommend(rows, device_names, link_names, max_drop=args.max_drop,
                               objective=args.objective, baseline=baseline,
                               max_psnr=args.max_psnr, max_label_auc=args.max_label_auc)
    fl = fl_comparison(rows, args) if args.compare_fl else None
    sweep = SweepResult(
        args=args, rows=rows, baseline=baseline, recommendations=recs, devices=devices,
        links=links, server=server, host=host, fl_comparison=fl, trained_cells=trained,
        cached_cells=reused, elapsed_s=time.perf_counter() - started,
    )
    sweep.privacy_samples = _samples(leaks) if args.privacy else None
    if write_report:
        from edgesplit.evaluate.report import write_report as _write

        _write(sweep.to_json(), out)
    return sweep


def _privacy_cell(args: SweepArgs, spec: TrainSpec, key: dict[str, Any], cache: Path,
                  cut: str, codec: str, seed: int, cell_path: Path
                  ) -> tuple[dict[str, Any], TrainResult | None]:
    """The privacy measurements of one cut x codec, from the cache or by training and
    attacking its first seed. Returns them and the freshly trained result (``None`` when
    cached)."""
    from edgesplit.evaluate.privacy_run import PrivacyOptions, train_and_attack

    options = PrivacyOptions(aux_fraction=args.privacy_aux, seed=seed,
                             query_free=args.privacy_full)
    pkey = {"cell": key, "options": asdict(options), "schema": PRIVACY_SCHEMA}
    ppath = cache / f"{_slug(cut, codec, seed)}-{_digest(pkey)}.privacy.json"
    if not args.fresh:
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(ppath.read_text())
            if isinstance(doc, dict) and doc.get("key") == pkey and "leak" in doc:
                return doc["leak"], None
    try:
        result, leak = train_and_attack(spec, options)
    except EdgesplitError as exc:
        raise type(exc)(f"cut {cut!r}, codec {codec!r}, seed {seed} (privacy): {exc}") from exc
    save_cell(cell_path, key, result)
    doc = {"key": pkey, "leak": asdict(leak)}
    tmp = ppath.with_name(ppath.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, ppath)
    return doc["leak"], result


def _samples(leaks: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """Originals and reconstructions per cut and codec, for the report's image grids."""
    out: dict[str, Any] = {"originals": {}, "reconstructions": {}}
    for (cut, codec), leak in leaks.items():
        out["originals"].setdefault(cut, leak.get("originals"))
        out["reconstructions"].setdefault(cut, {})[codec] = leak.get("reconstructions")
    return out


def default_train_fn(spec: TrainSpec) -> TrainResult:
    """Train one cell with the in-process engine (imports torch)."""
    from edgesplit.train.engine import run_training

    return _as_result(run_training(spec))


def _as_result(out: Any) -> TrainResult:
    # the engine returns a TrainedSplit (segments + result); a train_fn may return either
    if isinstance(out, TrainResult):
        return out
    inner = getattr(out, "result", None)
    if isinstance(inner, TrainResult):
        return inner
    raise ConfigError(f"train_fn returned {type(out).__name__}, not a TrainResult")


def _validate(args: SweepArgs) -> None:
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.codecs:
        raise ConfigError("--codecs is empty")
    for codec in args.codecs:
        check_cell_codec(codec)
    for what, items in (("codec", args.codecs), ("cut", args.cuts or [])):
        dup = sorted({x for x in items if items.count(x) > 1})
        if dup:
            raise ConfigError(f"{what} listed twice: {', '.join(dup)}")
    if args.objective not in recommend.OBJECTIVES:
        raise ConfigError(f"unknown --objective {args.objective!r}; valid: "
                          f"{', '.join(recommend.OBJECTIVES)}")
    if args.latency_mode not in latency.MODES:
        raise ConfigError(f"unknown --latency-mode {args.latency_mode!r}; valid: "
                          f"{', '.join(latency.MODES)}")
    if args.latency_batch is not None and args.latency_batch < 1:
        raise ConfigError(f"--latency-batch must be >= 1, got {args.latency_batch}")
    if not math.isfinite(args.max_drop) or args.max_drop < 0:
        raise ConfigError(f"--max-drop must be >= 0 points, got {args.max_drop}")
    if any(k < 1 for k in args.fl_clients):
        raise ConfigError(f"--fl-clients must all be >= 1, got {args.fl_clients}")
    if (args.max_psnr is not None or args.max_label_auc is not None) and not args.privacy:
        raise ConfigError("--max-psnr and --max-label-auc need the leakage measured: add "
                          "--privacy")
    recommend.within_leakage([], args.max_psnr, args.max_label_auc)   # checks the limits
    if args.privacy and not 0 < args.privacy_aux < 1:
        raise ConfigError(f"--privacy-aux must be a fraction in (0, 1), got {args.privacy_aux}")
    if args.defense is not None:
        try:
            from edgesplit.split.defense import parse_defense
        except ImportError as exc:   # the training extra is not installed
            raise ConfigError(f"--defense needs the training extra ({exc})") from None
        if parse_defense(args.defense).active and not _engine_applies_defenses():
            raise ConfigError(f"--defense {args.defense!r}: this version's training engine does "
                              "not apply defenses yet (edgesplit.train.engine.DEFENSES_APPLIED)")
    if args.fl_codec is not None and args.fl_codec not in args.codecs:
        raise ConfigError(f"--fl-codec {args.fl_codec!r} is not one of the swept codecs "
                          f"({', '.join(args.codecs)})")


def _engine_applies_defenses() -> bool:
    # the engine sets this flag once it wraps client segments, adds the NoPeek loss and
    # perturbs returned gradients; until then a --defense would silently do nothing
    from edgesplit.train import engine

    return bool(getattr(engine, "DEFENSES_APPLIED", False))


def default_cuts(args: SweepArgs) -> list[str]:
    """Every valid cut of the model for this data (:func:`edgesplit.split.cut.valid_cuts`).

    ushape needs pairs of cuts and has no default here: pass ``--cuts "a,b;c,d"``.
    """
    if args.config == "ushape":
        raise ConfigError("ushape needs pairs of cuts: pass --cuts 'first,second;first,second'")
    try:
        from edgesplit.data import load_dataset
        from edgesplit.models import build_model
        from edgesplit.split.cut import valid_cuts
    except ImportError as exc:   # the training extra is not installed
        raise ConfigError(f"cannot list the model's valid cuts ({exc}); pass --cuts") from None
    data = load_dataset(args.data)
    model = build_model(args.model, data.input_shape, data.num_classes)
    return [str(getattr(c, "name", c)) for c in valid_cuts(model, data.input_shape)]


#: A codec-axis entry ``bn:D[:BITS[:RATE]]`` trains a learned bottleneck at the cut (width ×
#: bits are then sweep axes, the cuts its positions) with the bottleneck's own codecs.
BOTTLENECK_PREFIX = "bn:"


def split_cell_codec(codec: str) -> tuple[str | None, str, str | None]:
    """``(bottleneck, activation codec, gradient codec or None)`` of a codec-axis entry.

    ``q4+zstd/q8+zstd`` names both directions; ``bn:16:2`` (optionally ``bn:16:2/q8``) a
    bottleneck with its default codecs (``fq:2,ans`` up, ``q4:stochastic`` down).
    """
    entry, _, grad = codec.partition("/")
    if entry.startswith(BOTTLENECK_PREFIX):
        from edgesplit.split.bottleneck import default_codecs

        bottleneck = entry[len(BOTTLENECK_PREFIX):]
        act, default_grad = default_codecs(bottleneck)
        return bottleneck, act, grad or default_grad
    return None, entry, grad or None


def check_cell_codec(codec: str) -> None:
    """Refuse a codec-axis entry that no cell could train, before any cell trains.

    Raises
    ------
    ConfigError
        Naming the entry and what would be valid.
    """
    from edgesplit.codecs import parse_codec

    try:
        bottleneck, act, grad = split_cell_codec(codec)
        for spec in (act, grad):
            if spec is not None:
                parse_codec(spec)
    except ImportError:
        raise ConfigError(f"codec {codec!r}: a bottleneck needs the training extra "
                          "(pip install 'edgesplit[train]')") from None
    except EdgesplitError as exc:
        raise ConfigError(f"--codecs entry {codec!r}: {exc}") from None


def make_spec(args: SweepArgs, cut: str, codec: str, seed: int) -> TrainSpec:
    """The :class:`TrainSpec` of one cell. ``codec`` may name both directions as
    ``ACTIVATIONS/GRADIENTS`` (``q4+zstd/q8+zstd``), otherwise gradients use ``--grad-codec``;
    ``bn:D:BITS`` is a learned bottleneck (:func:`split_cell_codec`)."""
    bottleneck, act, grad = split_cell_codec(codec)
    return TrainSpec(
        data=args.data, config=args.config, clients=args.clients, model=args.model, cut=cut,
        codec=act, grad_codec=grad or args.grad_codec, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=seed, feature_split=args.feature_split,
        defense=args.defense, bottleneck=bottleneck,
    )


# ---------------------------------------------------------------------------------------------
# Cache


def cell_key(spec: TrainSpec) -> dict[str, Any]:
    """Everything that changes what a cell trains, plus the edgesplit version.

    Data and model given as files add the file's size and modification time, so editing the
    ``.npz`` (or the model factory) invalidates the cells trained on the old one.
    """
    key: dict[str, Any] = asdict(spec)
    key["edgesplit_version"] = edgesplit.__version__
    key["data_file"] = _file_fingerprint(spec.data)
    if ":" in spec.model:
        key["model_file"] = _file_fingerprint(spec.model.rsplit(":", 1)[0])
    return key


def load_cell(path: Path, key: dict[str, Any]) -> TrainResult | None:
    """The cached result at ``path`` if it exists, parses and was made for ``key``."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cache file %s (%s); the cell will be trained again",
                    path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("schema") != CACHE_SCHEMA or doc.get("key") != key:
        return None
    try:
        return _result_from_dict(doc["result"])
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring cache file %s that does not hold a result (%s)", path, exc)
        return None


def save_cell(path: Path, key: dict[str, Any], result: TrainResult) -> None:
    """Write one finished cell atomically (temporary file + rename)."""
    # the cache is private: plain json keeps inf/nan (fp32 SNR is inf) where strict JSON cannot
    doc = {"schema": CACHE_SCHEMA, "key": key, "result": asdict(result),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _result_from_dict(d: dict[str, Any]) -> TrainResult:
    names = {f.name for f in dataclasses.fields(TrainResult)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs["clients"] = [ClientBytes(**c) for c in kwargs.get("clients", [])]
    return TrainResult(**kwargs)


def _digest(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _slug(cut: str, codec: str, seed: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{cut}__{codec}")
    return f"{safe}__s{seed}"


def _file_fingerprint(ref: str) -> list[int] | None:
    path = Path(ref)
    try:
        if path.is_file():
            st = path.stat()
            return [st.st_size, st.st_mtime_ns]
        if path.is_dir():   # an image folder: its entries' sizes and times
            stats = [p.stat() for p in sorted(path.rglob("*")) if p.is_file()]
            return [len(stats), sum(s.st_size for s in stats),
                    max((s.st_mtime_ns for s in stats), default=0)]
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Aggregation


def steps_per_run(result: TrainResult, batch_size: int) -> int:
    """Training steps (= frames each way) of a run: ``ceil(samples / batch) x epochs``.

    Exact for one client; with several clients each client's last batch is partial, so this
    undercounts by less than one step per client per epoch.
    """
    return max(1, math.ceil(result.train_samples / batch_size) * max(result.epochs, 1))


def cut_elements(cut_shape: Sequence[int], fp32_bytes_per_sample: float) -> int:
    """Elements of the cut activation for one sample.

    ``TrainResult.cut_shape`` is the per-sample shape; if a batch axis slipped in (the product
    is far more than the fp32 bytes per sample allow), it is dropped.
    """
    n = math.prod(int(d) for d in cut_shape) if cut_shape else 0
    if len(cut_shape) > 1 and fp32_bytes_per_sample > 0 and n * 4 > 2 * fp32_bytes_per_sample:
        return math.prod(int(d) for d in cut_shape[1:])
    return n


def aggregate(cut: str, codec: str, results: Sequence[TrainResult],
              args: SweepArgs) -> dict[str, Any]:
    """One row of ``results.json``: mean and std over seeds of one cut x codec.

    Bytes per sample are ``bytes / (train_samples x epochs)`` (the real frame bytes, so headers
    and scales are included); encode/decode times are per training step (batch).
    """
    if not results:
        raise ConfigError(f"no results for cut {cut!r} with {codec!r}")
    first = results[0]
    acc = [float(r.accuracy) for r in results]
    samples = [max(r.train_samples * r.epochs, 1) for r in results]
    steps = [steps_per_run(r, args.batch_size) for r in results]
    up = _mean(r.bytes_up / n for r, n in zip(results, samples, strict=True))
    down = _mean(r.bytes_down / n for r, n in zip(results, samples, strict=True))
    up32 = _mean(r.bytes_up_fp32 / n for r, n in zip(results, samples, strict=True))
    down32 = _mean(r.bytes_down_fp32 / n for r, n in zip(results, samples, strict=True))
    elements = cut_elements(first.cut_shape, up32)
    return {
        "cut": cut,
        "codec": codec,
        "grad_codec": first.grad_codec or args.grad_codec,
        # the learned bottleneck (D:BITS:RATE) of a bn: cell; ratios stay against the fp32 cut
        # without bottleneck at the same position
        "bottleneck": split_cell_codec(codec)[0],
        "config": first.config,
        "seeds": args.seed_values()[: len(results)],
        "n_seeds": len(results),
        "accuracy_mean": _mean(acc),
        # sample standard deviation over seeds (0 with one seed)
        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "accuracies": acc,
        # a seed whose training stopped on a non-finite loss: its accuracy is what it reached
        "diverged": any(bool(getattr(r, "diverged", False)) for r in results),
        "loss_mean": _mean(float(r.loss) for r in results),
        "bytes_up_per_sample": up,
        "bytes_down_per_sample": down,
        "bytes_per_sample": up + down,
        "bytes_up_fp32_per_sample": up32,
        "bytes_down_fp32_per_sample": down32,
        "ratio_up": up32 / up if up > 0 else math.nan,
        "ratio_down": down32 / down if down > 0 else math.nan,
        "snr_db": _mean(float(r.snr_db) for r in results),
        "client_params": int(first.client_params),
        "server_params": int(first.server_params),
        "client_flops": int(first.client_flops),
        "server_flops": int(first.server_flops),
        "cut_shape": list(first.cut_shape),
        "cut_elements": elements,
        "train_samples": int(first.train_samples),
        "epochs": int(first.epochs),
        "batch_size": args.batch_size,
        "steps": steps[0],
        # model weights that travelled (vanilla hand-off, splitfed averaging), per epoch
        "weights_bytes_per_epoch": _mean(
            (getattr(r, "weights_up", 0) + getattr(r, "weights_down", 0)) / max(r.epochs, 1)
            for r in results),
        "frame_bytes_up": _mean(r.bytes_up / s for r, s in zip(results, steps, strict=True)),
        "frame_bytes_down": _mean(r.bytes_down / s for r, s in zip(results, steps, strict=True)),
        "encode_ms_per_batch": _mean(1e3 * r.encode_seconds / s
                                     for r, s in zip(results, steps, strict=True)),
        "decode_ms_per_batch": _mean(1e3 * r.decode_seconds / s
                                     for r, s in zip(results, steps, strict=True)),
        "client_memory_bytes": latency.estimate_client_memory_bytes(
            int(first.client_params), 4 * elements, _latency_batch(args), args.latency_mode),
    }


def add_latency(row: dict[str, Any], args: SweepArgs, devices: dict[str, DeviceProfile],
                links: dict[str, LinkProfile], server: DeviceProfile,
                host: DeviceProfile) -> None:
    """Fill ``row["latency"][device][link]`` (breakdown dicts) and ``row["latency_ms"]``."""
    batch = _latency_batch(args)
    measured = args.batch_size
    up = latency.frame_bytes_for_batch(row["frame_bytes_up"], measured, batch)
    if args.latency_mode == "train":
        down = latency.frame_bytes_for_batch(row["frame_bytes_down"], measured, batch)
    else:
        # the answer is one frame of int64 class ids
        down = latency.FRAME_OVERHEAD_BYTES + PREDICTION_BYTES * batch
    scale = batch / measured   # codec work grows with the batch
    row["latency_batch"] = batch
    row["latency"] = {}
    row["latency_ms"] = {}
    for dname, dev in devices.items():
        row["latency"][dname] = {}
        row["latency_ms"][dname] = {}
        for lname, link in links.items():
            b = latency.estimate(
                client_flops=row["client_flops"], server_flops=row["server_flops"],
                batch_size=batch, bytes_up=up, bytes_down=down, device=dev, link=link,
                server=server, host=host, encode_s=row["encode_ms_per_batch"] * scale / 1e3,
                decode_s=row["decode_ms_per_batch"] * scale / 1e3, mode=args.latency_mode,
                client_memory_bytes=row["client_memory_bytes"],
                # codec time from the deterministic cost model, not this host's busy clock, for
                # the values sent (a bottleneck's D)
                codec=row["codec"], cut_elements=row["cut_elements"],
            )
            row["latency"][dname][lname] = b.to_json()
            row["latency_ms"][dname][lname] = b.total_ms if b.feasible else None


def fl_comparison(rows: Sequence[dict[str, Any]], args: SweepArgs) -> fl_compare.FLComparison:
    """SplitNN vs FedAvg for the chosen configuration.

    The configuration is ``--fl-codec`` at the cut of the reference accuracy if given, else the
    frontier row with the fewest bytes per sample within the accuracy budget (the codec a
    bandwidth-minded user would pick), else the fp32 row of the reference cut.
    """
    baseline = recommend.reference_accuracy(rows)
    chosen: dict[str, Any] | None = None
    if args.fl_codec is not None:
        cut = baseline.cut if baseline.cut is not None else rows[0]["cut"]
        chosen = next((r for r in rows if r["cut"] == cut and r["codec"] == args.fl_codec), None)
    if chosen is None:
        good = [r for r in rows if r.get("pareto") and r.get("within_budget")]
        if good:
            chosen = min(good, key=lambda r: r["bytes_per_sample"])
    if chosen is None:
        chosen = next((r for r in rows if r["cut"] == baseline.cut and r["codec"] == "fp32"),
                      rows[0])
    return fl_compare.compare(
        total_samples=chosen["train_samples"],
        model_params=chosen["client_params"] + chosen["server_params"],
        client_params=chosen["client_params"],
        model_forward_flops=chosen["client_flops"] + chosen["server_flops"],
        client_forward_flops=chosen["client_flops"],
        cut_elements=max(chosen["cut_elements"], 1),
        codec=chosen["codec"], cut=chosen["cut"],
        codec_bytes_up_per_sample=chosen["bytes_up_per_sample"],
        codec_bytes_down_per_sample=chosen["bytes_down_per_sample"],
        clients=args.fl_clients,
    )


def _latency_batch(args: SweepArgs) -> int:
    if args.latency_batch is not None:
        return args.latency_batch
    return args.batch_size if args.latency_mode == "train" else 1


def _mean(values: Any) -> float:
    """Mean that keeps inf (the fp32 SNR) and NaN instead of raising like ``math.fsum``."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan
    if all(math.isfinite(v) for v in vals):
        return math.fsum(vals) / len(vals)
    return sum(vals) / len(vals)


def _profile_json(p: DeviceProfile | LinkProfile) -> dict[str, Any]:
    out = asdict(p)
    out.pop("path", None)
    return out
