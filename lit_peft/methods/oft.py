"""OFT (Qiu et al., 2023): block-diagonal orthogonal R_b = (I + S_b)(I - S_b)^-1 (Cayley), S_b skew-symmetric.

S starts at zero, so R = I at init. Only the strictly upper triangle of each S_b is a parameter:
nb * b(b-1)/2 per transformed side, b = width / nb. Applied to the input blocks (W' = W R), or to the output blocks
with `flip_side` (W' = R W): a (b x b) matmul per block per token; R is formed once per forward, never W R.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from lit_peft.errors import UserError
from lit_peft.methods.transform import BlockSettings, BlockTransform, BlockTransformMethod


class Cayley(BlockTransform):
    def __init__(self, width: int, where: str, nb: int | None = 1, block_size: int | None = None) -> None:
        super().__init__(width, where, nb, block_size)
        if self.block < 2:
            given = f"block_size={block_size}" if block_size is not None else f"nb={self.nb}"
            raise UserError(
                f"{given} leaves blocks of 1 feature on the {where} (width {width}), which cannot rotate; "
                f"use nb <= {width // 2} or block_size >= 2"
            )
        rows, cols = torch.triu_indices(self.block, self.block, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.s = nn.Parameter(torch.zeros(self.nb, len(rows)))  # strictly upper triangle of each S_b

    def skew(self) -> torch.Tensor:
        upper = self.s.new_zeros(self.nb, self.block, self.block)
        upper[:, self.rows, self.cols] = self.s
        return upper - upper.transpose(1, 2)  # (nb, b, b)

    def blocks(self) -> torch.Tensor:
        s = self.skew()
        s = s.to(torch.promote_types(s.dtype, torch.float32))  # float32 or better, also for bfloat16 parameters
        eye = torch.eye(self.block, device=s.device, dtype=s.dtype).expand_as(s)
        # (I + S) and (I - S) commute, so (I + S)(I - S)^-1 = (I - S)^-1 (I + S): one batched solve.
        return torch.linalg.solve(eye - s, eye + s)

    def factor(self) -> torch.Tensor:
        return self.blocks()  # R (nb, b, b)

    @classmethod
    def apply_blocks(
        cls, x: torch.Tensor, r: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        """y_n = R_n x_n for x (tokens, nb, b): one batched matmul over the blocks."""
        y = torch.bmm(x.transpose(0, 1), r.transpose(1, 2)).transpose(0, 1)  # (tokens, nb, b), block-major
        return (y.contiguous() if out is None else out.copy_(y)), None

    @classmethod
    def grad_blocks(
        cls, grad: torch.Tensor, x: torch.Tensor, r: torch.Tensor, saved: None, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """grad_x_n = R_n^T grad_n, grad_R_n = sum_tokens grad_n x_n^T (before `out`, possibly grad, is written)."""
        grad_r = torch.bmm(grad.permute(1, 2, 0), x.transpose(0, 1))  # (nb, b, b)
        grad_x = torch.bmm(grad.transpose(0, 1), r).transpose(0, 1)  # (tokens, nb, b)
        return (grad_x.contiguous() if out is None else out.copy_(grad_x)), grad_r


@dataclasses.dataclass(frozen=True)
class OFTSettings(BlockSettings):
    default_nb: ClassVar[int] = 32


class OFT(BlockTransformMethod):
    name = "oft"
    Settings = OFTSettings
    transform = Cayley
