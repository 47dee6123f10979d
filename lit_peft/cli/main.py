"""`lit-peft <command> [args]`: the installed package's one command; each subcommand is a module of lit_peft.cli.

lit-peft finetune method=lora model=smollm2-135m-instruct     (= python finetune/run.py ...)
lit-peft merge --adapter outputs/<run>/adapter --out checkpoints/merged/my-model
lit-peft chat --adapter outputs/<run>/adapter
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {  # subcommand -> (module, what it does)
    "finetune": ("finetune", "fine-tune a model (Hydra overrides: method=lora model=... data=...; -m sweeps)"),
    "merge": ("merge", "merge an adapter into its base: a plain LitGPT checkpoint"),
    "chat": ("chat", "chat with a base, merged or adapted model"),
    "eval": ("eval", "evaluate with lm-eval (local offline tasks or lm-eval's own)"),
    "report": ("report", "the report of a sweep folder: table, plots, optional evals"),
    "download": ("download", "download (or convert) a model into a LitGPT checkpoint"),
    "convert-hf": ("convert_hf", "a Hugging Face transformers folder -> a LitGPT checkpoint"),
    "convert-lit": ("convert_lit", "a LitGPT checkpoint (or merged model) -> a Hugging Face transformers folder"),
    "convert-lrc": ("convert_lrc", "a Low-Rank Clone run -> a standalone LitGPT checkpoint"),
    "export-peft": ("export_peft", "a LoRA adapter -> Hugging Face PEFT format"),
    "import-peft": ("import_peft", "a Hugging Face PEFT LoRA adapter -> a lit-peft adapter"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    head = "usage: lit-peft <command> [args]   (lit-peft <command> --help for its arguments)"
    return head + "\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, *rest = argv
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; valid choices: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"lit-peft {name}", *rest]
    runpy.run_module(f"lit_peft.cli.{COMMANDS[name][0]}", run_name="__main__", alter_sys=False)


if __name__ == "__main__":
    main()
