"""LoRA (Hu et al., 2021): W' = W + (alpha / r) B A, with A (r, in) random and B (out, r) zero at init.

On fused qkv each enabled part (query/key/value) has its own A and B, as if the model had three Linears.
All parts' A matrices are stacked into one (n_parts * r, in) so the input is read once.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lit_peft.methods.base import AdapterLinear, Method, MethodSettings, Part


@dataclasses.dataclass(frozen=True)
class LoRASettings(MethodSettings):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"lora r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")


class LoRALinear(AdapterLinear):
    def __init__(self, base: nn.Linear, parts: list[Part], r: int, alpha: float, dropout: float) -> None:
        super().__init__(base, parts)
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {
            "device": base.weight.device,
            "dtype": torch.float32
            if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            else base.weight.dtype,
        }
        self.lora_A = nn.Parameter(torch.empty(len(parts) * r, base.in_features, **factory))  # (P*r, in)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(n, r, **factory)) for n in self.part_sizes)
        for i in range(len(parts)):  # as nn.Linear's default init, per part
            nn.init.kaiming_uniform_(self.lora_A[i * r : (i + 1) * r], a=math.sqrt(5))

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        h = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T  # (B, T, P*r)
        delta = torch.cat(
            [hp @ b.T for hp, b in zip(h.split(self.r, dim=-1), self.lora_B, strict=False)], dim=-1
        )  # (B, T, rows)
        return self.add_to_rows(y, (delta * self.scaling).to(y.dtype))

    def merged_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.base_weight().double().clone()
        a_parts = self.lora_A.double().split(self.r, dim=0)
        dense = torch.cat([b.double() @ a for a, b in zip(a_parts, self.lora_B, strict=True)], dim=0)  # (rows, in)
        weight[self.rows] += dense * self.scaling
        bias = self.base.bias if self.base.bias is not None else None
        return weight, bias


class LoRA(Method):
    name = "lora"
    Settings = LoRASettings

    def make_adapter(self, base: nn.Linear, parts: list[Part], settings: LoRASettings) -> LoRALinear:
        return LoRALinear(base, parts, settings.r, settings.alpha, settings.dropout)
