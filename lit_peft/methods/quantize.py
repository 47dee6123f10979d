"""4-bit frozen bases (QLoRA-style) with bitsandbytes: nf4 or fp4 blockwise quantization, optionally with the
quantization constants quantized again ("double quantization", `-dq`).

Every Linear inside the transformer blocks becomes a `bnb.nn.Linear4bit` before the method is installed, so any
adapter method trains over a 4-bit base. Embeddings, norms and the output head stay in full precision (as QLoRA).
bitsandbytes >= 0.50 runs these layers forward and backward on CPU as well as on CUDA.
"""

from __future__ import annotations

import torch
from litgpt import GPT
from torch import nn

from lit_peft.errors import UserError

QUANTIZE_MODES = ("nf4", "nf4-dq", "fp4", "fp4-dq")


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in QUANTIZE_MODES:
        raise UserError(f"unknown quantize mode {mode!r}; valid: {', '.join(QUANTIZE_MODES)} or null")


def quantize_base(model: GPT, mode: str | None, compute_dtype: torch.dtype | None = None) -> int:
    """Replace the block Linears of `model` with frozen 4-bit ones, in place. Returns how many were replaced.

    Matmuls run in `compute_dtype` (default: the dtype the base was in, e.g. bfloat16 for a bf16 base).
    """
    check_mode(mode)
    if mode is None:
        return 0
    import bitsandbytes as bnb

    quant_type, double = mode.split("-")[0], mode.endswith("-dq")
    count = 0
    for block in model.transformer.h:
        for name, linear in list(block.named_modules()):
            if type(linear) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute_dtype or linear.weight.dtype,
                compress_statistics=double,
                quant_type=quant_type,
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                linear.weight.data.to(torch.float32),
                requires_grad=False,
                compress_statistics=double,
                quant_type=quant_type,
            )
            if linear.bias is not None:
                q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
            q = q.to(linear.weight.device if linear.weight.device.type != "meta" else "cpu")  # quantizes
            # bitsandbytes repacks CPU weights for inference (eval + no grad) into a bf16-scaled layout that needs
            # in_features % 64 == 0 and changes the numerics between training and validation; keep one layout.
            q.support_avx512bf16_for_cpu = False
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, q)
            count += 1
    return count


def is_quantized(linear: nn.Module) -> bool:
    return type(linear).__name__ == "Linear4bit"


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a Linear as a dense tensor: dequantized for a 4-bit Linear."""
    if is_quantized(linear):
        from bitsandbytes.functional import dequantize_4bit

        w = dequantize_4bit(linear.weight.data, linear.weight.quant_state)
        return w.to(linear.compute_dtype or torch.float32)
    return linear.weight


@torch.no_grad()
def dequantize_base(model: nn.Module) -> int:
    """Replace every 4-bit Linear with a dense float32 one holding its dequantized weight. Returns the count."""
    found = [(n, m) for n, m in model.named_modules() if is_quantized(m)]
    for name, q in found:
        w = dense_weight(q).float()
        dense = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device, dtype=w.dtype)
        dense.weight.copy_(w)
        if q.bias is not None:
            dense.bias.copy_(q.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, dense)
    return len(found)
