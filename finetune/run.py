"""Fine-tune a LitGPT model: `python finetune/run.py method=lora model=smollm2-135m-instruct data=alpaca`.

Hydra composes conf/config.yaml with the method/, model/, data/, task/ and strategy/ groups; `-m` sweeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_peft.cli import check_group_choices, fail, remove_if_only_hydra_files, run_dir_follows_out_dir  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> dict:
    from lit_peft.train import train

    with fail.on_user_error(cleanup=lambda: remove_if_only_hydra_files(Path(cfg.out_dir))):
        result = train(cfg)
    print(f"exported: {result['export']}\nlogs: {result['log_dir']}")
    if "val_loss" in result["initial"] and "val_loss" in result["final"]:
        print(f"held-out loss: {result['initial']['val_loss']:.4f} -> {result['final']['val_loss']:.4f}")
    return result


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], ROOT / "conf")
    sys.argv = run_dir_follows_out_dir(sys.argv)
    main()
