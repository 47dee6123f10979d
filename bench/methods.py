"""Training-step time of every method, against LoRA r=8, on SmolLM2-135M and on a random 2048-wide 4-layer model.

    python bench/methods.py                       # both models, all variants (CPU: about 15 minutes on 2 cores)
    python bench/methods.py --models wide --steps 3 --batch 1 --seq 256

One step = forward + backward + AdamW step on a fixed batch. Each variant runs in its own process, so the peak
memory (CUDA: max allocated; CPU: the process's peak RSS, which model loading may dominate) is its own; "saved for
backward" counts the activations autograd keeps in one forward (unique storages, parameters excluded). "frozen base" is the floor every adapter
pays: the same forward and backward through the frozen model, gradients flowing to the activations only.
"rebuild" rows are the original ETHER implementation's formulation: the dense W H formed blockwise every step.
All methods target query and value (as LoRA's default), ratios are to LoRA r=8 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDE = dict(name="wide-2048x4", block_size=4096, vocab_size=32000, padded_vocab_size=32000, n_layer=4, n_head=16,
            n_query_groups=4, n_embd=2048, intermediate_size=5632, bias=False, norm_class_name="RMSNorm",
            mlp_class_name="LLaMAMLP", rotary_percentage=1.0, parallel_residual=False)

VARIANTS = ["frozen base", "lora r=8"] + [
    f"{m} nb={nb}" for m in ("ether", "etherplus", "etherplusHH") for nb in (1, 4, 32)
] + ["oft nb=32"] + [f"{m} nb={nb} rebuild" for m in ("ether", "etherplus") for nb in (1, 32)]
VARIANT_PATTERN = re.compile(r"frozen base|lora r=\d+|(ether|etherplus|etherplusHH|oft) nb=\d+|(ether|etherplus) nb=\d+ rebuild")


def build(model_key: str, variant: str):
    import torch
    from litgpt import GPT, Config

    from lit_peft.methods import build_settings
    from lit_peft.model import load_base

    if model_key == "smollm2":
        from lit_peft.hub import prepare_checkpoint

        ckpt = prepare_checkpoint({"checkpoint_dir": str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
                                   "source": "smollm2-gguf"})
        model = load_base(ckpt)
    else:
        torch.manual_seed(0)
        model = GPT(Config(**WIDE))
    model.requires_grad_(False)
    if variant == "frozen base":
        model.transformer.wte.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return model
    name, *rest = variant.split()
    values = {"targets": ["query", "value"]}
    if name == "lora":
        values["r"] = int(rest[0].split("=")[1])
    else:
        values["nb"] = int(rest[0].split("=")[1])
    method, settings = build_settings(name, values)
    method.apply(model, settings)
    if rest and rest[-1] == "rebuild":
        from lit_peft.methods import adapters

        for _, layer in adapters(model):
            layer.__class__ = RebuildTransformLinear
    return model


def _rebuild_class():
    import torch
    import torch.nn.functional as F

    from lit_peft.methods.transform import TransformLinear

    class Rebuild(TransformLinear):
        """ETHER as first implemented: W' = W H formed densely (blockwise) every step, then one matmul."""

        def adapted(self, x: torch.Tensor) -> torch.Tensor:
            w = self.base.weight
            parts = []
            for i in range(len(self.groups)):
                w_i = self._take(w, i, 0)  # (rows, in)
                if i < len(self.part_names):
                    t = self.t_in[i]
                    h = t.blocks().to(w.dtype)  # (nb, b, b)
                    w_i = torch.einsum("fnb,nbc->fnc", w_i.unflatten(1, (t.nb, t.block)), h).flatten(1)
                parts.append(w_i)
            weight = torch.cat(parts, 0)
            if not self.in_order:
                weight = weight.index_select(0, self.inverse)
            return F.linear(self.dropout(x), weight, self.base.bias)

    return Rebuild


def worker(model_key: str, variant: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    import torch

    global RebuildTransformLinear
    RebuildTransformLinear = _rebuild_class()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(model_key, variant).to(device)
    model.max_seq_length = seq
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
    times = []
    saved = saved_activation_bytes(model, idx)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "sec": statistics.median(times), "trainable": sum(p.numel() for p in trainable),
            "peak_mb": peak / 2**20, "saved_mb": saved / 2**20, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def saved_activation_bytes(model, idx) -> int:
    """Bytes autograd keeps for backward in one forward: unique storages, parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx).sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "wide"], choices=["smollm2", "wide"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, metavar="VARIANT")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    bad = [v for v in args.variants if not VARIANT_PATTERN.fullmatch(v)]
    if bad:
        sys.exit(f"error: unknown variant {bad[0]!r}; valid: {VARIANT_PATTERN.pattern}, e.g. {', '.join(VARIANTS[:4])}")
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.batch, args.seq)))
        return
    for model_key in args.models:
        rows = []
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", model_key, variant, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"error: {model_key} / {variant} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {model_key:8s} {variant:24s} {rows[-1]['sec']:.3f} s/step", file=sys.stderr, flush=True)
        lora = next((r["sec"] for r in rows if r["variant"] == "lora r=8"), None)
        print(f"\n### {model_key} (batch {args.batch} x {args.seq} tokens, {rows[0]['device']}, median of "
              f"{args.steps} steps after {args.warmup} warm-up)\n")
        print("| variant | s/step | x LoRA r=8 | trainable params | saved for backward (MiB) | peak memory (MiB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            ratio = f"{r['sec'] / lora:.2f}" if lora else "-"
            print(f"| {r['variant']} | {r['sec']:.3f} | {ratio} | {r['trainable']:,} | {r['saved_mb']:.0f} "
                  f"| {r['peak_mb']:.0f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
