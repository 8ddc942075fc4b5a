"""Packed labels (the FORWARD tensor ``y``): exact round trips, tight sizes, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.errors import FrameError
from edgesplit.wire.labels import label_bits, pack_labels, unpack_labels


@pytest.mark.parametrize("classes", [1, 2, 3, 10, 16, 17, 100, 256])
def test_round_trip_and_size(classes: int) -> None:
    y = np.random.default_rng(classes).integers(0, classes, 37)
    data = pack_labels(y, classes)
    assert len(data) == (37 * label_bits(classes) + 7) // 8
    np.testing.assert_array_equal(unpack_labels(data, 37, classes), y)


def test_ten_classes_cost_half_a_byte_a_sample() -> None:
    assert len(pack_labels(np.arange(32) % 10, 10)) == 16


@pytest.mark.parametrize(
    ("labels", "message"),
    [(np.array([0, 10]), "class ids 0..9"), (np.array([-1, 2]), "class ids 0..9"),
     (np.array([[1, 2]]), "one integer class id"), (np.array([0.5]), "one integer class id")],
)
def test_sender_refuses_labels_outside_the_classes(labels: np.ndarray, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        pack_labels(labels, 10)


def test_receiver_refuses_wrong_lengths_padding_and_ids() -> None:
    data = pack_labels(np.array([1, 2, 3]), 10)  # 12 bits in 2 bytes
    with pytest.raises(FrameError, match="batch of 5"):
        unpack_labels(data, 5, 10)
    with pytest.raises(FrameError, match="batch of 3"):
        unpack_labels(data + b"\x00", 3, 10)
    # 4-bit code 15 is not a class of a 10-class model
    with pytest.raises(FrameError, match="class id 15"):
        unpack_labels(b"\xff\x0f", 3, 10)
    with pytest.raises(FrameError, match="1..256 classes"):
        unpack_labels(data, 3, 1000)
