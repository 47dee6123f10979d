"""chat/base.py driven through stdin: the reply is the greedy continuation of the templated conversation."""

from __future__ import annotations

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
