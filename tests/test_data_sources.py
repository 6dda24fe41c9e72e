"""Data sources: canonical files (MD5, restricted unpickling), synthetic files, image folders,
the array store (rule order, locking, validation) and the validation split. All offline."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import pickletools
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_dist.config.schema import DataConfig
from cifar_dist.data import (
    ArraySplit,
    DataError,
    cifar,
    load_splits,
    open_store,
    prepare_store,
    read_canonical,
    read_image_folder,
    resolve_data_dir,
    verify_store,
    write_store,
    write_synthetic,
)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer"]  # a prefix suffices


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may read the user's env or reach the network: downloads hit a missing file."""
    monkeypatch.delenv("CIFAR_DIST_DATA", raising=False)
    monkeypatch.delenv("CIFAR_DIST_SOURCE", raising=False)
    for name, spec in list(cifar.SPECS.items()):
        bad = (tmp_path / "no-such-host" / spec.tarball).as_uri()
        monkeypatch.setitem(cifar.SPECS, name, dataclasses.replace(spec, url=bad))


def _cfg(data_dir: Path, **kw: object) -> DataConfig:
    return DataConfig(**{"dir": str(data_dir), "download": False, "val_size": 0, **kw})  # type: ignore[arg-type]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _reseal(folder: Path, name: str) -> None:
    """Rewrite the manifest entry of `name` so only the unpickler can object to it."""
    lines = [ln for ln in (folder / "MD5SUMS").read_text().splitlines() if not ln.endswith(name)]
    (folder / "MD5SUMS").write_text("\n".join([*lines, f"{_md5(folder / name)}  {name}"]) + "\n")


def _rows(images: np.ndarray) -> set[bytes]:
    return {im.tobytes() for im in images}


# ---------------------------------------------------------------- canonical and synthetic files


@pytest.mark.parametrize(
    ("dataset", "k", "label_key"), [("cifar10", 10, b"labels"), ("cifar100", 100, b"fine_labels")]
)
def test_synthetic_files_read_as_canonical(
    tmp_path: Path, dataset: str, k: int, label_key: bytes
) -> None:
    folder = write_synthetic(tmp_path, dataset, n_train=10 * k, n_test=2 * k, seed=3)
    spec = cifar.SPECS[dataset]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*spec.md5, "MD5SUMS"])
    splits, names = read_canonical(tmp_path, dataset)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    assert xtr.shape == (10 * k, 32, 32, 3) and xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert xte.shape == (2 * k, 32, 32, 3) and len(names) == k
    assert np.bincount(ytr, minlength=k).tolist() == [10] * k
    assert np.bincount(yte, minlength=k).tolist() == [2] * k
    # The raw file: bytes keys, CHW rows, and no globals beyond numpy's (no _codecs, no builtins).
    raw_path = folder / spec.train[0]
    raw = pickle.loads(raw_path.read_bytes(), encoding="bytes")
    assert isinstance(raw[b"data"], np.ndarray) and raw[b"data"].shape[1] == 3072
    assert np.array_equal(raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0), xtr[0])
    assert raw[label_key][0] == ytr[0]
    globals_ = {
        arg for op, arg, _ in pickletools.genops(raw_path.read_bytes()) if op.name == "GLOBAL"
    }
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    if dataset == "cifar10":
        assert names[:5] == CIFAR10_NAMES


def test_synthetic_images_are_learnable(tmp_path: Path) -> None:
    write_synthetic(tmp_path, "cifar10", n_train=500, n_test=200, seed=0)
    splits, _ = read_canonical(tmp_path, "cifar10")
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    # Nearest class mean in pixel space: a weak learner; a CNN does far better still.
    means = np.stack([xtr[ytr == c].reshape(-1, 3072).mean(0) for c in range(10)])
    d = ((xte.reshape(-1, 1, 3072).astype(np.float32) - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == yte).mean() > 0.9
    assert len(_rows(xtr)) == len(xtr)  # noise makes every image distinct


def test_md5_mismatch_refused_before_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_synthetic(tmp_path, "cifar10", n_train=50, n_test=10)
    data = bytearray((folder / "data_batch_3").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "data_batch_3").write_bytes(bytes(data))  # manifest kept: now it disagrees

    class Tripwire:
        def __init__(self, *a: object, **k: object) -> None:
            raise AssertionError("unpickler reached before the MD5 check")

    monkeypatch.setattr(cifar, "RestrictedUnpickler", Tripwire)
    with pytest.raises(DataError, match=r"data_batch_3: MD5 [0-9a-f]{32} does not match"):
        read_canonical(tmp_path, "cifar10")


def test_published_md5s_apply_without_manifest(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, "cifar100", n_train=100, n_test=100)
    (folder / "MD5SUMS").unlink()
    with pytest.raises(DataError, match=cifar.SPECS["cifar100"].md5["train"]):
        read_canonical(tmp_path, "cifar100")


def test_truncated_file_refused(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, "cifar10", n_train=50, n_test=10)
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="test_batch: MD5"):
        read_canonical(tmp_path, "cifar10")
    _reseal(folder, "test_batch")  # even with a matching sum the unpickler refuses it cleanly
    with pytest.raises(DataError, match="test_batch: truncated or corrupt pickle"):
        read_canonical(tmp_path, "cifar10")


class _Custom:
    pass


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["exploit", "custom"])
def test_unexpected_pickled_type_refused(tmp_path: Path, kind: str) -> None:
    folder = write_synthetic(tmp_path, "cifar10", n_train=50, n_test=10)
    marker = tmp_path / "pwned"
    payload = _Exploit(marker) if kind == "exploit" else _Custom()
    (folder / "data_batch_1").write_bytes(
        pickle.dumps({b"data": payload, b"labels": []}, protocol=2)
    )
    _reseal(folder, "data_batch_1")
    with pytest.raises(DataError, match=r"data_batch_1: refused pickle \(forbidden global"):
        read_canonical(tmp_path, "cifar10")
    assert not marker.exists()


def test_wrong_structure_refused(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, "cifar10", n_train=50, n_test=10)
    bad = {b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}
    (folder / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=4))
    _reseal(folder, "data_batch_2")
    with pytest.raises(DataError, match="data_batch_2: b'labels' must be a list of 10"):
        read_canonical(tmp_path, "cifar10")


# ---------------------------------------------------------------- image folders


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _image_tree(
    root: Path, classes: list[str], n: int, seed: int = 0
) -> dict[tuple[str, str, str], np.ndarray]:
    rng = np.random.default_rng(seed)
    files = {}
    for split, count in (("train", n), ("test", 1)):
        for cls in classes:
            for i in rng.permutation(count):  # names not created in sorted order
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                path = root / split / cls / f"img{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_png(img))
                files[(split, cls, path.name)] = img
    return files


def _expected(files: dict, classes: list[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted((k for k in files if k[0] == split), key=lambda k: (classes.index(k[1]), k[2]))
    return np.stack([files[k] for k in keys]), np.array([classes.index(k[1]) for k in keys])


def test_image_folder_round_trips_dir_and_tar_shards(tmp_path: Path) -> None:
    classes = ["zebra", "apple", "mango"]  # deliberately not sorted: labels follow classes.txt
    tree = tmp_path / "tree"
    files = _image_tree(tree, classes, n=4)
    (tree / "classes.txt").write_text("\n".join(classes) + "\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    members = sorted(p for p in tree.rglob("*") if p.is_file())
    for s, part in enumerate((members[::2], members[1::2])):
        with tarfile.open(shards / f"part-{s}.tar", "w") as tar:
            tar.add(tree / "classes.txt", arcname="classes.txt")
            for p in part:
                tar.add(p, arcname=p.relative_to(tree).as_posix())
    for source in (tree, shards, shards / "part-0.tar"):
        splits, got_classes = read_image_folder(source)
        assert got_classes == classes
        if source.suffix == ".tar":  # one shard alone: only its own files
            assert len(splits["train"][0]) + len(splits["test"][0]) < len(files)
            continue
        for split in ("train", "test"):
            x, y = _expected(files, classes, split)
            assert np.array_equal(splits[split][0], x) and splits[split][1].tolist() == y.tolist()
    (tree / "classes.txt").unlink()
    _, got_classes = read_image_folder(tree)
    assert got_classes == sorted(classes)


def test_image_folder_refuses_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^\S*nowhere: no such file or directory \(an image-f"):
        read_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: neither a train/<class>/ tree nor"):
        read_image_folder(tmp_path / "empty")
    _image_tree(tmp_path, ["a", "b"], n=2)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match="missing class folder train/c/"):
        read_image_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    big = tmp_path / "train" / "b" / "big.png"
    big.write_bytes(_png(np.zeros((33, 32, 3), np.uint8)))
    with pytest.raises(DataError, match=r"big\.png: image is 32x33, expected 32x32"):
        read_image_folder(tmp_path)
    big.unlink()
    (tmp_path / "train" / "stray").mkdir()
    (tmp_path / "train" / "stray" / "x.png").write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(DataError, match="class folder 'stray' is not a known class"):
        read_image_folder(tmp_path)


# ---------------------------------------------------------------- download


def _canonical_tarball(tmp_path: Path, members: list[tuple[Path, str]] | None = None) -> Path:
    src = write_synthetic(tmp_path / "src", "cifar10", n_train=50, n_test=10, seed=7)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for path, arcname in members or [(src, src.name)]:
            tar.add(path, arcname=arcname)
    return tar_path


def _serve(monkeypatch: pytest.MonkeyPatch, tar_path: Path) -> None:
    spec = dataclasses.replace(
        cifar.SPECS["cifar10"], url=tar_path.as_uri(), tarball_md5=_md5(tar_path)
    )
    monkeypatch.setitem(cifar.SPECS, "cifar10", spec)


def test_download_from_file_url_builds_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, _canonical_tarball(tmp_path))
    store = prepare_store(_cfg(tmp_path / "data", download=True))
    splits, meta = open_store(store)
    assert "downloaded from file://" in meta["source"] and meta["counts"] == {
        "train": 50,
        "test": 10,
    }
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_download_refuses_bad_md5_and_unsafe_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar_path = _canonical_tarball(tmp_path)
    spec = dataclasses.replace(cifar.SPECS["cifar10"], url=tar_path.as_uri())  # published md5
    monkeypatch.setitem(cifar.SPECS, "cifar10", spec)
    with pytest.raises(DataError, match="downloaded tarball MD5 .* does not match c58f3010"):
        prepare_store(_cfg(tmp_path / "d1", download=True))
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    _serve(
        monkeypatch, _canonical_tarball(tmp_path, [(payload, "cifar-10-batches-py/../../pwned")])
    )
    with pytest.raises(DataError, match="unsafe member 'cifar-10-batches-py/../../pwned'"):
        prepare_store(_cfg(tmp_path / "d2", download=True))
    assert not (tmp_path / "pwned").exists()


def test_no_network_error_says_how_to_provide_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot download") as e:
        prepare_store(_cfg(tmp_path, download=True))
    assert all(s in str(e.value) for s in ("data.dir", "data.source", "$CIFAR_DIST_SOURCE"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cifar10").exists()


# ---------------------------------------------------------------- prepare_store rule order


def test_no_source_and_no_download_explains_the_three_ways(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.download is off") as e:
        prepare_store(_cfg(tmp_path))
    assert all(
        s in str(e.value)
        for s in ("data.source", "CIFAR_DIST_SOURCE", "data.dir", "cifar-10-batches-py")
    )


def test_rule_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    classes = [f"c{i}" for i in range(10)]
    _image_tree(tmp_path / "folder", classes, n=2)
    data = tmp_path / "data"
    write_synthetic(data, "cifar10", n_train=50, n_test=10)
    # (3) canonical files beat the download (whose URL would fail here).
    store = prepare_store(_cfg(data, download=True))
    assert open_store(store)[1]["source"].startswith("canonical ")
    # (1) an existing store beats any source, even a missing one.
    assert prepare_store(_cfg(data, source=str(tmp_path / "missing"))) == store
    # (2) a source beats canonical files: from the config, and from $CIFAR_DIST_SOURCE.
    for source, env in ((str(tmp_path / "folder"), ""), ("", str(tmp_path / "folder"))):
        (tmp_path / "fresh").mkdir(exist_ok=True)
        write_synthetic(tmp_path / "fresh", "cifar10", n_train=50, n_test=10)
        if env:
            monkeypatch.setenv("CIFAR_DIST_SOURCE", env)
        _, meta = open_store(prepare_store(_cfg(tmp_path / "fresh", source=source)))
        assert meta["source"].startswith("image-folder ") and meta["counts"] == {
            "train": 20,
            "test": 10,
        }
        assert meta["classes"] == classes
        (tmp_path / "fresh" / "cifar10" / "meta.json").unlink()
        (tmp_path / "fresh").rename(tmp_path / f"used-{bool(env)}")


def test_source_class_count_must_match_dataset(tmp_path: Path) -> None:
    _image_tree(tmp_path / "folder", ["a", "b", "c"], n=1)
    with pytest.raises(DataError, match="has 3 classes but data.dataset=cifar100 needs 100"):
        prepare_store(_cfg(tmp_path / "d", dataset="cifar100", source=str(tmp_path / "folder")))


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir(DataConfig()) == Path("data")
    monkeypatch.setenv("CIFAR_DIST_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(DataConfig()) == tmp_path / "env"
    assert resolve_data_dir(DataConfig(dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"


_RACE = r"""
import sys, time
from pathlib import Path
import cifar_dist.data.arrays as arrays
from cifar_dist.config.schema import DataConfig
data, log, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
real = arrays.read_canonical
def counting(*a):
    with open(log, "a") as f:
        f.write(me + "\n")
    time.sleep(1.0)  # a slow import: the other process must wait, not build it again
    return real(*a)
arrays.read_canonical = counting
(data / f"ready-{me}").touch()
deadline = time.time() + 60
while len(list(data.glob("ready-*"))) < 2 and time.time() < deadline:
    time.sleep(0.01)
print(arrays.prepare_store(DataConfig(dir=str(data), download=False)))
"""


def test_concurrent_prepare_store_builds_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_synthetic(data, "cifar10", n_train=50, n_test=10)
    log = tmp_path / "builds.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR_DIST_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(data), str(log), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {o.strip() for o, _ in outs} == {str(data / "cifar10")}
    assert len(log.read_text().split()) == 1
    assert open_store(data / "cifar10")[1]["counts"] == {"train": 50, "test": 10}
    assert not [p for p in data.iterdir() if p.name.startswith(".cifar10.")]  # no temp dirs left


# ---------------------------------------------------------------- validation split and subset


def test_val_split(tmp_path: Path) -> None:
    write_synthetic(tmp_path, "cifar10", n_train=500, n_test=100)
    full = load_splits(_cfg(tmp_path))
    assert isinstance(full["train"].images, np.memmap) and len(full["test"]) == 100
    assert full.classes[:5] == CIFAR10_NAMES
    by_row = {im.tobytes(): int(y) for im, y in zip(full["train"].images, full["train"].labels)}
    assert len(by_row) == 500
    a = load_splits(_cfg(tmp_path, val_size=100, split_seed=0))
    b = load_splits(_cfg(tmp_path, val_size=100, split_seed=0))
    c = load_splits(_cfg(tmp_path, val_size=100, split_seed=1))
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (400, 100, 100)
    tr, va = _rows(a["train"].images), _rows(a["val"].images)
    assert not tr & va and tr | va == set(by_row)
    for split in (a["train"], a["val"]):  # labels travel with their images
        assert [by_row[im.tobytes()] for im in split.images] == split.labels.tolist()
    assert np.array_equal(a["val"].images, b["val"].images) and va != _rows(c["val"].images)
    sub = load_splits(_cfg(tmp_path, val_size=100, subset=30))
    assert len(sub["train"]) == 30 and _rows(sub["train"].images) <= tr  # a sample of train
    assert _rows(sub["train"].images) != _rows(a["train"].images[:30])  # random, not a prefix
    assert np.array_equal(sub["val"].images, a["val"].images)
    assert len(load_splits(_cfg(tmp_path, subset=7))["train"]) == 7
    with pytest.raises(DataError, match="data.val_size=500 must be smaller than the 500"):
        load_splits(_cfg(tmp_path, val_size=500))


# ---------------------------------------------------------------- store validation


def test_store_validation_and_verify(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    y = np.arange(20, dtype=np.int64) % 2
    with pytest.raises(DataError, match=r"labels outside 0\.\.1"):
        write_store(tmp_path / "s", {"train": ArraySplit(x, y + 1)}, ["a", "b"], "test")
    with pytest.raises(DataError, match="images are uint8 .* expected uint8 \\(20, 32, 32, 3\\)"):
        write_store(tmp_path / "s", {"train": ArraySplit(x[:, :31], y)}, ["a", "b"], "test")
    store = write_store(tmp_path / "s", {"train": ArraySplit(x, y)}, ["a", "b"], "test")
    report = verify_store(store)
    assert "train: 20 images; per class min 10" in report
    splits, _ = open_store(store)
    assert np.array_equal(splits["train"].images, x)
    raw = bytearray((store / "train_images.npy").read_bytes())
    raw[-1] ^= 1
    (store / "train_images.npy").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train_images.npy: sha256 .* differs from meta.json"):
        verify_store(store)
    (store / "train_labels.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="train_labels.npy: cannot load"):
        open_store(store)
    (store / "meta.json").write_text('{"format": "cifar-dist-arrays", "format_version": 99}')
    with pytest.raises(DataError, match="format version 99"):
        open_store(store)
