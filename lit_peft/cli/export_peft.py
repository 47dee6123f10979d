"""A LoRA adapter -> Hugging Face PEFT format (adapter_model.safetensors + adapter_config.json), for transformers +
peft (`PeftModel.from_pretrained`) and vLLM (`--enable-lora --lora-modules name=<folder>`) over the Hugging Face
export of the base (scripts/convert_lit_checkpoint.py).

    python scripts/export_peft.py --adapter outputs/<run>/adapter --out peft/my-adapter [--base <checkpoint>]

The module names are Hugging Face Llama's (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head).
The base defaults to the checkpoint the adapter was trained on; the output folder must be new. Only method=lora
exports; other methods are merged instead (scripts/merge.py, then scripts/convert_lit_checkpoint.py). Beside PEFT's
files, lit_peft_lora.json records the adapter's settings, so that scripts/import_peft.py gives back the same adapter.
"""

from __future__ import annotations

from pathlib import Path

from lit_peft.cli.args import ArgumentParser, fail


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--adapter", type=Path, required=True, help="a LoRA adapter folder written by finetune/run.py")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the PEFT adapter")
    parser.add_argument("--base", type=Path, help="base checkpoint (default: the one the adapter was trained on)")
    parser.add_argument(
        "--base-model-name-or-path",
        help="base_model_name_or_path to record (default: the hub id of the conf/model/ entry of the base, else "
        "the base checkpoint's path); e.g. the folder of the base's Hugging Face export",
    )
    args = parser.parse_args(argv)

    from lit_peft.export.peft import export_peft

    with fail.on_user_error():
        out = export_peft(args.adapter, args.out, args.base, args.base_model_name_or_path)
    print(f"PEFT adapter: {out}")
    return out


if __name__ == "__main__":
    main()
