"""A Hugging Face PEFT LoRA adapter -> a lit-peft adapter folder (adapter.safetensors + adapter_config.json) that
scripts/merge.py, chat/base.py and eval/run.py load over a LitGPT checkpoint.

    python scripts/import_peft.py --adapter peft/my-adapter --out adapters/imported [--model <checkpoint or name>]

--model is the LitGPT checkpoint the adapter belongs to: a checkpoint folder or a conf/model/ name (e.g.
smollm2-135m-instruct). By default it comes from the adapter's base_model_name_or_path, when that is a LitGPT
checkpoint folder or the hub id of a conf/model/ entry. The adapter holds exactly PEFT's modules (down_proj alone is
target mlp.proj), and whatever export_peft.py wrote comes back as the adapter it came from (either qkv layout: an
interleaved export's rank_pattern is its stacked q/k/v LoRAs). LoRA settings lit-peft cannot represent (DoRA, an r or
alpha/r per module that one r cannot hold, trained biases, modules_to_save, LoRA on embeddings, ...) are refused in
one line.
"""

from __future__ import annotations

from pathlib import Path

from lit_peft.cli.args import ArgumentParser, fail


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--adapter", type=Path, required=True, help="a PEFT LoRA folder (adapter_config.json)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the lit-peft adapter")
    parser.add_argument(
        "--model", "--base", dest="model", help="LitGPT checkpoint folder or conf/model/ name (default: see above)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept an adapter with only adapter_model.bin, read as tensors only (torch.load weights_only)",
    )
    args = parser.parse_args(argv)

    from lit_peft.export.peft import import_peft

    with fail.on_user_error():
        out = import_peft(args.adapter, args.out, args.model, args.allow_pickle)
    print(f"lit-peft adapter: {out}")
    return out


if __name__ == "__main__":
    main()
