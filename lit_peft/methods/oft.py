"""OFT (Qiu et al., 2023): block-diagonal orthogonal R_b = (I + S_b)(I - S_b)^-1 (Cayley), S_b skew-symmetric.

S starts at zero, so R = I at init. Only the strictly upper triangle of each S_b is a parameter:
nb * b(b-1)/2 per transformed side, b = width / nb. Applied to the input blocks (W' = W R), or to the output blocks
with `flip_side` (W' = R W): a (b x b) matmul per block per token; R is formed once per forward, never W R.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from lit_peft.methods.base import Method, MethodSettings, Part
from lit_peft.methods.transform import BlockTransform, TransformLinear


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
class OFTSettings(MethodSettings):
    nb: int = 32
    flip_side: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.nb, int) and self.nb >= 1):
            raise ValueError(f"nb must be a positive integer, got {self.nb!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class OFT(Method):
    name = "oft"
    Settings = OFTSettings

    def make_adapter(self, base: nn.Linear, parts: list[Part], settings: OFTSettings) -> TransformLinear:
        side = partial(Cayley, nb=settings.nb)
        return TransformLinear(
            base,
            parts,
            make_input=None if settings.flip_side else side,
            make_output=side if settings.flip_side else None,
            dropout=settings.dropout,
        )
