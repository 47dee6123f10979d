"""HRA (Yuan et al., 2024): W' = W H_1 H_2 ... H_r, a chain of r Householder reflections H_i = I - 2 u_i u_i^T/||u_i||^2
on the input side; the vectors u (in, r) train. As Hugging Face PEFT's `HRAConfig` (peft/tuners/hra/layer.py):

- `init: paired` (PEFT's init_weights=True): u_1 = u_2, u_3 = u_4, ... (r even), so each pair cancels and W' = W at
  init; `init: random` draws every u_i independently (W' is then a product of reflections, not W).
- `apply_GS: true`: the u_i are orthonormalised first (Gram-Schmidt, as a QR), giving H = I - 2 Q Q^T. A paired init
  has nothing to orthonormalise (u_1 = u_2), so it needs `init: random`.
- `orth_reg`: the HRA paper's orthogonality regulariser, added to the task loss in training:
  orth_reg * sum over adapted matrices of ||I - U^T U||_F, U the column-normalised u (as the authors' code,
  DaShenZi721/HRA, which used 1e-4; PEFT has none, so the default 0 trains as PEFT does).

H is applied to activations, never formed: with unit directions D (in, r), the chain is H = I - D T D^T with T the
(r, r) upper triangular inverse of 1/2 I + striu(D^T D) (the compact WY form of a product of reflections; T = 2 I
under apply_GS), so y = W x + b - (W D) T (D^T x): the base matmul plus two rank-r products per token. W D is the
base's own matmul of D^T (the 4-bit base's too, so its weight is never kept dense). On fused qkv each part has its
own u. Parameters per adapted matrix: r * in.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lit_peft.errors import UserError
from lit_peft.methods.base import AdapterLinear, Method, MethodSettings, Part

HRA_INITS = ("paired", "random")


@dataclasses.dataclass(frozen=True)
class HRASettings(MethodSettings):
    r: int = 8  # reflections per adapted matrix
    apply_GS: bool = False  # noqa: N815 (PEFT's name) orthonormalise the u first: H = I - 2 Q Q^T
    init: str = "paired"  # paired (identity at init; r even) | random
    orth_reg: float = 0.0  # weight of the orthogonality regulariser added to the loss

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise UserError(f"hra r must be a positive integer, got {self.r!r}")
        if not isinstance(self.apply_GS, bool):
            raise UserError(f"hra apply_GS must be true or false, got {self.apply_GS!r}")
        if self.init not in HRA_INITS:
            raise UserError(f"hra init={self.init!r} is not valid; valid: {', '.join(HRA_INITS)}")
        if self.init == "paired" and self.r % 2:
            raise UserError(
                f"hra init=paired needs an even r (reflections cancel in pairs), got r={self.r}; "
                "use an even r or init=random"
            )
        if self.init == "paired" and self.apply_GS:
            raise UserError(
                "hra apply_GS=true needs init=random: paired reflections are parallel, Gram-Schmidt "
                "cannot orthonormalise them"
            )
        reg = self.orth_reg
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not reg >= 0:
            raise UserError(f"hra orth_reg must be a number >= 0, got {reg!r}")


def init_directions(width: int, r: int, init: str) -> torch.Tensor:
    """u (width, r) as PEFT: kaiming-uniform over an (in, r) tensor; `paired` repeats r/2 columns twice each."""
    if init == "random":
        u = torch.empty(width, r)
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        return u
    half = torch.empty(width, r // 2)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    return torch.repeat_interleave(half, 2, dim=1)


class HRALinear(AdapterLinear):
    def __init__(self, base: nn.Linear, parts: list[Part], r: int, apply_gs: bool, init: str, orth_reg: float) -> None:
        super().__init__(base, parts)
        self.r, self.apply_gs, self.orth_reg = r, apply_gs, float(orth_reg)
        self.hra_u = nn.ParameterList(
            nn.Parameter(init_directions(base.in_features, r, init).to(base.weight.device)) for _ in parts
        )  # per part (in, r)

    def directions(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Per part the unit directions D (in, r): the normalised u, or with apply_GS an orthonormal basis of them."""
        out = []
        for u in self.hra_u:
            u = u if dtype is None else u.to(dtype)
            out.append(torch.linalg.qr(u).Q if self.apply_gs else u / u.norm(dim=0))
        return out

    def chain_factor(self, d: torch.Tensor) -> torch.Tensor:
        """T (r, r) with H_1 ... H_r = I - D T D^T for the unit directions D (in, r)."""
        eye = torch.eye(self.r, device=d.device, dtype=d.dtype)
        if self.apply_gs:
            return 2 * eye
        return torch.linalg.solve_triangular(eye / 2 + torch.triu(d.T @ d, diagonal=1), eye, upper=True)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # W x + b
        dtype = torch.promote_types(self.hra_u[0].dtype, torch.float32)
        ds = self.directions(dtype)
        d_all = torch.cat(ds, dim=1)  # (in, P*r)
        coeffs = x.to(dtype) @ d_all  # D^T x per part (..., P*r)
        wd = self.base(d_all.T.to(x.dtype))  # (P*r, out): (W D)^T + b, by the base's own matmul
        if self.base.bias is not None:
            wd = wd - self.base.bias.to(wd.dtype)
        wd = wd.to(dtype) if self.covers_all else wd.to(dtype).index_select(1, self.rows)  # (P*r, rows)
        deltas, start = [], 0
        for i, (d, c) in enumerate(zip(ds, coeffs.split(self.r, dim=-1), strict=True)):
            t = self.chain_factor(d)
            w_p = wd[i * self.r : (i + 1) * self.r, start : start + self.part_sizes[i]]  # (r, rows_p)
            deltas.append((c @ t.T) @ w_p)  # (W D T D^T x)_p
            start += self.part_sizes[i]
        return self.add_to_rows(y, (-torch.cat(deltas, dim=-1)).to(y.dtype))

    def regularizer(self) -> torch.Tensor | None:
        """orth_reg * sum over parts of ||I - U^T U||_F, U the column-normalised u; None when orth_reg is 0."""
        if not self.orth_reg:
            return None
        total = 0
        for u in self.hra_u:
            un = u / u.norm(dim=0)
            gram = un.T @ un
            total = total + torch.linalg.matrix_norm(torch.eye(self.r, device=u.device, dtype=u.dtype) - gram)
        return self.orth_reg * total

    def merged_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.base_weight().double().clone()
        start = 0
        for d, size in zip(self.directions(torch.float64), self.part_sizes, strict=True):
            rows = self.rows[start : start + size]
            start += size
            h = torch.eye(len(d), dtype=torch.float64, device=d.device) - d @ self.chain_factor(d) @ d.T
            weight[rows] = weight[rows] @ h
        bias = self.base.bias if self.base.bias is not None else None
        return weight, bias


class HRA(Method):
    name = "hra"
    Settings = HRASettings

    def make_adapter(self, base: nn.Linear, parts: list[Part], settings: HRASettings) -> HRALinear:
        return HRALinear(base, parts, settings.r, settings.apply_GS, settings.init, settings.orth_reg)
