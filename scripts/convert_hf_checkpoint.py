"""Hugging Face folder -> LitGPT checkpoint, through litgpt's converter (the folder name or --model-name picks

The code is in `lit_peft/cli/convert_hf.py` (installed: `lit-peft convert-hf`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.convert_hf", run_name="__main__")
