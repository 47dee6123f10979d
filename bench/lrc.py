"""Low-Rank Clone training-step time: generated weights vs the factored route vs the automatic choice.

    python bench/lrc.py                                  # SmolLM2-135M-shaped teacher (random weights), 576 -> 384
    python bench/lrc.py --model tiny-llama-1.1b --width 1024 --batches 1x128,4x512

A step = teacher forward (no grad) + student forward and backward on the full LRC loss (CE + KL + all clone sites).
`generated` builds every student weight (W_t @ P or P^T @ W_t) per forward; `factored` runs x @ P^T @ W_t^T (input
side) and (x @ W_t^T) @ P (output side); `auto` picks per layer and batch by multiply-add count. Also reported: the
same step with the clone losses off, and the teacher forward alone. Medians over rounds; ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M", help="a LitGPT config name")
    parser.add_argument("--width", type=int, default=384, help="the student's hidden size")
    parser.add_argument("--batches", default="2x128,8x256", help="micro-batch x sequence length, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    from litgpt import GPT, Config

    from lit_peft.models.lrc import LowRankClone, LRCSettings, ProjectedLinear
    from lit_peft.tasks.lrc import LowRankCloneTask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = Config.from_name(args.model)
    with torch.device(device):
        teacher = GPT(config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    clone = LowRankClone(teacher.to(dtype), LRCSettings(args.width)).train()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    print(f"{args.model} -> hidden {args.width} on {device} ({dtype}); medians of {args.rounds} rounds")
    print(f"{'batch':>8} {'variant':>22} {'s/step':>8} {'tokens/s':>9} {'vs auto':>8}")
    for spec in args.batches.split(","):
        b, t = (int(v) for v in spec.split("x"))
        idx = torch.randint(0, config.padded_vocab_size, (b, t), device=device)
        batch = {"input_ids": idx, "labels": idx}

        def step(task: LowRankCloneTask, batch: dict = batch) -> None:
            with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                loss, _ = task(clone, batch)
            loss.backward()
            clone.zero_grad(set_to_none=True)

        results = {}
        for mode in ("auto", "generated", "factored"):
            for m in clone.modules():
                if isinstance(m, ProjectedLinear):
                    m.compute = mode
            results[mode] = timed(lambda: step(LowRankCloneTask()))
            if mode == "auto":
                results["auto, no clone losses"] = timed(lambda: step(LowRankCloneTask(aux_scale=0)))
        with torch.no_grad():
            results["teacher forward only"] = timed(lambda idx=idx: teacher(idx))
        for name, seconds in results.items():
            ratio = seconds / results["auto"]
            print(f"{spec:>8} {name:>22} {seconds:8.3f} {b * t / seconds:9.0f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
