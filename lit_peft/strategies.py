"""Lightning strategies as conf/strategy/*.yaml build them (where a YAML value needs a Python object)."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's name without the wrapper modules FSDP, activation checkpointing or compile put in its path."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def gathered_parameters(strategy, module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """`module`'s parameters by plain name, whole on every rank (gathered from FSDP shards when sharded)."""

    def collect() -> dict[str, torch.Tensor]:
        return {
            plain_name(n): p.detach().clone()
            for n, p in module.named_parameters(remove_duplicate=False)  # tied weights under each of their names
            if p.requires_grad or not trainable_only
        }

    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(strategy.model, writeback=False):
            return collect()
    return collect()


class GatheringFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, with checkpoints gathered by `summon_full_params` instead of FSDP's state-dict hooks.

    On a GPU run (torch 2.11, use_orig_params, LitGPT blocks that mix frozen base and trainable adapter weights),
    FSDP's full-state-dict hook asserted that frozen parameters were missing; gathering the parameters directly
    avoids the hooks. Adapter runs save only the trainable parameters (the module's `save_full_state` is False).
    """

    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        module = self.lightning_module
        trainable_only = not getattr(module, "save_full_state", True)
        return gathered_parameters(self, module, trainable_only)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        state = checkpoint["state_dict"]
        with FSDP.summon_full_params(self.model, writeback=True), torch.no_grad():
            params = {plain_name(n): p for n, p in self.lightning_module.named_parameters()}
            unknown = set(state) - set(params)
            if unknown:
                raise KeyError(f"checkpoint holds parameters this model lacks: {sorted(unknown)[:3]}")
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))


def fsdp(wrap: list[str] | None = None, activation_checkpointing: list[str] | None = None, **kwargs: Any):
    """FSDPStrategy that shards per module class (by import path), e.g. one unit per LitGPT transformer Block.

    With frozen base weights and trainable adapters in one unit, `use_orig_params=True` keeps the mix legal.
    """
    wrap_classes = {get_class(path) for path in wrap or []}
    checkpoint_classes = {get_class(path) for path in activation_checkpointing or []}
    return GatheringFSDPStrategy(
        auto_wrap_policy=wrap_classes or None, activation_checkpointing_policy=checkpoint_classes or None, **kwargs
    )


class TrainableFloat32Precision(HalfPrecision):
    """Lightning's `bf16-true` / `16-true`, but parameters that train stay float32 (adapters cast to the activations'
    dtype in their forward), so that small updates are not rounded away.

    The upcast happens where Lightning converts the module, before the strategy moves and wraps it: DDP then registers
    its gradient hooks on the float32 parameters. (Done after wrapping, e.g. in `configure_optimizers`, it would swap
    the parameters' storage under DDP's hooks and their gradients would no longer be all-reduced.)
    """

    def convert_module(self, module: nn.Module) -> nn.Module:
        # The float32 values themselves are kept, not a round trip through half precision: on resume, Lightning has
        # already loaded the checkpoint's float32 adapter weights into the module.
        keep = {p: p.data for p in module.parameters() if p.requires_grad}
        module = super().convert_module(module)
        if getattr(module, "trainable_float32", False):
            for p, data in keep.items():
                p.data = data.float()
        return module


def precision_plugin(precision: str, strategy: Any) -> TrainableFloat32Precision | None:
    """The precision plugin for `-true` half precision on one device or DDP (None: Lightning's own from the string;
    FSDP and DeepSpeed bring their own precision plugins)."""
    if precision not in ("bf16-true", "16-true"):
        return None
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if name not in ("auto", "ddp", "DDPStrategy", "SingleDeviceStrategy"):
        return None
    return TrainableFloat32Precision(precision)
