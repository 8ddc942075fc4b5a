"""The sweep's per-cell cache: a rerun trains nothing, an interrupt loses at most one cell.

Uses a FAKE train_fn (counts calls, returns made-up results): this file tests the cache and the
aggregation plumbing, not training. The real sweep is tests/evaluate/test_sweep_digits.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from edgesplit.errors import CodecError, ConfigError
from edgesplit.evaluate.sweep import CACHE_DIR, SweepArgs, cut_elements, run_sweep
from edgesplit.train.spec import TrainResult, TrainSpec

BYTES_PER_ELEMENT = {"fp32": 4.0, "q8": 1.0, "q4": 0.5}
ELEMENTS = {"a": 128, "b": 64}
SAMPLES = 100


def fake_result(spec: TrainSpec) -> TrainResult:
    """A plausible TrainResult for ``spec``, filled field by field so new fields with defaults
    do not break this test."""
    elems = ELEMENTS[spec.cut or "a"]
    steps = math.ceil(SAMPLES / spec.batch_size) * spec.epochs
    up = int(elems * BYTES_PER_ELEMENT[spec.codec] * SAMPLES * spec.epochs + 24 * steps)
    fp32 = int(elems * 4 * SAMPLES * spec.epochs + 24 * steps)
    values = {
        "config": spec.config, "codec": spec.codec, "grad_codec": spec.grad_codec,
        "accuracy": 0.9 - 0.01 * list(BYTES_PER_ELEMENT).index(spec.codec) + 0.001 * spec.seed,
        "loss": 0.3, "bytes_up": up, "bytes_down": fp32, "bytes_up_fp32": fp32,
        "bytes_down_fp32": fp32, "cut_shape": [elems], "train_samples": SAMPLES,
        "epochs": spec.epochs, "snr_db": math.inf if spec.codec == "fp32" else 30.0,
        "encode_seconds": 0.001 * steps, "decode_seconds": 0.0005 * steps,
        "client_params": 1000 * elems, "server_params": 500, "client_flops": 2000 * elems,
        "server_flops": 1000,
    }
    kwargs = {}
    for f in dataclasses.fields(TrainResult):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = 0
    return TrainResult(**kwargs)


class Counter:
    def __init__(self, fail_on: int | None = None, exc: BaseException | None = None) -> None:
        self.calls: list[TrainSpec] = []
        self.fail_on, self.exc = fail_on, exc

    def __call__(self, spec: TrainSpec) -> TrainResult:
        if self.fail_on is not None and len(self.calls) + 1 == self.fail_on:
            raise self.exc or KeyboardInterrupt()
        self.calls.append(spec)
        return fake_result(spec)


def _args(out: Path, **kw: object) -> SweepArgs:
    base = {"cuts": ["a", "b"], "codecs": ["fp32", "q8", "q4"], "seeds": 2, "epochs": 2,
            "devices": ["rpi4"], "links": ["wifi", "lora"], "out": str(out)}
    base.update(kw)
    return SweepArgs(**base)  # type: ignore[arg-type]


def test_rerun_trains_nothing(tmp_path: Path) -> None:
    fn = Counter()
    first = run_sweep(_args(tmp_path), train_fn=fn, on_progress=None, write_report=False)
    assert len(fn.calls) == 2 * 3 * 2
    assert (first.trained_cells, first.cached_cells) == (12, 0)
    assert len(list((tmp_path / CACHE_DIR).glob("*.json"))) == 12

    again = Counter()
    second = run_sweep(_args(tmp_path), train_fn=again, on_progress=None, write_report=False)
    assert again.calls == []                               # zero new calls
    assert (second.trained_cells, second.cached_cells) == (0, 12)
    strip = ("latency",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in second.rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in first.rows]

    # judging options are not part of the key: everything is reused
    judged = Counter()
    run_sweep(_args(tmp_path, max_drop=5.0, objective="bytes", links=["ble"]), train_fn=judged,
              on_progress=None, write_report=False)
    assert judged.calls == []

    # a training option is: every cell again
    more = Counter()
    run_sweep(_args(tmp_path, epochs=3), train_fn=more, on_progress=None, write_report=False)
    assert len(more.calls) == 12

    # one more seed: only the new cells
    extra = Counter()
    run_sweep(_args(tmp_path, seeds=3), train_fn=extra, on_progress=None, write_report=False)
    assert len(extra.calls) == 2 * 3 and {s.seed for s in extra.calls} == {2}

    fresh = Counter()
    run_sweep(_args(tmp_path, fresh=True), train_fn=fresh, on_progress=None, write_report=False)
    assert len(fresh.calls) == 12


def test_interrupt_loses_at_most_the_running_cell(tmp_path: Path) -> None:
    fn = Counter(fail_on=5)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_args(tmp_path), train_fn=fn, on_progress=None, write_report=False)
    assert len(fn.calls) == 4
    assert len(list((tmp_path / CACHE_DIR).glob("*.json"))) == 4
    assert not list((tmp_path / CACHE_DIR).glob("*.tmp*"))   # no half-written file
    resume = Counter()
    run_sweep(_args(tmp_path), train_fn=resume, on_progress=None, write_report=False)
    assert len(resume.calls) == 12 - 4


def test_a_failing_cell_is_named_and_earlier_cells_stay(tmp_path: Path) -> None:
    fn = Counter(fail_on=3, exc=CodecError("unknown codec stage 'q3'"))
    with pytest.raises(CodecError, match=r"cut 'a', codec 'q8', seed 0: unknown codec"):
        run_sweep(_args(tmp_path), train_fn=fn, on_progress=None, write_report=False)
    assert len(list((tmp_path / CACHE_DIR).glob("*.json"))) == 2


def test_corrupt_cache_file_is_retrained(tmp_path: Path) -> None:
    run_sweep(_args(tmp_path), train_fn=Counter(), on_progress=None, write_report=False)
    victim = sorted((tmp_path / CACHE_DIR).glob("*.json"))[0]
    victim.write_text("{ not json")
    fn = Counter()
    run_sweep(_args(tmp_path), train_fn=fn, on_progress=None, write_report=False)
    assert len(fn.calls) == 1
    assert json.loads(victim.read_text())["schema"] == 1


def test_aggregation(tmp_path: Path) -> None:
    res = run_sweep(_args(tmp_path), train_fn=Counter(), on_progress=None, write_report=False)
    rows = {(r["cut"], r["codec"]): r for r in res.rows}
    assert len(rows) == 6
    fp32, q8, q4 = rows[("a", "fp32")], rows[("a", "q8")], rows[("a", "q4")]
    # bytes per sample = bytes_up / (train_samples x epochs), headers included
    steps = math.ceil(SAMPLES / 32) * 2
    assert fp32["bytes_up_per_sample"] == pytest.approx((128 * 4 * 200 + 24 * steps) / 200)
    assert fp32["bytes_up_per_sample"] > q8["bytes_up_per_sample"] > q4["bytes_up_per_sample"]
    assert fp32["ratio_up"] == pytest.approx(1.0)
    assert fp32["accuracy_mean"] == pytest.approx(0.9005)
    assert fp32["accuracy_std"] == pytest.approx(0.000707, rel=1e-2)   # sample std, 2 seeds
    assert fp32["snr_db"] == math.inf and q8["snr_db"] == 30.0
    assert fp32["encode_ms_per_batch"] == pytest.approx(1.0)           # 1 ms per step
    assert fp32["cut_elements"] == 128 and fp32["client_params"] == 128_000
    assert set(fp32["latency"]) == {"rpi4"} and set(fp32["latency"]["rpi4"]) == {"wifi", "lora"}
    assert fp32["latency_ms"]["rpi4"]["lora"] is None               # 32-sample frame > 222 B
    assert fp32["latency_ms"]["rpi4"]["wifi"] > 0
    assert res.baseline.accuracy == pytest.approx(0.9005)
    doc = res.to_json()
    json.dumps(doc, allow_nan=False)                                  # strict JSON
    assert doc["rows"][0]["snr_db"] is None
    assert len(doc["recommendations"]) == 2
    assert "fl_comparison" not in doc


def test_compare_fl_and_infer_mode(tmp_path: Path) -> None:
    res = run_sweep(_args(tmp_path, compare_fl=True, latency_mode="infer", max_drop=5.0),
                    train_fn=Counter(), on_progress=None, write_report=False)
    assert res.fl_comparison is not None
    assert [r.clients for r in res.fl_comparison.rows] == [10, 100, 500]
    # one sample per request: a q4 frame of cut b fits a LoRa payload
    lora = next(r for r in res.recommendations if r.link == "lora")
    assert lora.found and lora.latency_ms is not None and lora.latency_ms > 1000


def test_argument_errors(tmp_path: Path) -> None:
    for kw, match in (({"seeds": 0}, "seeds"), ({"codecs": ["q8", "q8"]}, "twice"),
                      ({"devices": ["toaster"]}, "unknown device"),
                      ({"links": ["smoke-signal"]}, "unknown link"),
                      ({"objective": "fun"}, "objective"), ({"max_drop": -1.0}, "max-drop"),
                      ({"fl_codec": "q2"}, "fl-codec"), ({"latency_mode": "x"}, "latency")):
        with pytest.raises(ConfigError, match=match):
            run_sweep(_args(tmp_path, **kw), train_fn=Counter(), on_progress=None,
                      write_report=False)


def test_cut_elements_tolerates_a_batch_axis() -> None:
    assert cut_elements([64], 260.0) == 64
    assert cut_elements([8, 4, 4], 520.0) == 128
    assert cut_elements([32, 64], 260.0) == 64         # a batch axis of 32 slipped in


def test_progress_and_report_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgesplit.cli.progress import sweep_progress

    calls: list[tuple[str, int, int]] = []
    with sweep_progress() as bar:
        assert bar is not None

        def on_progress(label: str, finished: int, total: int) -> None:
            calls.append((label, finished, total))
            bar(label, finished, total)

        run_sweep(_args(tmp_path, seeds=1, codecs=["fp32", "q8"]), train_fn=Counter(),
                  on_progress=on_progress, write_report=True)
    # each cell is announced, then counted as finished
    total = len(calls) // 2
    assert total == 4                                   # 2 cuts x 2 codecs x 1 seed
    assert [c[1:] for c in calls] == [(k + done, total) for k in range(total)
                                      for done in (0, 1)]
    labels = [c[0] for c in calls]
    assert labels[::2] == labels[1::2] and len(set(labels)) == total
    out, err = capsys.readouterr()
    assert out == ""                                    # stdout stays free for --json
    for name in ("results.json", "results.csv", "report.md", "accuracy_vs_bytes.png",
                 "latency.png"):
        assert (tmp_path / name).is_file(), name


def test_a_codec_can_name_its_gradient_codec() -> None:
    from edgesplit.evaluate.sweep import SweepArgs, make_spec

    args = SweepArgs(grad_codec="bf16")
    both = make_spec(args, "relu1", "q4+zstd/q8+zstd", 0)
    plain = make_spec(args, "relu1", "q4+zstd", 0)
    assert (both.codec, both.grad_codec) == ("q4+zstd", "q8+zstd")
    assert (plain.codec, plain.grad_codec) == ("q4+zstd", "bf16")
