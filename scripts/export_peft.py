"""A LoRA adapter -> Hugging Face PEFT format (adapter_model.safetensors + adapter_config.json), for transformers +

The code is in `lit_peft/cli/export_peft.py` (installed: `lit-peft export-peft`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.export_peft", run_name="__main__")
