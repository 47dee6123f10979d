"""Fold a Low-Rank Clone's trained projections into a standalone LitGPT checkpoint of the student.

The code is in `lit_peft/cli/convert_lrc.py` (installed: `lit-peft convert-lrc`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.convert_lrc", run_name="__main__")
