"""Does every method learn? Fine-tune SmolLM2-135M-Instruct with each method on real Alpaca data and report the
held-out loss before and after (same data, seed, steps and batch for all).

    python bench/learning.py --data ../shared/data/alpaca/alpaca_5000.json [--steps 30] [--methods lora ether ...]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LR = {"lora": 1e-3, "oft": 1e-3, "full": 5e-5}  # the ETHER family takes a higher rate (few, bounded parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an Alpaca-format JSON file")
    parser.add_argument("--methods", nargs="+", default=["lora", "ether", "etherplus", "etherplusHH", "oft"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nb", type=int, default=4)
    args = parser.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"error: data file not found: {args.data}")
    print("| method | lr | held-out loss before | after | change | minutes |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods:
        lr = LR.get(method, 5e-3)
        with tempfile.TemporaryDirectory() as out:
            extra = [] if method in ("lora", "full") else [f"method.nb={args.nb}"]
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
            sys.exit(f"error: {method} failed:\n{res.stderr[-2000:]}")
        before, after = map(float, found.groups())
        print(f"| {method} | {lr:g} | {before:.4f} | {after:.4f} | {after - before:+.4f} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main()
