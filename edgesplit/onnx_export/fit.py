"""Can a device run an exported client? Opset and memory checks against its profile."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgesplit.devices import MIB, DeviceProfile
from edgesplit.errors import ExportError

#: Resident memory of a process that has imported numpy + onnxruntime + edgesplit.edge and run
#: a small session (measured by bench/edge_runtime.py: ~60 MiB VmRSS on x86-64 Linux, Python
#: 3.11, onnxruntime 1.32; rounded up). Small next to any device profile, but it is what makes
#: a microcontroller-class "device" fail the memory check.
RUNTIME_OVERHEAD_MIB = 64


@dataclass
class MemoryEstimate:
    """Peak memory the client needs on the device, in bytes.

    Attributes
    ----------
    weights: the model files' sizes (weights dominate them; int8 files are ~4× smaller).
    activations: ``batch`` × (input + 2 × largest layer output): ONNX Runtime keeps a layer's
        input and output alive while it runs; fp32 activations also in int8 (QDQ) models.
    runtime: :data:`RUNTIME_OVERHEAD_MIB`.
    batch: the batch size the estimate is for.
    """

    weights: int
    activations: int
    runtime: int
    batch: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.runtime


def estimate_memory(model_bytes: int, input_bytes: int, peak_activation_bytes: int,
                    batch: int = 1) -> MemoryEstimate:
    """See :class:`MemoryEstimate`; sizes are per sample except ``model_bytes``."""
    return MemoryEstimate(model_bytes, batch * (input_bytes + 2 * peak_activation_bytes),
                          RUNTIME_OVERHEAD_MIB * MIB, batch)


@dataclass
class DeviceFit:
    """Whether ``device`` can run the export, and why not.

    Attributes
    ----------
    device: profile name.
    fits: every check passed.
    reasons: one sentence per failed check.
    opset, max_onnx_opset: the model's opset and the highest the device runs.
    memory_mib: the device's memory.
    estimated_memory_bytes: :attr:`MemoryEstimate.total`.
    memory: the estimate's parts.
    execution_provider: the provider the device would use.
    precision: ``fp32`` or ``int8``: which throughput the latency estimate uses.
    estimated_ms_per_sample: client FLOPs / the device's effective throughput.
    """

    device: str
    fits: bool
    opset: int
    max_onnx_opset: int
    memory_mib: int
    estimated_memory_bytes: int
    execution_provider: str
    precision: str
    estimated_ms_per_sample: float
    memory: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_opset_fits(device: DeviceProfile, opset: int) -> None:
    """Raise :class:`ExportError` before exporting when ``device`` cannot run ``opset``."""
    if opset > device.max_onnx_opset:
        runtime = f" (onnxruntime {device.onnxruntime_version})" if device.onnxruntime_version \
            else ""
        raise ExportError(
            f"device {device.name} runs ONNX opset ≤ {device.max_onnx_opset}{runtime}, the export "
            f"needs opset {opset}; pass --opset {device.max_onnx_opset} (or leave --opset out: "
            "the device's max is then used)"
        )


def device_fit(device: DeviceProfile, *, opset: int, memory: MemoryEstimate, flops: int,
               precision: str) -> DeviceFit:
    """Check ``device`` against the export's opset and memory estimate (never raises)."""
    reasons = []
    if opset > device.max_onnx_opset:
        reasons.append(f"opset {opset} > device max {device.max_onnx_opset}")
    if memory.total > device.memory_bytes:
        reasons.append(
            f"needs ~{memory.total / MIB:.1f} MiB (weights {memory.weights / MIB:.2f} + "
            f"activations at batch {memory.batch} {memory.activations / MIB:.2f} + runtime "
            f"{memory.runtime / MIB:.0f}), device has {device.memory_mib} MiB"
        )
    ms = flops / (device.gflops(precision) * 1e9) * 1e3
    return DeviceFit(
        device=device.name, fits=not reasons, opset=opset,
        max_onnx_opset=device.max_onnx_opset, memory_mib=device.memory_mib,
        estimated_memory_bytes=memory.total, execution_provider=device.execution_provider,
        precision=precision, estimated_ms_per_sample=ms,
        memory={"weights": memory.weights, "activations": memory.activations,
                "runtime": memory.runtime, "batch": memory.batch},
        reasons=reasons,
    )
