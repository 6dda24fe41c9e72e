"""The array store: the one compact format every loader reads.

`<data_dir>/<dataset>/` holds `train_images.npy` (uint8 N×32×32×3, HWC), `train_labels.npy`
(int64 N), optionally `test_*.npy`, and `meta.json`. It is built once from whichever source is
available (see `prepare_store`), written into a temp dir and renamed into place, so a reader
never sees a half-written store, and opened memory-mapped so every rank shares the page cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import DataConfig
from .cifar import canonical_dir, download_canonical, read_canonical, spec_for
from .errors import DataError
from .imagefolder import read_image_folder

FORMAT = "cifar-dist-arrays"
FORMAT_VERSION = 1
ENV_DATA = "CIFAR_DIST_DATA"
ENV_SOURCE = "CIFAR_DIST_SOURCE"
STORE_SPLITS = ("train", "test")


@dataclass
class ArraySplit:
    images: np.ndarray  # uint8 (N, 32, 32, 3), HWC
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_split(where: str, split: ArraySplit, num_classes: int, count: int | None = None) -> None:
    x, y = split.images, split.labels
    n = len(y) if count is None else count
    if x.dtype != np.uint8 or x.shape != (n, 32, 32, 3):
        raise DataError(f"{where}: images are {x.dtype} {x.shape}, expected uint8 ({n}, 32, 32, 3)")
    if y.dtype != np.int64 or y.shape != (n,):
        raise DataError(f"{where}: labels are {y.dtype} {y.shape}, expected int64 ({n},)")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}")


def write_store(
    out_dir: Path,
    splits: dict[str, ArraySplit],
    classes: list[str],
    source: str,
    dataset: str | None = None,
) -> Path:
    """Write the store atomically (temp dir + rename); `dataset` defaults to the dir name."""
    out_dir = Path(out_dir)
    if "train" not in splits or not set(splits) <= set(STORE_SPLITS):
        raise DataError(f"{out_dir}: splits must be 'train' (+ 'test'), got {sorted(splits)}")
    for name, split in splits.items():
        _check_split(f"{out_dir} ({name})", split, len(classes))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        sha: dict[str, str] = {}
        for name, split in splits.items():
            for kind, arr in (("images", split.images), ("labels", split.labels)):
                np.save(tmp / f"{name}_{kind}.npy", np.ascontiguousarray(arr))
                sha[f"{name}_{kind}.npy"] = _sha256(tmp / f"{name}_{kind}.npy")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dataset": dataset or out_dir.name,
            "classes": list(classes),
            "counts": {name: len(split) for name, split in splits.items()},
            "source": source,
            "sha256": sha,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():  # replace: move the old one aside first, rename() needs a free name
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / "store")
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _read_meta(store_dir: Path) -> dict[str, Any]:
    path = store_dir / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable store metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} store")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {meta.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; delete {store_dir} to re-import"
        )
    classes, counts = meta.get("classes"), meta.get("counts")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}: 'classes' must be a non-empty list of names")
    if not (isinstance(counts, dict) and "train" in counts and set(counts) <= set(STORE_SPLITS)):
        raise DataError(f"{path}: 'counts' must name 'train' (+ 'test')")
    if not all(isinstance(n, int) and n >= 0 for n in counts.values()):
        raise DataError(f"{path}: 'counts' must be non-negative integers")
    return meta


def open_store(store_dir: Path) -> tuple[dict[str, ArraySplit], dict[str, Any]]:
    """Open a store memory-mapped (read-only) and validate it against its meta.json."""
    store_dir = Path(store_dir)
    meta = _read_meta(store_dir)
    splits: dict[str, ArraySplit] = {}
    for name, count in meta["counts"].items():
        arrays = []
        for kind in ("images", "labels"):
            path = store_dir / f"{name}_{kind}.npy"
            try:
                arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot load ({e})") from None
        splits[name] = ArraySplit(arrays[0], arrays[1])
        _check_split(f"{store_dir} ({name})", splits[name], len(meta["classes"]), count)
    return splits, meta


_WRITABLE_HINT = (
    "data.dir must be writable the first time (the array store is built inside it): make it "
    "writable, or import once into a writable DIR (cifar-dist data import --data.dir=DIR) and "
    "train with --data.dir=DIR"
)


def resolve_data_dir(cfg: DataConfig) -> Path:
    """`data.dir`, else `$CIFAR_DIST_DATA`, else `./data`."""
    return Path(cfg.dir or os.environ.get(ENV_DATA) or "data").expanduser()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # The lock file is never deleted: unlinking it would let a late process lock a new inode
    # while another still holds the old one. The OS drops the lock if the holder dies.
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+b")  # noqa: SIM115 - closed below, after the lock is released
    except OSError as e:
        raise DataError(
            f"{lock_path}: cannot create the store lock ({e}); {_WRITABLE_HINT}"
        ) from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _import(cfg: DataConfig, data_dir: Path) -> tuple[dict[str, ArraySplit], list[str], str]:
    source = cfg.source or os.environ.get(ENV_SOURCE, "")
    folder = canonical_dir(data_dir, cfg.dataset)
    if source:
        path = Path(source).expanduser()
        arrays, classes = read_image_folder(path)
        desc = f"image-folder {path.resolve()}"
    elif folder.is_dir():
        arrays, classes = read_canonical(data_dir, cfg.dataset)
        desc = f"canonical {folder.resolve()}"
    elif cfg.download:
        download_canonical(data_dir, cfg.dataset)
        arrays, classes = read_canonical(data_dir, cfg.dataset)
        desc = f"canonical {folder.resolve()} (downloaded from {spec_for(cfg.dataset).url})"
    else:
        raise DataError(
            f"{data_dir}: no {cfg.dataset} data found and data.download is off. Provide one of: "
            "data.source (or $CIFAR_DIST_SOURCE) = an image-folder directory or .tar shards "
            f"with train/<class>/*.png|jpg; the canonical '{folder.name}/' pickles inside "
            "data.dir (or $CIFAR_DIST_DATA, default ./data); or data.download=true with network"
        )
    if len(classes) != cfg.num_classes:
        raise DataError(
            f"{desc}: has {len(classes)} classes but data.dataset={cfg.dataset} needs "
            f"{cfg.num_classes}"
        )
    return {k: ArraySplit(x, y) for k, (x, y) in arrays.items()}, classes, desc


def prepare_store(cfg: DataConfig) -> Path:
    """Return `<data_dir>/<dataset>/`, building it first if missing (safe across processes).

    Rule order: (1) an existing store; (2) data.source / $CIFAR_DIST_SOURCE; (3) canonical
    pickles in the data dir; (4) download them when data.download; else a DataError.
    An existing store always wins: delete it to re-import from a different source.
    """
    data_dir = resolve_data_dir(cfg)
    store = data_dir / cfg.dataset

    def ready() -> bool:
        if (store / "meta.json").is_file():
            return True
        if store.exists():
            raise DataError(f"{store}: exists but is not an array store (no meta.json); move it")
        return False

    if ready():
        return store
    with _exclusive(data_dir / f"{cfg.dataset}.lock"):
        if not ready():  # re-check: another process may have built it while we waited
            splits, classes, desc = _import(cfg, data_dir)
            try:
                write_store(store, splits, classes, desc, dataset=cfg.dataset)
            except OSError as e:  # read-only or full filesystem: name the place, not a traceback
                raise DataError(
                    f"{store}: cannot write the array store ({e}); {_WRITABLE_HINT}"
                ) from None
    return store


class Splits(dict[str, ArraySplit]):
    """The dict `load_splits` returns, also carrying the class names and the store's meta."""

    classes: list[str]
    meta: dict[str, Any]


def load_splits(cfg: DataConfig) -> Splits:
    """{"train", "val" (if data.val_size > 0), "test" (if the store has one)}.

    Validation is `perm[-val_size:]` of `default_rng(split_seed).permutation(len(train))`; both
    train and val keep the store's original order (sorted indices: sequential memmap reads);
    `subset` keeps the first N of the remaining permutation, i.e. a seeded random sample, because
    image-folder stores are sorted by class. Without val and subset, train stays memory-mapped;
    otherwise the selected rows are copied into memory.
    """
    store = prepare_store(cfg)
    splits, meta = open_store(store)
    if meta["dataset"] != cfg.dataset or len(meta["classes"]) != cfg.num_classes:
        raise DataError(
            f"{store}: holds {meta['dataset']} with {len(meta['classes'])} classes, "
            f"but data.dataset={cfg.dataset}"
        )
    train = splits["train"]
    n, v = len(train), cfg.val_size
    out = Splits()
    out.classes, out.meta = list(meta["classes"]), meta
    if v >= n:
        raise DataError(f"{store}: data.val_size={v} must be smaller than the {n} train images")
    if v > 0 or cfg.subset > 0:
        perm = np.random.default_rng(cfg.split_seed).permutation(n)
        # subset = a seeded random sample (stores may be sorted by class), still read in order.
        keep = perm[: n - v][: cfg.subset or None]
        train_idx = np.sort(keep)
        out["train"] = ArraySplit(train.images[train_idx], train.labels[train_idx])
        if v > 0:
            val_idx = np.sort(perm[n - v :])
            out["val"] = ArraySplit(train.images[val_idx], train.labels[val_idx])
    else:
        out["train"] = train
    if "test" in splits:
        out["test"] = splits["test"]
    return out


def verify_store(store_dir: Path) -> str:
    """Human summary for `cifar-dist data verify`; DataError if anything is inconsistent."""
    store_dir = Path(store_dir)
    splits, meta = open_store(store_dir)
    classes: list[str] = meta["classes"]
    lines = [
        f"{store_dir}: {meta.get('dataset')}, {len(classes)} classes, "
        f"format v{meta['format_version']}, source: {meta.get('source')}"
    ]
    recorded: dict[str, str] = meta.get("sha256") or {}
    for name, split in splits.items():
        hist = np.bincount(split.labels, minlength=len(classes))
        lo, hi = int(hist.argmin()), int(hist.argmax())
        lines.append(
            f"{name}: {len(split)} images; per class min {hist[lo]} ({classes[lo]}), "
            f"max {hist[hi]} ({classes[hi]}), empty classes {int((hist == 0).sum())}"
        )
        for kind in ("images", "labels"):
            fn = f"{name}_{kind}.npy"
            actual = _sha256(store_dir / fn)
            if fn in recorded and recorded[fn] != actual:
                raise DataError(
                    f"{store_dir / fn}: sha256 {actual} differs from meta.json {recorded[fn]} "
                    "(file changed since import; delete the store to re-import)"
                )
            lines.append(f"  {fn} sha256 {actual}")
    return "\n".join(lines)
