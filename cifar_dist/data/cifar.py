"""The canonical python-pickle CIFAR files: published MD5s, a restricted reader, a safe download.

Every file's MD5 is checked before anything is unpickled, and unpickling admits only the numpy
globals the canonical files use, so a tampered or truncated file cannot run code or crash late.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import DataError

try:  # numpy >= 2 moved the module; pickles may name either spelling
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

MANIFEST = "MD5SUMS"
DOWNLOAD_TIMEOUT_S = 60.0
SplitArrays = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class CanonicalSpec:
    folder: str  # directory inside the tarball, and under the data dir
    url: str
    tarball: str
    tarball_md5: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    md5: dict[str, str] = field(hash=False)


# Published sums, as in torchvision.datasets.cifar (the University of Toronto originals).
SPECS: dict[str, CanonicalSpec] = {
    "cifar10": CanonicalSpec(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        tarball="cifar-10-python.tar.gz",
        tarball_md5="c58f30108f718f92721af3b95e74349a",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
    "cifar100": CanonicalSpec(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        tarball="cifar-100-python.tar.gz",
        tarball_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
}


def spec_for(dataset: str) -> CanonicalSpec:
    if dataset not in SPECS:
        raise DataError(f"unknown dataset {dataset!r}: expected one of {sorted(SPECS)}")
    return SPECS[dataset]


def canonical_dir(root: Path, dataset: str) -> Path:
    """`root/<folder>`, or `root` itself when it already is the canonical folder."""
    spec = spec_for(dataset)
    root = Path(root)
    return root if root.name == spec.folder else root / spec.folder


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_md5s(directory: Path, spec: CanonicalSpec) -> dict[str, str]:
    """Published sums, overridden per file by `directory/MD5SUMS` when present.

    The manifest (`md5sum` output: `<hex>  <name>` per line) exists so that synthetic files in
    the canonical format (synth.py) pass the check. It only guards against corruption, not
    tampering: whoever can write the files can write the manifest; the restricted unpickler is
    what keeps a hostile file from running code.
    """
    sums = dict(spec.md5)
    manifest = directory / MANIFEST
    if manifest.is_file():
        for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or len(parts[0]) != 32:
                raise DataError(f"{manifest}:{lineno}: expected '<md5 hex>  <file name>'")
            sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


def check_md5(path: Path, expected: str) -> None:
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    actual = file_md5(path)
    if actual != expected:
        raise DataError(
            f"{path}: MD5 {actual} does not match the expected {expected} "
            "(truncated or corrupt file; delete it and download or copy it again)"
        )


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the allowed numpy ones."""


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only the numpy globals of the canonical files; dicts/lists/bytes need none."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"forbidden global {module}.{name}") from None


def unpickle(path: Path) -> Any:
    """Load one canonical file (bytes keys, as written by Python 2); call only after check_md5."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise DataError(f"{path}: refused pickle ({e})") from None
    except Exception as e:  # malformed pickles raise almost anything: report, do not crash
        raise DataError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def _read_batch(path: Path, spec: CanonicalSpec) -> tuple[np.ndarray, np.ndarray]:
    entry = unpickle(path)
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a dict, found {type(entry).__name__}")
    data, labels = entry.get(b"data"), entry.get(spec.label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise DataError(f"{path}: b'data' must be a uint8 (N, 3072) array")
    if data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' has shape {data.shape}, expected (N, 3072)")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise DataError(f"{path}: {spec.label_key!r} must be a list of {len(data)} labels")
    lab = np.asarray(labels)
    if len(lab) and lab.dtype.kind not in "iu":
        raise DataError(f"{path}: {spec.label_key!r} must hold integers, found {lab.dtype}")
    lab = lab.astype(np.int64)
    if len(lab) and (lab.min() < 0 or lab.max() >= spec.num_classes):
        raise DataError(f"{path}: labels outside 0..{spec.num_classes - 1}")
    # Rows are CHW-flattened; the store keeps HWC like PIL and the image-folder importer.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, lab


def _read_names(path: Path, spec: CanonicalSpec) -> list[str]:
    entry = unpickle(path)
    names = entry.get(spec.names_key) if isinstance(entry, dict) else None
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DataError(f"{path}: {spec.names_key!r} must list {spec.num_classes} class names")
    if not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: class names must be strings")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def read_canonical(root: Path, dataset: str) -> tuple[SplitArrays, list[str]]:
    """Read `root/<folder>/` into ({"train": (images, labels), "test": ...}, class names).

    Images are uint8 (N, 32, 32, 3) HWC, labels int64 (N,).
    """
    spec = spec_for(dataset)
    directory = canonical_dir(root, dataset)
    if not directory.is_dir():
        raise DataError(f"{directory}: directory of canonical {dataset} files not found")
    sums = expected_md5s(directory, spec)
    # Check every file before unpickling any: nothing unverified reaches the unpickler.
    for name in (*spec.train, *spec.test, spec.meta):
        check_md5(directory / name, sums[name])
    splits: SplitArrays = {}
    for split, names in (("train", spec.train), ("test", spec.test)):
        parts = [_read_batch(directory / n, spec) for n in names]
        splits[split] = (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )
    return splits, _read_names(directory / spec.meta, spec)


def _fetch(url: str, dest: Path, spec: CanonicalSpec) -> None:
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(part, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DataError(
            f"{url}: cannot download ({reason}). Without network, provide the data: copy the "
            f"canonical '{spec.folder}/' folder into data.dir (or $CIFAR_DIST_DATA, default "
            "./data), or set data.source / $CIFAR_DIST_SOURCE to an image-folder directory or "
            ".tar shards"
        ) from None
    part.replace(dest)


def _safe_extract(tar_path: Path, dest: Path, spec: CanonicalSpec) -> None:
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    raise DataError(f"{tar_path}: unsafe member {m.name!r} (absolute, .., or link)")
            # Only the dataset folder is extracted: nothing else lands in the data dir.
            wanted = [m for m in members if PurePosixPath(m.name).parts[:1] == (spec.folder,)]
            if not wanted:
                raise DataError(f"{tar_path}: no '{spec.folder}/' folder inside")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
                tar.extractall(dest, members=wanted, filter="data")
            else:  # pragma: no cover - the member checks above are the guard
                tar.extractall(dest, members=wanted)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{tar_path}: cannot extract ({e})") from None


def download_canonical(root: Path, dataset: str) -> Path:
    """Download (if needed), MD5-check and safely extract the tarball; return the folder."""
    spec = spec_for(dataset)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tar_path = root / spec.tarball
    if not (tar_path.is_file() and file_md5(tar_path) == spec.tarball_md5):
        _fetch(spec.url, tar_path, spec)
        actual = file_md5(tar_path)
        if actual != spec.tarball_md5:
            tar_path.unlink()
            raise DataError(
                f"{spec.url}: downloaded tarball MD5 {actual} does not match {spec.tarball_md5}"
            )
    _safe_extract(tar_path, root, spec)
    return root / spec.folder
