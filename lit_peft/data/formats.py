"""Record formats (a raw record -> a conversation, a list of messages), and loading records from files or the hub."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lit_peft.data.templates import Message, instruction_messages
from lit_peft.errors import UserError

LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def data_suffix(path: Path) -> str:
    """The data file type, looking through a compression suffix: a.jsonl.gz -> .jsonl."""
    suffixes = [x for x in path.suffixes if x not in COMPRESSIONS]
    return suffixes[-1] if suffixes and path.suffix in (*COMPRESSIONS, suffixes[-1]) else path.suffix


class DataError(UserError):
    """A data set problem, reported with the file, the record index and the field."""


class SkipRecord(DataError):
    """A well-formed record that cannot be used (counted and reported, not fatal); `reason` groups the report."""

    def __init__(self, message: str, reason: str = "unusable") -> None:
        super().__init__(message)
        self.reason = reason


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def check_conversation(messages: list[Message], source: str, index: int, last: str = "assistant") -> list[Message]:
    """The one rule every conversation follows after parsing, whatever its format; SkipRecord if it does not.

    An optional leading system turn, then user and assistant turns alternating, starting with the user and ending
    with `last` (an assistant reply for SFT, the user's turn for a preference prompt); no user or assistant turn empty.
    """
    where = f"{source}: record {index}"
    if all(m["role"] == "system" for m in messages):
        what = "only system turns" if messages else "no turns"
        raise SkipRecord(f"{where}: has no user or assistant turn ({what})", "no user or assistant turn")
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for j, m in enumerate(turns, start=len(messages) - len(turns)):
        if m["role"] == "system":
            raise SkipRecord(
                f"{where}: turn {j} is a system turn after the conversation began", "misplaced system turn"
            )
        if not m["content"].strip():
            raise SkipRecord(f"{where}: turn {j} ({m['role']}) is empty", f"empty {m['role']} turn")
    roles = [m["role"] for m in turns]
    for j, role in enumerate(roles):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            offset = len(messages) - len(turns)
            raise SkipRecord(
                f"{where}: turn {j + offset} is {_a(role)} turn where {_a(expected)} turn belongs (roles must "
                "alternate, starting with the user)",
                "roles do not alternate",
            )
    if roles[-1] != last:
        raise SkipRecord(f"{where}: ends with {_a(roles[-1])} turn, not with the {last}'s", f"does not end with {last}")
    return messages


IDENTICAL_PAIR = "identical replies"  # the reason a preference pair whose two replies are the same is skipped for


def check_preference(pair: Preference, source: str, index: int) -> Preference:
    """check_conversation's rule for a preference pair: the prompt ends with the user's turn, both replies non-empty
    and not identical (a pair whose replies are the same teaches nothing: it is skipped and counted)."""
    check_conversation(pair.prompt, source, index, last="user")
    for name in ("chosen", "rejected"):
        if not getattr(pair, name).strip():
            raise SkipRecord(f"{source}: record {index}: the {name} reply is empty", "empty reply")
    if pair.chosen.strip() == pair.rejected.strip():  # DPO's loss has no gradient for such a pair
        raise SkipRecord(f"{source}: record {index}: the chosen and rejected replies are identical", IDENTICAL_PAIR)
    return pair


def as_text(value: Any) -> str | None:
    """A text field's value as text: a string, or a number as its text (a JSON 42 or 1.5 is the text "42", "1.5");
    None for anything else (a list, a mapping, true/false), which is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _field(record: Mapping[str, Any], name: str, source: str, index: int, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{source}: record {index} has no field {name!r} (fields: {', '.join(sorted(record))})")
        return ""
    return _text(value, source, index, name)


def _text(value: Any, source: str, index: int, field: str) -> str:
    text = as_text(value)
    if text is None:
        raise DataError(
            f"{source}: record {index} field {field!r} is {type(value).__name__}, expected a string (or a number)"
        )
    return text


def _list(record: Mapping[str, Any], name: str, source: str, index: int, required: bool = True) -> list:
    value = record.get(name)
    if value is None and not required:
        return []
    if value is None:
        raise DataError(f"{source}: record {index} has no field {name!r} (fields: {', '.join(sorted(record))})")
    if not isinstance(value, list):
        raise DataError(f"{source}: record {index} field {name!r} is {type(value).__name__}, expected a list")
    return value


ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


def _turns(items: list, source: str, index: int, field: str, role_key: str, content_key: str) -> list[Message]:
    """[{role_key: ..., content_key: ...}, ...] -> messages with roles normalised (human/gpt/... -> user/assistant)."""
    messages = []
    for j, item in enumerate(items):
        where = f"{field}[{j}]"
        if not isinstance(item, Mapping) or role_key not in item or content_key not in item:
            raise DataError(f"{source}: record {index} field {where!r} needs {role_key!r} and {content_key!r}")
        role = ROLES.get(str(item[role_key]).lower())
        if role is None:
            raise DataError(
                f"{source}: record {index} field {where!r} has role {item[role_key]!r}; valid: {', '.join(ROLES)}"
            )
        messages.append({"role": role, "content": _text(item[content_key], source, index, f"{where}.{content_key}")})
    return messages


def alpaca(record: Mapping[str, Any], source: str, index: int) -> list[Message]:
    """{instruction, input (optional), output}."""
    return instruction_messages(
        _field(record, "instruction", source, index),
        _field(record, "input", source, index, required=False),
        _field(record, "output", source, index),
    )


def dolly(record: Mapping[str, Any], source: str, index: int) -> list[Message]:
    """databricks-dolly-15k: {instruction, context (optional), response}."""
    return instruction_messages(
        _field(record, "instruction", source, index),
        _field(record, "context", source, index, required=False),
        _field(record, "response", source, index),
    )


def lima(record: Mapping[str, Any], source: str, index: int) -> list[Message]:
    """LIMA as LLaMA-Factory ships it: earlier turns in `history` ([[user, assistant], ...]), then
    {instruction, input (optional), output} as the last exchange."""
    messages: list[Message] = []
    for j, pair in enumerate(_list(record, "history", source, index, required=False)):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise DataError(f"{source}: record {index} field 'history[{j}]' must be a [user, assistant] pair")
        messages.append({"role": "user", "content": _text(pair[0], source, index, f"history[{j}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], source, index, f"history[{j}][1]")})
    return messages + alpaca(record, source, index)


def sharegpt(record: Mapping[str, Any], source: str, index: int) -> list[Message]:
    """ShareGPT exports: {conversations: [{from: human|gpt|system, value}], system (optional)}."""
    messages = _turns(_list(record, "conversations", source, index), source, index, "conversations", "from", "value")
    system = record.get("system")
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": _text(system, source, index, "system")})
    return messages


def openai_messages(record: Mapping[str, Any], source: str, index: int) -> list[Message]:
    """OpenAI chat style: {messages: [{role: system|user|assistant, content}]}."""
    return _turns(_list(record, "messages", source, index), source, index, "messages", "role", "content")


_HUMAN = re.compile(r"###\s*(Human|Assistant)\s*:\s*")
_INST = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=<s>\s*\[INST\]|\[INST\]|$)", re.DOTALL)
_SYS = re.compile(r"<<SYS>>(.*?)<</SYS>>", re.DOTALL)


def guanaco(record: Mapping[str, Any], source: str, index: int) -> list[Message]:
    """OpenAssistant/guanaco dialogues in one `text` field, in either shape: `### Human: ... ### Assistant: ...`
    or Llama-2 `<s>[INST] ... [/INST] ... </s>` (an optional <<SYS>> block in the first turn is the system)."""
    text = _field(record, "text", source, index)
    messages: list[Message] = []
    if "[INST]" in text:
        for user, reply in _INST.findall(text):
            system = _SYS.search(user)
            if system and not messages:
                messages.append({"role": "system", "content": system.group(1).strip()})
            user = _SYS.sub("", user).strip()
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": reply.replace("</s>", "").strip()})
    elif _HUMAN.search(text):
        parts = _HUMAN.split(text)  # ["", "Human", "...", "Assistant", "...", ...]
        for role, content in zip(parts[1::2], parts[2::2], strict=True):
            messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    else:
        raise DataError(
            f"{source}: record {index} field 'text' is neither '### Human: ... ### Assistant: ...' "
            "nor Llama-2 '[INST] ... [/INST]' dialogue"
        )
    return messages


FORMATS: dict[str, Callable[[Mapping[str, Any], str, int], list[Message]]] = {
    "alpaca": alpaca,
    "dolly": dolly,
    "lima": lima,
    "sharegpt": sharegpt,
    "messages": openai_messages,
    "guanaco": guanaco,
}


@dataclasses.dataclass(frozen=True)
class Preference:
    """One preference pair: a conversation so far (ending with the user's turn) and two assistant replies."""

    prompt: list[Message]
    chosen: str
    rejected: str


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def _hh_dialogue(text: str, source: str, index: int, field: str) -> list[Message]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{source}: record {index} field {field!r} is not a '\\n\\nHuman: ... Assistant: ...' dialogue")
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def hh_rlhf(record: Mapping[str, Any], source: str, index: int) -> Preference:
    """Anthropic hh-rlhf: {chosen, rejected}, each the whole dialogue; the reply pair is the last assistant turn."""
    chosen = _hh_dialogue(_field(record, "chosen", source, index), source, index, "chosen")
    rejected = _hh_dialogue(_field(record, "rejected", source, index), source, index, "rejected")
    for name, dialogue in (("chosen", chosen), ("rejected", rejected)):
        if dialogue[-1]["role"] != "assistant" or len(dialogue) < 2:
            raise SkipRecord(
                f"{source}: record {index} field {name!r} does not end with an assistant turn",
                "does not end with assistant",
            )
    if chosen[:-1] != rejected[:-1]:
        raise SkipRecord(
            f"{source}: record {index}: 'chosen' and 'rejected' dialogues differ before the last reply",
            "sides differ before the reply",
        )
    return Preference(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _reply(value: Any, source: str, index: int, field: str) -> str:
    """A reply as a string or as a one-turn {from/role, value/content} message (LLaMA-Factory)."""
    if isinstance(value, Mapping):
        value = value.get("value", value.get("content"))
    if value is None:
        raise DataError(f"{source}: record {index} has no field {field!r}")
    return _text(value, source, index, field)


def sharegpt_pairs(record: Mapping[str, Any], source: str, index: int) -> Preference:
    """LLaMA-Factory preference data: {conversations: [...ShareGPT turns], chosen: {from, value}, rejected}."""
    prompt = sharegpt(record, source, index)
    return Preference(
        prompt,
        _reply(record.get("chosen"), source, index, "chosen"),
        _reply(record.get("rejected"), source, index, "rejected"),
    )


def pairs(record: Mapping[str, Any], source: str, index: int) -> Preference:
    """Flat {prompt, chosen, rejected} (prompt a string or a list of role/content messages; system optional)."""
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        messages = _turns(prompt, source, index, "prompt", "role", "content")
    else:
        messages = [{"role": "user", "content": _field(record, "prompt", source, index)}]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": _text(record["system"], source, index, "system")})
    return Preference(
        messages,
        _reply(record.get("chosen"), source, index, "chosen"),
        _reply(record.get("rejected"), source, index, "rejected"),
    )


PREFERENCE_FORMATS: dict[str, Callable[[Mapping[str, Any], str, int], Preference]] = {
    "hh_rlhf": hh_rlhf,
    "sharegpt_pairs": sharegpt_pairs,
    "pairs": pairs,
}
TEXT_FORMATS = ("text", "tokens")  # raw documents ({text}, .txt) and pre-tokenized documents ({input_ids})


def format_kind(name: str) -> str:
    """'conversation', 'preference' or 'text' for a data.format value; one-line error for an unknown one."""
    if name in FORMATS:
        return "conversation"
    if name in PREFERENCE_FORMATS:
        return "preference"
    if name in TEXT_FORMATS:
        return "text"
    valid = sorted([*FORMATS, *PREFERENCE_FORMATS, *TEXT_FORMATS])
    raise UserError(f"unknown data format {name!r}; valid formats: {', '.join(valid)}")


def get_format(name: str) -> Callable[[Mapping[str, Any], str, int], list[Message]]:
    if name not in FORMATS:
        raise UserError(f"unknown data format {name!r}; valid conversation formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def _reaching_the_hub_failed(error: BaseException) -> bool:
    """Whether an exception from loading a hub data set (or one it was raised from) is a failure to reach the hub.

    Offline, `datasets` raises ConnectionError (HF_HUB_OFFLINE=1) or, once its HTTP client gave up retrying, a
    RuntimeError "Cannot send a request, as the client has been closed"; an unknown name gives a FileNotFoundError
    (DatasetNotFoundError) that looks the same as a name not cached offline.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        module = type(error).__module__.split(".")[0]
        if isinstance(error, OSError) or module in ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub"):
            return True
        if isinstance(error, RuntimeError) and "client has been closed" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_records(path: str, split: str = "train", columns: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Records from a local JSON/JSONL/Parquet/CSV file or folder, or a hub data set name, through `datasets`.

    `columns` renames fields (format field -> field in the file), so files with other names need no code; a column it
    names that the file does not have is an error naming it and the fields the file has.
    """
    import datasets

    from lit_peft.data.files import file_error, load_local, quiet_datasets

    local = Path(path).expanduser()
    hub = False
    files: list[Path] = []  # the local files read, which a failure is looked for in
    try:
        if local.is_file():
            builder = LOCAL_EXTENSIONS.get(data_suffix(local))
            if builder is None:
                raise DataError(
                    f"{path}: unsupported file type {data_suffix(local)!r}; valid: {', '.join(LOCAL_EXTENSIONS)} "
                    f"(optionally .gz/.bz2/.xz/.zst compressed)"
                )
            files = [local]
            ds = load_local(builder, local)
        elif local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.is_file() and data_suffix(p) in LOCAL_EXTENSIONS)
            with quiet_datasets():  # its progress bars go to run.log
                ds = datasets.load_dataset(str(local), split=split)
        elif path.startswith((".", "/", "~")) or data_suffix(local) in LOCAL_EXTENSIONS:
            raise DataError(f"data file not found: {path}")
        else:
            hub = True
            with quiet_datasets():
                ds = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets wraps JSON parse errors in its own types
        if hub and _reaching_the_hub_failed(e):
            raise DataError(
                f"could not load data set {path!r} from the hub ({type(e).__name__}: {_first_line(e)}); "
                "offline, or a misspelled name? pass data.path=<local file>"
            ) from e
        raise file_error(files, e, path) from e
    if columns:
        missing = {ours: theirs for ours, theirs in columns.items() if theirs not in ds.column_names}
        if missing:
            bad = ", ".join(f"{ours}: {theirs!r}" for ours, theirs in missing.items())
            raise DataError(
                f"{path}: data.columns names a column the file does not have ({bad}); "
                f"the file's fields: {', '.join(ds.column_names)}"
            )
    try:
        records = ds.to_list()
    except Exception as e:  # invalid UTF-8 in a JSON file surfaces only here, when the rows are decoded
        raise file_error(files, e, path) from e
    if not records:
        raise DataError(f"{path}: holds no records")
    if columns:
        records = [{**r, **{ours: r[theirs] for ours, theirs in columns.items()}} for r in records]
    return records
