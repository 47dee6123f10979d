"""LoRA (Hu et al., 2021): W' = W + (alpha / r) B A, with A (r, in) random and B (out, r) zero at init.

On fused qkv each enabled part (query/key/value) has its own A and B, as if the model had three Linears.
All parts' A matrices are stacked into one (n_parts * r, in) so the input is read once.

`init=pissa` (PiSSA, Meng et al., 2024, as Hugging Face PEFT's `init_lora_weights="pissa"`): per part, from the top-r
singular triplets of W = U S V^T, A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s) (s = alpha / r), and the frozen
base becomes the residual W_res = W - s B A, so the model at init is W. `pissa_niter` takes the triplets from
`torch.svd_lowrank` with that many subspace iterations (PEFT's `pissa_niter_<n>`) instead of an exact SVD; it runs
on the CPU under a fixed seed, so that rebuilding the adapter (merge, chat, eval, resume) gives the same residual on
any device. Over a 4-bit base the triplets come from the dequantized weight and the residual is quantized again
(QPiSSA), with the base's own quant type, block size and double quantization.
The off switch (`adapters_disabled`) gives the model at init, W_res + s B0 A0 from the initial A0, B0 kept as
buffers, not the residual alone: the original W for a dense base, so DPO references and self-distillation teachers
are the model that was loaded. A merge gives W_res + s B A.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from lit_peft.errors import UserError
from lit_peft.methods.base import AdapterLinear, Method, MethodSettings, Part
from lit_peft.methods.quantize import is_quantized

Spans = tuple[tuple[int, int], ...]

LORA_INITS = ("default", "pissa")
PISSA_SEED = 0  # the randomized SVD's seed: the same residual every time the adapter is built


@dataclasses.dataclass(frozen=True)
class LoRASettings(MethodSettings):
    method: ClassVar[str] = "lora"  # in messages
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "default"  # default (A random, B = 0) | pissa (A, B from the top-r singular vectors of W)
    pissa_niter: int | None = None  # pissa: None = exact SVD; n = torch.svd_lowrank with n subspace iterations

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.r, int) and self.r > 0):
            raise UserError(f"{self.method} r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{self.method} dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in LORA_INITS:
            raise UserError(f"{self.method} init={self.init!r} is not valid; valid: {', '.join(LORA_INITS)}")
        niter = self.pissa_niter
        if niter is not None and not (isinstance(niter, int) and not isinstance(niter, bool) and niter >= 0):
            raise UserError(f"pissa_niter must be null (exact SVD) or an integer >= 0, got {niter!r}")
        if niter is not None and self.init != "pissa":
            raise UserError(f"pissa_niter={niter} needs init=pissa (init={self.init}); set pissa_niter=null")


def top_singular(w: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_r^T) of w (m, n) in float32: exact SVD, or torch.svd_lowrank with `niter` iterations (on the CPU,
    seeded, so that the result does not depend on the device or the random state)."""
    w = w.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PISSA_SEED)
        u, s, v = torch.svd_lowrank(w.cpu(), q=r, niter=niter)
    return u.to(w.device), s.to(w.device), v.t().to(w.device)


@torch.no_grad()
def set_base_weight(base: nn.Module, weight: torch.Tensor) -> None:
    """Replace the frozen weight of `base` (a new tensor: a weight tied elsewhere keeps its value). A 4-bit base is
    quantized again from `weight` with its own settings (quant type, block size, double quantization)."""
    old = base.weight
    if is_quantized(base):
        from bitsandbytes.nn import Params4bit

        new = Params4bit(
            weight.to(torch.float32).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
        base.weight = new.to(old.device)  # quantizes
        base.quant_state = base.weight.quant_state
        return
    base.weight = nn.Parameter(weight.to(old.dtype).clone(), requires_grad=False)


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (B_p A_p x_a) at each part's rows, for x (tokens, in): a whole LoRA Linear in one Function.

    x_a is the adapter's input (x after dropout), or x itself when `xa` is None. Every part's rows are one span of
    the output (`spans`, one per part, as the concatenated qkv layout and plain Linears have them).

    The low-rank products are skinny (r = 8 columns against hundreds of tokens and features); on a CPU a matmul of
    that shape runs several times faster when its small dimension is the output's rows, so they are taken in the
    transposed orientation: h^T = A x_a^T (P*r, tokens), (g B_p)^T = B_p^T g_p^T, grad B_p = (h_p^T g_p)^T. The
    adapter's share is added into the base output's rows by `addmm_` (no (tokens, rows) delta, no concatenation), and
    in backward into the base's input gradient. Saved: x_a, h^T and the parameters; never an activation-sized delta.
    """

    @staticmethod
    def forward(ctx, x, xa, weight, bias, lora_a, scaling: float, spans: Spans, *lora_b):
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        xa2 = x2 if xa is None else xa.reshape(x2.shape)
        y = torch.nn.functional.linear(x2, weight, bias)  # (tokens, out)
        h_t = lora_a @ xa2.t()  # (P*r, tokens)
        r = lora_a.shape[0] // len(spans)
        for p, ((a, b), b_p) in enumerate(zip(spans, lora_b, strict=True)):
            y[:, a:b].addmm_(h_t[p * r : (p + 1) * r].t(), b_p.t(), alpha=scaling)
        ctx.scaling, ctx.spans, ctx.shape, ctx.same_input = scaling, spans, x.shape, xa is None
        ctx.save_for_backward(xa2, weight, lora_a, h_t, *lora_b)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xa2, weight, lora_a, h_t, *lora_b = ctx.saved_tensors
        s, spans = ctx.scaling, ctx.spans
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        r = lora_a.shape[0] // len(spans)
        gb_t = torch.cat([b_p.t() @ g[:, a:b].t() for (a, b), b_p in zip(spans, lora_b, strict=True)])  # (P*r, T)
        grad_a = torch.mm(gb_t, xa2).mul_(s)  # (P*r, in)
        grad_b = [
            torch.mm(h_t[p * r : (p + 1) * r], g[:, a:b]).t().mul(s) for p, (a, b) in enumerate(spans)
        ]  # (rows_p, r) each
        grad_x = grad_xa = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight  # (tokens, in)
            if ctx.same_input:
                grad_x.addmm_(gb_t.t(), lora_a, alpha=s)
            grad_x = grad_x.view(ctx.shape)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xa = torch.mm(gb_t.t(), lora_a).mul_(s).view(ctx.shape)
        grad_bias = g.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_xa, None, grad_bias, grad_a, None, None, *grad_b


class LoRALinear(AdapterLinear):
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
        self.pissa = init == "pissa"
        if self.pissa:
            self._pissa_init(parts, pissa_niter)
        # Each part's rows as one span of the output (plain Linears, concatenated qkv): then `LoRALinearFunction`.
        spans = [(int(p.rows[0]), int(p.rows[-1]) + 1) for p in parts]
        one_span = all(torch.equal(p.rows, torch.arange(a, b)) for p, (a, b) in zip(parts, spans, strict=True))
        self.spans: Spans | None = tuple(spans) if one_span else None

    @torch.no_grad()
    def _pissa_init(self, parts: list[Part], niter: int | None) -> None:
        """A, B from each part's top-r singular triplets (scaled as PEFT); the residual becomes the frozen weight."""
        w = self.base_weight().float()  # (out, in), dequantized for a 4-bit base
        residual = w.clone()
        for i, part in enumerate(parts):
            w_p = w[part.rows]  # (rows, in)
            if self.r > min(w_p.shape):
                where = " of ".join(n for n in (part.name if part.name != "all" else "", part.linear) if n)
                raise UserError(
                    f"lora init=pissa needs r <= {min(w_p.shape)} here: r={self.r} is more than the rank of "
                    f"{where or 'the Linear'} ({w_p.shape[0]} x {w_p.shape[1]})"
                )
            u, s, vh = top_singular(w_p, self.r, niter)
            root = (s / self.scaling).sqrt()
            a, b = root[:, None] * vh, u * root[None, :]  # (r, in), (rows, r)
            self.lora_A[i * self.r : (i + 1) * self.r] = a
            self.lora_B[i].copy_(b)
            residual[part.rows] = w_p - self.scaling * (b @ a)
        set_base_weight(self.base, residual)
        # The initial adapter, for the off switch (the model at init = residual + s B0 A0); rebuilt, never saved.
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", torch.cat([b.detach() for b in self.lora_B]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            return self.adapted(x)
        y = self.base(x)
        if not self.pissa:  # the frozen base is the model at init
            return y
        b0 = self.pissa_B0.split(self.part_sizes)
        return self.add_to_rows(y, (self._delta(x, self.pissa_A0, b0) * self.scaling).to(y.dtype))

    def _delta(self, x: torch.Tensor, a: torch.Tensor, bs) -> torch.Tensor:
        """B A x per part, concatenated over the parts' rows: (..., rows)."""
        h = x.to(a.dtype) @ a.T  # (..., P*r)
        return torch.cat([hp @ b.T for hp, b in zip(h.split(self.r, dim=-1), bs, strict=True)], dim=-1)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        if self.spans is not None and not is_quantized(self.base) and not self.base.weight.requires_grad:
            return self._function(x)  # (the Function gives no gradient to the base weight, frozen by contract)
        y = self.base(x)  # (B, T, out)
        delta = self._delta(self.dropout(x), self.lora_A, self.lora_B)  # (B, T, rows)
        return self.add_to_rows(y, (delta * self.scaling).to(y.dtype))

    def _function(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted output through `LoRALinearFunction`, in the dtype the base Linear computes in (the autocast
        dtype under mixed precision, as `nn.Linear` would)."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self._function(x.to(torch.get_autocast_dtype(device)))
        dropped = not isinstance(self.dropout, nn.Identity) and self.training
        dtype = x.dtype
        bias = None if self.base.bias is None else self.base.bias.to(dtype)
        return LoRALinearFunction.apply(
            x,
            self.dropout(x) if dropped else None,
            self.base.weight.to(dtype),
            bias,
            self.lora_A.to(dtype),
            self.scaling,
            self.spans,
            *(b.to(dtype) for b in self.lora_B),
        )

    def lora_dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """B A of every part, stacked over the parts' rows: (rows, in)."""
        a_parts = self.lora_A.to(dtype).split(self.r, dim=0)
        return torch.cat([b.to(dtype) @ a for a, b in zip(a_parts, self.lora_B, strict=True)], dim=0)

    def merged_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.base_weight().double().clone()
        weight[self.rows] += self.lora_dense() * self.scaling
        bias = self.base.bias if self.base.bias is not None else None
        return weight, bias


class LoRA(Method):
    name = "lora"
    Settings = LoRASettings

    def make_adapter(self, base: nn.Linear, parts: list[Part], settings: LoRASettings) -> LoRALinear:
        return LoRALinear(
            base, parts, settings.r, settings.alpha, settings.dropout, settings.init, settings.pissa_niter
        )
