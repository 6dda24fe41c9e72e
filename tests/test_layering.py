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


def _model_classes() -> set[str]:
    names: set[str] = set()
    for path in (PKG / "models").glob("*.py"):
        if path.name in ("registry.py", "__init__.py"):  # the contract, not a model
            continue
        tree = ast.parse(path.read_text())
        names.update(n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef))
    return names


@pytest.mark.parametrize("path", sorted((PKG / "parallel").glob("*.py")), ids=lambda p: p.name)
def test_parallel_names_no_model_class(path: Path) -> None:
    """TP and pipeline plans come from the models (tensor_parallel_plan, pipeline_layers):
    parallel/ neither imports a model module nor names a model class, even as a string."""
    classes = _model_classes()
    assert {"VisionTransformer", "ResNet", "AirbenchNet"} <= classes
    mods = {m for m in _imports(path) if m.startswith("cifar_dist.models")}
    assert mods <= {"cifar_dist.models.registry"}, mods
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            used.add(node.value)
    assert not used & classes, f"{path.name} names {sorted(used & classes)}"


@pytest.mark.parametrize(
    ("over", "world", "expected"),
    [
        ({}, 1, "TorchBackend"),
        ({"parallel.dp_mode": "fsdp"}, 2, "TorchBackend"),
        ({"parallel.tp": 2}, 2, "TorchBackend"),
        ({"parallel.pp": 2}, 2, "PipelineBackend"),
        ({"parallel.pp": 2, "parallel.tp": 2}, 4, "PipelineBackend"),
        ({"parallel.engine": "deepspeed"}, 2, "DeepSpeedBackend"),
        ({"parallel.engine": "deepspeed", "parallel.pp": 2}, 2, "DeepSpeedPipeBackend"),
    ],
)
def test_backend_registry_picks_the_layout(over: dict, world: int, expected: str) -> None:
    from cifar_dist.config import load_config
    from cifar_dist.parallel.mesh import ParallelDims
    from cifar_dist.train.backends import backend_for, list_backends
    from cifar_dist.train.backends.base import Backend

    assert list_backends() == ["deepspeed", "pipeline", "torch"]
    cfg = load_config(None, over)
    dims = ParallelDims.from_config(cfg.parallel, world, "cpu")
    chosen = backend_for(cfg, dims)
    assert chosen.__name__ == expected and issubclass(chosen, Backend)


def test_one_trainer_class() -> None:
    """Layouts are backends, not Trainer subclasses: no class in the package derives from
    Trainer (the benchmark's step timer patches the method instead of subclassing)."""
    subclasses = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {
                    b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
                }
                if "Trainer" in bases:
                    subclasses.append(f"{path.relative_to(PKG)}:{node.name}")
    assert not subclasses, subclasses


def test_deepspeed_code_lives_in_one_package() -> None:
    """Only cifar_dist/deepspeed/ imports the deepspeed library (an optional extra)."""
    outside = [
        p.relative_to(PKG).as_posix()
        for p in PKG.rglob("*.py")
        if "deepspeed" not in p.relative_to(PKG).parts[:1]
        and any(m == "deepspeed" or m.startswith("deepspeed.") for m in _imports(p))
    ]
    assert not outside, outside
    assert len(list((PKG / "deepspeed").glob("*.py"))) >= 6
