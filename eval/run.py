"""Evaluate a base, adapter or merged checkpoint with lm-evaluation-harness: any lm-eval task, any few-shot count.

The code is in `lit_peft/cli/eval.py` (installed: `lit-peft eval`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.eval", run_name="__main__")
