"""Readers for the in-memory datasets: CIFAR-10/100 (torchvision's pickled format) and scikit-learn digits."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

__all__ = ["CIFAR_LAYOUT", "find_cifar_dir", "download_cifar", "read_cifar", "read_digits"]

# name -> (folder, train files, test file, meta file, label key, class-name key, classes)
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names", 100),
}


def _expected(name: str) -> list[str]:
    _, train, test, meta, *_ = CIFAR_LAYOUT[name]
    return [*train, test, meta]


def find_cifar_dir(name: str, data_dir: str | Path) -> Path:
    """The folder holding the CIFAR files: ``data_dir/<cifar-10-batches-py|cifar-100-python>`` or
    ``data_dir`` itself."""
    folder = CIFAR_LAYOUT[name][0]
    root = Path(data_dir).expanduser()
    for d in (root / folder, root):
        if all((d / f).is_file() for f in _expected(name)):
            return d
    have = root / folder if (root / folder).is_dir() else root
    missing = [f for f in _expected(name) if not (have / f).is_file()]
    raise FileNotFoundError(
        f"{name}: {have} lacks {', '.join(missing)}; expected {root}/{folder}/ with "
        f"{', '.join(_expected(name))} (torchvision's python format) -- pass --download to fetch it")


def download_cifar(name: str, data_dir: str | Path) -> None:
    """Fetch CIFAR into ``data_dir`` with torchvision (needs internet)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    for train in (True, False):
        cls(root=str(data_dir), train=train, download=True)


def _load_pickle(path: Path) -> dict[str, object]:
    # CIFAR ships as Python-2 pickles; 'bytes' keeps their byte strings, str keys (Python-3 writers) pass through.
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated or foreign files raise many exception types
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {e}); delete the folder and re-run "
                         "with --download") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a {type(d).__name__}, not a CIFAR dict; delete it and re-run with --download")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path} lacks the 'data' or '{label_key}' entry; delete it and re-run with --download")
    x = np.asarray(d["data"], dtype=np.uint8)
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise ValueError(f"{path}: data {x.shape} / {len(y)} labels is not N x 3072 uint8 with N labels; "
                         "delete it and re-run with --download")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1}; delete it and re-run with --download")
    return x.reshape(-1, 3, 32, 32), y


def read_cifar(name: str, data_dir: str | Path) -> dict[str, object]:
    """Load CIFAR-10/100 into uint8 arrays [N, 3, 32, 32] (train, test), int64 labels and class names.

    Note: pickles can run code when loaded; read only CIFAR files you downloaded yourself.
    """
    root = find_cifar_dir(name, data_dir)
    _, train_files, test_file, meta_file, label_key, names_key, k = CIFAR_LAYOUT[name]
    parts = [_batch(root / f, label_key, k) for f in train_files]
    x_test, y_test = _batch(root / test_file, label_key, k)
    meta = _load_pickle(root / meta_file)
    if names_key not in meta or len(meta[names_key]) != k:
        raise ValueError(f"{root / meta_file} lacks {k} '{names_key}'; delete it and re-run with --download")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    return dict(x_train=np.concatenate([p[0] for p in parts]), y_train=np.concatenate([p[1] for p in parts]),
                x_test=x_test, y_test=y_test, classes=classes)


def read_digits(test_fraction: float = 0.2, split_seed: int = 0) -> dict[str, object]:
    """scikit-learn's bundled 8x8 digits (pixel values 0..16) with a fixed stratified train/test split
    (independent of the run's seed, so every run tests on the same 360 images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = ds.images.astype(np.uint8)[:, None]  # [1797, 1, 8, 8], integers 0..16
    y = ds.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed)
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                classes=[str(c) for c in ds.target_names])
