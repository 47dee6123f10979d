"""Model FLOPs utilisation (MFU) of a training step: the step's model FLOPs per second over the device's dense peak.

    python bench/mfu.py                     # TinyLlama-1.1B-shaped, full fine-tuning, bf16, 4 x 2048, compiled
    python bench/mfu.py --methods full lora ether etherplus etherplusHH oft        # + the per-method table
    python bench/mfu.py --model tiny --batch 2 --seq 64 --precision 32-true --no-compile --peak-tflops 1   # CPU smoke

Model FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one eager step, every matmul
and attention product of forward and backward as the math needs them (recomputation would not count; for full
fine-tuning this is 3 x the forward's 2 x tokens x weights plus attention's T^2 terms, the usual 6N per token). Adapter
methods need fewer (no frozen weight's gradient), so their MFU is against their own FLOPs, and their tokens/s is the
figure to compare across methods.
One step: forward to logits, next-token cross-entropy on every position, backward, AdamW (fused on CUDA) over the
trainable parameters, on a fixed random batch of a randomly initialised model (speed does not depend on the weights).
Time: the median of `--steps` timed steps after `--warmup` untimed ones (compilation happens there); compiled means
every transformer block through `lit_peft.training.compile.compile_blocks`, as `trainer.compile=true` trains.
Peak: `--peak-tflops`, or the device's dense (non-sparse) bf16 tensor peak from `PEAK_BF16_TFLOPS` when it is listed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memory import TINYLLAMA  # noqa: E402  (bench/ is on sys.path when a bench script runs)
from methods import RANDOM_MODELS, lm_loss  # noqa: E402

# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name() (vendor data sheets).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 125.0,
    "RTX 4090": 165.2,
}
MODELS = {"tinyllama": TINYLLAMA, "tiny": RANDOM_MODELS["tiny"], "wide": RANDOM_MODELS["wide"]}
TARGETS = ["query", "key", "value", "projection", "mlp"]
PRECISIONS = {"bf16-true": "bfloat16", "32-true": "float32"}


def device_peak(name: str) -> float | None:
    """The listed dense bf16 peak (TFLOP/s) whose key occurs in the device name; the longest key wins."""
    hits = [key for key in PEAK_BF16_TFLOPS if key in name]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def build(model_key: str, method: str, dtype, device: str):
    """The model with `method` installed (`full`: every parameter trains), its trainable parameters."""
    import torch
    from litgpt import GPT, Config

    from lit_peft.methods import build_settings

    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(Config(**MODELS[model_key]))
    model.to(dtype)
    if method == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        m, settings = build_settings(method, {"targets": TARGETS})
        m.apply(model, settings)
        model.to(device=device, dtype=dtype)
    return model, [p for p in model.parameters() if p.requires_grad]


def step_flops(model, idx) -> int:
    """Model FLOPs of one training step (forward and backward), counted on an eager step.

    Attention's backward is 2 x its forward (grad of the scores and of V, then of Q and K): torch's own count adds the
    scores that flash kernels recompute, which are hardware FLOPs, not model FLOPs. torch knows the CUDA kernels'
    shapes only; the CPU kernel gets the same formulas here."""
    import torch
    from torch.utils import flop_counter

    def attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return 2 * flop_counter.sdpa_flop_count(query, key, value)

    aten = torch.ops.aten
    formulas = {aten._scaled_dot_product_flash_attention_for_cpu: attention}
    for name in ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention"):
        op = getattr(aten, f"_scaled_dot_product_{name}_backward", None)
        if op is not None:
            formulas[op] = attention_backward
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=formulas)
    with counter:
        lm_loss(model(idx), idx).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(model_key: str, method: str, args: argparse.Namespace, peak: float | None) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, PRECISIONS[args.precision])
    model, trainable = build(model_key, method, dtype, device)
    model.max_seq_length = args.seq
    idx = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    flops = step_flops(model, idx)
    if args.compile:
        from lit_peft.training.compile import compile_blocks

        compile_blocks(model)
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        lm_loss(model(idx), idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    achieved = flops / sec / 1e12
    return {
        "method": method,
        "trainable": sum(p.numel() for p in trainable),
        "sec": sec,
        "tokens_per_s": args.batch * args.seq / sec,
        "tflop_step": flops / 1e12,
        "tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | trainable params | s/step | tokens/s | model TFLOP/step | TFLOP/s | MFU | peak allocated (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.3g}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['sec']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflop_step']:.4g} | {r['tflops']:.4g} | {mfu} | {mem} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinyllama", choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["full"], metavar="METHOD", help="full or adapter methods")
    parser.add_argument("--precision", default="bf16-true", choices=list(PRECISIONS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: PEAK_BF16_TFLOPS by name)")
    args = parser.parse_args()
    import torch

    from lit_peft.methods import METHODS

    valid = ["full", *sorted(m for m in METHODS if m != "full")]
    bad = [m for m in args.methods if m not in valid]
    if bad:
        sys.exit(f"error: unknown method {bad[0]!r}; valid: {', '.join(valid)}")
    for key in ("batch", "seq", "steps"):
        if getattr(args, key) < 1:
            sys.exit(f"error: --{key} must be at least 1, got {getattr(args, key)}")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = args.peak_tflops
    if peak is None and args.precision == "bf16-true" and torch.cuda.is_available():
        peak = device_peak(name)
    rows = [measure(args.model, method, args, peak) for method in args.methods]
    print(
        f"\n### {args.model}, {args.precision}, batch {args.batch} x {args.seq} tokens, "
        f"{'compiled' if args.compile else 'eager'}, {name}, peak {peak or '?'} TFLOP/s, median of {args.steps} steps\n"
    )
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
