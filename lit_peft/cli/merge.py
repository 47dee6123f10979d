"""Merge a trained adapter into its base model: a plain LitGPT checkpoint that chat, eval and the HF export read.

    python scripts/merge.py --adapter outputs/<run>/adapter --out checkpoints/merged/my-model [--base <checkpoint>]

The adapter's saved method name and settings are all that is needed (no Hydra config). The base defaults to the
checkpoint the adapter was trained on; the output folder must be new (or --overwrite), and is never the base.

The merged weights keep the base's dtype (a bf16 base gives a bf16 checkpoint; a 4-bit adapter's base is written
in the precision it trained in) unless --dtype says otherwise. The merged folder's lit_peft_merge.json records the
dtype and the template and system prompt the adapter was trained with, which chat/base.py and eval/run.py then use.

Of the base folder only the checkpoint's own files are copied (model_config.yaml, prompt_style.yaml, config.json,
tokenizer.json, tokenizer_config.json, tokenizer.model, special_tokens_map.json, generation_config.json and lit-peft's
records), so the merged folder can be shared: nothing else in the base (a .env, notes) and never a symbolic link (a
base whose checkpoint file is a link is refused; replace the link with the file).
"""

from __future__ import annotations

from pathlib import Path

from lit_peft.cli.args import ArgumentParser, fail


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--adapter", type=Path, required=True, help="an adapter folder written by finetune/run.py")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the merged checkpoint")
    parser.add_argument("--base", type=Path, help="base checkpoint (default: the one the adapter was trained on)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the base)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto | float32 | bfloat16 | float16 (auto: the base's stored dtype; a 4-bit adapter's training one)",
    )
    parser.add_argument("--template", help="chat template to record (default: the adapter's)")
    parser.add_argument("--system", help="system prompt to record (default: the adapter's; '' for none)")
    args = parser.parse_args(argv)

    from lit_peft.export.merge import merge_checkpoint

    with fail.on_user_error():
        out = merge_checkpoint(
            args.adapter,
            args.out,
            args.base,
            overwrite=args.overwrite,
            dtype=args.dtype,
            template=args.template,
            system=args.system,
            report=print,
        )
    print(f"merged checkpoint: {out}")
    return out


if __name__ == "__main__":
    main()
