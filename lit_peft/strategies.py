"""Lightning strategies as conf/strategy/*.yaml build them (where a YAML value needs a Python object)."""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class


def fsdp(wrap: list[str] | None = None, activation_checkpointing: list[str] | None = None, **kwargs: Any):
    """FSDPStrategy that shards per module class (by import path), e.g. one unit per LitGPT transformer Block.

    With frozen base weights and trainable adapters in one unit, `use_orig_params=True` keeps the mix legal.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    wrap_classes = {get_class(path) for path in wrap or []}
    checkpoint_classes = {get_class(path) for path in activation_checkpointing or []}
    return FSDPStrategy(
        auto_wrap_policy=wrap_classes or None, activation_checkpointing_policy=checkpoint_classes or None, **kwargs
    )
