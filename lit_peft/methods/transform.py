"""Multiplicative adapters: W' = T_out W T_in with block-diagonal T, applied to activations, never to W.

`BlockTransform` is a (width x width) block-diagonal matrix with `nb` equal blocks; it acts on the last dimension
of activations block by block. `TransformLinear` puts one on the input side and/or the output side of a frozen
Linear, separately for every part (q, k and v of a fused qkv each get their own, as three Linears would):

    input side:  y_p = W_p (T_in_p x) + b_p           (reflect/rotate the input blocks, then the base matmul)
    output side: z_p = T_out_p (W_p x + b_p)           (the base matmul, then transform the output blocks)

so a step costs the base matmul plus O(width) (reflections) or O(width * block) (rotations) per token. The dense
T_out W T_in is formed only by `merged_parameters()`, once, for merge.

Speed on a CPU is passes over activations (memory-bound), so one autograd.Function (`TransformLinearFunction`) runs
a whole adapted Linear: the parts' transformed inputs share one buffer, their matmuls write straight into the
output's rows (either qkv layout, no concatenation or reordering), and backward transforms the gradient in place.
A Householder-type input side (ETHER, ETHER+) can instead run as one matmul for all parts plus a low-rank correction
per part, W_p H_p x = W_p x + (W_p D_p S) (D_p^T x); `TransformLinear.low_rank_is_cheaper` picks the route per Linear
and batch size (the correction has rank K nb, so it pays on long batches, small nb and the fused qkv).
Either way it keeps for backward only the input x (input side), a few coefficients per token and the small transform
factors, and for an output side one activation: a Householder-type side transforms the base output in place and
keeps the Linear's output (what the next layer often keeps anyway, e.g. SiLU its input; backward corrects for it with
a K x K Gram matrix per block), a rotation (OFT) keeps the base output W x + b. The frozen weight is the parameter
itself, or, over a 4-bit base, dequantized again in backward instead of kept dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from lit_peft.errors import UserError
from lit_peft.methods.base import AdapterLinear, Method, MethodSettings, Part
from lit_peft.methods.quantize import dense_weight, is_quantized


class BlockTransform(nn.Module):
    """A block-diagonal matrix acting on the last dimension of activations: x_b <- T_b x_b for each block b.

    `nb` blocks, or blocks of `block_size` features (then nb = width / block_size); either must divide `width`.
    A subclass gives `factor()`, the small differentiable tensor that defines T (unit directions, a rotation), and
    the two kernels on activations viewed as (tokens, nb, block), without autograd:
        apply_blocks(x, f, out)            -> (T x, what backward needs besides x)   [into `out` when given]
        grad_blocks(grad, x, f, saved, out) -> (T^T grad, grad of f)                 [into `out`; it may be `grad`]
    """

    # Householder-type transforms (I + sum_k s_k d_k d_k^T per block, unit directions as the factor) give their
    # signs s: an input side of theirs can also run as a low-rank correction (see `TransformLinearFunction`).
    signs: ClassVar[tuple[float, ...] | None] = None

    def __init__(self, width: int, where: str, nb: int | None = 1, block_size: int | None = None) -> None:
        super().__init__()
        what, value = ("block_size", block_size) if block_size is not None else ("nb", nb)
        if not (isinstance(value, int) and value >= 1 and width % value == 0):
            divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
            raise UserError(
                f"{what}={value} does not divide the width {width} of the {where}; valid {what} here: "
                f"{', '.join(map(str, divisors))}{', ...' if width > 64 else ''}"
            )
        self.width, self.nb = width, value if block_size is None else width // value
        self.block = width // self.nb

    def factor(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def apply_blocks(
        cls, x: torch.Tensor, f: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @classmethod
    def grad_blocks(
        cls, grad: torch.Tensor, x: torch.Tensor, f: torch.Tensor, saved: torch.Tensor | None, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # Kinds whose output side can keep its output instead of its input for backward (see `grad_blocks_from_output`).
    grad_blocks_from_output: ClassVar[Callable[..., tuple[torch.Tensor, torch.Tensor]] | None] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor().to(x.dtype)
        return BlockFunction.apply(x.reshape(x.shape[:-1].numel(), self.nb, self.block), f, type(self)).view(x.shape)

    def blocks(self) -> torch.Tensor:
        """The dense blocks, (nb, block, block)."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The whole (width, width) block-diagonal matrix (for merge and tests)."""
        return torch.block_diag(*self.blocks().unbind(0))


class BlockFunction(torch.autograd.Function):
    """y = T x for x (tokens, nb, block) with a `BlockTransform` subclass's kernels (a transform on its own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f: torch.Tensor, kind: type[BlockTransform]) -> torch.Tensor:
        y, saved = kind.apply_blocks(x, f)
        ctx.save_for_backward(x, f, saved)
        ctx.kind = kind
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, f, saved = ctx.saved_tensors
        grad_x, grad_f = ctx.kind.grad_blocks(grad, x, f, saved, None)
        return grad_x, grad_f, None


def _runs(rows: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """`rows` (ascending) as maximal runs of consecutive indices: ((start, stop), ...)."""
    breaks = (rows.diff() != 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *breaks, len(rows)]
    return tuple((int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True))


class Group(NamedTuple):
    """A row group of the adapted Linear: its rows as runs, and its input and output transforms (kind and the index
    of its factor among the Function's factors), None for the rows no part owns."""

    runs: tuple[tuple[int, int], ...]
    t_in: tuple[type[BlockTransform], int] | None
    t_out: tuple[type[BlockTransform], int] | None


def _cols(t: torch.Tensor, runs: tuple[tuple[int, int], ...], dim: int = 1) -> torch.Tensor:
    """The columns `runs` of t (tokens, out), or with dim=0 its rows (a weight's): a view for one run, else a copy."""
    if len(runs) == 1:
        return t.narrow(dim, runs[0][0], runs[0][1] - runs[0][0])
    return torch.cat([t.narrow(dim, a, b - a) for a, b in runs], dim=dim)


def _put_cols(t: torch.Tensor, runs: tuple[tuple[int, int], ...], value: torch.Tensor) -> None:
    """t[:, runs] = value, value (tokens, sum of the run lengths)."""
    offset = 0
    for a, b in runs:
        t[:, a:b].copy_(value[:, offset : offset + b - a])
        offset += b - a


def _blocks(t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """t (tokens, width) viewed as (tokens, nb, b); b is the factor's last dimension (directions (K, nb, b),
    rotations (nb, b, b))."""
    return t.view(t.shape[0], -1, f.shape[-1])


def _rows_matmul(
    g: torch.Tensor, w: torch.Tensor, runs: tuple[tuple[int, int], ...], out: torch.Tensor | None
) -> torch.Tensor:
    """sum over the runs of g[:, run] w[run]: (tokens, in), written into `out` when given."""
    for j, (a, b) in enumerate(runs):
        if out is None:
            out = g[:, a:b] @ w[a:b]
        else:
            out.addmm_(g[:, a:b], w[a:b], beta=0 if j == 0 else 1)
    return out


def _owned(plan: tuple[Group, ...], factors: tuple[torch.Tensor, ...]) -> list[tuple[Group, int, slice]]:
    """The groups with an input transform: the group, the index of its factor, and the slice of its K directions
    among every group's directions stacked (as `_input_coefficients` takes them)."""
    owned, k0 = [], 0
    for group in plan:
        if group.t_in is not None:
            i = group.t_in[1]
            owned.append((group, i, slice(k0, k0 + factors[i].shape[0])))
            k0 += factors[i].shape[0]
    return owned


def _input_coefficients(x2: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """c[t, k, n] = d_kn . x_tn for x2 (tokens, in) and every group's unit directions stacked (sum of K, nb, b):
    (tokens, sum of K, nb), one batched matmul over the blocks that reads x once."""
    nb, b = directions.shape[1:]
    c = torch.bmm(x2.view(-1, nb, b).transpose(0, 1), directions.permute(1, 2, 0))  # (nb, tokens, sum of K)
    return c.permute(1, 2, 0).contiguous()


def _signed_products(w_g: torch.Tensor, d: torch.Tensor, signs: tuple[float, ...]) -> torch.Tensor:
    """P[k*nb + n, o] = s_k W_g[o, block n] . d_kn for a group's rows of the weight (rows, in): (K * nb, rows).
    W_g (H - I) x = C P for C[t, k*nb + n] = d_kn . x_tn: the input transform as a low-rank correction."""
    k, nb, b = d.shape
    p = torch.einsum("onb,knb->kno", w_g.view(-1, nb, b), d) * d.new_tensor(signs)[:, None, None]
    return p.reshape(k * nb, -1)


class TransformLinearFunction(torch.autograd.Function):
    """z = T_out (W T_in x + b), per row group, for x (tokens, in): the whole adapted Linear in one Function.

    The input side takes one of two routes (`low_rank`), chosen per shape by `TransformLinear`:
    - direct: for each group, T_in x into one reused buffer, then its rows of y = W x' + b by matmuls written in place;
      backward: for each group grad_x' = grad_y[rows] W[rows], whose T_in^T is taken in place and summed into grad_x.
      Passes over activations grow with the number of groups (q, k and v of a fused qkv each transform x).
    - low_rank (Householder-type transforms, T_in = I + D S D^T with K unit directions per block): y = W x + b
      + C P, one matmul for all rows plus per group C (tokens, K nb) = D^T x, read from x once for every group, times
      P = S (W D)^T (K nb, rows); backward: grad_x = grad_y W + D (grad_y P^T) and the directions' gradients from
      grad_y P^T and C^T grad_y. Skinny matmuls of width K nb instead of passes over activations.
    Then z = T_out y per group: in place on y when every output kind has `grad_blocks_from_output` (Householder-type),
    else into a new tensor. Backward: grad_y = T_out^T grad_z, then the input side's backward. Saved: x (input side),
    z or y (output side), the kernels' per-token coefficients and the factors; the weight is the frozen parameter, or
    read again from a 4-bit `quantized` base.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        quantized: nn.Module | None,
        plan: tuple[Group, ...],
        low_rank: bool,
        *factors: torch.Tensor,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if x2.shape[0] == 0:  # no tokens (e.g. the chunked head's probe): an empty output, zero gradients
            ctx.empty, ctx.shape = True, x.shape
            ctx.save_for_backward(*factors)
            out = weight.shape[0] if quantized is None else quantized.out_features
            return x.new_empty(*x.shape[:-1], out)
        ctx.empty = False
        w = weight if quantized is None else dense_weight(quantized).to(x.dtype)  # (out, in)
        y = x2.new_empty(x2.shape[0], w.shape[0])  # (tokens, out)
        has_input, has_output = plan[0].t_in is not None, plan[0].t_out is not None
        saved_in, saved_out = [None] * len(plan), [None] * len(plan)
        coefficients = None
        if not has_input or low_rank:
            torch.mm(x2, w.t(), out=y)  # one matmul for all rows
        if has_input and low_rank:  # + each group's W (T_in - I) x = C P, written into its rows
            owned = _owned(plan, factors)
            coefficients = _input_coefficients(x2, torch.cat([factors[i] for _, i, _ in owned]))
            for group, i, ks in owned:
                c = coefficients[:, ks].flatten(1)  # (tokens, K nb), a view
                p = _signed_products(_cols(w, group.runs, dim=0), factors[i], group.t_in[0].signs)
                _add_cols(y, group.runs, c, p)
        elif has_input:
            buffer = None  # one buffer for every group's transformed input
            for g, group in enumerate(plan):
                source = x2
                if group.t_in is not None:
                    kind, i = group.t_in
                    f = factors[i]
                    target = None if buffer is None else _blocks(buffer, f)
                    buffer, saved_in[g] = kind.apply_blocks(_blocks(x2, f), f, target)
                    buffer = source = buffer.view(x2.shape)
                for a, b in group.runs:  # beta=0: y's uninitialised rows are not read
                    y[:, a:b].addmm_(source, w[a:b].t(), beta=0)
        if bias is not None:
            y.add_(bias)
        z = y
        # An output side whose kinds can all backpropagate from their output transforms y in place and keeps it.
        in_place = has_output and all(
            group.t_out is None or group.t_out[0].grad_blocks_from_output is not None for group in plan
        )
        if in_place:
            for g, group in enumerate(plan):
                if group.t_out is None:
                    continue
                kind, i = group.t_out
                f = factors[i]
                y_g = _cols(y, group.runs)
                blocks = _blocks(y_g, f)
                _, saved_out[g] = kind.apply_blocks(blocks, f, blocks)  # in place: a view of y, or a copy
                if len(group.runs) > 1:
                    _put_cols(y, group.runs, y_g)
        elif has_output:
            z = torch.empty_like(y)
            for g, group in enumerate(plan):
                y_g = _cols(y, group.runs)
                if group.t_out is None:
                    _put_cols(z, group.runs, y_g)
                    continue
                kind, i = group.t_out
                f = factors[i]
                one_run = len(group.runs) == 1  # then z's columns are a view to write into
                target = _blocks(_cols(z, group.runs), f) if one_run else None
                z_g, saved_out[g] = kind.apply_blocks(_blocks(y_g, f), f, target)
                if not one_run:
                    _put_cols(z, group.runs, z_g.view(y_g.shape))
        ctx.plan, ctx.quantized, ctx.shape, ctx.low_rank, ctx.in_place = plan, quantized, x.shape, low_rank, in_place
        # x only for the input side; for the output side y = W x' + b, or with in_place the output itself; the low-rank
        # route's coefficients; the per-token coefficients of each group's transforms (None for rotations), in and out
        ctx.save_for_backward(
            x2 if has_input else None,
            weight,
            y if has_output else None,
            coefficients,
            *factors,
            *saved_in,
            *saved_out,
        )
        return z.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.empty:  # no tokens: nothing flows back, the factors' gradients are zeros
            grad_x = grad.new_zeros(ctx.shape) if ctx.needs_input_grad[0] else None
            return grad_x, None, None, None, None, None, *(torch.zeros_like(f) for f in ctx.saved_tensors)
        plan, n = ctx.plan, len(ctx.plan)
        x2, weight, y, coefficients, *rest = ctx.saved_tensors
        factors, saved_in, saved_out = rest[: -2 * n], rest[-2 * n : -n], rest[-n:]
        w = weight if ctx.quantized is None else dense_weight(ctx.quantized).to(grad.dtype)
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_f: list[torch.Tensor | None] = [None] * len(factors)
        if y is not None:  # grad_y = T_out^T grad_z, per group
            grad_y = torch.empty_like(g)
            for group, kept in zip(plan, saved_out, strict=True):
                g_g = _cols(g, group.runs)
                if group.t_out is None:
                    _put_cols(grad_y, group.runs, g_g)
                    continue
                kind, i = group.t_out
                one_run = len(group.runs) == 1
                target = _blocks(_cols(grad_y, group.runs), factors[i]) if one_run else None
                blocks = _blocks(_cols(y, group.runs), factors[i])  # the transform's input, or with in_place its output
                grad_blocks = kind.grad_blocks_from_output if ctx.in_place else kind.grad_blocks
                out_g, grad_f[i] = grad_blocks(_blocks(g_g, factors[i]), blocks, factors[i], kept, target)
                if not one_run:
                    _put_cols(grad_y, group.runs, out_g.view(g_g.shape))
            g = grad_y
        if plan[0].t_in is None:  # no input side
            grad_x = g @ w  # (tokens, in): one matmul over all rows
        elif ctx.low_rank:
            grad_x = _low_rank_input_backward(g, w, x2, coefficients, plan, factors, grad_f)
        else:
            grad_x = scratch = None
            for group, kept in zip(plan, saved_in, strict=True):
                if group.t_in is None:  # the rows no part owns (last): their matmul input is x itself
                    for a, b in group.runs:
                        grad_x.addmm_(g[:, a:b], w[a:b])
                    continue
                part = _rows_matmul(g, w, group.runs, None if grad_x is None else scratch)  # grad of T_in x
                kind, i = group.t_in
                f = factors[i]
                blocks = _blocks(part, f)
                _, grad_f[i] = kind.grad_blocks(blocks, _blocks(x2, f), f, kept, blocks)  # T_in^T in place
                if grad_x is None:
                    grad_x = part
                else:
                    grad_x.add_(part)
                    scratch = part
        grad_x = grad_x.view(ctx.shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, *grad_f


def _add_cols(y: torch.Tensor, runs: tuple[tuple[int, int], ...], c: torch.Tensor, p: torch.Tensor) -> None:
    """y[:, runs] += c p for c (tokens, r) and p (r, sum of the run lengths)."""
    offset = 0
    for a, b in runs:
        y[:, a:b].addmm_(c, p[:, offset : offset + b - a])
        offset += b - a


def _low_rank_input_backward(
    g: torch.Tensor,
    w: torch.Tensor,
    x2: torch.Tensor,
    coefficients: torch.Tensor,
    plan: tuple[Group, ...],
    factors: tuple[torch.Tensor, ...],
    grad_f: list[torch.Tensor | None],
) -> torch.Tensor:
    """The low-rank route's backward for y = W x + C P (per group): grad_x, and the directions' gradients added to
    `grad_f`. With E = grad_C = grad_y P^T (tokens, K nb) and grad_P = C^T grad_y:
        grad_x = grad_y W + sum over groups of D E                       (rank-K updates per block)
        grad_d_kn = sum_t E[t, kn] x_tn  +  s_k W_g[:, block n]^T grad_P[kn, :]
    """
    owned = _owned(plan, factors)
    directions = torch.cat([factors[i] for _, i, _ in owned])  # (sum of K, nb, b)
    nb, b = directions.shape[1:]
    tokens = g.shape[0]
    grad_c = torch.empty_like(coefficients)  # (tokens, sum of K, nb)
    for group, i, ks in owned:
        d = factors[i]
        w_g = _cols(w, group.runs, dim=0)  # (rows, in)
        g_g = _cols(g, group.runs)  # (tokens, rows)
        p = _signed_products(w_g, d, group.t_in[0].signs)  # (K nb, rows)
        grad_c[:, ks] = (g_g @ p.t()).view(tokens, -1, nb)
        grad_p = coefficients[:, ks].flatten(1).t() @ g_g  # (K nb, rows)
        signs = d.new_tensor(group.t_in[0].signs)[:, None, None]
        grad_f[i] = torch.einsum("kno,onb->knb", grad_p.view(len(d), nb, -1), w_g.view(-1, nb, b)) * signs
    grad_d = torch.bmm(grad_c.permute(2, 1, 0), x2.view(tokens, nb, b).transpose(0, 1))  # (nb, sum of K, b)
    for _, i, ks in owned:
        grad_f[i] = grad_f[i] + grad_d[:, ks].transpose(0, 1)
    grad_x = g @ w  # (tokens, in)
    blocks = grad_x.view(tokens, nb, b)
    for k in range(len(directions)):  # + D E: a rank-1 update per block and direction (faster than a batched bmm)
        blocks.addcmul_(grad_c[:, k, :, None], directions[k])
    return grad_x


# The input side's cost model, in passes over one element (memory-bound reads and writes), fitted to forward +
# backward times of SmolLM2-135M's Linears on a 2-core CPU at 512 and 4096 tokens (checked end to end with
# bench/methods.py's "direct" / "low-rank" rows at --seq 256 and 1024): the direct route makes ~15 passes over x per
# group (transform, update, backward's transform and sum); the low-rank route ~2 + sum of K over x, its skinny matmuls
# (3 K nb multiply-adds per adapted output row, ~19 of which cost one pass), 3 passes over the weight per step and
# more small operations (~1e7 passes' worth).
PASSES_DIRECT = 15
MACS_PER_PASS = 19
FIXED_LOW_RANK = 10_000_000


def low_rank_route_is_cheaper(
    tokens: int, in_features: int, out_features: int, ks: list[int], skinny_macs: int, device: str = "cpu"
) -> bool:
    """The automatic route of a TransformLinear's input side: True for one matmul plus low-rank corrections, False
    for transforming x per group (the direct route, the definition).

    `ks`: the reflections per group (K, one group per fused part); `skinny_macs`: the low-rank route's multiply-adds
    per token (3 K nb per adapted output row). On the CPU the model above decides: the low-rank route wins on long
    batches, on a fused qkv (three groups transform x on the direct route) and on small nb; the direct route on
    short batches and on Linears much wider out than in at nb=32. On other devices the direct route is chosen: the
    model was fitted on a CPU and no GPU measurement backs the other route yet (`compute="low_rank"` forces it).
    """
    if device != "cpu":
        return False
    direct = tokens * PASSES_DIRECT * len(ks) * in_features
    low_rank = tokens * ((2 + sum(ks)) * in_features + skinny_macs // MACS_PER_PASS)
    return low_rank + 3 * out_features * in_features + FIXED_LOW_RANK < direct


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
            raise UserError("a transform adapter needs an input-side or an output-side transform")
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
        self.transforms = [*(self.t_in or []), *(self.t_out or [])]  # the Function's factors, in this order
        self.compute = "auto"  # the input side's route: "direct", "low_rank" or "auto" (`low_rank_is_cheaper`)
        n_in, n_parts = len(self.t_in or []), len(parts)
        self.plan = tuple(
            Group(
                _runs(rows),
                (type(self.t_in[i]), i) if self.t_in is not None and i < n_parts else None,
                (type(self.t_out[i]), n_in + i) if self.t_out is not None and i < n_parts else None,
            )
            for i, rows in enumerate(self.groups)
        )

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # compute in the autocast dtype, as the base Linear would
            with torch.autocast(device, enabled=False):
                return self._function(x.to(torch.get_autocast_dtype(device)))
        return self._function(x)

    @property
    def low_rank_possible(self) -> bool:
        """Whether the input side is Householder-type everywhere (ETHER, ETHER+), so the low-rank route applies."""
        return self.t_in is not None and all(t.signs is not None and t.nb == self.t_in[0].nb for t in self.t_in)

    def low_rank_is_cheaper(self, tokens: int) -> bool:
        """Whether the input side runs as one matmul plus low-rank corrections rather than transforming x per group.

        The direct route's cost grows with the groups (q, k and v of a fused qkv each transform x), the low-rank
        route's with K nb (its rank) and has a fixed part; so the low-rank route wins on long batches, on the fused
        qkv and on small nb, the direct one on short batches and on Linears much wider out than in at nb=32.
        `compute` ("direct" / "low_rank") overrides the model.
        """
        if self.t_in is None:  # no input side: nothing to route
            return False
        if self.compute != "auto":
            if self.compute == "low_rank" and not self.low_rank_possible:
                raise UserError("compute='low_rank' needs Householder-type input transforms (ETHER, ETHER+)")
            return self.compute == "low_rank"
        if not self.low_rank_possible:
            return False
        ks = [len(t.signs) for t in self.t_in]
        skinny = 3 * sum(k * t.nb * size for k, t, size in zip(ks, self.t_in, self.part_sizes, strict=True))
        return low_rank_route_is_cheaper(
            tokens, self.base.in_features, self.base.out_features, ks, skinny, self.base.weight.device.type
        )

    def _function(self, x: torch.Tensor) -> torch.Tensor:
        factors = [t.factor().to(x.dtype) for t in self.transforms]
        quantized = self.base if is_quantized(self.base) else None
        weight = None if quantized is not None else self.base.weight.to(x.dtype)
        bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
        low_rank = self.low_rank_is_cheaper(x.numel() // x.shape[-1])
        return TransformLinearFunction.apply(x, weight, bias, quantized, self.plan, low_rank, *factors)

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
                raise UserError(f"{key} must be a positive integer or null, got {value!r}")
        if self.nb is not None and self.block_size is not None:
            raise UserError(f"nb={self.nb} and block_size={self.block_size} both given; give one (the other null)")
        if self.nb is None and self.block_size is None:
            object.__setattr__(self, "nb", self.default_nb)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}")


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
