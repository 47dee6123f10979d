"""Hugging Face folder -> LitGPT checkpoint, through litgpt's converter (the folder name or --model-name picks
litgpt's config).

    python scripts/convert_hf_checkpoint.py --hf-dir hf/SmolLM2-135M-Instruct --out checkpoints/x/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lit_peft.cli.args import ArgumentParser, fail
from lit_peft.errors import UserError


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--hf-dir", type=Path, required=True, help="a folder with config.json and weights")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the LitGPT checkpoint")
    parser.add_argument("--model-name", help="litgpt config name (default: the name of --out)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept a folder with only pickle (.bin) weights, read as tensors only (torch.load weights_only)",
    )
    args = parser.parse_args(argv)
    from litgpt import Config

    from lit_peft.checkpoints.files import check_new_output
    from lit_peft.checkpoints.hub import _publish, _stage_dir, convert_hf_folder

    with fail.on_user_error():
        if not args.hf_dir.is_dir():
            raise FileNotFoundError(f"--hf-dir {args.hf_dir} is not a folder (expected config.json and weights)")
        check_new_output(args.out, {"Hugging Face folder": args.hf_dir}, False, "converting")
        name = args.model_name or args.out.name
        try:
            Config.from_name(name)
        except ValueError:
            raise UserError(
                f"litgpt has no config named {name!r}: pass --model-name with one of litgpt's names"
            ) from None
        stage = _stage_dir(args.out)
        try:
            shutil.copytree(args.hf_dir, stage)
            # Only safetensors reach litgpt's converter: pickle weights are refused, or read weights_only.
            convert_hf_folder(stage, name, args.allow_pickle, source=f"--hf-dir {args.hf_dir}")
            out = _publish(stage, args.out, replace=False)
        finally:
            shutil.rmtree(stage.parent, ignore_errors=True)
    print(f"LitGPT checkpoint: {out}")
    return out


if __name__ == "__main__":
    main()
