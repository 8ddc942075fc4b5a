"""Datasets: the built-in ones (from scikit-learn, no download) and the user's own.

Torch-free on purpose: the edge runtime reads local data with this module. A user dataset is
an ``.npz`` with arrays ``x`` and ``y`` (and optionally ``x_test``, ``y_test``), or an image
folder laid out as ``root/<class name>/<image>``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesplit.errors import ConfigError
from edgesplit.wire.labels import label_dtype  # noqa: F401  (re-exported: callers use data's)

#: Built-in datasets: ``digits`` (64 pixel features, an MLP), ``digits_images`` (the same
#: digits as 1×8×8 images, a 2-D CNN) and ``breast_cancer`` (30 lab features).
BUILTIN = ("digits", "digits_images", "breast_cancer")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm"}


@dataclass
class Dataset:
    """Train and test arrays. ``x`` is float32 with the sample axis first, ``y`` int64 labels
    (or ``None`` for unlabelled inference data)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch axis)."""
        return tuple(self.x_train.shape[1:])


def load_dataset(source: str, *, test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """Load a built-in dataset by name, an ``.npz`` file or an image folder.

    Data without a test split is split stratified with ``split_seed`` (fixed by default so every
    run of a sweep sees the same test set, whatever the training seed).
    """
    if source in BUILTIN:
        x, y = _load_builtin(source)
        return _split(source, x, y, None, None, test_fraction, split_seed)
    path = Path(source)
    if not path.exists():
        raise ConfigError(
            f"data {source!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an "
            "existing .npz file or image folder"
        )
    if path.is_dir():
        x, y = load_image_folder(path)
        return _split(path.name, x, y, None, None, test_fraction, split_seed)
    if path.suffix != ".npz":
        raise ConfigError(f"data file {source!r} must be an .npz (arrays x, y[, x_test, y_test])")
    arrays = load_npz(path)
    return _split(
        path.stem,
        arrays["x"],
        arrays["y"],
        arrays.get("x_test"),
        arrays.get("y_test"),
        test_fraction,
        split_seed,
    )


def load_npz(path: Path | str, *, require_labels: bool = True) -> dict[str, np.ndarray]:
    """Read and validate a user ``.npz``. Every problem is a :class:`ConfigError` naming it."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is not an .npz archive (write one with numpy.savez(path, x=..., "
                          "y=...))")
    try:
        # never allow_pickle: an .npz from someone else must not run code on load
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as .npz: {exc}") from None
    if "x" not in arrays:
        raise ConfigError(f"{path} has no array 'x' (found: {', '.join(arrays) or 'nothing'})")
    if require_labels and "y" not in arrays:
        raise ConfigError(f"{path} has no array 'y' with the labels (found: {', '.join(arrays)})")
    for xs, ys in (("x", "y"), ("x_test", "y_test")):
        if (xs in arrays) != (ys in arrays) and xs != "x":
            raise ConfigError(f"{path} has {xs if xs in arrays else ys} without its partner")
        if xs in arrays:
            arrays[xs] = _check_features(path, xs, arrays[xs])
        if ys in arrays:
            arrays[ys] = _check_labels(path, ys, arrays[ys])
            if len(arrays[ys]) != len(arrays[xs]):
                raise ConfigError(
                    f"{path}: {xs} has {len(arrays[xs])} samples but {ys} has {len(arrays[ys])}"
                )
    if "x_test" in arrays and arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
        raise ConfigError(
            f"{path}: x_test samples have shape {arrays['x_test'].shape[1:]}, "
            f"x samples {arrays['x'].shape[1:]}"
        )
    return arrays


def _check_features(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    if x.ndim < 2:
        raise ConfigError(
            f"{path}: {name} must have a sample axis and features, got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ConfigError(f"{path}: {name} must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ConfigError(f"{path}: {name} holds {bad} NaN or infinite values; clean them first")
    return x


def _check_labels(path: Path, name: str, y: np.ndarray) -> np.ndarray:
    if y.ndim != 1:
        raise ConfigError(f"{path}: {name} must be one class id per sample, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise ConfigError(
                f"{path}: {name} must hold integer class ids (found NaN or fractions)"
            )
    elif not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{path}: {name} must hold integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise ConfigError(f"{path}: {name} holds negative class ids; use 0..C-1")
    return y


def _load_builtin(name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn import datasets
    except ImportError:
        raise ConfigError(
            f"built-in dataset {name!r} needs scikit-learn (pip install 'edgesplit[train]'); "
            "on a device, pass an .npz instead"
        ) from None
    bunch = datasets.load_breast_cancer() if name == "breast_cancer" else datasets.load_digits()
    # raw values, as a device would read them (digits: pixels 0..16): each client segment starts
    # with a standardization fitted on its own rows (edgesplit.split.preprocess)
    x = bunch.data.astype(np.float32)
    if name == "digits_images":
        x = x.reshape(-1, 1, 8, 8)  # (N, C, H, W): the built-in models pick the 2-D CNN
    return x, bunch.target.astype(np.int64)


def load_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images under ``root/<class>/``, as float32 in [0, 1], shape (N, C, H, W); classes sorted."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("image folders need Pillow: pip install pillow") from None
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(file) as img:
                arr = np.asarray(img, dtype=np.float32) / 255.0
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if images and arr.shape != images[0].shape:
                raise ConfigError(
                    f"{file} has shape {arr.shape}, the first image {images[0].shape}; "
                    "resize the folder to one size"
                )
            images.append(arr)
            labels.append(label)
    if not images:
        raise ConfigError(f"{root} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    test_fraction: float,
    seed: int,
) -> Dataset:
    if x_test is None or y_test is None:
        rng = np.random.default_rng(seed)
        test_idx: list[int] = []
        for cls in np.unique(y):  # stratified: every class keeps its share in the test set
            members = np.flatnonzero(y == cls)
            rng.shuffle(members)
            test_idx.extend(members[: max(1, round(len(members) * test_fraction))].tolist())
        mask = np.zeros(len(y), dtype=bool)
        mask[test_idx] = True
        x, y, x_test, y_test = x[~mask], y[~mask], x[mask], y[mask]
    num_classes = int(max(y.max(initial=0), y_test.max(initial=0))) + 1
    if len(x) < 2:
        raise ConfigError(f"dataset {name!r} has {len(x)} training samples; need at least 2")
    return Dataset(name, x, y, x_test, y_test, num_classes)


def iid_shard_indices(n: int, index: int, count: int, *, seed: int = 0) -> np.ndarray:
    """Sample indices of IID shard ``index`` of ``count`` over ``n`` samples (sorted).

    One seeded permutation cut into ``count`` near-equal parts, so the shards of one dataset
    are disjoint, cover it, and are the same on every machine that uses the same seed: several
    processes given one file each play a different data holder.

    Raises
    ------
    ConfigError
        ``count < 1``, ``index`` outside ``0..count-1``, or more shards than samples.
    """
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count}: need 0 <= I < N with N >= 1")
    if count > n:
        raise ConfigError(f"cannot cut {n} samples into {count} shards")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(np.array_split(order, count)[index])
