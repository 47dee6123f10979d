"""chat/base.py driven through stdin: the reply is the greedy continuation of the templated conversation."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from litgpt import Tokenizer

from lit_peft.data.templates import get_template
from lit_peft.data.tokenize import encode_text, special_strings
from lit_peft.model import load_base


def greedy(model, ids: list[int], eos: int, n: int) -> list[int]:
    """Argmax decoding by full forward passes (no KV cache): the definition the chat script must match."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def test_chat_replies_are_greedy_continuations_over_two_turns(tiny_checkpoint):
    res = run_cli(
        "chat/base.py",
        "--checkpoint-dir",
        str(tiny_checkpoint),
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--system",
        "Be brief.",
        stdin="hello there\nand again\n",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    replies = res.stdout.rstrip("\n").split("\n")
    assert len(replies) == 2

    model, tokenizer = load_base(tiny_checkpoint).eval(), Tokenizer(tiny_checkpoint)
    template = get_template("chatml", "Be brief.")
    bos, eos = special_strings(tokenizer)
    history = []
    for user, printed in zip(["hello there", "and again"], replies, strict=True):
        history.append({"role": "user", "content": user})
        text = "".join(t for t, _ in template.segments(history, bos, eos)) + template.generation_prompt()
        expected = tokenizer.decode(torch.tensor(greedy(model, encode_text(tokenizer, text), tokenizer.eos_id, 12)))
        assert printed == expected.replace("\n", "\\n")
        history.append({"role": "assistant", "content": expected})


def test_chat_with_a_missing_adapter_is_a_one_line_error(tmp_path):
    res = run_cli("chat/base.py", "--adapter", str(tmp_path / "nope"), stdin="")
    assert res.returncode == 2 and res.stderr.strip().startswith("error:")


# ---------------------------------------------------------------- the prompt format and dtype training used


def _adapter(tiny_checkpoint, folder):
    """A LoRA adapter whose system prompt is recorded only in the training config (adapters written before the
    top-level key); chatml template."""
    from lit_peft.io import save_adapter
    from lit_peft.model import install_method, trainable_state_dict

    model = load_base(tiny_checkpoint)
    _, settings = install_method(model, "lora", {"r": 4, "targets": ["query", "value", "mlp"]})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    meta = {
        "method": "lora",
        "settings": settings.to_dict(),
        "base_checkpoint": str(tiny_checkpoint),
        "template": "chatml",
        "config": {"model": {"system_prompt": "Be brief."}, "data": {"format": "alpaca"}, "precision": "32-true"},
    }
    return save_adapter(folder, trainable_state_dict(model), meta)


def _expected_replies(model, tokenizer, system, users, n=12):
    template = get_template("chatml", system)
    bos, eos = special_strings(tokenizer)
    history, replies = [], []
    for user in users:
        history.append({"role": "user", "content": user})
        text = "".join(t for t, _ in template.segments(history, bos, eos)) + template.generation_prompt()
        reply = tokenizer.decode(torch.tensor(greedy(model, encode_text(tokenizer, text), tokenizer.eos_id, n)))
        replies.append(reply.replace("\n", "\\n"))
        history.append({"role": "assistant", "content": reply})
    return replies


def test_chat_renders_the_adapters_system_prompt_and_a_merged_model_keeps_it(tiny_checkpoint, tmp_path):
    from lit_peft.model import load_adapter_into

    adapter = _adapter(tiny_checkpoint, tmp_path / "adapter")
    users = ["hello there", "and again"]
    args = ["--temperature", "0", "--max-new-tokens", "12"]
    res = run_cli("chat/base.py", "--adapter", str(adapter), *args, stdin="\n".join(users) + "\n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"prompt format: template chatml, system prompt 'Be brief.' (adapter {adapter})" in res.stderr
    assert f"dtype: float32 (stored in {tiny_checkpoint / 'lit_model.pth'})" in res.stderr

    model, tokenizer = load_base(tiny_checkpoint), Tokenizer(tiny_checkpoint)
    load_adapter_into(model, adapter)
    model.eval()
    with_system = _expected_replies(model, tokenizer, "Be brief.", users)
    without = _expected_replies(model, tokenizer, None, users)
    assert with_system != without  # the system turn changes the replies, so the check below can tell
    assert res.stdout.rstrip("\n").split("\n") == with_system

    # --system '' renders no system turn.
    res = run_cli("chat/base.py", "--adapter", str(adapter), "--system", "", *args, stdin="\n".join(users) + "\n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no system prompt (flag --system)" in res.stderr
    assert res.stdout.rstrip("\n").split("\n") == without

    # The merged model's record carries the template and system prompt: same replies as base + adapter.
    merged = tmp_path / "merged"
    assert run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(merged)).returncode == 0
    res = run_cli("chat/base.py", "--checkpoint-dir", str(merged), *args, stdin="\n".join(users) + "\n")
    assert res.returncode == 0, res.stderr[-2000:]
    record = merged / "lit_peft_merge.json"
    assert f"prompt format: template chatml, system prompt 'Be brief.' (merged record {record})" in res.stderr
    assert res.stdout.rstrip("\n").split("\n") == with_system


def test_chat_keeps_a_bf16_checkpoint_in_bf16_and_rejects_a_bad_dtype(tiny_checkpoint, tmp_path):
    from lit_peft.io import save_lit_checkpoint

    state = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    bf16 = save_lit_checkpoint(tmp_path / "bf16", {k: v.bfloat16() for k, v in state.items()}, tiny_checkpoint)
    res = run_cli(
        "chat/base.py", "--checkpoint-dir", str(bf16), "--temperature", "0", "--max-new-tokens", "4", stdin="hi\n"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"dtype: bfloat16 (stored in {bf16 / 'lit_model.pth'})" in res.stderr
    assert "template chatml (guessed from the tokenizer), no system prompt (none recorded)" in res.stderr
    res = run_cli(
        "chat/base.py", "--checkpoint-dir", str(bf16), "--dtype", "float32", "--max-new-tokens", "4", stdin="hi\n"
    )
    assert res.returncode == 0 and "dtype: float32 (--dtype float32)" in res.stderr

    res = run_cli("chat/base.py", "--checkpoint-dir", str(bf16), "--dtype", "half", stdin="hi\n")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == "error: unknown --dtype 'half'; valid: auto, float32, bfloat16, float16"


@pytest.mark.parametrize(
    ("name", "eos", "expected"),
    [
        ("chatml", "<|im_end|>", ("<|im_end|>",)),  # SmolLM2: eos is the end of turn
        ("gemma", "<eos>", ("<eos>", "<end_of_turn>")),
        ("phi3", "<|endoftext|>", ("<|endoftext|>", "<|end|>")),
        ("llama3", "<|end_of_text|>", ("<|end_of_text|>", "<|eot_id|>")),
        ("mistral", "</s>", ("</s>",)),
    ],
)
def test_a_reply_stops_at_eos_or_the_templates_end_of_turn(name, eos, expected):
    from lit_peft.data.templates import get_template

    template = get_template(name)
    assert template.stop_strings(eos) == expected
    # the end-of-turn token closes every assistant turn the template writes
    text = "".join(
        t
        for t, _ in template.segments(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "<bos>", eos
        )
    )
    assert f"b{expected[-1]}" in text
