"""The embedded model: GGUF tokenizer rebuild, conversion, and hub downloads against a local stand-in hub."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hub_standin import standin_hub
from litgpt import GPT, Config, Tokenizer

from lit_peft.checkpoints.hub import SMOLLM2_NAME, export_smollm2_hf, gguf_fast_tokenizer, smollm2_gguf_path
from lit_peft.env import host_for_file_names
from lit_peft.models.load import load_base

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
    assert res.returncode == 2 and "valid choices: model=gemma-2-2b-it, model=gemma-2b, model=llama2-7b," in res.stderr


# ---------------------------------------------------------------- pickle weights, and replacing a checkpoint safely


class Payload:
    """Unpickled, it creates a folder: a stand-in for any code a crafted `pytorch_model.bin` could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickle_repo(folder: Path, marker: Path | None, state: dict | None = None) -> Path:
    """A hub-style folder whose only weights are a pickle `pytorch_model.bin` (crafted when `marker` is given)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    state = dict(state or {"model.embed_tokens.weight": torch.zeros(4, 4)})
    if marker is not None:
        state["model.norm.weight"] = Payload(marker)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_a_crafted_pickle_runs_code_in_litgpts_lazy_loader(tmp_path):
    """Why pickle weights are refused: litgpt's converter reads `.bin` files with `lazy_load`, which unpickles any
    global; torch.load(weights_only=True) refuses the same file."""
    from litgpt.utils import lazy_load

    repo = pickle_repo(tmp_path / "repo", tmp_path / "pwned")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(repo / "pytorch_model.bin", weights_only=True)
    assert not (tmp_path / "pwned").exists()
    lazy_load(repo / "pytorch_model.bin")
    assert (tmp_path / "pwned").is_dir()  # code ran


@pytest.mark.parametrize("allow", [False, True])
def test_a_hub_repo_with_only_pickle_weights_runs_no_code(tmp_path, allow):
    repo = pickle_repo(tmp_path / "repo", tmp_path / "pwned")
    target = tmp_path / "checkpoints" / "x"
    with standin_hub("HuggingFaceTB/SmolLM2-135M-Instruct", repo) as (endpoint, log):
        env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home")}
        args = ["--repo-id", "HuggingFaceTB/SmolLM2-135M-Instruct", "--checkpoint-dir", str(target)]
        res = run_cli("scripts/download.py", *args, *(["--allow-pickle"] if allow else []), env=env)
    error = res.stderr.splitlines()[-1]  # (after the download's progress bar)
    assert res.returncode == 2 and error.startswith("error: "), res.stderr[-2000:]
    if allow:  # read with weights_only: the crafted global is refused, nothing runs
        assert error.startswith(
            "error: pytorch_model.bin holds more than tensors, refused even with --allow-pickle (weights_only: "
        )
        assert "posix.mkdir" in error  # torch names the refused global
        assert any("pytorch_model.bin" in line and line.startswith("GET") for line in log)
    else:  # refused before anything is fetched
        assert res.stderr.count("\n") == 1 and error.startswith(
            "error: HuggingFaceTB/SmolLM2-135M-Instruct has only pickle weights (pytorch_model.bin): unpickling can "
            "run arbitrary code, so they are refused; pass --allow-pickle"
        )
        assert not any("pytorch_model.bin" in line and line.startswith("GET") for line in log)
    assert not (tmp_path / "pwned").exists()
    assert not target.exists() and not any(target.parent.iterdir())  # no staging folder left either


def test_convert_hf_checkpoint_refuses_pickle_weights_and_missing_folders(tmp_path):
    repo = pickle_repo(tmp_path / "repo", tmp_path / "pwned")
    out = tmp_path / "lit" / "SmolLM2-135M-Instruct"
    res = run_cli("scripts/convert_hf_checkpoint.py", "--hf-dir", str(repo), "--out", str(out))
    assert res.returncode == 2 and f"--hf-dir {repo} has only pickle weights (pytorch_model.bin)" in res.stderr
    assert not (tmp_path / "pwned").exists() and not out.exists() and not any(out.parent.iterdir())
    res = run_cli("scripts/convert_hf_checkpoint.py", "--hf-dir", str(tmp_path / "missing"), "--out", str(out))
    assert res.returncode == 2 and res.stderr.startswith(f"error: --hf-dir {tmp_path / 'missing'} is not a folder")


def test_allow_pickle_converts_plain_bin_weights_read_as_tensors_only(tiny_checkpoint, tmp_path, monkeypatch):
    """Opted in, `.bin` weights (here sharded, with an index, and a tied tensor) are read with weights_only, written
    as safetensors and converted by litgpt: the same model as the original."""
    import litgpt.config
    from conftest import TINY
    from safetensors.torch import load_file

    from lit_peft.checkpoints.hub import convert_hf_folder
    from lit_peft.export.hf import export_hf

    monkeypatch.setitem(litgpt.config.name_to_config, "tiny-random", {**TINY, "vocab_size": 259})
    hf = export_hf(tiny_checkpoint, tmp_path / "hf")
    state = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, hf / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    stage = tmp_path / "stage" / "tiny-random"
    shutil.copytree(hf, stage)
    with pytest.raises(ValueError, match="has only pickle weights"):
        convert_hf_folder(stage, "tiny-random")
    convert_hf_folder(stage, "tiny-random", allow_pickle=True)
    assert not list(stage.glob("*.bin*")) and not list(stage.glob("*.safetensors*"))
    idx = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_base(stage)(idx), load_base(tiny_checkpoint)(idx), rtol=0, atol=0)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_failed_forced_download_keeps_the_old_checkpoint(tiny_checkpoint, tmp_path):
    target = tmp_path / "checkpoints" / "SmolLM2"
    shutil.copytree(tiny_checkpoint, target)
    before = (target / "lit_model.pth").read_bytes()
    # a killed download's staging folder
    stale = tmp_path / "checkpoints" / f".SmolLM2.{host_for_file_names()}.{dead_pid()}.abc123.tmp"
    stale.mkdir()
    env = {"HF_ENDPOINT": closed_port_endpoint(), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    res = run_cli(
        "scripts/download.py", "--repo-id", "HuggingFaceTB/SmolLM2-135M-Instruct", "--checkpoint-dir", str(target),
        "--force", env=env,
    )  # fmt: skip
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert res.stderr.startswith("error: could not download 'HuggingFaceTB/SmolLM2-135M-Instruct' (ConnectError")
    assert res.stderr.rstrip().endswith(f"{target} was left as it was")
    assert (target / "lit_model.pth").read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["SmolLM2"]  # the stale staging folder is gone


def test_force_replaces_a_checkpoint_only_once_the_new_one_is_whole(tmp_path):
    target = tmp_path / "tiny"
    res = run_cli("scripts/download.py", "model=tiny-random", "--checkpoint-dir", str(target))
    assert res.returncode == 0, res.stderr[-2000:]
    (target / "extra.txt").write_text("from the old checkpoint")
    res = run_cli("scripts/download.py", "model=tiny-random", "--checkpoint-dir", str(target), "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (target / "lit_model.pth").is_file() and not (target / "extra.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    res = run_cli("scripts/download.py", "model=tiny-random", "--checkpoint-dir", str(mine), "--force")
    assert res.returncode == 2 and "is not a LitGPT checkpoint folder; it is never replaced" in res.stderr
    assert (mine / "thesis.tex").read_text() == "mine"
