"""lit-peft: parameter-efficient fine-tuning of LitGPT models with Lightning and Hydra."""

__version__ = "0.1.0"
