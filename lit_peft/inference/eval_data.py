"""Loaders for the local (offline) lm-eval tasks of eval/tasks/: lm-eval calls them as `custom_dataset`.

Each receives the task's `dataset_kwargs` (which file, under the data directory) and lm-eval's metadata, where
`data_dir` comes from `python eval/run.py --data-dir DIR` or `lm_eval ... --metadata '{"data_dir": "DIR"}'`. Each
returns a DatasetDict whose rows have the fields of lm-eval's own task of the same name, so the prompts match.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets

from lit_peft.errors import UserError


def _file(data_dir: str | None, file: str) -> Path:
    if not data_dir:
        raise UserError(
            "local tasks read files under a data directory: pass --data-dir DIR to eval/run.py "
            """(with lm_eval: --metadata '{"data_dir": "DIR"}')"""
        )
    path = Path(data_dir).expanduser() / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (data_dir={data_dir}, file={file})")
    return path


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _splits(**splits: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items() if v is not None})


def _strip(text: str, prefix: str) -> str:
    text = text.strip()
    return text[len(prefix) :].strip() if text.startswith(prefix) else text


def mosaic_multiple_choice(data_dir=None, file=None, **_) -> datasets.DatasetDict:
    """MosaicML ICL jsonl {query: "Question: ...", choices, gold} (llmfoundry_eval: ARC, PIQA, OBQA, ...)."""
    rows = _jsonl(_file(data_dir, file))
    docs = [{"question": _strip(r["query"], "Question:"), "choices": r["choices"], "label": r["gold"]} for r in rows]
    return _splits(test=docs)


def arc(data_dir=None, file=None, fewshot_file=None, **_) -> datasets.DatasetDict:
    """The original ARC jsonl ({question: {stem, choices: [{text, label}]}, answerKey})."""

    def load(name):
        docs = []
        for r in _jsonl(_file(data_dir, name)):
            labels = [c["label"] for c in r["question"]["choices"]]
            docs.append(
                {
                    "question": r["question"]["stem"],
                    "choices": [c["text"] for c in r["question"]["choices"]],
                    "label": labels.index(r["answerKey"]),
                }
            )
        return docs

    return _splits(test=load(file), train=load(fewshot_file) if fewshot_file else None)


def piqa(data_dir=None, file=None, labels=None, **_) -> datasets.DatasetDict:
    """PIQA as released: {goal, sol1, sol2} jsonl and a labels file with one 0/1 per line."""
    rows = _jsonl(_file(data_dir, file))
    gold = _file(data_dir, labels).read_text().split()
    if len(gold) != len(rows):
        raise UserError(f"{labels} has {len(gold)} labels for {len(rows)} PIQA records in {file}")
    return _splits(test=[{**r, "label": int(g)} for r, g in zip(rows, gold, strict=True)])


def boolq(data_dir=None, file=None, **_) -> datasets.DatasetDict:
    """MosaicML's BoolQ jsonl {query: "Passage: ...\\nQuestion: ...?", choices [no, yes], gold}."""
    docs = []
    for i, r in enumerate(_jsonl(_file(data_dir, file))):
        passage, sep, question = r["query"].rpartition("\nQuestion:")
        if not sep:
            raise UserError(f"{file} record {i}: query has no '\\nQuestion:' part")
        docs.append({"passage": _strip(passage, "Passage:"), "question": question.strip(), "label": r["gold"]})
    return _splits(test=docs)


def winogrande(data_dir=None, file=None, **_) -> datasets.DatasetDict:
    """MosaicML's WinoGrande jsonl {context_options: [sentence up to the blank, option filled], continuation, gold}."""
    rows = _jsonl(_file(data_dir, file))
    return _splits(
        test=[{"options": r["context_options"], "rest": r["continuation"], "label": r["gold"]} for r in rows]
    )


def mmlu(data_dir=None, subject=None, folder="mmlu", **_) -> datasets.DatasetDict:
    """hendrycks/test CSVs with a header (question, choice0..3, answer index): <folder>/{test,dev}/<subject>_*.csv."""

    def load(split):
        with _file(data_dir, f"{folder}/{split}/{subject}_{split}.csv").open(encoding="utf-8", newline="") as f:
            return [
                {"question": r["question"], "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])}
                for r in csv.DictReader(f)
            ]

    return _splits(test=load("test"), dev=load("dev"))


def truthfulqa(data_dir=None, file=None, **_) -> datasets.DatasetDict:
    """TruthfulQA's mc_task.json ({question, mc1_targets: {answer: 0/1}, mc2_targets}); correct answers first."""
    rows = json.loads(_file(data_dir, file).read_text(encoding="utf-8"))

    def targets(d):
        return {"choices": list(d), "labels": [int(v) for v in d.values()]}

    docs = [
        {"question": r["question"], "mc1": targets(r["mc1_targets"]), "mc2": targets(r["mc2_targets"])} for r in rows
    ]
    return _splits(validation=docs)


def process_results_mc2(doc, results):
    """TruthfulQA MC2: the normalised probability mass on the true answers (lm-eval's definition)."""
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2 as lm_eval_mc2

    return lm_eval_mc2({"mc2_targets": doc["mc2"]}, results)
