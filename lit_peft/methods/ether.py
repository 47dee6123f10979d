"""The ETHER family (Bini et al., 2024): block-diagonal Householder-type transforms of a frozen weight.

- ETHER: H_b = I - 2 u_b u_b^T / ||u_b||^2, a reflection (orthogonal, and not the identity at init).
- ETHER+ (`etherplus`): H_b = I - u_b u_b^T/||u_b||^2 + v_b v_b^T/||v_b||^2, with v = -u at init so H = I.
- ETHER+HH (`etherplusHH`): ETHER+ on both sides, W' = H_out W H_in.
One side is the input side (W' = W H) unless `flip_side` puts it on the output side (W' = H W). Blocks follow the
paper's block-diagonal definition: block b covers features [b*d/nb, (b+1)*d/nb) of the transformed side.

All three are one form, H_b = I + sum_k s_k d_kb d_kb^T with unit directions d_k = u_k/||u_k|| and signs s
(ETHER: s = (-2,); ETHER+: s = (-1, +1) for d = (u, v)), applied to activations as a rank-1 or rank-2 update per
block, O(width) per token, with a hand-written backward that keeps only the input and K*nb coefficients per token.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from lit_peft.methods.transform import BlockTransform, BlockTransformMethod


def _init_directions(nb: int, block: int) -> torch.Tensor:
    u = torch.empty(nb, block)
    nn.init.kaiming_uniform_(u, a=math.sqrt(5))  # as the reference: U(-1/sqrt(block), 1/sqrt(block))
    return u


def _coefficients(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """c[n, k, t] = d_kn . x_tn for x (tokens, nb, b) and d (K, nb, b): (nb, K, tokens), one batched matmul over the
    blocks for all K directions at once (ETHER+'s u and v together), reading x in place."""
    return torch.bmm(d.transpose(0, 1), x.permute(1, 2, 0))


def _update(
    x: torch.Tensor, c: torch.Tensor, d: torch.Tensor, signs: tuple[float, ...], out: torch.Tensor | None
) -> torch.Tensor:
    """x_tn + sum_k s_k c[n, k, t] d_kn for every token t and block n, (tokens, nb, b): a new tensor, or written into
    `out` (which may be x itself)."""
    k0 = 0
    if out is None:
        out, k0 = torch.addcmul(x, c[:, 0].t()[..., None], d[0], value=signs[0]), 1
    else:
        out.copy_(x)  # nothing to do when out is x (copy_ returns at once)
    for k in range(k0, len(d)):
        out.addcmul_(c[:, k].t()[..., None], d[k], value=signs[k])
    return out


class HouseholderType(BlockTransform):
    """H_b = I + sum_k s_k d_kb d_kb^T for unit directions d (K, nb, b) and signs s; subclasses give both.

    Kernels: forward c = d . x (K*nb numbers per token, kept for backward), y = x + sum_k s_k c_k d_k. H is symmetric:
        grad_x   = H grad_y = grad_y + sum_k s_k e_k d_k,                 e = d . grad_y
        grad_d_k = s_k sum_tokens (c_k grad_y + e_k x)                    (per block: two batched matmuls)
    """

    signs: ClassVar[tuple[float, ...]]

    def directions(self) -> torch.Tensor:
        """The unit directions (K, nb, b), differentiable in the parameters."""
        raise NotImplementedError

    def factor(self) -> torch.Tensor:
        return self.directions()

    @classmethod
    def apply_blocks(
        cls, x: torch.Tensor, d: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = _coefficients(x, d)  # (nb, K, tokens)
        return _update(x, c, d, cls.signs, out), c

    @classmethod
    def grad_blocks(
        cls, grad: torch.Tensor, x: torch.Tensor, d: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = _coefficients(grad, d)  # (nb, K, tokens)
        grad_d = torch.baddbmm(torch.bmm(c, grad.transpose(0, 1)), e, x.transpose(0, 1))  # (nb, K, b)
        grad_d = grad_d.transpose(0, 1) * grad_d.new_tensor(cls.signs)[:, None, None]  # (K, nb, b)
        return _update(grad, e, d, cls.signs, out), grad_d  # read grad before `out` (possibly grad) is written

    @classmethod
    def grad_blocks_from_output(
        cls, grad: torch.Tensor, z: torch.Tensor, d: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`grad_blocks` with the output z = H x kept instead of x: x = z - sum_j s_j c_j d_j, so
        sum_t e_k x = sum_t e_k z - sum_j s_j (sum_t e_k c_j) d_j, a K x K Gram matrix per block."""
        e = _coefficients(grad, d)  # (nb, K, tokens)
        signs = d.new_tensor(cls.signs)
        gram = torch.bmm(e, c.transpose(1, 2)) * signs  # (nb, K, K): s_j sum_t e_k c_j
        grad_d = torch.bmm(c, grad.transpose(0, 1)) + torch.bmm(e, z.transpose(0, 1))  # (nb, K, b)
        grad_d = torch.baddbmm(grad_d, gram, d.transpose(0, 1), alpha=-1).transpose(0, 1) * signs[:, None, None]
        return _update(grad, e, d, cls.signs, out), grad_d

    def blocks(self) -> torch.Tensor:
        d = self.directions()  # (K, nb, b)
        d = d.to(torch.promote_types(d.dtype, torch.float32))  # float32 or better, also for bfloat16 parameters
        eye = torch.eye(self.block, device=d.device, dtype=d.dtype)
        return eye + sum(s * d[k, :, :, None] * d[k, :, None, :] for k, s in enumerate(self.signs))


class Householder(HouseholderType):
    """H_b = I - 2 u_b u_b^T / ||u_b||^2."""

    signs = (-2.0,)

    def __init__(self, width: int, where: str, nb: int | None = 1, block_size: int | None = None) -> None:
        super().__init__(width, where, nb, block_size)
        self.u = nn.Parameter(_init_directions(self.nb, self.block))

    def directions(self) -> torch.Tensor:
        return nn.functional.normalize(self.u, dim=-1)[None]


class HouseholderPlus(HouseholderType):
    """H_b = I - u_b u_b^T/||u_b||^2 + v_b v_b^T/||v_b||^2, v = -u at init (H = I): one rank-2 update per block."""

    signs = (-1.0, 1.0)

    def __init__(self, width: int, where: str, nb: int | None = 1, block_size: int | None = None) -> None:
        super().__init__(width, where, nb, block_size)
        u = _init_directions(self.nb, self.block)
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(-u.clone())

    def directions(self) -> torch.Tensor:
        return nn.functional.normalize(torch.stack([self.u, self.v]), dim=-1)


class Ether(BlockTransformMethod):
    """ETHER; ETHER+ and ETHER+HH below differ only in the transform and the sides it acts on.

    `flip_side` has no effect on etherplusHH, which always transforms both sides.
    """

    name = "ether"
    transform = Householder


class EtherPlus(Ether):
    name = "etherplus"
    transform = HouseholderPlus


class EtherPlusHH(Ether):
    name = "etherplusHH"
    transform = HouseholderPlus
    both_sides = True
