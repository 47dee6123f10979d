"""Chat with a base, adapter or merged checkpoint, streaming the reply, with the model's chat template.

The code is in `lit_peft/cli/chat.py` (installed: `lit-peft chat`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.chat", run_name="__main__")
