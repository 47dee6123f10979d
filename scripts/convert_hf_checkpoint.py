"""Hugging Face folder -> LitGPT checkpoint, through litgpt's converter (the folder name or --model-name picks
litgpt's config).

    python scripts/convert_hf_checkpoint.py --hf-dir hf/SmolLM2-135M-Instruct --out checkpoints/x/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_peft.cli import fail  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", type=Path, required=True, help="a folder with config.json and weights")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the LitGPT checkpoint")
    parser.add_argument("--model-name", help="litgpt config name (default: the name of --out)")
    args = parser.parse_args(argv)
    from litgpt import Config
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    from lit_peft.hub import _publish, _stage_dir

    with fail.on_user_error():
        if args.out.exists():
            raise ValueError(f"--out {args.out} already exists; pick a new folder")
        name = args.model_name or args.out.name
        try:
            Config.from_name(name)
        except ValueError:
            raise ValueError(
                f"litgpt has no config named {name!r}: pass --model-name with one of litgpt's names"
            ) from None
        stage = _stage_dir(args.out)
        try:
            shutil.copytree(args.hf_dir, stage)
            convert_hf_checkpoint(checkpoint_dir=stage, model_name=name)
            for f in [*stage.glob("*.safetensors*"), *stage.glob("*.bin*")]:
                f.unlink()
            out = _publish(stage, args.out)
        finally:
            shutil.rmtree(stage.parent, ignore_errors=True)
    print(f"LitGPT checkpoint: {out}")
    return out


if __name__ == "__main__":
    main()
