"""Get a base model as a LitGPT checkpoint.

The code is in `lit_peft/cli/download.py` (installed: `lit-peft download`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.download", run_name="__main__")
