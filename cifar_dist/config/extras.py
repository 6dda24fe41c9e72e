"""Optional extras: which pip extra provides which import, checked before any work starts.

A config that needs an optional package (data.loader=ffcv, parallel.engine=deepspeed) is
checked at load, before data is prepared, with importlib's find_spec (no import: `import ffcv`
alone takes seconds). The CLI maps any other ModuleNotFoundError of these packages to the same
one line, so a missing extra never ends in a traceback.
"""

from __future__ import annotations

import importlib.util

from cifar_dist.config.schema import Config, ConfigError

# top-level import name -> the pyproject extra that installs it
EXTRA_OF = {
    "ffcv": "ffcv",
    "deepspeed": "deepspeed",
    "ray": "tune",
    "optuna": "tune",
    "onnx": "compress",
    "onnxruntime": "compress",
    "onnxscript": "compress",
    "wandb": "wandb",
}
_NOTES = {
    "ffcv": " (after its system libraries: apt-get install -y pkg-config libturbojpeg0-dev "
    "libopencv-dev; see docs/fast_data.md)",
    "deepspeed": " (prefix DS_BUILD_OPS=0 to skip compiling its ops at install)",
}


class MissingExtraError(ConfigError, ImportError):
    """An optional package is not installed; the message names the extra to install. (Also an
    ImportError, for callers that catch that around an import.)"""


def install_line(module: str) -> str:
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top, top)
    return f"pip install 'cifar-dist[{extra}]'{_NOTES.get(extra, '')}"


def missing_message(module: str, needed_by: str) -> str:
    top = module.split(".")[0]
    return f"{needed_by} needs the optional package {top!r}, not installed: {install_line(top)}"


def require(module: str, needed_by: str) -> None:
    """Raise MissingExtraError unless `module` is importable (find_spec: no import)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module with no spec
        found = False
    if not found:
        raise MissingExtraError(missing_message(module, needed_by))


def check_extras(cfg: Config) -> None:
    """The optional packages this config needs, checked at load."""
    if cfg.data.loader == "ffcv":
        require("ffcv", "data.loader=ffcv")
    if cfg.parallel.engine == "deepspeed":
        require("deepspeed", "parallel.engine=deepspeed")


def extra_for(error: ImportError) -> str | None:
    """The one-line message for an ImportError of an optional package, else None."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if name not in EXTRA_OF:
        return None
    return missing_message(name, "this command")
