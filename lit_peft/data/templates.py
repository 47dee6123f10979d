"""Prompt templates: a conversation (list of role/content messages) -> text segments, each marked as loss target or not.

Only assistant replies (and the token that ends them) are targets; system, user and template text are masked.
Segments are tokenized one by one and concatenated, so the mask boundary is exact, whatever the tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Segment = tuple[str, bool]  # (text, is_target)

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclasses.dataclass(frozen=True)
class Template:
    """How one model family formats a conversation. `{bos}`/`{eos}` are the tokenizer's special token strings."""

    name: str
    default_system: str | None = None

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        raise NotImplementedError

    def generation_prompt(self) -> str:
        """Text that cues the assistant's reply after the last user turn (for generation)."""
        return ""


def _system_and_turns(messages: list[Message], default: str | None) -> tuple[str | None, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages


class ChatML(Template):
    """<|im_start|>role\\ncontent<|im_end|>\\n (SmolLM2, Qwen, ...)."""

    def generation_prompt(self) -> str:
        return "<|im_start|>assistant\n"

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system)
        out: list[Segment] = []
        if system is not None:
            out.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for m in turns:
            if m["role"] == "assistant":
                out += [("<|im_start|>assistant\n", False), (f"{m['content']}<|im_end|>", True), ("\n", False)]
            else:
                out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        return out


class Llama2(Template):
    """<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] assistant </s><s>[INST] ..."""

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system)
        out: list[Segment] = []
        first = True
        for m in turns:
            if m["role"] == "assistant":
                out.append((f" {m['content']} {eos}", True))
                continue
            text = m["content"]
            if first and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
            out.append((f"{bos}[INST] {text} [/INST]", False))
            first = False
        return out


class Alpaca(Template):
    """Stanford Alpaca's instruction format; later turns are appended as further Instruction/Response pairs."""

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system or ALPACA_SYSTEM)
        out: list[Segment] = [(f"{bos}{system}\n\n", False)]
        for m in turns:
            if m["role"] == "assistant":
                out += [(f"{m['content']}{eos}", True), ("\n\n", False)]
            else:
                out.append((f"### Instruction:\n{m['content']}\n\n### Response:\n", False))
        return out


class Zephyr(Template):
    """<|system|>\\n...</s>\\n<|user|>\\n...</s>\\n<|assistant|>\\n...</s> (TinyLlama-Chat, Zephyr)."""

    def generation_prompt(self) -> str:
        return "<|assistant|>\n"

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system)
        out: list[Segment] = [(f"<|system|>\n{system}{eos}\n", False)] if system is not None else []
        for m in turns:
            if m["role"] == "assistant":
                out += [("<|assistant|>\n", False), (f"{m['content']}{eos}", True), ("\n", False)]
            else:
                out.append((f"<|{m['role']}|>\n{m['content']}{eos}\n", False))
        return out


TEMPLATES: dict[str, type[Template]] = {"chatml": ChatML, "llama2": Llama2, "alpaca": Alpaca, "zephyr": Zephyr}


def get_template(name: str, default_system: str | None = None) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name](name=name, default_system=default_system)


def instruction_messages(instruction: str, input: str = "", output: str | None = None) -> list[Message]:
    """An Alpaca-style record as a two-turn conversation."""
    user = f"{instruction}\n\n{input}" if input else instruction
    messages = [{"role": "user", "content": user}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


def guess_template(checkpoint_dir: str | Path) -> str:
    """The chat template a checkpoint's tokenizer was made for (by its special tokens); alpaca when none matches."""
    config = Path(checkpoint_dir) / "tokenizer_config.json"
    text = config.read_text() if config.is_file() else ""
    if "<|im_start|>" in text:
        return "chatml"
    if "<|assistant|>" in text:
        return "zephyr"
    if "[INST]" in text:
        return "llama2"
    return "alpaca"
