"""Cutting models into segments (torch)."""

from edgesplit.split.cut import cut_model, cut_ushape, layer_names, valid_cuts

__all__ = ["cut_model", "cut_ushape", "layer_names", "valid_cuts"]
