"""Prompt templates: a conversation (list of role/content messages) -> text segments, each marked as loss target or not.

Only assistant replies (and the token that ends them) are targets; system, user and template text are masked.
The segments are joined and tokenized as one text (lit_peft.data.tokenize), so training sees the same ids as chat.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from lit_peft.errors import UserError

# {"role": "system" | "user" | "assistant", "content": str}; a user turn made from an instruction record may also
# carry its parts, "instruction" and "input" (content is then "instruction\n\ninput"), for the Alpaca template.
Message = dict[str, str]
Segment = tuple[str, bool]  # (text, is_target)

# Stanford Alpaca's two preambles: without and with an `### Input:` section.
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclasses.dataclass(frozen=True)
class Template:
    """How one model family formats a conversation. `{bos}`/`{eos}` are the tokenizer's special token strings."""

    name: str
    default_system: str | None = None
    # The special token that ends an assistant turn when it is not the tokenizer's eos (generation stops at either).
    turn_end: ClassVar[str] = ""

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        raise NotImplementedError

    def generation_prompt(self) -> str:
        """Text that cues the assistant's reply after the last user turn (for generation)."""
        return ""

    def stop_strings(self, eos: str) -> tuple[str, ...]:
        """The special tokens at which a reply ends: the tokenizer's eos and the template's end of turn."""
        return tuple(dict.fromkeys(t for t in (eos, self.turn_end) if t))


def _system_and_turns(messages: list[Message], default: str | None) -> tuple[str | None, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages


class ChatML(Template):
    """<|im_start|>role\\ncontent<|im_end|>\\n (SmolLM2, Qwen, ...)."""

    turn_end = "<|im_end|>"

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
    """Stanford Alpaca's instruction format, with its `### Input:` section and preamble when a record has an input;
    later turns are appended as further Instruction/Response pairs. A system prompt replaces the preamble."""

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system or None)
        if system is None:
            has_input = bool(turns and turns[0]["role"] == "user" and turns[0].get("input"))
            system = ALPACA_SYSTEM_INPUT if has_input else ALPACA_SYSTEM
        out: list[Segment] = [(f"{bos}{system}\n\n", False)]
        for m in turns:
            if m["role"] == "assistant":
                out += [(f"{m['content']}{eos}", True), ("\n\n", False)]
            elif m.get("instruction") and m.get("input"):
                out.append(
                    (f"### Instruction:\n{m['instruction']}\n\n### Input:\n{m['input']}\n\n### Response:\n", False)
                )
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


# Llama 3.1's official template writes this date into every system header unless the caller passes one; Llama 3.2's
# writes the day it runs (strftime_now). A fixed date keeps training data and prompts the same from day to day.
LLAMA3_DATE = "26 Jul 2024"
LLAMA3_CUTOFF = "December 2023"


class Llama3(Template):
    """Llama 3.1 / 3.2 Instruct: <|begin_of_text|>, a system header that always carries the knowledge cutoff and a
    date (then the system prompt, if any), then <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> per
    turn, every content trimmed as the official template does. The date is `LLAMA3_DATE` (Llama 3.1's default; for
    Llama 3.2 it equals `apply_chat_template(..., date_string=LLAMA3_DATE)`)."""

    turn_end = "<|eot_id|>"

    def generation_prompt(self) -> str:
        return "<|start_header_id|>assistant<|end_header_id|>\n\n"

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system)
        out: list[Segment] = [
            (
                f"{bos}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: {LLAMA3_CUTOFF}\n"
                f"Today Date: {LLAMA3_DATE}\n\n{(system or '').strip()}<|eot_id|>",
                False,
            )
        ]
        for m in turns:
            if m["role"] == "assistant":
                out += [(self.generation_prompt(), False), (f"{m['content'].strip()}<|eot_id|>", True)]
            else:
                out.append(
                    (f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>", False)
                )
        return out


class Gemma(Template):
    """<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n...<end_of_turn>\\n (Gemma, Gemma 2),
    contents trimmed. Gemma has no system role (its template refuses one): a system prompt opens the first user
    turn, followed by a blank line, as Gemma 3's official template places it."""

    turn_end = "<end_of_turn>"

    def generation_prompt(self) -> str:
        return "<start_of_turn>model\n"

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system)
        out: list[Segment] = [(bos, False)]
        first = True
        for m in turns:
            if m["role"] == "assistant":
                out += [
                    (self.generation_prompt(), False),
                    (f"{m['content'].strip()}<end_of_turn>", True),
                    ("\n", False),
                ]
                continue
            prefix = f"{system}\n\n" if first and system is not None else ""
            out.append((f"<start_of_turn>{m['role']}\n{prefix}{m['content'].strip()}<end_of_turn>\n", False))
            first = False
        return out


class Phi3(Template):
    """<|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n (Phi-3 mini, its July 2024
    template), and the tokenizer's end-of-text token after a conversation that ends with a reply (the template adds
    it whenever no generation prompt follows)."""

    turn_end = "<|end|>"

    def generation_prompt(self) -> str:
        return "<|assistant|>\n"

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system)
        out: list[Segment] = [(f"<|system|>\n{system}<|end|>\n", False)] if system is not None else []
        for m in turns:
            if m["role"] == "assistant":
                out += [("<|assistant|>\n", False), (f"{m['content']}<|end|>", True), ("\n", False)]
            else:
                out.append((f"<|{m['role']}|>\n{m['content']}<|end|>\n", False))
        if turns and turns[-1]["role"] == "assistant":
            out.append((eos, False))
        return out


class Mistral(Template):
    """Mistral Instruct v0.3 (tokenizer v3): <s>[INST] user[/INST] reply</s>[INST] user[/INST] ..., replies trimmed.
    A system prompt opens the last user turn, followed by a blank line (mistral-common's rule). The hub's template
    writes it only when that user turn ends the conversation, so prompts for generation are identical, and a training
    conversation keeps its system prompt where the model sees it at inference."""

    def segments(self, messages: list[Message], bos: str, eos: str) -> list[Segment]:
        system, turns = _system_and_turns(messages, self.default_system)
        last_user = max((i for i, m in enumerate(turns) if m["role"] != "assistant"), default=-1)
        out: list[Segment] = [(bos, False)]
        for i, m in enumerate(turns):
            if m["role"] == "assistant":
                out += [(" ", False), (f"{m['content'].strip()}{eos}", True)]
            else:
                text = f"{system}\n\n{m['content']}" if i == last_user and system is not None else m["content"]
                out.append((f"[INST] {text}[/INST]", False))
        return out


TEMPLATES: dict[str, type[Template]] = {
    "chatml": ChatML,
    "llama2": Llama2,
    "alpaca": Alpaca,
    "zephyr": Zephyr,
    "llama3": Llama3,
    "gemma": Gemma,
    "phi3": Phi3,
    "mistral": Mistral,
}


def get_template(name: str, default_system: str | None = None) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; valid templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name](name=name, default_system=default_system)


def instruction_messages(instruction: str, input: str = "", output: str | None = None) -> list[Message]:
    """An Alpaca-style record as a two-turn conversation. The user turn's content is "instruction\n\ninput" for
    every template; with an input it also keeps the two parts, which the Alpaca template renders in sections."""
    messages: list[Message] = [{"role": "user", "content": instruction}]
    if input:
        messages[0] = {
            "role": "user",
            "content": f"{instruction}\n\n{input}",
            "instruction": instruction,
            "input": input,
        }
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


def guess_template(checkpoint_dir: str | Path) -> str:
    """The chat template a checkpoint's tokenizer was made for (by its special tokens); alpaca when none matches."""
    config = Path(checkpoint_dir) / "tokenizer_config.json"
    text = config.read_text() if config.is_file() else ""
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text:
        return "llama3"
    if "<start_of_turn>" in text:
        return "gemma"
    if "<|end|>" in text and "<|assistant|>" in text:
        return "phi3"
    if "<|assistant|>" in text:
        return "zephyr"
    if "[AVAILABLE_TOOLS]" in text:  # the v3 tokenizer's control tokens (Mistral v0.3); v0.1/v0.2 write Llama 2's form
        return "mistral"
    if "[INST]" in text:
        return "llama2"
    return "alpaca"
