"""Does every method learn? Fine-tune SmolLM2-135M-Instruct with each method on real Alpaca data and report the
held-out loss before and after (same data, seed, steps and batch for all).

    python bench/learning.py --data ../shared/data/alpaca/alpaca_5000.json [--steps 30] [--methods lora ether ...]
    python bench/learning.py --data ../shared/data/alpaca/alpaca_5000.json --methods lora dora hra lora,init=pissa

A method may carry settings after commas (`lora,init=pissa,r=16` is method=lora method.init=pissa method.r=16).
Each method trains at its own recommended rate (`lr` in conf/method/<name>.yaml) unless --lr is given.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lit_peft.paths import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def method_yaml(name: str) -> dict:
    import yaml

    path = CONF_DIR / "method" / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        sys.exit(f"error: unknown method {name!r}; valid: {valid}")
    return yaml.safe_load(path.read_text()) or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an Alpaca-format JSON file")
    parser.add_argument("--methods", nargs="+", default=["lora", "ether", "etherplus", "etherplusHH", "oft"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nb", type=int, default=4, help="blocks for the methods that have nb (ETHER family, OFT)")
    parser.add_argument("--lr", type=float, help="one rate for every method (default: each method's own)")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"error: data file not found: {args.data}")
    print("| method | lr | held-out loss before | after | change | minutes |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in args.methods:
        method, *settings = spec.split(",")
        defaults = method_yaml(method)
        lr = args.lr or float(defaults.get("lr", 1e-3))
        with tempfile.TemporaryDirectory() as out:
            extra = [f"method.{kv}" for kv in settings]
            if "nb" in defaults and not any(kv.startswith(("nb=", "block_size=")) for kv in settings):
                extra.append(f"method.nb={args.nb}")
            start = time.time()
            res = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "finetune/run.py"),
                    f"method={method}",
                    "data=alpaca",
                    f"data.path={Path(args.data).resolve()}",
                    "data.max_seq_length=256",
                    "data.val_size=48",
                    "data.max_examples=1200",
                    f"trainer.max_steps={args.steps}",
                    "trainer.val_check_interval=1000",
                    "trainer.global_batch_size=8",
                    "trainer.micro_batch_size=4",
                    "trainer.progress_bar=false",
                    f"optim.lr={lr}",
                    f"out_dir={out}",
                    *extra,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            minutes = (time.time() - start) / 60
        found = re.search(r"held-out loss: ([\d.]+) -> ([\d.]+)", res.stdout)
        if res.returncode or not found:
            sys.exit(f"error: {spec} failed:\n{res.stderr[-2000:]}")
        before, after = map(float, found.groups())
        print(f"| {spec} | {lr:g} | {before:.4f} | {after:.4f} | {after - before:+.4f} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main()
