"""Prefill and per-token decode latency of CQIL against the original model (ratios measured in one run).

    python bench/cqil.py                            # SmolLM2-135M- and TinyLlama-1.1B-shaped, random weights
    python bench/cqil.py --models smollm2 --prompt 512 --decode 64

Variants: the original (sequential) model; the simulated CQIL model (members one after another: the training path);
the batched path (a group's members in one vmapped pass over stacked weights; prefill only, decoding falls back to
the simulation); and the distributed path (members on 2 torch.distributed ranks, updates summed by all-reduce; gloo
on CPU, NCCL when 2 GPUs are visible), run in 2 processes with half the threads each. Prefill = one forward over the
prompt; decode = mean time of one token with the KV cache after that prefill. Medians over rounds.
Groups: 8 pairs over the upper layers (SmolLM2: pairs:12-27 of 30; TinyLlama: pairs:6-21 of 22).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"smollm2": ("SmolLM2-135M", "pairs:12-27"), "tinyllama": ("tiny-llama-1.1b", "pairs:6-21")}


def build(model_key: str, groups: str | None, device: str):
    import torch
    from litgpt import GPT, Config

    from lit_peft.models import cqil

    torch.manual_seed(0)
    config = Config.from_name(MODELS[model_key][0])
    with torch.device(device):
        model = GPT(config).eval()
    if device == "cuda":
        model = model.to(torch.bfloat16)
    if groups:
        cqil.install(model, cqil.build_settings({"groups": groups}, config.n_layer))
    return model


def timed(fn, sync, rounds: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, prompt: int, decode: int, rounds: int, device: str) -> tuple[float, float]:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    idx = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    model.max_seq_length = prompt + decode + 1

    @torch.inference_mode()
    def prefill():
        model(idx)

    @torch.inference_mode()
    def generate():
        model.set_kv_cache(batch_size=1, device=idx.device)
        model(idx, input_pos=torch.arange(prompt, device=idx.device))
        sync()
        start = time.perf_counter()
        token = idx[:, -1:]
        for t in range(prompt, prompt + decode):
            token = model(token, input_pos=torch.tensor([t], device=idx.device))[:, -1:].argmax(-1)
        sync()
        generate.per_token = (time.perf_counter() - start) / decode
        model.clear_kv_cache()

    prefill_s = timed(prefill, sync, rounds)
    per_token = []
    for _ in range(rounds):
        generate()
        per_token.append(generate.per_token)
    return prefill_s, statistics.median(per_token)


def distributed_worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch
    import torch.distributed as dist

    from lit_peft.models import cqil

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_cuda = args.device == "cuda" and torch.cuda.device_count() >= world
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    device = "cuda" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(max(1, args.threads // world))
    model = build(args.model, MODELS[args.model][1], device)
    cqil.set_mode(model, "distributed")
    result = measure(model, args.prompt, args.decode, args.rounds, device)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def main() -> None:
    import torch
    import torch.multiprocessing as mp

    from lit_peft.models import cqil

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    for model_key in args.models:
        rows = {}
        for name, groups, mode in (
            ("original", None, None),
            ("CQIL simulated", MODELS[model_key][1], "simulated"),
            ("CQIL batched (vmap)", MODELS[model_key][1], "batched"),
        ):
            model = build(model_key, groups, args.device)
            if mode:
                cqil.set_mode(model, mode)
            rows[name] = measure(model, args.prompt, args.decode, args.rounds, args.device)
            del model
        if args.device != "cuda" or torch.cuda.device_count() >= 2:  # one rank per GPU; gloo ranks on CPU
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = str(ROOT / f".bench_cqil_{os.getpid()}.pt")
            args.model = model_key
            mp.start_processes(distributed_worker, args=(2, port, args, out), nprocs=2, join=True, start_method="spawn")
            backend = "nccl" if args.device == "cuda" else "gloo"
            rows[f"CQIL distributed (2 ranks, {backend})"] = torch.load(out, weights_only=True)
            os.unlink(out)
        device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} threads"
        base_prefill, base_decode = rows["original"]
        print(
            f"\n### {MODELS[model_key][0]} ({MODELS[model_key][1]}; prompt {args.prompt}, {args.decode} decoded "
            f"tokens; {device}; median of {args.rounds})\n"
        )
        print("| variant | prefill (ms) | x original | decode (ms/token) | x original |")
        print("|---|---:|---:|---:|---:|")
        for name, (prefill, decode) in rows.items():
            note = " (falls back to simulated)" if "batched" in name else ""
            print(
                f"| {name} | {prefill * 1e3:.1f} | {prefill / base_prefill:.2f} | {decode * 1e3:.1f}{note} "
                f"| {decode / base_decode:.2f} |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
