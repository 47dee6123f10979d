"""LitGPT checkpoint -> Hugging Face folder that transformers loads (weights via litgpt's converter).

The code is in `lit_peft/cli/convert_lit.py` (installed: `lit-peft convert-lit`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.convert_lit", run_name="__main__")
