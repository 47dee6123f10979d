"""The method registry: name -> Method. Adding a method = one module here + one YAML in conf/method/."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lit_peft.errors import UserError
from lit_peft.methods.base import (
    TARGETS,
    AdapterLinear,
    Method,
    MethodSettings,
    adapters,
    adapters_disabled,
    merge_adapters,
)
from lit_peft.methods.dora import DoRA
from lit_peft.methods.ether import Ether, EtherPlus, EtherPlusHH
from lit_peft.methods.full import Full
from lit_peft.methods.hra import HRA
from lit_peft.methods.lora import LoRA
from lit_peft.methods.oft import OFT

METHODS: dict[str, type[Method]] = {m.name: m for m in (Full, LoRA, DoRA, HRA, Ether, EtherPlus, EtherPlusHH, OFT)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]()


# Keys of a conf/method/*.yaml node that are not settings of the adapter: `lr` is the learning rate that works for
# the method, the default of optim.lr (`lr: ${method.lr}` in conf/config.yaml). It is dropped here, so an adapter's
# recorded settings never hold it (the run's resolved config, saved beside them, holds both method.lr and optim.lr).
NOT_SETTINGS = ("lr",)


def build_settings(name: str, values: dict[str, Any]) -> tuple[Method, MethodSettings]:
    """The Method for `name` and its validated settings (from a Hydra node or a saved adapter_config.json)."""
    method = get_method(name)
    lr = values.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise UserError(f"method.lr={lr} is not valid; expected a number > 0 (the method's default optim.lr)")
    return method, method.Settings.from_dict({k: v for k, v in values.items() if k not in NOT_SETTINGS})


def regularization(model: nn.Module) -> torch.Tensor | None:
    """The sum of the adapters' own loss terms (`regularizer()`, e.g. HRA's orthogonality penalty), added to the task
    loss once per optimizer step; None when no adapter has one."""
    terms = [t for _, m in adapters(model) if (t := getattr(m, "regularizer", lambda: None)()) is not None]
    return torch.stack(terms).sum() if terms else None


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
    "regularization",
]
