"""OFT (Qiu et al., 2023): block-diagonal orthogonal R_b = (I + S_b)(I - S_b)^-1 (Cayley), S_b skew-symmetric.

S starts at zero, so R = I at init. Only the strictly upper triangle of each S_b is a parameter:
nb * b(b-1)/2 per transformed side, b = width / nb. Applied to the input blocks (W' = W R), or to the output blocks
with `flip_side` (W' = R W): a (b x b) matmul per block per token (`Rotate`); R is formed once per forward, never W R.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from lit_peft.methods.transform import BlockSettings, BlockTransform, BlockTransformMethod


class Rotate(torch.autograd.Function):
    """y_n = R_n x_n for x (..., nb, b), r (nb, b, b).

    Backward: grad_x_n = R_n^T grad_y_n (R is orthogonal), grad_R_n = sum_tokens grad_y_n x_n^T.
    Saved for backward: x (the input) and R; never y.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, r)
        return torch.einsum("...nj,nij->...ni", x, r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, r = ctx.saved_tensors
        grad_x = torch.einsum("...ni,nij->...nj", grad, r) if ctx.needs_input_grad[0] else None
        grad_r = torch.einsum("...ni,...nj->nij", grad, x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_r


class Cayley(BlockTransform):
    def __init__(self, width: int, where: str, nb: int | None = None, block_size: int | None = None) -> None:
        super().__init__(width, where, nb, block_size)
        if self.block < 2:
            given = f"block_size={block_size}" if block_size is not None else f"nb={self.nb}"
            raise ValueError(
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.blocks().to(x.dtype)  # (nb, b, b)
        return Rotate.apply(x.unflatten(-1, (self.nb, self.block)), r).flatten(-2)


@dataclasses.dataclass(frozen=True)
class OFTSettings(BlockSettings):
    default_nb: ClassVar[int] = 32


class OFT(BlockTransformMethod):
    name = "oft"
    Settings = OFTSettings
    transform = Cayley
