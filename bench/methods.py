"""Training-step time of every method, against LoRA r=8, on SmolLM2-135M and on a random 2048-wide 4-layer model.

    python bench/methods.py                       # both models, all variants (CPU: about 30 minutes on 2 cores)
    python bench/methods.py --models wide --rounds 2 --batch 1 --seq 256

One step = forward + backward + AdamW step on a fixed batch. All variants share one process and one frozen model
(installed, timed, removed), interleaved over several rounds so that machine noise hits them alike. "saved for
backward" counts the activations autograd keeps in one forward (unique storages, parameters excluded). Peak memory
of each variant's first round: on CUDA torch's peak allocated memory; on CPU the resident memory above the level
before the steps (adapter, optimizer state, activations, temporaries; run with MALLOC_MMAP_THRESHOLD_=1048576 so
that glibc returns freed buffers and the figure follows what is allocated). "frozen base" is the floor every adapter
pays: the same forward and backward through the frozen model, gradients flowing to the activations only.
"rebuild" rows are the original ETHER implementation's formulation: the dense W H formed blockwise every step.
All methods adapt the same Linears (`--targets`, default query and value as LoRA's default); ratios are to LoRA r=8
measured in the same run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memory import RssPeak  # noqa: E402  (bench/ is on sys.path when a bench script runs)

WIDE = dict(
    name="wide-2048x4",
    block_size=4096,
    vocab_size=32000,
    padded_vocab_size=32000,
    n_layer=4,
    n_head=16,
    n_query_groups=4,
    n_embd=2048,
    intermediate_size=5632,
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    rotary_percentage=1.0,
    parallel_residual=False,
)

VARIANTS = (
    ["frozen base", "lora r=8"]
    + [f"{m} nb={nb}" for m in ("ether", "etherplus", "etherplusHH") for nb in (1, 4, 32)]
    + ["oft nb=32"]
    + [f"{m} nb={nb} rebuild" for m in ("ether", "etherplus") for nb in (1, 32)]
)
VARIANT_PATTERN = re.compile(
    r"frozen base|lora r=\d+|(ether|etherplus|etherplusHH|oft) nb=\d+|(ether|etherplus) nb=\d+ rebuild"
)


def load_model(model_key: str):
    import torch
    from litgpt import GPT, Config

    from lit_peft.model import load_base

    if model_key == "smollm2":
        from lit_peft.hub import prepare_checkpoint

        ckpt = prepare_checkpoint(
            {"checkpoint_dir": str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), "source": "smollm2-gguf"}
        )
        model = load_base(ckpt)
    else:
        torch.manual_seed(0)
        model = GPT(Config(**WIDE))
    return model.requires_grad_(False)


def apply_variant(model, variant: str, targets: list[str]):
    """Install `variant` on the frozen model; returns a function that takes it off again."""
    from lit_peft.methods import adapters, build_settings

    if variant == "frozen base":
        hook = model.transformer.wte.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return hook.remove
    name, *rest = variant.split()
    values = {"targets": targets}
    if name == "lora":
        values["r"] = int(rest[0].split("=")[1])
    else:
        values["nb"] = int(rest[0].split("=")[1])
    method, settings = build_settings(name, values)
    method.apply(model, settings)
    if rest[-1] == "rebuild":
        for _, layer in adapters(model):
            layer.__class__ = RebuildTransformLinear

    def remove() -> None:
        for name_, layer in list(adapters(model)):
            parent, _, attr = name_.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, layer.base)
        model.requires_grad_(False)

    return remove


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


def worker(
    model_key: str, variants: list[str], rounds: int, steps: int, batch: int, seq: int, targets: list[str]
) -> list[dict]:
    """Time every variant in one process, interleaved over `rounds`, so machine noise hits all of them alike."""
    import torch

    global RebuildTransformLinear
    RebuildTransformLinear = _rebuild_class()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_key).to(device)
    model.max_seq_length = seq
    idx = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {
        v: {"variant": v, "times": [], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        for v in variants
    }
    for r in range(rounds):
        for v in variants:
            remove = apply_variant(model, v, targets)
            model.to(device)
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
            if r == 0:
                results[v]["trainable"] = sum(p.numel() for p in trainable)
                results[v]["saved_mb"] = saved_activation_bytes(model, idx) / 2**20
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                else:
                    rss = RssPeak()
            for step in range(1 + steps):  # one warm-up step per round
                sync()
                start = time.perf_counter()
                logits = model(idx)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
                loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync()
                if step:
                    results[v]["times"].append(time.perf_counter() - start)
            if r == 0:
                results[v]["peak_mb"] = (torch.cuda.max_memory_allocated() if device == "cuda" else rss.stop()) / 2**20
            del opt
            remove()
            print(f"  {model_key} round {r + 1}/{rounds} {v}", file=sys.stderr, flush=True)
    for res in results.values():
        res["sec"] = statistics.median(res.pop("times"))
    return list(results.values())


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
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=["query", "value"], help="Linears every method adapts")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    bad = [v for v in args.variants if not VARIANT_PATTERN.fullmatch(v)]
    if bad:
        sys.exit(f"error: unknown variant {bad[0]!r}; valid: {VARIANT_PATTERN.pattern}, e.g. {', '.join(VARIANTS[:4])}")
    for model_key in args.models:
        rows = worker(model_key, args.variants, args.rounds, args.steps, args.batch, args.seq, args.targets)
        lora = next((r["sec"] for r in rows if r["variant"] == "lora r=8"), None)
        print(
            f"\n### {model_key} (batch {args.batch} x {args.seq} tokens, {rows[0]['device']}, median of "
            f"{args.rounds} rounds x {args.steps} steps, variants interleaved, targets {','.join(args.targets)})\n"
        )
        peak = "peak allocated" if rows[0]["device"] != "cpu" else "step peak RSS"
        print(f"| variant | s/step | x LoRA r=8 | trainable params | saved for backward (MiB) | {peak} (MiB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            ratio = f"{r['sec'] / lora:.2f}" if lora else "-"
            print(
                f"| {r['variant']} | {r['sec']:.3f} | {ratio} | {r['trainable']:,} | {r['saved_mb']:.0f} "
                f"| {r['peak_mb']:.0f} |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
