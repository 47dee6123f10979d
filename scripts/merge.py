"""Merge a trained adapter into its base model: a plain LitGPT checkpoint that chat, eval and the HF export read.

The code is in `lit_peft/cli/merge.py` (installed: `lit-peft merge`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.merge", run_name="__main__")
