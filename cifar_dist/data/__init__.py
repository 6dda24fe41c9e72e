"""Data sources: canonical CIFAR pickles, synthetic files, image folders, and the array store."""

from cifar_dist.data.arrays import (
    ArraySplit,
    Splits,
    load_splits,
    open_store,
    prepare_store,
    resolve_data_dir,
    verify_store,
    write_store,
)
from cifar_dist.data.cifar import SPECS, download_canonical, read_canonical
from cifar_dist.data.errors import DataError
from cifar_dist.data.imagefolder import read_image_folder
from cifar_dist.data.synth import write_synthetic

__all__ = [
    "SPECS",
    "Splits",
    "ArraySplit",
    "DataError",
    "download_canonical",
    "load_splits",
    "open_store",
    "prepare_store",
    "read_canonical",
    "read_image_folder",
    "resolve_data_dir",
    "verify_store",
    "write_store",
    "write_synthetic",
]
