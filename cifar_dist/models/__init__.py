"""Model zoo: importing this package registers every model with the registry."""

from . import airbench, cnn, resnet, vit  # noqa: F401  (imported for their @register_model)
from .airbench import fit_whitening
from .norm import make_norm2d
from .registry import PipelineModel, create_model, list_models, register_model

__all__ = [
    "PipelineModel",
    "create_model",
    "fit_whitening",
    "list_models",
    "make_norm2d",
    "register_model",
]
