"""LitGPT checkpoint -> Hugging Face folder that transformers loads (weights via litgpt's converter).

python scripts/convert_lit_checkpoint.py --checkpoint-dir checkpoints/merged/my-model --out hf/my-model
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_peft.cli import ArgumentParser, fail  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint-dir", type=Path, required=True, help="a LitGPT checkpoint (base or merged)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the Hugging Face export")
    args = parser.parse_args(argv)
    from lit_peft.hf_export import export_hf
    from lit_peft.io import check_new_output

    with fail.on_user_error():
        check_new_output(args.out, {"checkpoint": args.checkpoint_dir}, False, "exporting")
        out = export_hf(args.checkpoint_dir, args.out)
    print(f"Hugging Face export: {out}")
    return out


if __name__ == "__main__":
    main()
