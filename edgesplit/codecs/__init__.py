"""Tensor codecs: quantize and compress what crosses the cut (numpy + zstandard only).

>>> from edgesplit.codecs import parse_codec
>>> codec = parse_codec("q4+zstd")
>>> table, payload = codec.encode(x)                       # doctest: +SKIP
>>> x_hat = codec.decode(table, payload, x.shape, x.dtype)  # doctest: +SKIP
>>> x_hat = codec.roundtrip(x)          # training-time path  # doctest: +SKIP

See :mod:`edgesplit.codecs.registry` for the grammar and the stage id table.
"""

from edgesplit.codecs.registry import (
    Codec,
    StageTable,
    as_codec,
    parse_codec,
    stage_by_id,
    stage_by_name,
    stage_names,
)

__all__ = [
    "Codec",
    "StageTable",
    "as_codec",
    "parse_codec",
    "stage_by_id",
    "stage_by_name",
    "stage_names",
]
