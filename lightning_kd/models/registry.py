"""Which adapter serves which ``config.model_type``."""

from __future__ import annotations

from torch import nn

from lightning_kd.models.adapter import ArchitectureAdapter

_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls()
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a Hugging Face model, or an error that lists the supported architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"lightning-kd has no adapter for {type(model).__name__} (model_type={model_type!r}). "
            f"Supported model types: {', '.join(supported_model_types())}. "
            "To add one, subclass lightning_kd.models.ArchitectureAdapter in a new file under "
            "lightning_kd/models/ and decorate it with @register_adapter."
        )
    return _ADAPTERS[model_type]
