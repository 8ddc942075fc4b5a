"""Parity of an exported model: ONNX Runtime (CPU) against torch eager, with explicit tolerances."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesplit.errors import ExportError

#: Batch sizes the parity check runs (1 and odd sizes catch a batch axis baked in as a constant).
DEFAULT_BATCH_SIZES = (1, 2, 7, 32)
#: fp32 tolerances: element-wise |ort - torch| ≤ ATOL·scale + RTOL·|torch|, where scale is the
#: batch's largest |torch| value (at least 1). Kernels differ in summation order, so fp32 results
#: differ by a few ulp of the *summed terms* times the fan-in: an element near zero in a tensor
#: whose values reach 25 is off by ~1e-5 (ResNet-18 at 224×224 after layer4), one in a tensor of
#: values ≤ 1 by ~1e-7 — an absolute tolerance must grow with the tensor's scale.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-4


@dataclass
class ParityResult:
    """ONNX Runtime vs torch eager on the same inputs.

    Attributes
    ----------
    batch_sizes: the batch sizes run.
    max_abs: largest |ort - torch| over every element of every batch.
    max_rel: largest |ort - torch| / max(|torch|, atol) (the floor keeps exact zeros, e.g. after
        a ReLU, from dividing by zero).
    atol, rtol: the tolerances; an element passes when |ort - torch| ≤ atol·scale + rtol·|torch|
        (scale: the largest |torch| value of its batch, at least 1).
    passed: every element of every batch passed, and all outputs were finite and shaped alike.
    samples: where the inputs came from (``train`` split of the dataset, or ``random``).
    runtime: the ONNX Runtime provider used.
    """

    batch_sizes: list[int]
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    samples: str = "train"
    runtime: str = "CPUExecutionProvider"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"parity {verdict}: max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e} "
                f"(atol {self.atol:g}, rtol {self.rtol:g}, batches {self.batch_sizes})")


def sample_batches(samples: np.ndarray, batch_sizes: Sequence[int], seed: int = 0
                   ) -> list[np.ndarray]:
    """One batch per size, drawn from ``samples`` (with replacement when there are too few)."""
    rng = np.random.default_rng(seed)
    out = []
    for b in batch_sizes:
        idx = rng.choice(len(samples), size=b, replace=b > len(samples))
        out.append(np.ascontiguousarray(samples[idx], dtype=np.float32))
    return out


def ort_session(model_bytes: bytes) -> Any:
    """A CPU ONNX Runtime session, or :class:`ExportError` naming what ORT rejected."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:   # onnxruntime's pybind errors share no public base class
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the exported model: "
                          f"{str(exc).strip().splitlines()[0]}") from None


def check_parity(segment: nn.Module, model_bytes: bytes, samples: np.ndarray, *,
                 input_name: str = "x", batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 atol: float = FP32_ATOL, rtol: float = FP32_RTOL, source: str = "train"
                 ) -> ParityResult:
    """Run ``segment`` in torch and ``model_bytes`` in ONNX Runtime on the same batches.

    Parameters
    ----------
    segment: the torch module the model was exported from (run in eval mode, no grad).
    model_bytes: the serialized ONNX model.
    samples: inputs to draw the batches from, ``(n, *sample shape)``.
    input_name: the ONNX graph input.
    batch_sizes, atol, rtol: see :class:`ParityResult`.
    source: recorded as :attr:`ParityResult.samples`.

    Raises
    ------
    ExportError: ONNX Runtime cannot load or run the model (a failed comparison is *not* an
        error here: it is ``passed=False``; the exporter decides).
    """
    session = ort_session(model_bytes)
    was_training = segment.training
    segment.eval()
    max_abs = max_rel = 0.0
    passed = True
    try:
        for x in sample_batches(samples, batch_sizes):
            with torch.no_grad():
                want = segment(torch.from_numpy(x)).numpy()
            try:
                (got,) = session.run(None, {input_name: x})
            except Exception as exc:   # onnxruntime pybind errors: see ort_session
                raise ExportError(f"onnxruntime failed on a batch of {len(x)}: "
                                  f"{str(exc).strip().splitlines()[0]}") from None
            if got.shape != want.shape or not np.isfinite(got).all():
                passed = False
                max_abs = max_rel = float("inf")
                continue
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            ref = np.abs(want.astype(np.float64))
            if diff.size:
                scale = max(1.0, float(ref.max()))
                max_abs = max(max_abs, float(diff.max()))
                max_rel = max(max_rel, float((diff / np.maximum(ref, atol)).max()))
                passed = passed and bool((diff <= atol * scale + rtol * ref).all())
    finally:
        segment.train(was_training)
    return ParityResult(list(batch_sizes), max_abs, max_rel, atol, rtol, passed, source)
