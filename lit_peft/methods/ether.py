"""The ETHER family (Bini et al., 2024): block-diagonal Householder-type transforms of a frozen weight.

- ETHER: H_b = I - 2 u_b u_b^T / ||u_b||^2, a reflection (orthogonal, and not the identity at init).
- ETHER+ (`etherplus`): H_b = I - u_b u_b^T/||u_b||^2 + v_b v_b^T/||v_b||^2, with v = -u at init so H = I.
- ETHER+HH (`etherplusHH`): ETHER+ on both sides, W' = H_out W H_in.
One side is the input side (W' = W H) unless `flip_side` puts it on the output side (W' = H W). Blocks follow the
paper's block-diagonal definition: block b covers features [b*d/nb, (b+1)*d/nb) of the transformed side.
Each H is applied to activations as a rank-1 (ETHER) or rank-2 (ETHER+) update per block: O(width) per token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lit_peft.methods.transform import BlockTransform, BlockTransformMethod


def _init_directions(nb: int, block: int) -> torch.Tensor:
    u = torch.empty(nb, block)
    nn.init.kaiming_uniform_(u, a=math.sqrt(5))  # as the reference: U(-1/sqrt(block), 1/sqrt(block))
    return u


def _reflect(x: torch.Tensor, unit: torch.Tensor, scale: float) -> torch.Tensor:
    """x_b + scale * (unit_b^T x_b) unit_b for every block b: x (..., nb, block), unit (nb, block)."""
    coef = torch.einsum("...nb,nb->...n", x, unit)  # (..., nb)
    return torch.addcmul(x, coef.unsqueeze(-1), unit, value=scale)


class Householder(BlockTransform):
    """H_b = I - 2 u_b u_b^T / ||u_b||^2."""

    def __init__(self, width: int, nb: int, where: str) -> None:
        super().__init__(width, nb, where)
        self.u = nn.Parameter(_init_directions(nb, self.block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.unflatten(-1, (self.nb, self.block))  # (..., nb, block)
        unit = nn.functional.normalize(self.u, dim=-1).to(x.dtype)
        return _reflect(xb, unit, -2.0).flatten(-2)

    def blocks(self) -> torch.Tensor:
        unit = nn.functional.normalize(self.u.float(), dim=-1)
        eye = torch.eye(self.block, device=unit.device)
        return eye - 2 * unit[:, :, None] * unit[:, None, :]


class HouseholderPlus(BlockTransform):
    """H_b = I - u_b u_b^T/||u_b||^2 + v_b v_b^T/||v_b||^2, v = -u at init (H = I)."""

    def __init__(self, width: int, nb: int, where: str) -> None:
        super().__init__(width, nb, where)
        u = _init_directions(nb, self.block)
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(-u.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.unflatten(-1, (self.nb, self.block))  # (..., nb, block)
        u = nn.functional.normalize(self.u, dim=-1).to(x.dtype)
        v = nn.functional.normalize(self.v, dim=-1).to(x.dtype)
        return self._plus(xb, u, v).flatten(-2)

    @staticmethod
    def _plus(xb: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Both projections read the same x (H = I - uu^T + vv^T), so they cannot be chained as two reflections.
        cu = torch.einsum("...nb,nb->...n", xb, u).unsqueeze(-1)  # (..., nb, 1)
        cv = torch.einsum("...nb,nb->...n", xb, v).unsqueeze(-1)
        return torch.addcmul(torch.addcmul(xb, cu, u, value=-1.0), cv, v)

    def blocks(self) -> torch.Tensor:
        u = nn.functional.normalize(self.u.float(), dim=-1)
        v = nn.functional.normalize(self.v.float(), dim=-1)
        eye = torch.eye(self.block, device=u.device)
        return eye - u[:, :, None] * u[:, None, :] + v[:, :, None] * v[:, None, :]


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
