"""Labels of a training step as bare bit-packed class ids (the FORWARD tensor ``y``).

A labels *frame* costs 16 bytes of header and checksum around 16 bytes of 4-bit class ids for a
32-sample batch of 10 classes — at 100× compression that header alone is half a byte a sample.
Everything the header would say is already fixed: the class count by the WELCOME, the batch by
the activations the labels travel with, the dtype by the protocol. So ``y`` carries only the
codes, ``ceil(log2(classes))`` bits each (at least 1), low bits first, zero padding to a whole
byte; the envelope's own framing delimits it. numpy only: edge devices send it too.
"""

from __future__ import annotations

import numpy as np

from edgesplit.codecs.base import Buffer
from edgesplit.codecs.fixed import pack_codes, unpack_codes
from edgesplit.errors import CodecError, FrameError

#: Name of the FORWARD tensor holding packed labels (``labels`` holds a labels frame).
PACKED_LABELS = "y"
#: Largest class count packed labels carry (8-bit codes); more classes use a labels frame.
MAX_PACKED_CLASSES = 256


def label_bits(num_classes: int) -> int:
    """Bits per packed class id: ``ceil(log2(num_classes))``, at least 1."""
    if not 1 <= num_classes <= MAX_PACKED_CLASSES:
        raise FrameError(
            f"packed labels carry 1..{MAX_PACKED_CLASSES} classes, got {num_classes}; "
            "send a labels frame instead"
        )
    return max(1, (num_classes - 1).bit_length())


def pack_labels(labels: np.ndarray, num_classes: int) -> bytes:
    """Class ids ``0 .. num_classes-1`` (any integer dtype, one per sample) as packed codes.

    Raises
    ------
    FrameError
        If a label is outside ``0 .. num_classes-1`` or the array is not one id per sample.
    """
    array = np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise FrameError(
            f"labels must be one integer class id per sample, got {array.dtype} shape {array.shape}"
        )
    bits = label_bits(num_classes)
    if array.size and (int(array.min()) < 0 or int(array.max()) >= num_classes):
        raise FrameError(
            f"labels must be class ids 0..{num_classes - 1}, got values "
            f"{int(array.min())}..{int(array.max())}"
        )
    return pack_codes(array.astype(np.uint8), bits)


def unpack_labels(data: Buffer, batch: int, num_classes: int) -> np.ndarray:
    """The ``batch`` int64 class ids packed in ``data``.

    Raises
    ------
    FrameError
        If ``data`` is not exactly ``batch`` packed ids (wrong length, non-zero padding) or an
        id is ``num_classes`` or more.
    """
    bits = label_bits(num_classes)
    try:
        codes = unpack_codes(data, bits, batch)
    except CodecError as exc:
        raise FrameError(f"packed labels 'y' for a batch of {batch}: {exc}") from None
    if codes.size and int(codes.max()) >= num_classes:
        raise FrameError(
            f"packed labels hold class id {int(codes.max())}; this model has classes "
            f"0..{num_classes - 1}"
        )
    return codes.astype(np.int64)


def encode_labels(labels: np.ndarray, num_classes: int) -> bytes:
    """Labels as a *frame* (the FORWARD tensor ``labels``): the smallest unsigned dtype that
    holds the class ids, bit-packed at ``ceil(log2(num_classes))`` bits when that is at most 8."""
    from edgesplit.wire.frame import encode_frame

    array = np.asarray(labels)
    bits = max(1, (num_classes - 1).bit_length())
    return encode_frame(
        array.astype(label_dtype(num_classes)), "fp32", int_bits=bits if bits <= 8 else None
    )


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned dtype that holds the class ids (labels frames use it)."""
    return np.dtype(
        np.uint8 if num_classes <= 256 else np.uint16 if num_classes <= 65536 else np.int64
    )
