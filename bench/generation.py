"""Greedy generation through LitLM.generate_until: one request at a time against batches (ratios from one run).

    python bench/generation.py                                  # SmolLM2-135M, 32 prompts x 32 new tokens, batch 16
    python bench/generation.py --prompts 64 --new-tokens 64 --batch 8 16 32 --rounds 2
    python bench/generation.py --model tiny --prompts 8 --new-tokens 8          # smoke test (random weights)

Rows: "generate_fn, one at a time" is the previous generate_until (litgpt's generate_fn per request, the KV cache
sized for that request); "batch N" is LitLM.generate_until with batch_size=N (right-padded rows, per-row positions;
batch 1 is the same code one request at a time). Every row generates the same requests: chatml prompts of ~30 to
~220 tokens (an open question after 0-12 sentences of notes; SmolLM2-Instruct answers plain prompts with EOS at
once), greedy, `max_gen_toks` = --new-tokens, no stop string (EOS still ends a row).
"s" is the median wall time of the whole workload over --rounds (variants interleaved, one untimed warm-up
request first); "x one at a time" divides the generate_fn row's time by the row's; "CPU s" is the process's CPU time
for the same run (all threads; steadier than wall time on a shared machine); "same text" counts the requests whose
text equals the generate_fn row's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SENTENCES = [
    "The river froze early that winter, and the village children skated to school.",
    "A prime number has exactly two divisors: one and itself.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The committee postponed its vote until the budget figures were checked again.",
    "Copper conducts electricity well, which is why it is used in household wiring.",
    "She packed a map, a torch and two days of food before setting off.",
    "Sorting a list of n numbers by comparison needs about n log n steps.",
    "The museum's oldest clock still chimes every quarter of an hour.",
]
QUESTIONS = [
    "Explain what happens to water as it freezes.",
    "Describe three uses of copper.",
    "Explain why ships float.",
    "Describe a day in a busy museum.",
    "Explain how sorting algorithms work.",
    "Describe how plants make their food.",
    "Write a short story about a river.",
    "Explain what a prime number is.",
]


def workload(lm, n: int, seed: int = 0) -> list[str]:
    """n chat-template prompts (an instruction-tuned model answers at some length; plain prompts get EOS at once)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        notes = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(0, 12)))
        content = f"{notes}\n\n{QUESTIONS[i % len(QUESTIONS)]}".lstrip()
        prompts.append(lm.apply_chat_template([{"role": "user", "content": content}]))
    return prompts


def load(model_key: str, device: str):
    import torch
    from litgpt import Tokenizer

    from lit_peft.models.load import load_base

    if model_key == "smollm2":
        from lit_peft.checkpoints.hub import prepare_checkpoint

        ckpt = prepare_checkpoint(
            {"checkpoint_dir": str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), "source": "smollm2-gguf"}
        )
    else:
        from lit_peft.checkpoints.hub import create_tiny_checkpoint

        tiny = dict(
            name="tiny-random", block_size=512, padded_vocab_size=320, n_layer=2, n_head=4, n_query_groups=2,
            n_embd=32, intermediate_size=64, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
            rotary_percentage=1.0, parallel_residual=False,
        )  # fmt: skip
        ckpt = create_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-random", tiny, seed=0)
    device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return load_base(ckpt).to(device), Tokenizer(ckpt), device


def one_at_a_time(lm, requests, device) -> list[str]:
    """The previous LitLM.generate_until: litgpt's generate_fn, one request at a time (greedy, EOS, stop strings)."""
    import torch
    from litgpt.generate.base import generate_fn
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    eos = lm.lit_tokenizer.processor.decode([lm.eot_token_id], skip_special_tokens=False)
    outputs = []
    with torch.inference_mode():
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), lm.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = int(kwargs.pop("max_gen_toks"))
            prompt = torch.tensor(lm.tok_encode(context)[-(lm.max_length - budget) :], device=device)
            lm.model.set_kv_cache(batch_size=1, max_seq_length=len(prompt) + budget, device=device)
            ids, text = [], ""
            try:
                for token in generate_fn(
                    lm.model,
                    prompt,
                    len(prompt) + budget,
                    temperature=0.0,
                    stop_tokens=([lm.eot_token_id],),
                    include_prompt=False,
                    include_eos=False,
                ):
                    ids.extend(token.view(-1).tolist())
                    text = lm.tok_decode(ids)
                    if any(stop and stop in text for stop in until):
                        break
            finally:
                lm.model.clear_kv_cache()
            for stop in filter(None, until):
                text = text.split(stop)[0]
            outputs.append(text)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to time (LitLM rows)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import torch
    from lm_eval.api.instance import Instance

    from lit_peft.data.templates import get_template
    from lit_peft.inference.evaluation import LitLM

    model, tokenizer, device = load(args.model, args.device)
    template = get_template("chatml")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen_kwargs = {"until": [], "max_gen_toks": args.new_tokens, "do_sample": False}
    variants = {"generate_fn, one at a time": (1, lambda lm, reqs: one_at_a_time(lm, reqs, device))}
    for b in args.batch:
        variants[f"batch {b}"] = (b, lambda lm, reqs: lm.generate_until(reqs, disable_tqdm=True))
    lms = {name: LitLM(model, tokenizer, batch_size=b, template=template) for name, (b, _) in variants.items()}
    prompts = workload(next(iter(lms.values())), args.prompts)
    requests = [Instance("generate_until", {}, (p, gen_kwargs), i) for i, p in enumerate(prompts)]
    warmup = requests[:1]
    first = next(iter(lms.values()))
    prompt_tokens = [min(len(first.tok_encode(r.args[0])), first.max_length - args.new_tokens) for r in requests]

    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    texts: dict[str, list[str]] = {}
    for name, (_, run) in variants.items():
        run(lms[name], warmup)
    for _ in range(args.rounds):
        for name, (_, run) in variants.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            texts[name] = run(lms[name], requests)
            sync()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"{name}: {times[name][-1]:.2f} s, CPU {cpu[name][-1]:.2f} s", file=sys.stderr, flush=True)

    lm = next(iter(lms.values()))
    base_name = next(iter(variants))
    base, base_cpu = statistics.median(times[base_name]), statistics.median(cpu[base_name])
    new_tokens = sum(len(lm.tok_encode(t, add_special_tokens=False)) for t in texts[base_name])
    print(
        f"{args.model} on {device} ({torch.get_num_threads()} threads), {len(requests)} prompts of "
        f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens, max_gen_toks {args.new_tokens} "
        f"(~{new_tokens} new tokens in all), greedy, median of {args.rounds} round(s)\n"
    )
    print("| variant | s | new tokens/s | x one at a time | CPU s | x one at a time (CPU) | same text |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        sec, sec_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        same = sum(a == b for a, b in zip(texts[name], texts[base_name], strict=True))
        print(
            f"| {name} | {sec:.2f} | {new_tokens / sec:.1f} | {base / sec:.2f} | {sec_cpu:.2f} | "
            f"{base_cpu / sec_cpu:.2f} | {same}/{len(requests)} |"
        )


if __name__ == "__main__":
    main()
