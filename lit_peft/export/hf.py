"""LitGPT checkpoint -> Hugging Face folder (safetensors, config.json, tokenizer, generation config).

The weights are renamed by litgpt's own converter; the config is written here for the architectures whose
transformers class we know (`hf_family`): LLaMA-style (RMSNorm, SwiGLU MLP, rotary on the whole head, no biases:
SmolLM2, TinyLlama, Llama 2/3, Mistral), Qwen2 (q/k/v biases), Gemma, Gemma 2 and Phi-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from litgpt import Config
from safetensors.torch import save_file

from lit_peft.checkpoints.files import TOKENIZER_FILES, atomic_path, checkpoint_files, copy_checkpoint_files, unshared
from lit_peft.errors import UserError
from lit_peft.models.load import dtype_name, load_config, stored_dtype


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
        raise UserError(
            f"HF export supports LLaMA-style models (LLaMAMLP, RMSNorm, no bias, full rotary); {config.name!r} has "
            f"mlp={config.mlp_class_name}, norm={config.norm_class_name}, bias={config.bias}"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_shared_hf_fields(config, torch_dtype, tie_word_embeddings),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _shared_hf_fields(config: Config, torch_dtype: str, tie_word_embeddings: bool) -> dict:
    """The config.json fields every exported family takes from the LitGPT config in the same way."""
    return {
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
    from litgpt.scripts.convert_lit_checkpoint import check_conversion_supported

    from lit_peft.models.load import check_checkpoint_dir, checkpoint_weights, read_architecture

    checkpoint_dir, out_dir = check_checkpoint_dir(checkpoint_dir), Path(out_dir)
    if read_architecture(checkpoint_dir).get("cqil"):
        raise UserError(
            f"{checkpoint_dir} is a CQIL model (concurrent layer groups): it is not a plain Llama and has no Hugging "
            "Face equivalent; use lit-peft's chat and eval on it, or export the original (un-rewired) checkpoint"
        )
    config = load_config(checkpoint_dir)
    checkpoint_files(checkpoint_dir, TOKENIZER_FILES)  # a symlinked tokenizer file is refused before any work
    lit_weights = checkpoint_weights(checkpoint_dir)
    tied = tied_embeddings(lit_weights)
    # the weights keep their dtype
    hf_config = family_hf_config(config, dtype_name(stored_dtype(checkpoint_dir)), tie_word_embeddings=tied)
    check_conversion_supported(lit_weights)
    state: dict[str, torch.Tensor] = {}
    copy_family_weights(config, state, lit_weights, untie_weights=tied)  # litgpt's flag: leave lm_head.weight out
    with atomic_path(out_dir, replace=replace) as stage:
        stage.mkdir()
        save_file(unshared(state), str(stage / "model.safetensors"), metadata={"format": "pt"})
        (stage / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_checkpoint_files(checkpoint_dir, stage, TOKENIZER_FILES)  # only these, never through a link
    return out_dir


# ---------------------------------------------------------------- the other families litgpt converts


def _family_checks(config: Config) -> tuple[str, list[tuple[str, str, bool]]]:
    """The transformers architecture a LitGPT config looks like, and what it must have to be one: (requirement, the
    config's value, whether it holds)."""
    c, name = config, config.name.lower()
    full_attention = c.sliding_window_size is None
    shared = [
        ("RMSNorm", f"norm_class_name={c.norm_class_name!r}", c.norm_class_name == "RMSNorm"),
        ("no Linear biases", f"bias={c.bias}, lm_head_bias={c.lm_head_bias}", not c.bias and not c.lm_head_bias),
        (
            "rotary embeddings on whole heads",
            f"rotary_percentage={c.rotary_percentage}, rope_condense_ratio={c.rope_condense_ratio}, "
            f"rope_interleave={c.rope_interleave}",
            c.rotary_percentage == 1.0 and c.rope_condense_ratio == 1 and not c.rope_interleave,
        ),
        (
            "sequential residual blocks",
            f"parallel_residual={c.parallel_residual}",
            not c.parallel_residual and not c.shared_attention_norm,
        ),
        ("a dense MLP", f"n_expert={c.n_expert}", c.n_expert == 0),
        ("no query/key norms", f"norm_qk={c.norm_qk}", not c.norm_qk),
    ]
    no_softcapping = (
        "no softcapping",
        f"attention_logit_softcapping={c.attention_logit_softcapping}, "
        f"final_logit_softcapping={c.final_logit_softcapping}",
        c.attention_logit_softcapping is None and c.final_logit_softcapping is None,
    )
    no_scalar = (
        "the default attention scale",
        f"attention_scores_scalar={c.attention_scores_scalar}",
        c.attention_scores_scalar is None,
    )
    no_window = ("full attention", f"sliding_window_size={c.sliding_window_size}", full_attention)
    if c.mlp_class_name == "GemmaMLP":
        gemma = [
            ("a Gemma name (RMSNorm with a unit offset)", f"name={c.name!r}", "gemma" in name),
            ("scaled embeddings", f"scale_embeddings={c.scale_embeddings}", c.scale_embeddings),
            ("tanh GELU", f"gelu_approximate={c.gelu_approximate!r}", c.gelu_approximate == "tanh"),
        ]
        if c.post_attention_norm or c.post_mlp_norm:
            both = c.post_attention_norm and c.post_mlp_norm
            norms = f"post_attention_norm={c.post_attention_norm}, post_mlp_norm={c.post_mlp_norm}"
            return "gemma2", [*shared, *gemma, ("post-attention and post-MLP norms", norms, both)]
        return "gemma", [*shared, *gemma, no_softcapping, no_window, no_scalar]
    llama_like = [
        *shared,
        ("LLaMAMLP", f"mlp_class_name={c.mlp_class_name!r}", c.mlp_class_name == "LLaMAMLP"),
        no_softcapping,
        no_scalar,
        ("unscaled embeddings", f"scale_embeddings={c.scale_embeddings}", not c.scale_embeddings),
        (
            "no post-attention or post-MLP norms",
            f"post_attention_norm={c.post_attention_norm}, post_mlp_norm={c.post_mlp_norm}",
            not (c.post_attention_norm or c.post_mlp_norm),
        ),
        ("not a Gemma name (RMSNorm without a unit offset)", f"name={c.name!r}", "gemma" not in name),
    ]
    rope = c.rope_adjustments
    no_rope_adjustments = ("no rope_adjustments", f"rope_adjustments={rope}", not rope)
    if name.startswith("phi-3"):  # litgpt's converter fuses q/k/v and gate/up by this name
        return "phi3", [
            *llama_like,
            ("no q/k/v biases", f"attn_bias={c.attn_bias}", not c.attn_bias),
            ("head_size = n_embd / n_head", f"head_size={c.head_size}", c.head_size * c.n_head == c.n_embd),
            (
                "a sliding window on every layer or none",
                f"sliding_window_indices={c.sliding_window_indices}",
                full_attention or all(c.sliding_window_indices),
            ),
            no_rope_adjustments,
        ]
    if c.attn_bias:
        return "qwen2", [*llama_like, no_window, no_rope_adjustments]
    llama3 = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
    return "llama", [
        *llama_like,
        no_window,
        ("no rope_adjustments or Llama 3's", f"rope_adjustments={rope}", rope is None or set(rope) == llama3),
    ]


def hf_family(config: Config) -> str:
    """Which transformers architecture the export writes for `config`: llama (Llama 2/3, Mistral, SmolLM2, ...),
    qwen2 (Qwen2.5: q/k/v biases), gemma, gemma2 or phi3; a one-line error naming what does not fit otherwise."""
    family, checks = _family_checks(config)
    failed = [(need, has) for need, has, ok in checks if not ok]
    if failed:
        need, has = failed[0]
        raise UserError(
            f"HF export supports Llama/Mistral, Qwen2.5, Gemma, Gemma 2 and Phi-3 style models; {config.name!r} looks "
            f"like {family} but needs {need} ({has})"
        )
    return family


def family_hf_config(config: Config, torch_dtype: str = "float32", tie_word_embeddings: bool = False) -> dict:
    """transformers' config.json for any family `hf_family` accepts (the LLaMA one is `llama_hf_config`'s)."""
    family = hf_family(config)
    if family == "llama":
        hf = llama_hf_config(config, torch_dtype, tie_word_embeddings)
        if config.rope_adjustments:  # Llama 3.1 / 3.2: rescaled low rotary frequencies
            rope = config.rope_adjustments
            hf["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": rope["factor"],
                "low_freq_factor": rope["low_freq_factor"],
                "high_freq_factor": rope["high_freq_factor"],
                "original_max_position_embeddings": rope["original_max_seq_len"],
            }
        return hf
    hf = _shared_hf_fields(config, torch_dtype, tie_word_embeddings)
    if family == "qwen2":
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **hf,
            "hidden_act": "silu",
            "use_sliding_window": False,
        }
    if family == "phi3":
        return {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            **hf,
            "hidden_act": "silu",
            "original_max_position_embeddings": config.block_size,
            "sliding_window": config.sliding_window_size,
            "pad_token_id": None,
        }
    hf.update({"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_activation": "gelu_pytorch_tanh"})
    if family == "gemma":
        return hf
    sliding = config.sliding_window_indices or [0] * config.n_layer
    return {
        **hf,
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "query_pre_attn_scalar": config.attention_scores_scalar or config.head_size,
        "attn_logit_softcapping": config.attention_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "sliding_window": config.sliding_window_size,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding[: config.n_layer]],
        # transformers' sdpa and flash attention leave out attn_logit_softcapping; its eager attention applies it
        "_attn_implementation": "eager",
    }


def copy_family_weights(
    config: Config, state: dict[str, torch.Tensor], lit_weights: dict[str, torch.Tensor], untie_weights: bool = False
) -> None:
    """LitGPT weights -> transformers names in `state`, by litgpt's own converter for the family (Phi-3's fused
    qkv_proj and gate_up_proj included); `untie_weights` leaves lm_head.weight out (a tied export)."""
    from litgpt.scripts.convert_lit_checkpoint import (
        copy_weights_gemma_2,
        copy_weights_llama,
        copy_weights_phi,
        copy_weights_qwen_2_5,
    )

    family = hf_family(config)
    if family == "phi3":
        copy_weights_phi(config, state, lit_weights)
        if untie_weights:
            state.pop("lm_head.weight", None)
        return
    copy = {"qwen2": copy_weights_qwen_2_5, "gemma2": copy_weights_gemma_2}.get(family, copy_weights_llama)
    copy(config, state, lit_weights, untie_weights=untie_weights)
