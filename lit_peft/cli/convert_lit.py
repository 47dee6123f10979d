"""LitGPT checkpoint -> Hugging Face folder that transformers loads (weights via litgpt's converter).

python scripts/convert_lit_checkpoint.py --checkpoint-dir checkpoints/merged/my-model --out hf/my-model
"""

from __future__ import annotations

from pathlib import Path

from lit_peft.cli.args import ArgumentParser, fail


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint-dir", type=Path, required=True, help="a LitGPT checkpoint (base or merged)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the Hugging Face export")
    args = parser.parse_args(argv)
    from lit_peft.checkpoints.files import check_new_output
    from lit_peft.export.hf import export_hf

    with fail.on_user_error():
        check_new_output(args.out, {"checkpoint": args.checkpoint_dir}, False, "exporting")
        out = export_hf(args.checkpoint_dir, args.out)
    print(f"Hugging Face export: {out}")
    return out


if __name__ == "__main__":
    main()
