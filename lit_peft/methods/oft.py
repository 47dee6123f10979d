"""OFT (Qiu et al., 2023): block-diagonal orthogonal R_b = (I + S_b)(I - S_b)^-1 (Cayley), S_b skew-symmetric.

S starts at zero, so R = I at init. Only the strictly upper triangle of each S_b is a parameter:
nb * b(b-1)/2 per transformed side, b = width / nb. Applied to the input blocks (W' = W R), or to the output blocks
with `flip_side` (W' = R W): a (b x b) matmul per block per token; R is formed once per forward, never W R.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lit_peft.methods.transform import BlockSettings, BlockTransform, BlockTransformMethod


class Cayley(BlockTransform):
    def __init__(self, width: int, nb: int, where: str) -> None:
        super().__init__(width, nb, where)
        if self.block < 2:
            raise ValueError(
                f"nb={nb} leaves blocks of 1 feature on the {where} (width {width}), which cannot rotate; "
                f"use nb <= {width // 2}"
            )
        rows, cols = torch.triu_indices(self.block, self.block, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.s = nn.Parameter(torch.zeros(nb, len(rows)))  # strictly upper triangle of each S_b

    def skew(self) -> torch.Tensor:
        upper = self.s.new_zeros(self.nb, self.block, self.block)
        upper[:, self.rows, self.cols] = self.s
        return upper - upper.transpose(1, 2)  # (nb, b, b)

    def blocks(self) -> torch.Tensor:
        s = self.skew().float()
        eye = torch.eye(self.block, device=s.device).expand_as(s)
        # (I + S) and (I - S) commute, so (I + S)(I - S)^-1 = (I - S)^-1 (I + S): one batched solve.
        return torch.linalg.solve(eye - s, eye + s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.blocks().to(x.dtype)  # (nb, b, b)
        xb = x.unflatten(-1, (self.nb, self.block))  # (..., nb, b)
        return torch.einsum("nij,...nj->...ni", r, xb).flatten(-2)


@dataclasses.dataclass(frozen=True)
class OFTSettings(BlockSettings):
    nb: int = 32


class OFT(BlockTransformMethod):
    name = "oft"
    Settings = OFTSettings
    transform = Cayley
