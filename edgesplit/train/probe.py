"""What compression costs on one batch: the server's output on the decoded activations vs on
the same activations sent at fp32 (a probe)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def snr_db(reference: torch.Tensor, decoded: torch.Tensor) -> float:
    """10·log10(Σref² / Σ(dec-ref)²); inf when lossless."""
    noise = float(((decoded - reference) ** 2).sum())
    signal = float((reference**2).sum())
    return 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else math.inf


@torch.no_grad()
def compare(
    segment: nn.Module,
    act: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    logits: bool,
) -> dict[str, Any]:
    """Distortion of ``act`` vs ``ref`` and of the segment's outputs; when the segment outputs
    logits, how often the decisions agree and (with labels) accuracy and loss of each."""
    was_training = segment.training
    segment.eval()
    out_dec, out_ref = segment(act), segment(ref)
    segment.train(was_training)
    record: dict[str, Any] = {"snr_db": snr_db(ref, act), "output_snr_db": snr_db(out_ref, out_dec)}
    if logits:
        pred_dec, pred_ref = out_dec.argmax(1), out_ref.argmax(1)
        record["agreement"] = float((pred_dec == pred_ref).float().mean())
        if labels is not None:
            loss = nn.functional.cross_entropy
            record.update(
                accuracy_decoded=float((pred_dec == labels).float().mean()),
                accuracy_reference=float((pred_ref == labels).float().mean()),
                loss_decoded=float(loss(out_dec, labels)),
                loss_reference=float(loss(out_ref, labels)),
            )
    return record
