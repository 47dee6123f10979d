"""One report for a sweep: report.md, report.csv and plots, from what every job wrote.

The code is in `lit_peft/cli/report.py` (installed: `lit-peft report`); this runs it from a checkout.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without `pip install -e .`
runpy.run_module("lit_peft.cli.report", run_name="__main__")
