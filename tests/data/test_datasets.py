from __future__ import annotations

import numpy as np
import pytest

from edgesplit.data import load_dataset, load_npz
from edgesplit.errors import ConfigError


def test_builtin_digits_split_is_stratified_and_fixed():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.input_shape == (64,) and a.num_classes == 10
    assert len(a.y_train) + len(a.y_test) == 1797
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert set(np.unique(a.y_test)) == set(range(10))
    assert a.x_train.dtype == np.float32
    # raw pixels 0..16, as a device reads them: client segments standardize (split.preprocess)
    x = np.concatenate([a.x_train, a.x_test])
    assert x.min() == 0 and x.max() == 16 and np.array_equal(x, np.round(x))


def test_npz_with_test_split(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x=rng.normal(size=(20, 3)),
        y=rng.integers(0, 2, 20),
        x_test=rng.normal(size=(5, 3)),
        y_test=rng.integers(0, 2, 5),
    )
    ds = load_dataset(str(path))
    assert len(ds.x_train) == 20 and len(ds.x_test) == 5 and ds.input_shape == (3,)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2))}, "no array 'y'"),
        ({"y": np.zeros(4)}, "no array 'x'"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "x has 4 samples but y has 3"),
        ({"x": np.array([[1.0, np.nan], [0, 0]]), "y": np.zeros(2, dtype=int)}, "NaN"),
        ({"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 0, 1])}, "integer class ids"),
        ({"x": np.zeros(4), "y": np.zeros(4, dtype=int)}, "sample axis"),
    ],
)
def test_malformed_npz_is_a_clear_error(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=message):
        load_npz(path)


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_dataset(str(tmp_path / "nothing.npz"))
    bad = tmp_path / "x.csv"
    bad.write_text("1,2")
    with pytest.raises(ConfigError, match="must be an .npz"):
        load_dataset(str(bad))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not an .npz archive"):
        load_npz(junk)


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(np.full((6, 6), 40 * i, dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    ds = load_dataset(str(tmp_path))
    assert ds.input_shape == (1, 6, 6) and ds.num_classes == 2


def test_builtin_digits_images_are_the_digits_as_images():
    flat, images = load_dataset("digits"), load_dataset("digits_images")
    assert images.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(images.x_train.reshape(len(images.x_train), -1), flat.x_train)
    np.testing.assert_array_equal(images.y_test, flat.y_test)
