"""Training-step time of every method against LoRA r=8 and against the frozen model's floor; optionally with HF PEFT.

    python bench/methods.py                                   # SmolLM2-135M and a random 2048-wide 4-layer model
    python bench/methods.py --models smollm2 --peers          # + Hugging Face PEFT on the same model, same table
    python bench/methods.py --models wide --compile           # + every variant with its blocks torch.compile'd
    python bench/methods.py --models tiny --rounds 1 --steps 1 --batch 1 --seq 32   # smoke test (seconds)

One step = forward to logits, mean next-token cross-entropy over every position (the same `lm_loss` for every
row), backward, AdamW step, on a fixed batch. All variants share one process and one frozen model (installed,
timed, removed), interleaved over several rounds so that machine noise hits them alike; s/step is the median of
the timed steps (the first round starts with one untimed warm-up step per variant).
"frozen base" is the floor every adapter pays: the same forward and backward through the frozen model, gradients
flowing to the activations only. "x LoRA r=8" divides by our LoRA r=8, "x floor" by the frozen base of the row's
own model (ours for our rows, the Hugging Face twin for "peft" rows), both measured in the same run and the same
mode (eager or compiled). "rebuild" rows are the original ETHER implementation's formulation: the dense W H formed
blockwise every step. "unfused" LoRA rows switch off `LoRALinearFunction` (plain autograd ops: the general path the
interleaved qkv layout and 4-bit bases take). "direct" / "low-rank" rows force the input side's route of the ETHER
family (`TransformLinear.compute`; plain rows choose per Linear and batch). "b=32" is 32-wide blocks, "nb=32" 32
blocks. All methods adapt the same Linears (`--targets`, default every Linear of a block: q, k, v, the attention
projection and the three MLP Linears).

--peers adds Hugging Face PEFT's LoRA, OFT and HRA (the `bench` extra: pip install -e '.[bench]') on a
transformers LlamaForCausalLM built from our model (`lit_peft.export.hf.llama_hf_config`, litgpt's weight
renaming; fp32, sdpa attention, same weights, checked to give our loss), adapting the same Linears.
--compile adds a "+compile" row per variant: each transformer block wrapped in torch.compile (regional
compilation: one graph serves every block), "x eager" is its time over the same variant's eager time.

"saved for backward" counts the activations autograd keeps in one forward (unique storages, parameters excluded).
Peak memory of each variant's first round: on CUDA torch's peak allocated memory; on CPU the resident memory above
the level before the steps (adapter, optimizer state, activations, temporaries; run with
MALLOC_MMAP_THRESHOLD_=1048576 so that glibc returns freed buffers and the figure follows what is allocated).
Time steps in a separate run without that setting: it makes every large buffer a fresh mapping whose pages fault in
on first touch, which slowed a SmolLM2 step about 1.5x on a 2-core CPU and weighs most on the rows that allocate most.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memory import RssPeak  # noqa: E402  (bench/ is on sys.path when a bench script runs)

LLAMA_STYLE = dict(
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    rotary_percentage=1.0,
    parallel_residual=False,
)
RANDOM_MODELS = {
    "wide": dict(
        name="wide-2048x4",
        block_size=4096,
        vocab_size=32000,
        padded_vocab_size=32000,
        n_layer=4,
        n_head=16,
        n_query_groups=4,
        n_embd=2048,
        intermediate_size=5632,
        **LLAMA_STYLE,
    ),
    "tiny": dict(  # for tests: every width divisible by 32 blocks and by 32-wide blocks
        name="tiny-128x2",
        block_size=256,
        vocab_size=256,
        padded_vocab_size=256,
        n_layer=2,
        n_head=4,
        n_query_groups=2,
        n_embd=128,
        intermediate_size=256,
        **LLAMA_STYLE,
    ),
}
MODELS = ("smollm2", *RANDOM_MODELS)
ALL_BLOCK_LINEARS = ["query", "key", "value", "projection", "mlp"]

VARIANTS = (
    ["frozen base", "lora r=8", "lora r=8 unfused", "dora r=8", "pissa r=8", "hra r=8"]
    + [f"{m} nb={nb}" for m in ("ether", "etherplus", "etherplusHH") for nb in (1, 4, 32)]
    + ["oft nb=32", "oft b=32"]
    + [f"{m} nb={nb} rebuild" for m in ("ether", "etherplus") for nb in (1, 32)]
    + [f"{m} nb={nb} {route}" for m in ("ether", "etherplus") for nb in (1, 32) for route in ("direct", "low-rank")]
)
PEER_VARIANTS = [
    *["peft frozen base", "peft lora r=8", "peft dora r=8"],
    *["peft oft b=32", "peft oft b=32 exact", "peft hra r=8"],
]
VARIANT_PATTERN = re.compile(
    r"frozen base|(lora|dora|pissa|hra) r=\d+|(ether|etherplus|etherplusHH|oft) n?b=\d+"
    r"|(ether|etherplus) nb=\d+ rebuild|lora r=\d+ unfused|(ether|etherplus|etherplusHH) nb=\d+ (direct|low-rank)"
    r"|peft (frozen base|(lora|dora) r=\d+|oft b=\d+( exact)?|hra r=\d+)"
)
ROW_METHODS = {"pissa": ("lora", {"init": "pissa"})}  # a row's first word -> (method, settings) when it is no method
COMPILED = " +compile"
# Our target names -> the Linears of a transformers Llama block.
HF_LINEARS = {
    "query": ["q_proj"],
    "key": ["k_proj"],
    "value": ["v_proj"],
    "projection": ["o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "head": ["lm_head"],
}
SETTING_KEYS = {"r": "r", "nb": "nb", "b": "block_size"}  # "lora r=8" -> r=8, "oft b=32" -> block_size=32


def lm_loss(logits, idx):
    """Mean next-token cross-entropy over every position: the one loss every row computes."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


@dataclasses.dataclass
class Subject:
    """A model the variants are installed on: ours (LitGPT), or its Hugging Face twin for the PEFT rows.

    `owner.<attr>` is the ModuleList of transformer blocks; for "+compile" rows it is swapped for `compiled`,
    torch.compile wrappers around the same block objects (so adapters installed in a block are seen by both).
    """

    model: object
    logits: Callable
    owner: object
    attr: str
    eager: object
    compiled: object = None

    def use_compiled(self, on: bool) -> None:
        setattr(self.owner, self.attr, self.compiled if on else self.eager)


def compile_blocks(blocks):
    import torch
    import torch._dynamo
    from torch import nn

    # One graph per variant (and per block class); never fall back to eager when variants add up.
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return nn.ModuleList(torch.compile(b) for b in blocks)


def load_model(model_key: str):
    import torch
    from litgpt import GPT, Config

    from lit_peft.models.load import load_base

    if model_key == "smollm2":
        from lit_peft.checkpoints.hub import prepare_checkpoint

        ckpt = prepare_checkpoint(
            {"checkpoint_dir": str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), "source": "smollm2-gguf"}
        )
        model = load_base(ckpt)
    else:
        torch.manual_seed(0)
        model = GPT(Config(**RANDOM_MODELS[model_key]))
    return model.requires_grad_(False)


def hf_twin(model, idx):
    """transformers' LlamaForCausalLM with our model's weights (shared, not copied): fp32, sdpa, no KV cache.

    The config is lit_peft.export.hf's, the weight names litgpt's converter's (as `export_hf` writes them); the
    twin's loss on `idx` must equal ours, or the comparison would not be of the same model.
    """
    import torch
    from litgpt.scripts.convert_lit_checkpoint import copy_weights_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_peft.export.hf import llama_hf_config

    values = {k: v for k, v in llama_hf_config(model.config).items() if k not in ("architectures", "model_type")}
    config = LlamaConfig(**values, use_cache=False)
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config).to(device=idx.device, dtype=torch.float32)
    state: dict = {}
    copy_weights_llama(model.config, state, model.state_dict())
    hf.load_state_dict(state, strict=True, assign=True)
    hf.requires_grad_(False).train()
    with torch.no_grad():
        ours, theirs = lm_loss(model(idx), idx).item(), lm_loss(hf(input_ids=idx).logits, idx).item()
    if not math.isclose(ours, theirs, rel_tol=1e-4):
        raise RuntimeError(f"the Hugging Face twin's loss {theirs:.6f} differs from ours {ours:.6f}")
    print(f"  Hugging Face twin: loss {theirs:.6f}, ours {ours:.6f}", file=sys.stderr, flush=True)
    return hf


def peer_variants(targets: list[str]) -> dict[str, Callable]:
    """Hugging Face PEFT's methods by row name: each installs itself on the twin and returns (logits, remove).

    The upstream references our methods are held against; add a method here as one more config.
    PEFT's OFT: `oft_block_size` is the block width (r=0 lets PEFT derive the count); by default it approximates
    the Cayley transform with a 5-term Neumann series ("exact" rows solve it, as our OFT does).
    """
    import peft

    modules = [m for t in targets for m in HF_LINEARS[t]]

    def config(variant: str):
        _, name, *rest = variant.split()
        value = int(rest[0].split("=")[1])
        if name in ("lora", "dora"):  # our LoRA's defaults: alpha 16, no dropout
            return peft.LoraConfig(
                r=value, lora_alpha=16, lora_dropout=0.0, target_modules=modules, use_dora=name == "dora"
            )
        if name == "oft":
            exact = rest[-1] == "exact"
            return peft.OFTConfig(r=0, oft_block_size=value, target_modules=modules, use_cayley_neumann=not exact)
        if name == "hra":
            return peft.HRAConfig(r=value, target_modules=modules)
        raise ValueError(f"no PEFT config for {variant!r}")

    def install(variant: str, hf):
        peft_model = peft.get_peft_model(hf, config(variant))

        def remove() -> None:
            peft_model.unload()  # the twin gets its plain Linears back
            hf.requires_grad_(False)

        return (lambda idx: peft_model(input_ids=idx).logits), remove

    return {v: install for v in PEER_VARIANTS if v != "peft frozen base"}


def settings_values(variant: str, targets: list[str]) -> dict:
    """A row name's method settings: "oft b=32" -> {"targets": ..., "block_size": 32}."""
    values = {"targets": targets, **ROW_METHODS.get(variant.split()[0], ("", {}))[1]}
    for word in variant.split()[1:]:
        if "=" in word:
            key, value = word.split("=")
            values[SETTING_KEYS[key]] = int(value)
    return values


def unavailable(variant: str, targets: list[str]) -> str | None:
    """Why this checkout's methods cannot build `variant` (e.g. OFT before its `block_size` setting), or None."""
    from lit_peft.methods import build_settings

    name = variant.split()[0]
    if name in ("frozen", "peft"):
        return None
    name = ROW_METHODS.get(name, (name,))[0]
    try:
        build_settings(name, settings_values(variant, targets))
    except ValueError as e:
        return str(e)
    return None


def apply_variant(subject: Subject, variant: str, targets: list[str], peers: dict):
    """Install `variant` on the subject's frozen model; returns (logits function, remove)."""
    from lit_peft.methods import adapters, build_settings

    model = subject.model
    if variant.endswith("frozen base"):  # ours or the twin's: gradients to the activations only
        embedding = model.transformer.wte if variant == "frozen base" else model.model.embed_tokens
        hook = embedding.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return subject.logits, hook.remove
    if variant.startswith("peft "):
        return peers[variant](variant, model)
    name = variant.split()[0]
    method, settings = build_settings(ROW_METHODS.get(name, (name,))[0], settings_values(variant, targets))
    weights = {n: m.weight for n, m in model.named_modules() if hasattr(m, "weight")}  # PiSSA replaces them
    method.apply(model, settings)
    if variant.endswith("rebuild"):
        for _, layer in adapters(model):
            layer.__class__ = RebuildTransformLinear
    for route in ("direct", "low-rank"):
        if variant.endswith(" " + route):
            for _, layer in adapters(model):
                layer.compute = route.replace("-", "_")
    if variant.endswith("unfused"):
        for _, layer in adapters(model):
            layer.spans = None  # LoRALinear's general path

    def remove() -> None:
        for name_, layer in list(adapters(model)):
            parent, _, attr = name_.rpartition(".")
            layer.base.weight = weights[name_]  # the frozen weight as it was (PiSSA left the residual there)
            setattr(model.get_submodule(parent) if parent else model, attr, layer.base)
        model.requires_grad_(False)

    return subject.logits, remove


def _rebuild_class():
    import torch
    import torch.nn.functional as F

    from lit_peft.methods.transform import TransformLinear

    class Rebuild(TransformLinear):
        """ETHER as first implemented: W' = W H formed densely (blockwise) every step, then one matmul."""

        def adapted(self, x: torch.Tensor) -> torch.Tensor:
            w = self.base.weight
            if not hasattr(self, "bench_inverse"):  # the groups' rows back in the weight's order
                self.bench_inverse = torch.argsort(torch.cat(self.groups)).to(w.device)
            parts = []
            for i, rows in enumerate(self.groups):
                w_i = w.index_select(0, rows.to(w.device))  # (rows, in)
                if i < len(self.part_names):
                    t = self.t_in[i]
                    h = t.blocks().to(w.dtype)  # (nb, b, b)
                    w_i = torch.einsum("fnb,nbc->fnc", w_i.unflatten(1, (t.nb, t.block)), h).flatten(1)
                parts.append(w_i)
            weight = torch.cat(parts, 0).index_select(0, self.bench_inverse)
            return F.linear(self.dropout(x), weight, self.base.bias)

    return Rebuild


def worker(model_key: str, rows: list[str], args: argparse.Namespace) -> list[dict]:
    """Time every row in one process, interleaved over `args.rounds`, so machine noise hits all of them alike."""
    import torch

    global RebuildTransformLinear
    RebuildTransformLinear = _rebuild_class()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_key).to(device)
    model.max_seq_length = args.seq
    idx = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    ).to(device)
    ours = Subject(model, model, model.transformer, "h", model.transformer.h)
    twin = peers = None
    if any(r.startswith("peft ") for r in rows):
        hf = hf_twin(model, idx)
        twin = Subject(hf, lambda i: hf(input_ids=i).logits, hf.model, "layers", hf.model.layers)
        peers = peer_variants(args.targets)
    if args.compile:
        for s in (ours, twin):
            if s is not None:
                s.compiled = compile_blocks(s.eager)
    gc.freeze()  # what exists now lives to the end: RssPeak's gc.collect per row then scans only the new objects
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {r: {"variant": r, "times": []} for r in rows}
    for n in range(args.rounds):
        for row in rows:
            res = results[row]
            if "note" in res:
                continue
            variant = row.removesuffix(COMPILED)
            subject = twin if variant.startswith("peft ") else ours
            try:
                logits, remove = apply_variant(subject, variant, args.targets, peers)
            except Exception as e:  # a row that fails (e.g. methods rewritten under the bench) must not end the run
                if n:
                    raise
                traceback.print_exc()
                res["note"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                continue
            subject.model.to(device)
            subject.use_compiled(row.endswith(COMPILED))
            trainable = [p for p in subject.model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
            if n == 0:
                res["trainable"] = sum(p.numel() for p in trainable)
                res["saved_mb"] = saved_activation_bytes(subject.model, logits, idx) / 2**20
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                else:
                    rss = RssPeak()
            warmup = 0 if n else 1  # the first round's first step compiles and allocates; later rounds reuse that
            for step in range(warmup + args.steps):
                sync()
                start = time.perf_counter()
                lm_loss(logits(idx), idx).backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync()
                if step >= warmup:
                    res["times"].append(time.perf_counter() - start)
            if n == 0:
                res["peak_mb"] = (torch.cuda.max_memory_allocated() if device == "cuda" else rss.stop()) / 2**20
            del opt
            subject.use_compiled(False)
            remove()
            print(f"  {model_key} round {n + 1}/{args.rounds} {row}", file=sys.stderr, flush=True)
        if n + 1 < args.rounds:  # a run stopped early still leaves its figures so far
            lines = table(with_medians(results.values()), cpu=device == "cpu")
            print(f"  {model_key} after round {n + 1}/{args.rounds}:", *lines, sep="\n  ", file=sys.stderr, flush=True)
    return with_medians(results.values())


def with_medians(results) -> list[dict]:
    """Each row with `sec`, the median of its step times so far, in place of the times."""
    return [
        {
            **{k: v for k, v in r.items() if k != "times"},
            **({"sec": statistics.median(r["times"])} if r["times"] else {}),
        }
        for r in results
    ]


def saved_activation_bytes(model, logits: Callable, idx) -> int:
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
        logits(idx).sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def table(rows: list[dict], cpu: bool) -> list[str]:
    """Markdown rows: each against our LoRA r=8 and the floor of its own model, in its own mode (eager/compiled)."""
    sec = {r["variant"]: r.get("sec") for r in rows}

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    compiled = any(r["variant"].endswith(COMPILED) for r in rows)
    peak = "step peak RSS" if cpu else "peak allocated"
    lines = [
        f"| variant | s/step | x LoRA r=8 | x floor |{' x eager |' if compiled else ''} trainable params "
        f"| saved for backward (MiB) | {peak} (MiB) |",
        f"|---|---:|---:|---:|{'---:|' if compiled else ''}---:|---:|---:|",
    ]
    for r in rows:
        name = r["variant"]
        if "note" in r:
            lines.append(f"| {name} | {r['note']} |")
            continue
        mode = COMPILED if name.endswith(COMPILED) else ""
        floor = ("peft frozen base" if name.startswith("peft ") else "frozen base") + mode
        cells = [name, f"{r['sec']:.3f}", ratio(r["sec"], sec.get("lora r=8" + mode)), ratio(r["sec"], sec.get(floor))]
        if compiled:
            cells.append(ratio(r["sec"], sec.get(name.removesuffix(COMPILED))) if mode else "")
        cells += [f"{r['trainable']:,}", f"{r['saved_mb']:.0f}", f"{r['peak_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "wide"], choices=MODELS)
    parser.add_argument("--variants", nargs="+", metavar="VARIANT", help="default: all (with --peers, PEFT's too)")
    parser.add_argument(
        "--peers", action="store_true", help="add Hugging Face PEFT's LoRA, OFT and HRA (extra `bench`)"
    )
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd (per block) row per variant")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--targets", nargs="+", default=ALL_BLOCK_LINEARS, help="Linears every method adapts (comma or space separated)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    args.targets = [t for arg in args.targets for t in arg.split(",") if t]
    bad = [t for t in args.targets if t not in HF_LINEARS]
    if bad:
        sys.exit(f"error: unknown target {bad[0]!r}; valid: {', '.join(HF_LINEARS)}")
    variants = args.variants or VARIANTS + (PEER_VARIANTS if args.peers else [])
    bad = [v for v in variants if not VARIANT_PATTERN.fullmatch(v)]
    if bad:
        sys.exit(f"error: unknown variant {bad[0]!r}; valid: {VARIANT_PATTERN.pattern}, e.g. {', '.join(VARIANTS[:4])}")
    if any(v.startswith("peft ") for v in variants):
        if not args.peers:
            sys.exit(f"error: variant {next(v for v in variants if v.startswith('peft '))!r} needs --peers")
        try:
            import peft  # noqa: F401
        except ImportError:
            sys.exit("error: --peers needs Hugging Face PEFT, the `bench` extra: pip install -e '.[bench]'")
    rows = [row for v in variants for row in ([v, v + COMPILED] if args.compile else [v])]
    skipped = {v: why for v in variants if (why := unavailable(v, args.targets))}
    import torch

    cores = f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    for model_key in args.models:
        load = os.getloadavg()[0]
        results = worker(model_key, [r for r in rows if r.removesuffix(COMPILED) not in skipped], args)
        by_name = {r["variant"]: r for r in results}
        ordered = [
            by_name.get(r) or {"variant": r, "note": f"skipped: {skipped[r.removesuffix(COMPILED)]}"} for r in rows
        ]
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else cores
        print(
            f"\n### {model_key} (batch {args.batch} x {args.seq} tokens, {device}, median of {args.rounds} rounds x "
            f"{args.steps} steps, variants interleaved, targets {','.join(args.targets)})\n"
        )
        if not torch.cuda.is_available():
            print(
                f"CPU load average {load:.1f} before, {os.getloadavg()[0]:.1f} after: the machine is shared with "
                "other work, so s/step is not a clean absolute figure; variants are interleaved over rounds, so "
                "the ratios are comparable.\n"
            )
        print("\n".join(table(ordered, cpu=not torch.cuda.is_available())))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
