"""chat/base.py driven through stdin: the reply is the greedy continuation of the templated conversation."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from litgpt import Tokenizer

from lit_peft.data.templates import get_template
from lit_peft.data.tokenize import encode_text, special_strings
from lit_peft.models.load import load_base


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
    from lit_peft.checkpoints.adapter import save_adapter
    from lit_peft.models.load import install_method, trainable_state_dict

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
    from lit_peft.models.load import load_adapter_into

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


def _valid_methods() -> str:
    from lit_peft.methods import METHODS

    return ", ".join(sorted(METHODS))


HAND_EDITED = {  # adapter_config.json as a user might leave it -> what the one error line says
    "a-list": (lambda m: [m], "holds a list, not a JSON object"),
    "no-method": (lambda m: {k: v for k, v in m.items() if k != "method"}, 'has no "method"; valid methods: '),
    "unknown-method": (lambda m: {**m, "method": "qlora"}, 'unknown method "qlora"; valid methods: '),
    "settings-a-string": (lambda m: {**m, "settings": "r=4"}, "'settings' is \"r=4\" (a string); expected an object"),
    "r-a-string": (
        lambda m: {**m, "settings": {**m["settings"], "r": "4"}},
        'settings.r="4" is not valid for method lora; expected an integer',
    ),
    "architecture-a-list": (lambda m: {**m, "architecture": ["cqil"]}, "'architecture' is [\"cqil\"]; expected an"),
}


@pytest.mark.parametrize("case", sorted(HAND_EDITED))
def test_chat_with_a_hand_edited_adapter_config_is_one_line_naming_it(tiny_checkpoint, tmp_path, case):
    import json

    adapter = _adapter(tiny_checkpoint, tmp_path / "adapter")
    path = adapter / "adapter_config.json"
    edit, message = HAND_EDITED[case]
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    res = run_cli("chat/base.py", "--adapter", str(adapter), "--temperature", "0", stdin="hi\n")
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: {path}") and message in res.stderr, res.stderr
    if "valid methods" in message:
        assert res.stderr.rstrip().endswith(_valid_methods())


def test_chat_with_an_adapter_missing_its_weights_is_one_line_naming_them(tiny_checkpoint, tmp_path):
    adapter = _adapter(tiny_checkpoint, tmp_path / "adapter")
    (adapter / "adapter.safetensors").unlink()
    res = run_cli("chat/base.py", "--adapter", str(adapter), stdin="hi\n")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr == (
        f"error: {adapter / 'adapter_config.json'}: the adapter's weights file {adapter / 'adapter.safetensors'} "
        "is missing (an incomplete adapter folder)\n"
    )


def test_chat_keeps_a_bf16_checkpoint_in_bf16_and_rejects_a_bad_dtype(tiny_checkpoint, tmp_path):
    from lit_peft.checkpoints.files import save_lit_checkpoint

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


# ---------------------------------------------------------------- stdin that is not UTF-8

HINT = "; chat reads UTF-8 text: convert it (e.g. iconv -f latin1 -t utf-8)\n"


@pytest.mark.parametrize(
    ("stdin", "replies", "error"),
    [  # as a stdin read with errors="surrogateescape" gives them: an undecodable byte b is the character U+DC00+b
        ("caf\udce9\n", 0, "stdin line 1 is not valid utf-8 text (byte 0xe9 at byte 3 of the line)"),
        ("hello\n\udcff\udcfe\n", 1, "stdin line 2 is not valid utf-8 text (byte 0xff at byte 0 of the line)"),
        ("hello\nné \udcc3", 1, "stdin line 2 is not valid utf-8 text (byte 0xc3 at byte 4 of the line)"),
    ],
)
def test_undecodable_stdin_is_one_line_naming_the_line_and_byte(tiny_checkpoint, stdin, replies, error):
    args = ["--checkpoint-dir", str(tiny_checkpoint), "--temperature", "0", "--max-new-tokens", "4"]
    res = run_cli("chat/base.py", *args, stdin=stdin)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stdout.count("\n") == replies  # the turns before the bad line were answered
    assert res.stderr.splitlines()[-1] + "\n" == f"error: {error}{HINT}"
    assert "Traceback" not in res.stderr


def test_undecodable_bytes_on_a_real_stdin_are_one_line_and_utf8_text_is_fine(tiny_checkpoint):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    def chat(data: bytes) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "chat/base.py"), "--checkpoint-dir", str(tiny_checkpoint)]
            + ["--temperature", "0", "--max-new-tokens", "4"],
            input=data,
            capture_output=True,
            timeout=600,
            env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONWARNINGS": "ignore"},  # a strict UTF-8 stdin
        )

    res = chat(b"hello there\ncaf\xe9 au lait\n")  # Latin-1
    assert res.returncode == 2, res.stderr.decode(errors="replace")[-2000:]
    assert res.stdout.decode().count("\n") == 1
    stderr = res.stderr.decode().splitlines()
    assert stderr[-1] + "\n" == f"error: stdin line 2 is not valid utf-8 text (byte 0xe9 at byte 3 of the line){HINT}"
    assert "Traceback" not in res.stderr.decode()
    res = chat("café ✓\r\nnaïve\n".encode())
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    assert res.stdout.decode().count("\n") == 2
