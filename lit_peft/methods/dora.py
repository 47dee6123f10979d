"""DoRA (Liu et al., 2024): W' = m * (W + s B A) / ||W + s B A||, the norm taken over each output row (every
output feature has its own magnitude m_i and norm), s = alpha / r; LoRA's A and B plus the magnitude m train.

As Hugging Face PEFT (`LoraConfig(use_dora=True)`, peft/tuners/lora/dora.py): m starts at the row norms of W, so the
model at init is W; the norm ||W + s B A|| is recomputed every forward from the current A and B but detached from the
gradient (the paper's section 4.3), and with dropout active the output is
    W x + b + (m/n - 1) W x_d + (m/n) s B A x_d,      x_d = dropout(x), n = ||W + s B A|| (detached),
which is b + (m/n)(W + s B A) x without dropout. On fused qkv each part (query/key/value) has its own A, B and m.
Over a 4-bit base the norm is taken of the dequantized weight (formed in forward, not kept), and W x is the 4-bit
base's own matmul. `init=pissa` works as for LoRA (the residual is the frozen base; m = the row norms of W).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from lit_peft.methods.base import Part
from lit_peft.methods.lora import LoRA, LoRALinear, LoRASettings


@dataclasses.dataclass(frozen=True)
class DoRASettings(LoRASettings):
    method: ClassVar[str] = "dora"


class DoRALinear(LoRALinear):
    def __init__(
        self,
        base: nn.Linear,
        parts: list[Part],
        r: int,
        alpha: float,
        dropout: float,
        init: str = "default",
        pissa_niter: int | None = None,
    ) -> None:
        super().__init__(base, parts, r, alpha, dropout, init, pissa_niter)
        norms = self.weight_norm().split(self.part_sizes)
        self.magnitude = nn.ParameterList(nn.Parameter(n.to(self.lora_A.dtype).clone()) for n in norms)

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| over each adapted row, (rows,), in float32 or better and detached (no gradient, as PEFT)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        w = self.base_weight().detach().to(dtype)
        w = w if self.covers_all else w.index_select(0, self.rows)
        return torch.linalg.vector_norm(w + self.scaling * self.lora_dense(dtype).detach(), dim=1)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # W x + b
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        x_d = self.dropout(x) if dropped else x
        y_d = self.base(x_d) if dropped else y  # W x_d + b
        bias = self.base.bias
        y_d = y_d if self.covers_all else y_d.index_select(-1, self.rows)  # (..., rows)
        if bias is not None:
            y_d = y_d - (bias if self.covers_all else bias.index_select(0, self.rows)).to(y_d.dtype)
        delta = self._delta(x_d, self.lora_A, self.lora_B)  # B A x_d (..., rows)
        scale = torch.cat(list(self.magnitude)) / self.weight_norm()  # m / n (rows,)
        update = (scale - 1) * y_d.to(delta.dtype) + scale * self.scaling * delta
        return self.add_to_rows(y, update.to(y.dtype))

    def merged_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.base_weight().double().clone()
        adapted = weight[self.rows] + self.scaling * self.lora_dense()
        m = torch.cat(list(self.magnitude)).double()
        weight[self.rows] = (m / torch.linalg.vector_norm(adapted, dim=1))[:, None] * adapted
        bias = self.base.bias if self.base.bias is not None else None
        return weight, bias


class DoRA(LoRA):
    name = "dora"
    Settings = DoRASettings

    def make_adapter(self, base: nn.Linear, parts: list[Part], settings: DoRASettings) -> DoRALinear:
        return DoRALinear(
            base, parts, settings.r, settings.alpha, settings.dropout, settings.init, settings.pissa_niter
        )
