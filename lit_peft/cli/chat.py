"""Chat with a base, adapter or merged checkpoint, streaming the reply, with the model's chat template.

    python chat/base.py                                               # the embedded SmolLM2-135M-Instruct
    python chat/base.py --adapter outputs/<run>/adapter               # base + adapter (method from the adapter)
    python chat/base.py --checkpoint-dir checkpoints/merged/my-model --temperature 0.7 --top-p 0.9
    printf 'Hi\\nWhat did I just say?\\n' | python chat/base.py --temperature 0   # scripted: one turn per line

Interactive when stdin is a terminal (empty line, EOF or Ctrl-C ends it); otherwise every stdin line is the next
user turn of one conversation and only the replies are printed, one per line.

The prompt format is the one training used: the template and system prompt the adapter recorded (or a merged
model's lit_peft_merge.json, or conf/model/*.yaml for a known base), unless --template / --system say otherwise
(--system '' renders no system turn). The model computes in the base's stored dtype (a 4-bit adapter: the
precision it trained in) unless --dtype says otherwise. Both choices, and where they came from, go to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lit_peft.cli.args import ArgumentParser, fail, non_negative_float, positive_int, seed_int, unit_interval
from lit_peft.paths import project_root

DEFAULT_CHECKPOINT = project_root() / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"


def parse_args(argv: list[str] | None):
    from lit_peft.data.templates import TEMPLATES

    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint-dir", type=Path, help="LitGPT checkpoint (default: the adapter's base, or SmolLM2)"
    )
    parser.add_argument("--adapter", type=Path, help="an adapter folder written by finetune/run.py")
    parser.add_argument(
        "--template",
        help=f"{' | '.join(sorted(TEMPLATES))} (default: the adapter's or merged model's, else from the tokenizer)",
    )
    parser.add_argument(
        "--system", help="system prompt (default: the one the adapter or merged model was trained with; '' for none)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto | float32 | bfloat16 | float16 (auto: the base's stored dtype; a 4-bit adapter's training one)",
    )
    parser.add_argument("--temperature", type=non_negative_float, default=0.7, help=">= 0; 0 = greedy")
    parser.add_argument("--top-k", type=positive_int, default=50, help="sample from the k likeliest tokens (>= 1)")
    parser.add_argument("--top-p", type=unit_interval, default=0.9, help="nucleus sampling share, in (0, 1]")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest reply in tokens (>= 1)")
    parser.add_argument("--seed", type=seed_int, default=1234)
    return parser.parse_args(argv)


def undecodable(line: str, number: int) -> str | None:
    """What is wrong with stdin line `number` if it holds bytes its encoding cannot decode (read with the
    surrogateescape handler, each such byte is a lone surrogate, which no tokenizer takes); None if nothing."""
    bad = next((i for i, ch in enumerate(line) if "\udc80" <= ch <= "\udcff"), None)
    if bad is None:
        return None
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    offset = len(line[:bad].encode(encoding, "surrogateescape"))
    return (
        f"stdin line {number} is not valid {encoding} text (byte 0x{ord(line[bad]) - 0xDC00:02x} at byte {offset} "
        "of the line); chat reads UTF-8 text: convert it (e.g. iconv -f latin1 -t utf-8)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from litgpt import Tokenizer
    from litgpt.generate.base import generate_fn

    from lit_peft.data.templates import get_template
    from lit_peft.data.tokenize import encode_text, special_strings
    from lit_peft.inference.load import inference_dtype, inference_source, load_for_inference, prompt_format
    from lit_peft.models.load import check_dtype, dtype_name

    with fail.on_user_error():
        check_dtype(args.dtype)
        if args.template is not None:
            get_template(args.template)  # an unknown name fails here, before the model loads
        checkpoint_dir, meta = inference_source(args.checkpoint_dir, args.adapter, DEFAULT_CHECKPOINT)
        dtype, dtype_from = inference_dtype(args.dtype, checkpoint_dir, meta)
        fmt = prompt_format(checkpoint_dir, meta, args.adapter, args.template, args.system)
        template = get_template(fmt.template, fmt.system_prompt)
        model, _, _ = load_for_inference(checkpoint_dir, args.adapter, DEFAULT_CHECKPOINT, dtype=dtype)
        tokenizer = Tokenizer(checkpoint_dir)
    print(f"dtype: {dtype_name(dtype)} ({dtype_from})", file=sys.stderr)
    print(f"prompt format: {fmt.describe()}", file=sys.stderr)
    torch.manual_seed(args.seed)
    bos, eos = special_strings(tokenizer)
    # a reply ends at eos or at the template's end-of-turn token (Gemma's <end_of_turn>, Phi-3's <|end|>, ...)
    stop_tokens = tuple(
        ids for ids in (encode_text(tokenizer, s) for s in template.stop_strings(eos)) if len(ids) == 1
    ) or ([tokenizer.eos_id],)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes arrive as escapes that undecodable() names
        sys.stdin.reconfigure(errors="surrogateescape")
    history: list[dict[str, str]] = []
    number = 0  # stdin's line number, for errors
    try:
        while True:
            if interactive:
                print(">> ", end="", flush=True)
            try:
                line = sys.stdin.readline()
            except UnicodeDecodeError as e:  # a stdin that cannot be reconfigured
                fail.exit(f"stdin line {number + 1} is not valid {e.encoding} text ({e.reason}); chat reads UTF-8")
            number += 1
            if not line or (interactive and not line.strip()):
                break
            problem = undecodable(line, number)
            if problem is not None:
                if not interactive:
                    fail.exit(problem)
                print(f"error: {problem}; type it again", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            text = "".join(t for t, _ in template.segments(history, bos, eos)) + template.generation_prompt()
            prompt = torch.tensor(encode_text(tokenizer, text), dtype=torch.long)
            budget = min(args.max_new_tokens, model.config.block_size - len(prompt))
            if budget <= 0:
                fail.exit(f"the conversation ({len(prompt)} tokens) fills the context of {model.config.block_size}")
            model.set_kv_cache(batch_size=1, max_seq_length=len(prompt) + budget)
            reply_ids: list[int] = []
            with torch.inference_mode():
                for token in generate_fn(
                    model,
                    prompt,
                    len(prompt) + budget,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    stop_tokens=stop_tokens,
                    include_prompt=False,
                    include_eos=False,
                ):
                    reply_ids.extend(token.view(-1).tolist())
                    if interactive:
                        print(tokenizer.decode(token), end="", flush=True)
            model.clear_kv_cache()
            reply = tokenizer.decode(torch.tensor(reply_ids, dtype=torch.long)) if reply_ids else ""
            print(reply.replace("\n", "\\n") if not interactive else "", flush=True)
            history.append({"role": "assistant", "content": reply})
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
