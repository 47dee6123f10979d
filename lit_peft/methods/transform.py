"""Multiplicative adapters: W' = T_out W T_in with block-diagonal T, applied to activations, never to W.

`BlockTransform` is a (width x width) block-diagonal matrix with `nb` equal blocks; it acts on the last dimension
of activations block by block. `TransformLinear` puts one on the input side and/or the output side of a frozen
Linear, separately for every part (q, k and v of a fused qkv each get their own, as three Linears would):

    input side:  y_p = W_p (T_in_p x) + b_p           (reflect/rotate the input blocks, then the base matmul)
    output side: y_p = T_out_p (W_p x + b_p)           (the base matmul, then transform the output blocks)

so a step costs the base matmul plus O(width) (reflections) or O(width * block) (rotations) per token. The dense
T_out W T_in is formed only by `merged_parameters()`, once, for merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.methods.base import AdapterLinear, Method, MethodSettings, Part


class BlockTransform(nn.Module):
    """A block-diagonal matrix acting on the last dimension of activations: x_b <- T_b x_b for each block b."""

    def __init__(self, width: int, nb: int, where: str) -> None:
        super().__init__()
        if nb < 1 or width % nb:
            divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
            raise ValueError(
                f"nb={nb} does not divide the width {width} of the {where}; valid nb here: "
                f"{', '.join(map(str, divisors))}{', ...' if width > 64 else ''}"
            )
        self.width, self.nb, self.block = width, nb, width // nb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> torch.Tensor:
        """The dense blocks, (nb, block, block)."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The whole (width, width) block-diagonal matrix (for merge and tests)."""
        return torch.block_diag(*self.blocks().unbind(0))


def _contiguous(rows: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) if `rows` is a run of consecutive indices, else None."""
    start, stop = int(rows[0]), int(rows[-1]) + 1
    return (start, stop) if stop - start == len(rows) and bool((rows.diff() == 1).all()) else None


class TransformLinear(AdapterLinear):
    def __init__(
        self,
        base: nn.Linear,
        parts: list[Part],
        make_input: Callable[..., BlockTransform] | None,
        make_output: Callable[..., BlockTransform] | None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base, parts)
        if make_input is None and make_output is None:
            raise ValueError("a transform adapter needs an input-side or an output-side transform")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.t_in = self.t_out = None
        if make_input is not None:
            self.t_in = nn.ModuleList(make_input(width=base.in_features, where=f"input of {p.name}") for p in parts)
        if make_output is not None:
            self.t_out = nn.ModuleList(make_output(width=len(p.rows), where=f"output of {p.name}") for p in parts)
        # Rows no part owns (e.g. k of a qkv adapted on q and v only) pass through as the plain base output.
        covered = torch.zeros(base.out_features, dtype=torch.bool)
        covered[self.rows] = True
        self.groups: list[torch.Tensor] = [p.rows for p in parts]
        rest = (~covered).nonzero().flatten()
        if len(rest):
            self.groups.append(rest)
        order = torch.cat(self.groups)
        self.in_order = bool((order == torch.arange(len(order))).all())
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        self.slices = [_contiguous(g) for g in self.groups]

    def _take(self, t: torch.Tensor, i: int, dim: int) -> torch.Tensor:
        """Rows of group i along `dim` (a view when they are consecutive)."""
        if self.slices[i] is not None:
            start, stop = self.slices[i]
            return t.narrow(dim, start, stop - start)
        return t.index_select(dim, self.groups[i].to(t.device))

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        w, b = self.base_weight(), self.base.bias
        n_parts = len(self.part_names)
        if self.t_in is None:
            y = F.linear(x, w, b)  # (..., out): one fused matmul, then transform each part's output block
            outs = [self._take(y, i, -1) for i in range(len(self.groups))]
        else:
            outs = []
            for i in range(len(self.groups)):
                xi = self.t_in[i](x) if i < n_parts else x
                outs.append(F.linear(xi, self._take(w, i, 0), None if b is None else self._take(b, i, 0)))
        if self.t_out is not None:
            outs = [self.t_out[i](o) if i < n_parts else o for i, o in enumerate(outs)]
        y = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return y if self.in_order else y.index_select(-1, self.inverse)

    def merged_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.base_weight().double().clone()
        bias = self.base.bias.double().clone() if self.base.bias is not None else None
        for i, rows in enumerate(self.groups[: len(self.part_names)]):
            w = weight[rows]  # (rows, in)
            if self.t_in is not None:
                w = w @ self.t_in[i].dense().double()
            if self.t_out is not None:
                t = self.t_out[i].dense().double()
                w = t @ w
                if bias is not None:
                    bias[rows] = t @ bias[rows]
            weight[rows] = w
        return weight, bias


@dataclasses.dataclass(frozen=True)
class BlockSettings(MethodSettings):
    """Settings shared by the block-transform methods (the ETHER family, OFT)."""

    nb: int = 1  # diagonal blocks; must divide the width of the transformed side
    flip_side: bool = False  # transform the output side instead of the input side
    dropout: float = 0.0  # on the input of adapted Linears

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.nb, int) and self.nb >= 1):
            raise ValueError(f"nb must be a positive integer, got {self.nb!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class BlockTransformMethod(Method):
    """A method that is a `BlockTransform` on one side of each target (or on both, with `both_sides`)."""

    Settings: ClassVar[type[MethodSettings]] = BlockSettings
    transform: ClassVar[type[BlockTransform]]
    both_sides: ClassVar[bool] = False

    def make_adapter(self, base: nn.Linear, parts: list[Part], settings: BlockSettings) -> TransformLinear:
        side = partial(self.transform, nb=settings.nb)
        on_input = self.both_sides or not settings.flip_side
        on_output = self.both_sides or settings.flip_side
        return TransformLinear(
            base,
            parts,
            make_input=side if on_input else None,
            make_output=side if on_output else None,
            dropout=settings.dropout,
        )
