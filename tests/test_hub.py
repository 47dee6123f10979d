"""The embedded model: GGUF tokenizer rebuild, conversion, and hub downloads against a local stand-in hub."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from hub_standin import standin_hub
from litgpt import GPT, Config, Tokenizer

from lit_peft.hub import SMOLLM2_NAME, export_smollm2_hf, gguf_fast_tokenizer, smollm2_gguf_path
from lit_peft.model import load_base

# Token ids of these strings under SmolLM2's tokenizer, as llama.cpp (an independent implementation reading the same
# GGUF) produces them.
LLAMA_CPP_IDS = {
    "Hello, world! 12345 tokens   spaced\n\nnew line": [
        19556,
        28,
        905,
        17,
        216,
        33,
        34,
        35,
        36,
        37,
        17837,
        256,
        23861,
        198,
        198,
        2241,
        1761,
    ],
    "def foo(x):\n    return x**2  # 2024": [
        1604,
        29856,
        24,
        104,
        727,
        472,
        1003,
        1792,
        828,
        34,
        216,
        907,
        216,
        34,
        32,
        34,
        36,
    ],
}


def test_gguf_tokenizer_rebuild_matches_llama_cpp():
    tok, chat_template = gguf_fast_tokenizer(smollm2_gguf_path())
    assert tok.get_vocab_size() == 49152
    assert [tok.id_to_token(i) for i in (0, 1, 2)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for text, ids in LLAMA_CPP_IDS.items():
        assert tok.encode(text).ids == ids
        assert tok.decode(ids) == text
    assert "<|im_start|>assistant" in chat_template
    # Special tokens inside text become single ids, as the chat template needs.
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1 and tok.encode("a<|im_end|>").ids[-1] == 2


@pytest.mark.slow
def test_converted_checkpoint_tokenizer_and_greedy_answer(smollm2_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(smollm2_checkpoint)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    hf = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2) and len(hf) == 49152
    prompt = hf.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")

    from litgpt.generate.base import generate

    model = load_base(smollm2_checkpoint)
    assert model.config.name == SMOLLM2_NAME and model.config.n_query_groups == 3
    ids = tokenizer.encode(prompt)
    model.set_kv_cache(batch_size=1, max_seq_length=len(ids) + 16)
    out = generate(model.eval(), ids, max_returned_tokens=len(ids) + 12, temperature=0.0, eos_id=tokenizer.eos_id)
    assert "Paris" in tokenizer.decode(out[len(ids) :])


@pytest.mark.slow
def test_hub_download_through_a_standin_hub(tmp_path, smollm2_checkpoint):
    """scripts/download.py --repo-id fetches over HTTP with huggingface_hub and converts with litgpt."""
    repo = tmp_path / "repo"
    export_smollm2_hf(repo)
    target = tmp_path / "checkpoints" / "HuggingFaceTB" / SMOLLM2_NAME
    with standin_hub("HuggingFaceTB/SmolLM2-135M-Instruct", repo, token="hf_secret") as (endpoint, log):
        env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home")}
        denied = run_cli(
            "scripts/download.py",
            "--repo-id",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--checkpoint-dir",
            str(target),
            env={**env, "HF_TOKEN": ""},
        )
        assert denied.returncode == 2 and "requires authentication" in denied.stderr
        assert not target.exists()
        res = run_cli(
            "scripts/download.py",
            "--repo-id",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--checkpoint-dir",
            str(target),
            "--access-token",
            "hf_secret",
            env=env,
        )
    assert res.returncode == 0, res.stderr[-3000:]
    assert any("model.safetensors" in line and line.startswith("GET") for line in log)
    assert (target / "lit_model.pth").is_file() and (target / "tokenizer.json").is_file()
    downloaded = GPT(Config.from_file(target / "model_config.yaml"))
    downloaded.load_state_dict(torch.load(target / "lit_model.pth", weights_only=True))
    reference = load_base(smollm2_checkpoint)
    idx = torch.tensor([[1, 9690, 198, 2683, 359, 253]])
    torch.testing.assert_close(downloaded(idx), reference(idx))


def test_unknown_repo_id_is_a_one_line_error(tmp_path):
    res = run_cli("scripts/download.py", "--repo-id", "someone/unknown-model", "--checkpoint-dir", str(tmp_path / "x"))
    assert res.returncode == 2
    assert (
        res.stderr.strip().startswith("error: unknown repo id 'someone/unknown-model'") and "--model-name" in res.stderr
    )
    assert not (tmp_path / "x").exists()


def test_unknown_model_choice_lists_conf_models():
    res = run_cli("scripts/download.py", "model=gpt5")
    assert res.returncode == 2 and "valid choices: model=llama2-7b, model=smollm2-135m-instruct" in res.stderr
