"""Multiplicative adapters: W' = T_out W T_in with block-diagonal T, applied to activations, never to W.

`BlockTransform` is a (width x width) block-diagonal matrix with `nb` equal blocks; it acts on the last dimension
of activations block by block. `TransformLinear` puts one on the input side and/or the output side of a frozen
Linear, separately for every part (q, k and v of a fused qkv each get their own, as three Linears would):

    input side:  y_p = W_p (T_in_p x) + b_p           (reflect/rotate the input blocks, then the base matmul)
    output side: y_p = T_out_p (W_p x + b_p)           (the base matmul, then transform the output blocks)

so a step costs the base matmul plus O(width) (reflections) or O(width * block) (rotations) per token. The dense
T_out W T_in is formed only by `merged_parameters()`, once, for merge.

Each transform is an autograd.Function with a hand-written backward (`ether.Reflect`, `oft.Rotate`) that keeps only
its input and a few numbers per token, never the transformed activation. On the input side of a fused qkv, the parts'
matmuls write into one output (`GroupedLinear`: no concatenation, no reordering, for either qkv layout); over a 4-bit
base, the frozen weight is dequantized again in backward instead of kept dense until then.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from lit_peft.methods.base import AdapterLinear, Method, MethodSettings, Part
from lit_peft.quantize import dense_weight, is_quantized


class BlockTransform(nn.Module):
    """A block-diagonal matrix acting on the last dimension of activations: x_b <- T_b x_b for each block b.

    `nb` blocks, or blocks of `block_size` features (then nb = width / block_size); either must divide `width`.
    """

    def __init__(self, width: int, where: str, nb: int | None = 1, block_size: int | None = None) -> None:
        super().__init__()
        what, value = ("block_size", block_size) if block_size is not None else ("nb", nb)
        if not (isinstance(value, int) and value >= 1 and width % value == 0):
            divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
            raise ValueError(
                f"{what}={value} does not divide the width {width} of the {where}; valid {what} here: "
                f"{', '.join(map(str, divisors))}{', ...' if width > 64 else ''}"
            )
        self.width, self.nb = width, value if block_size is None else width // value
        self.block = width // self.nb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> torch.Tensor:
        """The dense blocks, (nb, block, block)."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The whole (width, width) block-diagonal matrix (for merge and tests)."""
        return torch.block_diag(*self.blocks().unbind(0))


def _runs(rows: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """`rows` (ascending) as maximal runs of consecutive indices: ((start, stop), ...)."""
    breaks = (rows.diff() != 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *breaks, len(rows)]
    return tuple((int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True))


class GroupedLinear(torch.autograd.Function):
    """y (..., out) of a frozen Linear whose row groups read different inputs: y[..., rows_g] = x_g W[rows_g]^T + b.

    `runs[g]` lists group g's rows as (start, stop) runs; each run is one matmul written straight into y, so there is
    no concatenation or reordering pass. The weight is frozen, so backward needs only W (grad_x_g = sum over runs of
    grad_y[..., run] W[run]); it is the parameter itself, or, for a 4-bit base (`quantized`, with `weight` None),
    dequantized again in backward: autograd keeps no dense copy of a 4-bit weight.
    """

    @staticmethod
    def forward(ctx, weight, bias, quantized, runs, *xs):  # noqa: ANN001, ANN205 (autograd.Function signature)
        w = weight if quantized is None else dense_weight(quantized)  # (out, in)
        y = xs[0].new_empty(*xs[0].shape[:-1], w.shape[0])
        y2 = y.view(-1, w.shape[0])  # (tokens, out)
        for x, group in zip(xs, runs, strict=True):
            x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
            for start, stop in group:  # in place into y's columns (beta=0: their old contents are not read)
                y2[:, start:stop].addmm_(x2, w[start:stop].t(), beta=0)
        if bias is not None:
            y2.add_(bias)
        ctx.save_for_backward(weight)
        ctx.quantized, ctx.runs = quantized, runs
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (weight,) = ctx.saved_tensors
        w = weight if ctx.quantized is None else dense_weight(ctx.quantized)
        g2 = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grads = []
        for i, group in enumerate(ctx.runs):
            gx = None
            if ctx.needs_input_grad[4 + i]:
                for start, stop in group:
                    part = g2[:, start:stop] @ w[start:stop]  # (tokens, in)
                    gx = part if gx is None else gx.add_(part)
                gx = gx.view(*grad.shape[:-1], -1)
            grads.append(gx)
        return None, None, None, None, *grads


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
            self.t_in = nn.ModuleList(make_input(width=base.in_features, where=_side("input", p)) for p in parts)
        if make_output is not None:
            self.t_out = nn.ModuleList(make_output(width=len(p.rows), where=_side("output", p)) for p in parts)
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
        self.runs = tuple(_runs(g) for g in self.groups)

    def _take(self, t: torch.Tensor, i: int, dim: int = -1) -> torch.Tensor:
        """Group i's rows of t along `dim`: a view when they are one run."""
        if len(self.runs[i]) == 1:
            start, stop = self.runs[i][0]
            return t.narrow(dim, start, stop - start)
        return t.index_select(dim, self.groups[i].to(t.device))

    def _linear(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """The frozen Linear, group i reading xs[i]; a 4-bit base keeps only its 4-bit weight for backward."""
        if len(xs) == 1:
            return self.base(xs[0])  # one group: all rows, in order
        if is_quantized(self.base):
            return GroupedLinear.apply(None, self.base.bias, self.base, self.runs, *xs)
        return GroupedLinear.apply(self.base.weight, self.base.bias, None, self.runs, *xs)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        n_parts = len(self.part_names)
        if self.t_in is None:
            y = self.base(x)  # (..., out): one fused matmul
        else:
            y = self._linear([self.t_in[i](x) if i < n_parts else x for i in range(len(self.groups))])
        if self.t_out is None:
            return y
        if len(self.groups) == 1:
            return self.t_out[0](y)
        outs = [self.t_out[i](self._take(y, i)) if i < n_parts else self._take(y, i) for i in range(len(self.groups))]
        y = torch.cat(outs, dim=-1)
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


def _side(side: str, part: Part) -> str:
    """Where a transform sits, for messages: 'input of query in transformer.h.0.attn.qkv'."""
    names = [n for n in (part.name if part.name != "all" else "", part.linear) if n]
    return f"{side} of {' in '.join(names)}" if names else side


@dataclasses.dataclass(frozen=True)
class BlockSettings(MethodSettings):
    """Settings shared by the block-transform methods (the ETHER family, OFT).

    Blocks are given as a count `nb` or as a width `block_size` (then nb = width / block_size for each transformed
    side); not both. With neither, nb is the method's `default_nb`.
    """

    default_nb: ClassVar[int] = 1
    nb: int | None = None  # diagonal blocks; must divide the width of the transformed side
    block_size: int | None = None  # features per block instead of nb; must divide the width of the transformed side
    flip_side: bool = False  # transform the output side instead of the input side
    dropout: float = 0.0  # on the input of adapted Linears

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("nb", "block_size"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{key} must be a positive integer or null, got {value!r}")
        if self.nb is not None and self.block_size is not None:
            raise ValueError(f"nb={self.nb} and block_size={self.block_size} both given; give one (the other null)")
        if self.nb is None and self.block_size is None:
            object.__setattr__(self, "nb", self.default_nb)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class BlockTransformMethod(Method):
    """A method that is a `BlockTransform` on one side of each target (or on both, with `both_sides`)."""

    Settings: ClassVar[type[MethodSettings]] = BlockSettings
    transform: ClassVar[type[BlockTransform]]
    both_sides: ClassVar[bool] = False

    def make_adapter(self, base: nn.Linear, parts: list[Part], settings: BlockSettings) -> TransformLinear:
        side = partial(self.transform, nb=settings.nb, block_size=settings.block_size)
        on_input = self.both_sides or not settings.flip_side
        on_output = self.both_sides or settings.flip_side
        return TransformLinear(
            base,
            parts,
            make_input=side if on_input else None,
            make_output=side if on_output else None,
            dropout=settings.dropout,
        )
