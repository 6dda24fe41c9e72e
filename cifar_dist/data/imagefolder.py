"""Import an image-folder source: `train/<class>/*.{png,jpg,jpeg}` (+ optional `test/`), with
`classes.txt` (label = line number - 1; else sorted class folder names), as a directory tree or
as `.tar` shards (a directory of `*.tar`, or one `.tar` path).

Tar members are streamed, never extracted to disk. Decoding is single-process: the two real
shards (50,000 JPEGs) take about 10 s on one core, and a process pool measured no faster on the
shared 2-core machine while adding fork/spawn hazards inside distributed ranks.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from .errors import DataError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SplitArrays = dict[str, tuple[np.ndarray, np.ndarray]]
# (split, class folder, file name) -> (where it came from, for messages; encoded bytes)
_Records = dict[tuple[str, str, str], tuple[str, bytes]]


def _add(records: _Records, rel: PurePosixPath, origin: str, data: bytes) -> None:
    split, cls, name = rel.parts[-3:]
    key = (split, cls, name)
    if key in records:
        raise DataError(f"{origin}: duplicate of {records[key][0]}")
    records[key] = (origin, data)


def _is_image(rel: PurePosixPath) -> bool:
    return len(rel.parts) >= 3 and rel.parts[-3] in SPLITS and rel.suffix.lower() in IMAGE_SUFFIXES


def _scan_tar(path: Path, records: _Records, class_lists: dict[str, list[str]]) -> None:
    try:
        with tarfile.open(path, "r|*") as tar:  # stream mode: one sequential pass
            for m in tar:
                if not m.isfile():
                    continue
                rel = PurePosixPath(m.name)
                if rel.name == "classes.txt" or _is_image(rel):
                    f = tar.extractfile(m)
                    data = f.read() if f is not None else b""
                    if rel.name == "classes.txt":
                        class_lists[f"{path}:{m.name}"] = _parse_classes(data)
                    else:
                        _add(records, rel, f"{path}:{m.name}", data)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable tar shard ({e})") from None


def _scan_dir(root: Path, records: _Records, class_lists: dict[str, list[str]]) -> None:
    if (root / "classes.txt").is_file():
        class_lists[str(root / "classes.txt")] = _parse_classes((root / "classes.txt").read_bytes())
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        for p in sorted((root / split).glob("*/*")):
            rel = PurePosixPath(*p.relative_to(root).parts)
            if p.is_file() and _is_image(rel):
                _add(records, rel, str(p), p.read_bytes())


def _parse_classes(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def _classes(source: Path, records: _Records, class_lists: dict[str, list[str]]) -> list[str]:
    folders = {cls for (split, cls, _) in records if split == "train"}
    classes = sorted(folders)
    if class_lists:
        (first_origin, classes), *others = class_lists.items()
        for origin, other in others:
            if other != classes:
                raise DataError(f"{origin}: differs from {first_origin}")
        if len(set(classes)) != len(classes):
            raise DataError(f"{first_origin}: duplicate class names")
        missing = [c for c in classes if c not in folders]
        if missing:
            raise DataError(f"{source}: missing class folder train/{missing[0]}/ (in classes.txt)")
    known = set(classes)
    for (_, cls, _), (origin, _) in records.items():
        if cls not in known:  # e.g. a test/ folder with no train/ counterpart
            raise DataError(f"{origin}: class folder '{cls}' is not a known class")
    return classes


def decode_image(data: bytes, origin: str) -> np.ndarray:
    """Decode to uint8 (32, 32, 3) RGB; refuse any other size."""
    try:
        # Only the formats the suffixes promise: no other PIL plugin parses untrusted bytes.
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:
            if im.size != (32, 32):
                raise DataError(f"{origin}: image is {im.size[0]}x{im.size[1]}, expected 32x32")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types on corrupt files
        raise DataError(f"{origin}: cannot decode image ({type(e).__name__}: {e})") from None


def _sources(source: Path) -> tuple[list[Path], bool]:
    """(paths, is_tar): one tar, the tar shards of a directory, or the directory tree itself."""
    if source.is_file():
        return [source], True
    if not source.is_dir():
        raise DataError(
            f"{source}: no such file or directory (an image-folder source is a train/<class>/ "
            "tree, a .tar, or a directory of .tar shards)"
        )
    if (source / "train").is_dir():
        return [source], False
    shards = sorted(source.glob("*.tar"))
    if not shards:
        raise DataError(f"{source}: neither a train/<class>/ tree nor *.tar shards inside")
    return shards, True


def read_image_folder(source: Path) -> tuple[SplitArrays, list[str]]:
    """Return ({"train": (uint8 N×32×32×3, int64 N), "test"?: ...}, class names).

    Order within a split: by label, then by file name (plain string order), so the result does
    not depend on shard boundaries or on the order of tar members.
    """
    source = Path(source)
    paths, is_tar = _sources(source)
    records: _Records = {}
    class_lists: dict[str, list[str]] = {}
    for p in paths:
        if is_tar:
            _scan_tar(p, records, class_lists)
        else:
            _scan_dir(p, records, class_lists)
    if not any(split == "train" for split, _, _ in records):
        raise DataError(f"{source}: no train/<class>/*.png|jpg|jpeg images found")
    classes = _classes(source, records, class_lists)
    index = {c: i for i, c in enumerate(classes)}
    splits: SplitArrays = {}
    for split in SPLITS:
        keys = sorted((k for k in records if k[0] == split), key=lambda k: (index[k[1]], k[2]))
        if not keys:
            continue
        images = np.empty((len(keys), 32, 32, 3), dtype=np.uint8)
        for i, key in enumerate(keys):
            origin, data = records.pop(key)  # drop the encoded bytes as we go
            images[i] = decode_image(data, origin)
        labels = np.array([index[k[1]] for k in keys], dtype=np.int64)
        splits[split] = (images, labels)
    return splits, classes
