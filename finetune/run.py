"""Fine-tune a LitGPT model: `python finetune/run.py method=lora model=smollm2-135m-instruct data=alpaca`.

The code is in `lit_peft/cli/finetune.py` (installed: `lit-peft finetune`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.finetune", run_name="__main__")
