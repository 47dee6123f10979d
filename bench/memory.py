"""Peak memory of a LoRA training step over an fp32, a bf16 and a 4-bit (QLoRA, nf4 + double quantization) base.

    python bench/memory.py                      # SmolLM2-135M and a random TinyLlama-1.1B-shaped model
    python bench/memory.py --models tinyllama --batch 1 --seq 256

Each variant runs in its own process. On CUDA the figure is torch's peak allocated memory over the steps; on CPU it
is the process's peak resident memory while stepping (sampled every millisecond; glibc's mmap threshold fixed at
1 MiB so freed buffers leave), minus what the process held after its imports: the model, adapters, optimizer state,
activations and temporaries, without the Python runtime.
LoRA r=8 on query, key, value, projection and mlp in every variant; ratios are to the fp32 base, measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINYLLAMA = dict(
    name="tinyllama-1.1b-shaped",
    block_size=2048,
    vocab_size=32000,
    padded_vocab_size=32000,
    n_layer=22,
    n_head=32,
    n_query_groups=4,
    n_embd=2048,
    intermediate_size=5632,
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    rotary_percentage=1.0,
    parallel_residual=False,
)
VARIANTS = {
    "LoRA, fp32 base": (None, "float32"),
    "LoRA, bf16 base": (None, "bfloat16"),
    "QLoRA, nf4-dq base, fp32 compute": ("nf4-dq", "float32"),
    "QLoRA, nf4-dq base, bf16 compute": ("nf4-dq", "bfloat16"),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssPeak:
    """Peak resident memory above the level at creation (CPU), sampled every millisecond until `stop()`."""

    def __init__(self) -> None:
        release_free_memory()
        self.start = self.peak = rss_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak - self.start


def worker(model_key: str, variant: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from litgpt import GPT, Config

    from lit_peft.model import install_method, load_base

    quantize, dtype = VARIANTS[variant]
    cuda = torch.cuda.is_available()
    release_free_memory()
    baseline = rss_bytes()
    if model_key == "smollm2":
        from lit_peft.hub import prepare_checkpoint

        ckpt = prepare_checkpoint(
            {"checkpoint_dir": str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), "source": "smollm2-gguf"}
        )
        model = load_base(ckpt, max_seq_length=seq)
    else:
        torch.manual_seed(0)
        model = GPT(Config(**TINYLLAMA))
        model.max_seq_length = seq
    model = model.to(getattr(torch, dtype))
    install_method(
        model, "lora", {"targets": ["query", "key", "value", "projection", "mlp"], "r": 8}, quantize=quantize
    )
    if cuda:
        model = model.cuda()
    release_free_memory()
    device = "cuda" if cuda else "cpu"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)

    sampler = RssPeak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    above_start = sampler.stop()
    used = torch.cuda.max_memory_allocated() if cuda else sampler.start + above_start - baseline
    return {
        "variant": variant,
        "mib": used / 2**20,
        "trainable": sum(p.numel() for p in trainable),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "tinyllama"], choices=["smollm2", "tinyllama"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.batch, args.seq)))
        return
    for model_key in args.models:
        rows = []
        for variant in VARIANTS:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                model_key,
                variant,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
            # A fixed mmap threshold makes glibc hand large freed buffers (dequantized weights, activations) back
            # to the OS at once, so resident memory follows what is allocated instead of what malloc kept.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"error: {model_key} / {variant} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        fp32 = rows[0]["mib"]
        print(f"\n### {model_key} (batch {args.batch} x {args.seq} tokens, {rows[0]['device']}, {args.steps} steps)\n")
        print("| variant | peak memory (MiB) | x fp32 base | x bf16 base | trainable params |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['variant']} | {r['mib']:.0f} | {r['mib'] / fp32:.2f} | {r['mib'] / rows[1]['mib']:.2f} "
                f"| {r['trainable']:,} |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
