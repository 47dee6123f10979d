"""The contract every method fulfils: which Linears it targets, the adapter module it wraps them in, merge, off switch.

A method never subclasses the model. It swaps target `nn.Linear`s of a loaded LitGPT `GPT` for `AdapterLinear`s
that keep the frozen Linear as `.base` and add their own trainable parameters. On the fused `qkv` Linear, the
adapter sees q, k and v as separate matrices (`parts`), each with its own rows and its own enable flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from litgpt import GPT
from torch import nn

from lit_peft.errors import UserError
from lit_peft.methods.qkv import QKV_LAYOUTS, QKV_PARTS, qkv_rows
from lit_peft.methods.quantize import dense_weight, is_quantized

TARGETS = ("query", "key", "value", "projection", "mlp", "head")
# Attribute names of the MLP Linears across LitGPT's MLP classes (LLaMAMLP, GptNeoxMLP, GemmaMLP).
MLP_LINEARS = ("fc_1", "fc_2", "fc", "proj")
# One MLP Linear each, by its LitGPT name: LLaMA's gate_proj, up_proj, down_proj are mlp.fc_1, mlp.fc_2, mlp.proj;
# GPT-NeoX's MLP has mlp.fc and mlp.proj. `mlp` is the shorthand for all of a model's MLP Linears.
MLP_TARGETS = tuple(f"mlp.{attr}" for attr in MLP_LINEARS)
VALID_TARGETS = TARGETS + MLP_TARGETS


@dataclasses.dataclass(frozen=True)
class Part:
    """A sub-matrix of a Linear that an adapter treats as its own: rows of the output it owns."""

    name: str
    rows: torch.Tensor  # (n_rows,) indices into the Linear's output features
    linear: str = ""  # the Linear's name in the model, for messages


class AdapterLinear(nn.Module):
    """A frozen Linear plus a method's trainable parameters.

    `parts` lists the output-row groups that get an adapter (one "all" part for a plain Linear; some of
    query/key/value for fused qkv). Subclasses implement `adapted(x)`, the adapted output, and `merged_parameters()`,
    the dense weight and bias that give the same output (for merge and for tests against the definition).
    """

    def __init__(self, base: nn.Linear, parts: list[Part]) -> None:
        super().__init__()
        if not parts:
            raise UserError("an adapter needs at least one part")
        self.base = base
        self.base.requires_grad_(False)
        self.part_names = [p.name for p in parts]
        rows = torch.cat([p.rows for p in parts])
        self.register_buffer("rows", rows, persistent=False)
        self.part_sizes = [len(p.rows) for p in parts]
        # Adapted rows in natural order [0, out): the output can be replaced whole instead of scattered.
        self.covers_all = len(rows) == base.out_features and bool((rows == torch.arange(len(rows))).all())
        self.enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some litgpt code paths read `.weight` of Linears
        return self.base.weight

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as a dense tensor (dequantized when the base is 4-bit)."""
        return dense_weight(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.adapted(x)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merged_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense (weight, bias) of a plain Linear whose output equals this adapter's, computed in float64."""
        raise NotImplementedError

    def add_to_rows(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """y (..., out) plus delta (..., n_rows) placed at this adapter's rows."""
        if self.covers_all:
            return y + delta
        return y.index_add(-1, self.rows, delta.to(y.dtype))

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain Linear (base dtype and device) whose output equals this adapter's enabled output."""
        w = self.base_weight()
        weight, bias = self.merged_parameters()
        merged = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        merged.weight.copy_(weight)
        if bias is not None:
            merged.bias.copy_(bias)
        return merged


def settings_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """A settings dataclass from a config node or saved JSON; an unknown key is a one-line error naming the valid."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        valid = f"valid settings: {', '.join(sorted(names))}" if names else "it has no settings"
        raise UserError(f"unknown setting {unknown[0]!r} {where}; {valid}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base for every method's settings: validated, serialisable, rebuilt from the saved adapter config."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Settings:
        return settings_from_dict(cls, values, "for this method")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class MethodSettings(Settings):
    """Settings of a method that wraps Linears: which ones (`targets`) and how a fused qkv is laid out."""

    targets: tuple[str, ...] = ("query", "value")
    qkv_layout: str = "concatenated"

    def __post_init__(self) -> None:
        targets = tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        bad = [t for t in targets if t not in VALID_TARGETS]
        if bad or not targets:
            raise UserError(
                f"unknown target {bad[0] if bad else '(none)'!r}; valid targets: {', '.join(VALID_TARGETS)}"
            )
        if self.qkv_layout not in QKV_LAYOUTS:
            raise UserError(f"unknown qkv_layout {self.qkv_layout!r}; valid: {', '.join(QKV_LAYOUTS)}")


class Method:
    """A fine-tuning method: settings type, the adapter it builds, and which parameters train."""

    name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = MethodSettings
    wraps_linears: ClassVar[bool] = True

    def make_adapter(self, base: nn.Linear, parts: list[Part], settings: MethodSettings) -> AdapterLinear:
        raise NotImplementedError

    def apply(self, model: GPT, settings: MethodSettings) -> list[str]:
        """Swap every targeted Linear of `model` for an adapter; freeze everything else. Returns adapted names."""
        model.requires_grad_(False)
        adapted = []
        for name, linear, parts in target_linears(model, settings.targets, settings.qkv_layout):
            parent, attr = _parent(model, name)
            setattr(parent, attr, self.make_adapter(linear, parts, settings))
            adapted.append(name)
        if not adapted:
            raise UserError(f"targets {list(settings.targets)} matched no Linear in the model")
        for target in settings.targets:
            if target in MLP_TARGETS and not any(name.endswith(f".{target}") for name in adapted):
                have = [t for t in MLP_TARGETS if any(n.endswith(f".{t}") for n, _ in model.named_modules())]
                raise UserError(
                    f"target {target} matched no Linear in the model; its MLP Linears are {', '.join(have) or 'none'}"
                )
        return adapted


def target_linears(
    model: GPT, targets: tuple[str, ...], qkv_layout: str
) -> Iterator[tuple[str, nn.Linear, list[Part]]]:
    """(name, Linear, parts) for every Linear that `targets` selects, in module order."""
    config = model.config
    qkv_parts = [p for p in QKV_PARTS if p in targets]
    rows = qkv_rows(config, qkv_layout) if qkv_parts else {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not is_quantized(module):
            continue
        *_, parent_name, attr = ("", "", *name.split("."))
        if parent_name == "attn" and attr == "qkv":
            if qkv_parts:
                yield name, module, [Part(p, rows[p], name) for p in qkv_parts]
            continue
        selected = (
            (parent_name == "attn" and attr == "proj" and "projection" in targets)
            or (parent_name == "mlp" and attr in MLP_LINEARS and ("mlp" in targets or f"mlp.{attr}" in targets))
            or (name == "lm_head" and "head" in targets)
        )
        if selected:
            yield name, module, [Part("all", torch.arange(module.out_features), name)]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def adapters(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model as its frozen base: every adapter off for the duration (teachers, DPO references)."""
    mods = [m for _, m in adapters(model)]
    previous = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, was in zip(mods, previous, strict=False):
            m.enabled = was


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its base Linear in place; the model becomes a plain LitGPT model. Returns the count."""
    found = list(adapters(model))
    if not found:
        raise UserError("nothing to merge: the model has no adapters (already merged, or trained with method=full)")
    for name, module in found:
        parent, attr = _parent(model, name)
        setattr(parent, attr, module.merged_linear())
    return len(found)
