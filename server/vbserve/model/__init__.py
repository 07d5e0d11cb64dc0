"""The base model: loading it (a hub id, a local path or a GGUF, converted once into a
safetensors cache) and the one description of it that the engine, the API and the trainer
read (`BaseModelSpec`)."""

from .description import BaseModelSpec, describe_model, module_shapes
from .loader import DEFAULT_NAME, LoadedModel, load_model, resolve_device, resolve_dtype

__all__ = [
    "DEFAULT_NAME",
    "BaseModelSpec",
    "LoadedModel",
    "describe_model",
    "load_model",
    "module_shapes",
    "resolve_device",
    "resolve_dtype",
]
