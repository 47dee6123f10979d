"""Peak memory of a training step: LoRA over an fp32, a bf16 and a 4-bit (QLoRA, nf4 + double quantization) base,
ETHER over the same 4-bit base, each with the output head a chunk of positions at a time and with the full logits.

    python bench/memory.py                      # SmolLM2-135M and a random TinyLlama-1.1B-shaped model
    python bench/memory.py --models smollm2 --batch 4 --seq 1024     # the 49k-vocabulary head at 4 x 1024 tokens
    python bench/memory.py --models tinyllama --batch 1 --seq 256 --head chunked

Each variant runs in its own process. On CUDA the figure is torch's peak allocated memory over the steps; on CPU it
is the process's peak resident memory while stepping (sampled every millisecond; glibc's mmap threshold fixed at
1 MiB so freed buffers leave), minus what the process held after its imports: the model, adapters, optimizer state,
activations and temporaries, without the Python runtime.
Every variant adapts query, key, value, projection and mlp (LoRA r=8; ETHER one block); the loss is next-token
cross-entropy on every token, through the SFT task: `--head chunked` runs the head a chunk of target positions at a
time (tasks/chunked_head.py, what training does), `--head full` computes the full (B, T, V) logits (the bench's own
loss: no task has that route). Ratios are to the fp32 base with the same head, and chunked to full, all measured in
one run.
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
TARGETS = ["query", "key", "value", "projection", "mlp"]
LORA = ("lora", {"targets": TARGETS, "r": 8})
ETHER = ("ether", {"targets": TARGETS})
VARIANTS = {  # name: (method and settings, quantize, base dtype)
    "LoRA, fp32 base": (LORA, None, "float32"),
    "LoRA, bf16 base": (LORA, None, "bfloat16"),
    "QLoRA, nf4-dq base, fp32 compute": (LORA, "nf4-dq", "float32"),
    "QLoRA, nf4-dq base, bf16 compute": (LORA, "nf4-dq", "bfloat16"),
    "ETHER, nf4-dq base, fp32 compute": (ETHER, "nf4-dq", "float32"),
    "ETHER, nf4-dq base, bf16 compute": (ETHER, "nf4-dq", "bfloat16"),
}
HEADS = ("chunked", "full")


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


def worker(model_key: str, variant: str, head: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from litgpt import GPT, Config

    from lit_peft.models.load import install_method, load_base
    from lit_peft.tasks.chunked_head import HEAD_CHUNK
    from lit_peft.tasks.sft import SFT

    (method, settings), quantize, dtype = VARIANTS[variant]
    cuda = torch.cuda.is_available()
    release_free_memory()
    baseline = rss_bytes()
    if model_key == "smollm2":
        from lit_peft.checkpoints.hub import prepare_checkpoint

        ckpt = prepare_checkpoint(
            {"checkpoint_dir": str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), "source": "smollm2-gguf"}
        )
        model = load_base(ckpt, max_seq_length=seq)
    else:
        torch.manual_seed(0)
        model = GPT(Config(**TINYLLAMA))
        model.max_seq_length = seq
    model = model.to(getattr(torch, dtype))
    install_method(model, method, settings, quantize=quantize)
    if cuda:
        model = model.cuda()
    release_free_memory()
    device = "cuda" if cuda else "cpu"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)
    task = SFT()  # every token a target: the labels are the inputs
    task.head_chunk = HEAD_CHUNK

    def full_logits_loss(model, batch):  # what the tasks did before the chunked head: the (B, T, V) logits at once
        logits = model(batch["input_ids"])[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten()), {}

    if head != "chunked":
        task = full_logits_loss

    sampler = RssPeak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        loss, _ = task(model, {"input_ids": idx, "labels": idx})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    above_start = sampler.stop()
    used = torch.cuda.max_memory_allocated() if cuda else sampler.start + above_start - baseline
    return {
        "variant": variant,
        "head": head,
        "mib": used / 2**20,
        "trainable": sum(p.numel() for p in trainable),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def measure(model_key: str, variant: str, head: str, args: argparse.Namespace) -> dict:
    """One variant's step in a fresh process (its peak is its own)."""
    cmd = [sys.executable, __file__, "--worker", model_key, variant, head]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    # A fixed mmap threshold makes glibc hand large freed buffers (dequantized weights, activations) back
    # to the OS at once, so resident memory follows what is allocated instead of what malloc kept.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"error: {model_key} / {variant} / {head} head failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "tinyllama"], choices=["smollm2", "tinyllama"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--head", nargs="+", default=list(HEADS), choices=HEADS, help="chunked, full or both")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.batch, args.seq)))
        return
    heads = [h for h in HEADS if h in args.head]
    for model_key in args.models:
        rows = {v: {h: measure(model_key, v, h, args) for h in heads} for v in args.variants}
        first = rows[args.variants[0]]
        device = next(iter(first.values()))["device"]
        print(f"\n### {model_key} (batch {args.batch} x {args.seq} tokens, {device}, {args.steps} steps)\n")
        columns = [f"peak MiB, {h} head" for h in heads] + [f"x {args.variants[0]}, {heads[0]} head"]
        columns += ["chunked / full"] if len(heads) == 2 else []
        print("| variant | " + " | ".join(columns) + " | trainable params |")
        print("|---|" + "---:|" * (len(columns) + 1))
        for variant, by_head in rows.items():
            cells = [f"{by_head[h]['mib']:.0f}" for h in heads]
            cells.append(f"{by_head[heads[0]]['mib'] / first[heads[0]]['mib']:.2f}")
            if len(heads) == 2:
                cells.append(f"{by_head['chunked']['mib'] / by_head['full']['mib']:.2f}")
            print(f"| {variant} | " + " | ".join(cells) + f" | {by_head[heads[0]]['trainable']:,} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
