"""Fine-tune a LitGPT model: `python finetune/run.py method=lora model=smollm2-135m-instruct data=alpaca`.

Hydra composes conf/config.yaml with the method/, model/, data/, task/ and strategy/ groups; `-m` sweeps.
Every override is composed and checked (lit_peft/validate.py) before Hydra writes anything: a bad one is a one-line
`error: ...` with exit status 2, and a run that fails later removes the folders it created.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_peft.cli import OUTPUTS, check_group_choices, fail, hydra_preflight, run_dir_follows_out_dir  # noqa: E402


def _run_folders(cfg: DictConfig) -> tuple[str | None, str | None]:
    from hydra.core.hydra_config import HydraConfig

    return cfg.get("out_dir"), (HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None)


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> dict:
    with fail.on_user_error(cleanup=lambda: OUTPUTS.remove_created(*_run_folders(cfg))):
        from lit_peft.validate import validate_config

        validate_config(cfg)
        from lit_peft.train import train

        result = train(cfg)
    OUTPUTS.keep(*_run_folders(cfg))
    print(f"exported: {result['export']}\nlogs: {result['log_dir']}")
    if "val_loss" in result["initial"] and "val_loss" in result["final"]:
        print(f"held-out loss: {result['initial']['val_loss']:.4f} -> {result['final']['val_loss']:.4f}")
    return result


if __name__ == "__main__":
    from lit_peft.validate import STAGES

    check_group_choices(sys.argv[1:], ROOT / "conf")
    argv = run_dir_follows_out_dir(sys.argv[1:])
    sys.argv = [sys.argv[0], *hydra_preflight(argv, ROOT / "conf", "config", STAGES)]
    main()
