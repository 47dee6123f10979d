"""Lightning strategies as conf/strategy/*.yaml build them (where a YAML value needs a Python object)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lit_peft.errors import UserError

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


STATE_DICT_TYPES = ("full", "sharded")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
SHARDED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint folder


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a sharded (distributed) checkpoint folder as `state_dict_type: sharded` writes it."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def cqil_member(module: nn.Module) -> bool:
    """Whether `module` is a block of a CQIL group (its group leader runs the members' forwards itself)."""
    return "_cqil_original" in vars(module)


def check_fsdp_settings(
    state_dict_type: Any = "full", sharding_strategy: Any = "FULL_SHARD", use_orig_params: Any = True, **_: Any
) -> None:
    """strategy=fsdp's own settings (one-line UserError naming the value and the valid ones); also run by
    lit_peft.cli.validate before anything is loaded."""
    if state_dict_type not in STATE_DICT_TYPES:
        raise UserError(f"strategy.state_dict_type={state_dict_type}; valid: {', '.join(STATE_DICT_TYPES)}")
    if isinstance(sharding_strategy, str) and sharding_strategy not in SHARDING_STRATEGIES:
        raise UserError(f"strategy.sharding_strategy={sharding_strategy}; valid: {', '.join(SHARDING_STRATEGIES)}")
    if use_orig_params is not True:
        raise UserError(
            f"strategy.use_orig_params={use_orig_params}; valid: true (frozen base and trainable adapter weights "
            "share FSDP units)"
        )


def check_resume_strategy(path: str | Path | None, strategy_cfg: Any) -> None:
    """A sharded checkpoint folder resumes only under strategy=fsdp (one line naming both otherwise)."""
    if path is None or not is_sharded_checkpoint(path):
        return
    target = str(strategy_cfg.get("_target_", strategy_cfg.get("name", "auto")))
    if target != f"{__name__}.fsdp":
        raise UserError(
            f"checkpoint {path} is sharded (strategy.state_dict_type=sharded) and strategy {target} cannot read it; "
            "valid: strategy=fsdp (any number of devices; with strategy.state_dict_type=full its next checkpoints "
            "are single files that resume anywhere)"
        )


def dtype_uniform_units(model: nn.Module, wrap_classes: tuple[type, ...], ignored: list[nn.Module]) -> set[nn.Module]:
    """The modules to wrap as FSDP units: those of `wrap_classes` (not CQIL group members), and every module whose own
    parameters have another dtype than the unit around it (FSDP flattens each unit into one tensor of one dtype).

    With float32 adapters over a half-precision base (`-true`), an adapted Linear becomes a unit of its own (float32)
    and its frozen base Linear another (half precision); in one dtype the units are the blocks (and the root).
    """
    skip = {id(p) for m in ignored for p in m.parameters()}
    units: set[nn.Module] = set()

    def visit(module: nn.Module, unit: dict[str, torch.dtype]) -> None:
        if any(module is m for m in ignored):
            return
        if isinstance(module, wrap_classes) and not cqil_member(module):
            units.add(module)
            unit = {}
        dtypes = {p.dtype for p in module.parameters(recurse=False) if id(p) not in skip}
        if len(dtypes) > 1:
            raise UserError(
                f"{type(module).__name__} holds parameters of several dtypes ({dtypes}); FSDP cannot shard it"
            )
        if dtypes:
            (dtype,) = dtypes
            if unit.setdefault("dtype", dtype) != dtype:
                units.add(module)
                unit = {"dtype": dtype}
        for child in module.children():
            visit(child, unit)

    visit(model, {})
    return units


class PeftFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP (FSDP1, `FullyShardedDataParallel` with `use_orig_params`) for adapter and full fine-tuning.

    What differs from Lightning's FSDPStrategy, and why:
    - The model is wrapped once per Trainer: `trainer.validate` before `fit` (and after it) reuses the same FSDP root.
      Wrapping again would find the blocks already wrapped and leave the LightningModule without a root unit, whose
      parameters then stay sharded in forward ('weight must be 2-D'), whose state dicts miss keys ('FSDP assumes ...
      norm_1.weight is in the state_dict') and whose units never leave their backward state ('Cannot manually unshard
      parameters during forward/backward'): what a GPU run with validate-first hit.
    - `device_id` is the root device itself, so the strategy also runs on CPU processes (gloo).
    - Checkpoints go through torch.distributed.checkpoint's state-dict API (`get_/set_model_state_dict`,
      `get_/set_optimizer_state_dict`): `state_dict_type: full` gathers one file in the plain single-process format
      (optimizer state keyed by parameter index), which resumes in one process, under DDP or FSDP on any world size;
      `sharded` writes a folder with every rank's shards (torch.distributed.checkpoint) and Lightning's `meta.pt`,
      which resumes under FSDP on any world size. Adapter runs save only the trainable parameters. Both are written
      into a staging folder and renamed into place. On CPU, tensors are not "offloaded" (FSDP frees the storage of a
      CPU-to-CPU offload, which crashes).
    - 4-bit (bitsandbytes) Linears are left out of the flat parameters (FSDP's `ignored_states`): they are frozen,
      packed uint8 with quantization state, and stay whole on every rank (FSDP cannot flatten them with float
      weights); everything else is sharded.
    - Units are split where dtypes would mix (`dtype_uniform_units`): under `-true` an adapter's float32 weights and
      its half-precision base Linear get units of their own, as FSDP flattens each unit into one dtype.
    - Blocks of CQIL groups are not wrapped as units of their own: a group's leader runs the other members' forwards,
      which FSDP only unshards through their unit's own call. They stay in the root unit, gathered for the step.
    """

    def __init__(
        self,
        wrap_classes: set[type] | None = None,
        state_dict_type: str = "full",
        sharding_strategy: str = "FULL_SHARD",
        use_orig_params: bool = True,
        **kwargs: Any,
    ) -> None:
        check_fsdp_settings(state_dict_type, sharding_strategy, use_orig_params)
        super().__init__(
            state_dict_type=state_dict_type, sharding_strategy=sharding_strategy, use_orig_params=True, **kwargs
        )
        self.wrap_classes = tuple(wrap_classes or ())
        self._wrapped: tuple[nn.Module, nn.Module] | None = None

    @property
    def state_dict_type(self) -> str:
        return self._state_dict_type

    def wrap_policy(self, model: nn.Module, ignored: list[nn.Module]):
        """FSDP units: every module of `wrap_classes` except CQIL group members, and, where a unit would mix dtypes
        (float32 adapters in a half-precision block under `-true`), the modules that start another dtype."""
        from torch.distributed.fsdp.wrap import CustomPolicy

        units = dtype_uniform_units(model, self.wrap_classes, ignored)
        return CustomPolicy(lambda m: m in units) if units else None

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from lit_peft.methods.quantize import is_quantized

        if self._wrapped is not None and self._wrapped[0] is model:
            return self._wrapped[1]  # the same LightningModule in a later trainer.validate/fit: already sharded
        if any(isinstance(m, FSDP) for m in model.modules()):
            raise UserError("the model is already wrapped in FSDP by another strategy; build a new model")
        quantized = [m for m in model.modules() if is_quantized(m)]
        for m in quantized:  # FSDP moves only what it manages
            m.to(self.root_device)
        wrapped = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            auto_wrap_policy=self.wrap_policy(model, quantized),
            ignored_states=quantized or None,
            **self.kwargs,
        )
        wrapped = super()._setup_model(wrapped)  # Lightning's steps for a wrapped model (activation checkpointing)
        self._wrapped = (model, wrapped)
        return wrapped

    # ---------------------------------------------------------------- checkpoints

    def _options(self, full: bool, trainable_only: bool | None = None):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if trainable_only is None:
            trainable_only = not getattr(self.lightning_module, "save_full_state", True)
        return StateDictOptions(
            full_state_dict=full,
            cpu_offload=full and self.root_device.type != "cpu",  # gathered on rank 0's CPU memory (a GPU run)
            ignore_frozen_params=trainable_only,
            strict=bool(getattr(self.lightning_module, "strict_loading", True)),
        )

    def _model_state(self, full: bool) -> dict[str, Any]:
        """The LightningModule's state dict (gathered or this rank's shards); of an adapter run, only the trainable
        parameters (not the frozen base, nor the quantization state of 4-bit weights)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        options = self._options(full)
        state = get_model_state_dict(self.model, options=options)
        if options.ignore_frozen_params:
            keep = {plain_name(n) for n, p in self.model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in keep}
        return state

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self._model_state(self.state_dict_type == "full")

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        state = get_optimizer_state_dict(self.model, optimizer, options=self._options(self.state_dict_type == "full"))
        if self.state_dict_type == "full" and state:
            state = keyed_by_index(state)  # torch's own format: what one process and DDP save and load
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        if self.state_dict_type == "full":
            if self.is_global_zero:  # atomically, also over a sharded folder of the same name (one rename)
                self.checkpoint_io.save_checkpoint(checkpoint, path)
            self.barrier("full_checkpoint_saved")
            return
        import shutil

        import torch.distributed.checkpoint as dcp

        from lit_peft.checkpoints.files import publish, staging_dir

        staging = Path(self.broadcast(str(staging_dir(path)) if self.is_global_zero else None))
        target = staging / path.name
        try:
            tensors = {"model": checkpoint.pop("state_dict")}
            tensors.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
            dcp.save(tensors, checkpoint_id=target)
            if self.is_global_zero:
                torch.save(checkpoint, target / SHARDED_METADATA)
            self.barrier("sharded_checkpoint_written")
            if self.is_global_zero:
                publish(target, path)  # the whole folder appears (or replaces the previous one) in one rename
        finally:
            self.barrier("sharded_checkpoint_published")
            if self.is_global_zero:
                shutil.rmtree(staging, ignore_errors=True)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers] if fitting else []
        if is_sharded_checkpoint(path):
            import torch.distributed.checkpoint as dcp

            options = self._options(full=False)
            tensors = {"model": self._model_state(full=False)}
            tensors.update(
                {
                    f"optimizer_{i}": get_optimizer_state_dict(self.model, o, options=options)
                    for i, o in enumerate(optimizers)
                }
            )
            dcp.load(tensors, checkpoint_id=path)
            set_model_state_dict(self.model, tensors["model"], options=options)
            for i, o in enumerate(optimizers):
                set_optimizer_state_dict(self.model, o, tensors[f"optimizer_{i}"], options=options)
            return torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
        if not path.is_file():
            raise FileNotFoundError(
                f"no checkpoint at {path} (a file, or a sharded checkpoint folder with {SHARDED_METADATA})"
            )
        checkpoint = self.checkpoint_io.load_checkpoint(path)
        options = self._options(full=True)
        options = type(options)(**{**vars(options), "cpu_offload": False})  # every rank loads its shards itself
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        saved = checkpoint.get("optimizer_states") or []
        if fitting and saved:
            if len(saved) != len(optimizers):
                raise RuntimeError(
                    f"the checkpoint holds {len(saved)} optimizer states, this run has {len(optimizers)}"
                )
            for o, state in zip(optimizers, saved, strict=True):
                set_optimizer_state_dict(self.model, o, keyed_by_name(state, self.model, o), options=options)
        return checkpoint


def keyed_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter name (torch.distributed.checkpoint's) -> keyed by index, in the order
    of the optimizer's parameter groups (torch's own `Optimizer.state_dict` format)."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: s for name, s in state["state"].items()}, "param_groups": groups}


def keyed_by_name(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of `keyed_by_index` for `optimizer`'s parameters (by their names in `model`); a state already keyed
    by name is returned as it is."""
    if all(isinstance(k, str) for k in state.get("state", {})) and all(
        isinstance(n, str) for g in state["param_groups"] for n in g["params"]
    ):
        return state
    names = {id(p): plain_name(n) for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def fsdp(wrap: list[str] | None = None, activation_checkpointing: list[str] | None = None, **kwargs: Any):
    """PeftFSDPStrategy that shards per module class (by import path), e.g. one unit per LitGPT transformer Block.

    With frozen base weights and trainable adapters in one unit, `use_orig_params=True` keeps the mix legal.
    """
    wrap_classes = {get_class(path) for path in wrap or []}
    checkpoint_classes = {get_class(path) for path in activation_checkpointing or []}
    return PeftFSDPStrategy(
        wrap_classes=wrap_classes, activation_checkpointing_policy=checkpoint_classes or None, **kwargs
    )
