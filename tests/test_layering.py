"""The package layering the design asks for, checked on the source (ast): parallel/ applies
parallelisms and plans but never imports the training loop nor names a model class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cifar_dist.data import registry as loaders

PKG = Path(__file__).resolve().parents[1] / "cifar_dist"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((PKG / "parallel").glob("*.py")), ids=lambda p: p.name)
def test_parallel_never_imports_train(path: Path) -> None:
    bad = {
        m for m in _imports(path) if m == "cifar_dist.train" or m.startswith("cifar_dist.train.")
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_loaders_come_from_the_registry() -> None:
    assert loaders.list_loaders() == ["device", "ffcv", "torch"]
    fit_src = (PKG / "train" / "fit.py").read_text()
    assert "build_device_loaders" not in fit_src and "build_ffcv_loaders" not in fit_src
