"""LitGPT checkpoint -> Hugging Face folder (safetensors, config.json, tokenizer, generation config).

The weights are renamed by litgpt's own converter; the config is written here for the architectures whose
transformers class we know (LLaMA-style: RMSNorm, SwiGLU MLP, rotary on the whole head, no biases), which covers
SmolLM2, TinyLlama, Llama 2/3 and Mistral-style checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from litgpt import Config
from safetensors.torch import save_file

from lit_peft.io import atomic_path, unshared
from lit_peft.model import dtype_name, load_config, stored_dtype

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
)


def llama_hf_config(config: Config, torch_dtype: str = "float32", tie_word_embeddings: bool = False) -> dict:
    """transformers' LlamaConfig for a LLaMA-style LitGPT config; a clear error for anything else.

    `torch_dtype` is the dtype the weights are stored in (transformers' "auto" loads them in it);
    `tie_word_embeddings`: the output head is the embedding matrix (SmolLM2), stored once.
    """
    supported = (
        config.mlp_class_name == "LLaMAMLP"
        and config.norm_class_name == "RMSNorm"
        and not config.bias
        and config.rotary_percentage == 1.0
        and not config.parallel_residual
    )
    if not supported:
        raise ValueError(
            f"HF export supports LLaMA-style models (LLaMAMLP, RMSNorm, no bias, full rotary); {config.name!r} has "
            f"mlp={config.mlp_class_name}, norm={config.norm_class_name}, bias={config.bias}"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "num_hidden_layers": config.n_layer,
        "head_dim": config.head_size,
        "vocab_size": config.padded_vocab_size,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": torch_dtype,
    }


def tied_embeddings(lit_weights: dict[str, torch.Tensor]) -> bool:
    """Whether the LitGPT weights' output head equals the token embedding (a tied model such as SmolLM2: LitGPT keeps
    two copies, which litgpt's HF converter writes from the one shared matrix). A head that fine-tuning changed is
    not tied, whatever the source model's config said."""
    head, embedding = lit_weights.get("lm_head.weight"), lit_weights.get("transformer.wte.weight")
    return (
        head is not None
        and embedding is not None
        and head.shape == embedding.shape
        and head.dtype == embedding.dtype
        and torch.equal(head, embedding)
    )


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, replace: bool = False) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits.

    lit_model.pth is read tensors-only (`torch.load(weights_only=True)`; litgpt's own converter would unpickle it
    with its lazy loader) and renamed by litgpt's `copy_weights_llama`. A head equal to the embedding is exported
    tied (`tie_word_embeddings: true`, no separate lm_head.weight), so the export has the original's parameter
    count. The folder appears whole, in one rename; an existing `out_dir` is kept unless `replace`.
    """
    from litgpt.scripts.convert_lit_checkpoint import check_conversion_supported, copy_weights_llama

    from lit_peft.model import check_checkpoint_dir, checkpoint_weights, read_architecture

    checkpoint_dir, out_dir = check_checkpoint_dir(checkpoint_dir), Path(out_dir)
    if read_architecture(checkpoint_dir).get("cqil"):
        raise ValueError(
            f"{checkpoint_dir} is a CQIL model (concurrent layer groups): it is not a plain Llama and has no Hugging "
            "Face equivalent; use lit-peft's chat and eval on it, or export the original (un-rewired) checkpoint"
        )
    config = load_config(checkpoint_dir)
    lit_weights = checkpoint_weights(checkpoint_dir)
    tied = tied_embeddings(lit_weights)
    # the weights keep their dtype
    hf_config = llama_hf_config(config, dtype_name(stored_dtype(checkpoint_dir)), tie_word_embeddings=tied)
    check_conversion_supported(lit_weights)
    state: dict[str, torch.Tensor] = {}
    copy_weights_llama(config, state, lit_weights, untie_weights=tied)  # litgpt's flag: leave lm_head.weight out
    with atomic_path(out_dir, replace=replace) as stage:
        stage.mkdir()
        save_file(unshared(state), str(stage / "model.safetensors"), metadata={"format": "pt"})
        (stage / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, stage / name)
    return out_dir
