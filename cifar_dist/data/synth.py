"""Synthetic CIFAR files in the exact canonical format, with learnable class-dependent images.

Used by tests and CPU smoke runs: same file names, bytes dict keys, (N, 3072) uint8 CHW rows,
protocol 2 written the way Python 2 wrote them, plus an MD5SUMS manifest (see cifar.py).
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .cifar import MANIFEST, _multiarray, file_md5, spec_for

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_PROTOTYPE_SEED = 20240601  # class patterns are fixed; `seed` only varies noise and order
_CHUNK = 4096  # images rendered at once (bounds float32 temporaries to ~50 MB)


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler that writes `bytes` as Python 2 `str` (BINSTRING).

    CPython 3 pickles bytes at protocol 2 as a call to `_codecs.encode`, which the restricted
    unpickler (rightly) refuses and which the real files do not contain. The pure-Python
    pickler lets us swap that one opcode; it also spells numpy's `_reconstruct` with the
    numpy 1.x module path the real files use, so older numpy can read these files too.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _multiarray._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _dump(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def class_names(dataset: str) -> list[str]:
    if dataset == "cifar10":
        return list(CIFAR10_CLASSES)
    return [f"synthetic_{i:03d}" for i in range(spec_for(dataset).num_classes)]


def render_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 32, 32, 3) images: per-class colour, stripe angle/frequency and blob position.

    Each class is separable on colour alone and on geometry alone; per-image phase, blob jitter,
    brightness and Gaussian noise keep it from being a lookup table, yet a small CNN learns it
    in an epoch or two.
    """
    proto = np.random.default_rng(_PROTOTYPE_SEED)
    colour = proto.uniform(40, 215, size=(num_classes, 3)).astype(np.float32)
    stripe_rgb = proto.choice([-1.0, 1.0], size=(num_classes, 3)).astype(np.float32)
    angle = (np.arange(num_classes) * 0.61803398875 * np.pi) % np.pi  # golden-ratio spread
    freq = 2.0 + (np.arange(num_classes) % 3)  # cycles per image
    centre = proto.uniform(8, 24, size=(num_classes, 2))
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    out = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for start in range(0, len(labels), _CHUNK):
        lab = labels[start : start + _CHUNK]
        n = len(lab)
        cos, sin = np.cos(angle[lab])[:, None, None], np.sin(angle[lab])[:, None, None]
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        wave = np.sin(2 * np.pi * freq[lab][:, None, None] * (xx * cos + yy * sin) / 32 + phase)
        c = centre[lab] + rng.uniform(-2, 2, size=(n, 2))
        dist2 = (yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2
        blob = np.exp(-dist2 / 18.0)
        img = (
            colour[lab][:, None, None, :]
            + 40 * wave[..., None] * stripe_rgb[lab][:, None, None, :]
            + 60 * blob[..., None]
            + rng.uniform(-15, 15, size=(n, 1, 1, 1))
            + rng.normal(0, 12, size=(n, 32, 32, 3))
        )
        out[start : start + n] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _batch(images: np.ndarray, labels: np.ndarray, key: str, title: str) -> dict[bytes, Any]:
    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
    entry: dict[bytes, Any] = {
        b"batch_label": title.encode(),
        key.encode(): [int(x) for x in labels],
        b"data": rows,
        b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(len(images))],
    }
    if key == "fine_labels":  # CIFAR-100 also carries the 20 superclasses
        entry[b"coarse_labels"] = [int(x) // 5 for x in labels]
    return entry


def write_synthetic(
    root: Path, dataset: str = "cifar10", n_train: int = 500, n_test: int = 100, seed: int = 0
) -> Path:
    """Write `root/<canonical folder>/` with synthetic data and its MD5SUMS; return the folder."""
    spec = spec_for(dataset)
    out = Path(root) / spec.folder
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = spec.num_classes
    train_y, test_y = _balanced_labels(n_train, k, rng), _balanced_labels(n_test, k, rng)
    train_x, test_x = render_images(train_y, k, rng), render_images(test_y, k, rng)
    key = spec.label_key.decode()
    files: dict[str, dict[bytes, Any]] = {}
    chunks = np.array_split(np.arange(n_train), len(spec.train))
    for i, (name, idx) in enumerate(zip(spec.train, chunks), 1):
        title = f"training batch {i} of {len(spec.train)}"
        files[name] = _batch(train_x[idx], train_y[idx], key, title)
    files[spec.test[0]] = _batch(test_x, test_y, key, "testing batch 1 of 1")
    names = [n.encode() for n in class_names(dataset)]
    if dataset == "cifar10":
        files[spec.meta] = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
    else:
        coarse = [f"synthetic_super_{i:02d}".encode() for i in range(k // 5)]
        files[spec.meta] = {b"fine_label_names": names, b"coarse_label_names": coarse}
    for name, obj in files.items():
        _dump(obj, out / name)
    (out / MANIFEST).write_text("".join(f"{file_md5(out / n)}  {n}\n" for n in files))
    return out
