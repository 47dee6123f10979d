"""The method registry: name -> Method. Adding a method = one module here + one YAML in conf/method/."""

from __future__ import annotations

from typing import Any

from lit_peft.methods.base import (
    TARGETS,
    AdapterLinear,
    Method,
    MethodSettings,
    adapters,
    adapters_disabled,
    merge_adapters,
)
from lit_peft.methods.ether import Ether, EtherPlus, EtherPlusHH
from lit_peft.methods.full import Full
from lit_peft.methods.lora import LoRA
from lit_peft.methods.oft import OFT

METHODS: dict[str, type[Method]] = {m.name: m for m in (Full, LoRA, Ether, EtherPlus, EtherPlusHH, OFT)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]()


def build_settings(name: str, values: dict[str, Any]) -> tuple[Method, MethodSettings]:
    """The Method for `name` and its validated settings (from a Hydra node or a saved adapter_config.json)."""
    method = get_method(name)
    return method, method.Settings.from_dict(values)


__all__ = [
    "METHODS",
    "TARGETS",
    "AdapterLinear",
    "Method",
    "MethodSettings",
    "adapters",
    "adapters_disabled",
    "build_settings",
    "get_method",
    "merge_adapters",
]
