"""A Hugging Face PEFT LoRA adapter -> a lit-peft adapter folder (adapter.safetensors + adapter_config.json) that

The code is in `lit_peft/cli/import_peft.py` (installed: `lit-peft import-peft`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.import_peft", run_name="__main__")
