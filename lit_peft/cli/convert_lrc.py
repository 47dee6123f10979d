"""Fold a Low-Rank Clone's trained projections into a standalone LitGPT checkpoint of the student.

    python scripts/convert_lrc.py --clone outputs/<run>/lrc --out checkpoints/SmolLM2-135M-lrc384 [--teacher <ckpt>]
    python scripts/convert_lrc.py --truncate 384 --teacher <ckpt> --out checkpoints/SmolLM2-135M-trunc384

The student keeps the teacher's depth, heads, head size and MLP width at the clone's hidden size; the folder (weights,
model_config.yaml, tokenizer) loads in chat, evaluation, merge, the HF export and as a base for further fine-tuning.
The teacher defaults to the checkpoint the clone was trained from; the output folder must be new (or --overwrite).
`--truncate WIDTH` writes the untrained student of the same shape instead: the teacher's weights cut to their first
WIDTH hidden dimensions (a baseline, and what `lrc.init=identity` starts from).
"""

from __future__ import annotations

from pathlib import Path

from lit_peft.cli.args import ArgumentParser, fail, positive_int
from lit_peft.errors import UserError


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--clone", type=Path, help="the <out_dir>/lrc folder a task=lrc run wrote")
    source.add_argument(
        "--truncate", type=positive_int, metavar="WIDTH", help="cut the --teacher to this hidden size instead"
    )
    parser.add_argument("--out", type=Path, required=True, help="new folder for the student checkpoint")
    parser.add_argument("--teacher", type=Path, help="teacher checkpoint (default: the one the clone was trained on)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the teacher)")
    args = parser.parse_args(argv)

    from lit_peft.models.lrc import convert, truncate

    with fail.on_user_error():
        if args.truncate is not None:
            if args.teacher is None:
                raise UserError("--truncate needs --teacher <LitGPT checkpoint folder>")
            out = truncate(args.teacher, args.truncate, args.out, overwrite=args.overwrite)
        else:
            out = convert(args.clone, args.out, args.teacher, overwrite=args.overwrite)
    print(f"student checkpoint: {out}")
    return out


if __name__ == "__main__":
    main()
