"""Standalone DoRA: magnitude x normalized (W + BA) direction, PEFT-equal numerics with a zero-row guard."""

from ..registry import register_method
from .config import DoraConfig
from .layer import DoraLayer, Linear
from .model import DoraModel

register_method("dora", DoraConfig, DoraModel, prefix="dora_")

__all__ = ["DoraConfig", "DoraModel", "DoraLayer", "Linear"]
