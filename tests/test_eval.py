"""lm-eval over our models: the local offline tasks, agreement with lm-eval's own HF backend, and eval/run.py."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, shared_data

logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)

ARC_EASY = [
    {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"], "gold": 1},
    {"query": "Question: What melts ice?", "choices": ["heat", "cold", "salt water", "wind"], "gold": 0},
    {"query": "Question: Which is a mammal?", "choices": ["shark", "whale"], "gold": 1},
    {"query": "Question: What do bees make?", "choices": ["milk", "silk", "honey"], "gold": 2},
    {"query": "Question: Where does rain come from?", "choices": ["clouds", "rocks"], "gold": 0},
    {"query": "Question: What is frozen water?", "choices": ["steam", "ice", "sand"], "gold": 1},
]
ARC_ORIGINAL = {
    "id": "x1",
    "question": {
        "stem": "Which tool measures mass?",
        "choices": [
            {"text": "ruler", "label": "A"},
            {"text": "balance", "label": "B"},
            {"text": "clock", "label": "C"},
        ],
    },
    "answerKey": "B",
}
PIQA = [
    {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid."},
    {"goal": "Dry hair", "sol1": "Use a towel.", "sol2": "Use a rock."},
]
BOOLQ = {
    "query": "Passage: Cats are small animals that many people keep.\nQuestion: is a cat an animal?",
    "choices": ["no", "yes"],
    "gold": 1,
}
WINOGRANDE = [
    {
        "context_options": ["Ann helped Bo because Ann", "Ann helped Bo because Bo"],
        "continuation": "was kind.",
        "gold": 0,
    },
    {
        "context_options": ["The cup beat the jug as the cup", "The cup beat the jug as the jug"],
        "continuation": "won.",
        "gold": 0,
    },
]
TRUTHFULQA = [
    {
        "question": "What colour is the sky?",
        "mc1_targets": {"Blue.": 1, "Green.": 0, "Red.": 0},
        "mc2_targets": {"Blue.": 1, "Blue by day.": 1, "Green.": 0},
    }
]
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _csv(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([MMLU_HEADER, *rows])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Small files in the layouts of ../shared/data (MosaicML ICL jsonl, ARC, PIQA, MMLU csv, TruthfulQA json)."""
    root = tmp_path_factory.mktemp("evaldata")
    _jsonl(root / "llmfoundry_eval/world_knowledge/arc_easy.jsonl", ARC_EASY)
    _jsonl(root / "arc/ARC-Challenge-Test.jsonl", [ARC_ORIGINAL] * 2)
    _jsonl(root / "arc/ARC-Challenge-Dev.jsonl", [ARC_ORIGINAL])
    _jsonl(root / "piqa/valid.jsonl", PIQA)
    (root / "piqa/valid-labels.lst").write_text("0\n0\n")
    _jsonl(root / "llmfoundry_eval/reading_comprehension/boolq.jsonl", [BOOLQ] * 2)
    _jsonl(root / "llmfoundry_eval/language_understanding/winogrande.jsonl", WINOGRANDE)
    _csv(root / "mmlu/test/anatomy_test.csv", [["Bones of the arm?", "humerus", "femur", "tibia", "skull", 0]] * 3)
    _csv(root / "mmlu/dev/anatomy_dev.csv", [["Largest organ?", "heart", "skin", "lung", "liver", 1]] * 2)
    (root / "truthfulqa/v1").mkdir(parents=True)
    (root / "truthfulqa/v1/mc_task.json").write_text(json.dumps(TRUTHFULQA))
    return root


@pytest.fixture(scope="module")
def manager(data_dir):
    from lit_peft.inference.evaluation import task_manager

    return task_manager(data_dir)


EXPECTED = {
    # task: (prompt of the first item, its choices, index of the gold choice) - lm-eval's prompts for these tasks
    "local_arc_easy": (
        "Question: Which gas do plants take in?\nAnswer:",
        ["oxygen", "carbon dioxide", "helium"],
        1,
    ),
    "local_arc_challenge": ("Question: Which tool measures mass?\nAnswer:", ["ruler", "balance", "clock"], 1),
    "local_piqa": ("Question: Open a jar\nAnswer:", ["Twist the lid.", "Eat the lid."], 0),
    "local_boolq": (
        "Cats are small animals that many people keep.\nQuestion: is a cat an animal?\nAnswer:",
        ["no", "yes"],
        1,
    ),
    "local_mmlu_anatomy": (
        "Bones of the arm?\nA. humerus\nB. femur\nC. tibia\nD. skull\nAnswer:",
        ["A", "B", "C", "D"],
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_local_tasks_render_lm_evals_prompts(name, data_dir, manager):
    from lm_eval.tasks import get_task_dict

    task = get_task_dict([name], manager)[name]
    doc = list(task.eval_docs)[0]
    prompt, choices, gold = EXPECTED[name]
    assert task.doc_to_text(doc) == prompt
    assert task.doc_to_choice(doc) == choices
    assert task.doc_to_target(doc) == gold


def test_winogrande_and_truthfulqa_local_tasks(manager):
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(["local_winogrande", "local_truthfulqa_mc1", "local_truthfulqa_mc2"], manager)
    wino = tasks["local_winogrande"]
    doc = list(wino.eval_docs)[0]
    # Partial scoring: the gold index as "text", the options as contexts, the sentence's rest as the target.
    assert wino.doc_to_text(doc) == 0
    assert wino.doc_to_choice(doc) == ["Ann helped Bo because Ann", "Ann helped Bo because Bo"]
    assert wino.doc_to_target(doc) == "was kind."
    mc1 = list(tasks["local_truthfulqa_mc1"].eval_docs)[0]
    assert tasks["local_truthfulqa_mc1"].doc_to_choice(mc1) == ["Blue.", "Green.", "Red."]
    assert tasks["local_truthfulqa_mc1"].doc_to_text(mc1).endswith("\n\nQ: What colour is the sky?\nA:")
    mc2 = tasks["local_truthfulqa_mc2"]
    doc2 = list(mc2.eval_docs)[0]
    # MC2 = probability mass on the true answers: log-likelihoods log(.5), log(.3), log(.2) -> 0.8.
    got = mc2.process_results(doc2, [(math.log(0.5), False), (math.log(0.3), False), (math.log(0.2), False)])
    assert got["acc"] == pytest.approx(0.8)


def test_local_task_errors_name_the_problem(data_dir, tmp_path):
    from lit_peft.inference import eval_data

    with pytest.raises(ValueError, match="--data-dir"):
        eval_data.piqa(None, "piqa/valid.jsonl", "piqa/valid-labels.lst")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        eval_data.mosaic_multiple_choice(str(data_dir), "nowhere.jsonl")
    (tmp_path / "piqa").mkdir()
    _jsonl(tmp_path / "piqa/valid.jsonl", PIQA)
    (tmp_path / "piqa/labels.lst").write_text("0\n")
    with pytest.raises(ValueError, match="1 labels for 2 PIQA records"):
        eval_data.piqa(str(tmp_path), "piqa/valid.jsonl", "piqa/labels.lst")


def test_mmlu_task_files_cover_the_57_subjects():
    folder = ROOT / "lit_peft/inference/eval_tasks/mmlu"
    subjects = sorted(p.stem.removeprefix("local_mmlu_") for p in folder.glob("local_mmlu_*.yaml"))
    assert len(subjects) == 57 and "abstract_algebra" in subjects and "world_religions" in subjects
    if (root := ROOT.parent / "shared/data/mmlu/test").is_dir():
        assert subjects == sorted(p.name.removesuffix("_test.csv") for p in root.glob("*_test.csv"))


# ---------------------------------------------------------------- the LM against lm-eval's HF backend


@pytest.fixture(scope="module")
def tiny_hf(tiny_checkpoint, tmp_path_factory) -> Path:
    from lit_peft.export.hf import export_hf

    return export_hf(tiny_checkpoint, tmp_path_factory.mktemp("hf") / "tiny")


def _evaluate(lm, tasks, manager, **kw):
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, **kw)


def _loglikelihoods(results, task):
    return [float(resp[0][0]) for sample in results["samples"][task] for resp in sample["resps"]]


def _lit_lm(checkpoint, batch_size=3):
    from litgpt import Tokenizer

    from lit_peft.inference.evaluation import LitLM
    from lit_peft.models.load import load_base

    return LitLM(load_base(checkpoint), Tokenizer(checkpoint), batch_size=batch_size)


def _hf_lm(hf_dir, batch_size=2):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=batch_size, dtype="float32")


TASKS = ["local_arc_easy", "local_winogrande", "local_truthfulqa_mc2", "local_mmlu_anatomy", "local_boolq"]


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_scores_equal_lm_evals_hf_backend_on_the_exported_model(tiny_checkpoint, tiny_hf, manager, num_fewshot):
    """Different batch sizes on purpose: padding and sorting must not change a score. Long prompts (2-shot) pass
    the tiny model's 128-token window, so left truncation is compared too."""
    ours = _evaluate(_lit_lm(tiny_checkpoint), TASKS, manager, num_fewshot=num_fewshot)
    theirs = _evaluate(_hf_lm(tiny_hf), TASKS, manager, num_fewshot=num_fewshot)
    for task in TASKS:
        assert ours["results"][task] == theirs["results"][task], task
        a, b = _loglikelihoods(ours, task), _loglikelihoods(theirs, task)
        assert len(a) == len(b) > 0
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
    assert len({round(x, 3) for x in _loglikelihoods(ours, "local_arc_easy")}) > 3  # scores differ per choice


def test_rolling_and_generation_equal_lm_evals_hf_backend(tiny_checkpoint, tiny_hf):
    from lm_eval.api.instance import Instance

    texts = ["The quick brown fox jumps over the lazy dog. " * 7, "short"]  # 322 bytes: three 128-token windows
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours, theirs = _lit_lm(tiny_checkpoint), _hf_lm(tiny_hf)
    a, b = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)
    assert a[0] < a[1] < 0
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=1e-3)

    gen = [
        Instance("generate_until", {}, ("Question: what next?\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, ("abc", {"until": ["q"], "max_gen_toks": 20, "do_sample": False}), 1),
    ]
    a, b = ours.generate_until(gen), theirs.generate_until(gen)
    assert a == b and any(a)


def test_loglikelihood_is_the_sum_of_the_continuations_token_log_probs(tiny_checkpoint):
    """Against the definition on a single unpadded forward, for requests batched with longer ones."""
    import torch.nn.functional as F

    from lit_peft.models.load import load_base

    lm = _lit_lm(tiny_checkpoint, batch_size=4)
    requests = [(("", ""), [5, 6, 7], [8, 9]), (("", ""), [5, 6, 7, 10, 11, 12, 13], [14]), (("", ""), [3], [4, 4, 4])]
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    model = load_base(tiny_checkpoint).eval()
    for (_, ctx, cont), (logp, greedy) in zip(requests, got, strict=True):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids)[0, :-1].double(), dim=-1)
        targets = torch.tensor(cont)
        expected = logprobs[len(ctx) - 1 :].gather(1, targets[:, None]).sum().item()
        assert logp == pytest.approx(expected, abs=1e-5)
        assert greedy == bool((logprobs[len(ctx) - 1 :].argmax(-1) == targets).all())


# ---------------------------------------------------------------- eval/run.py


def test_eval_script_compares_base_and_adapter(tiny_checkpoint, data_dir, tmp_path):
    from lit_peft.checkpoints.adapter import save_adapter
    from lit_peft.models.load import install_method, load_base, trainable_state_dict

    model = load_base(tiny_checkpoint)
    method, settings = install_method(model, "lora", {"r": 4, "targets": ["query", "value"]})
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter that changes the scores
    adapter = tmp_path / "adapter"
    save_adapter(
        adapter,
        trainable_state_dict(model),
        {
            "method": "lora",
            "settings": settings.to_dict(),
            "base_checkpoint": str(tiny_checkpoint),
            "template": "chatml",
        },
    )
    args = ["--data-dir", str(data_dir), "--tasks", "local_arc_easy,local_piqa", "--batch-size", "4"]
    out = tmp_path / "eval"
    res = run_cli("eval/run.py", "--adapter", str(adapter), "--compare-base", *args, "--out", str(out), "--log-samples")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert set(report["models"]) == {"base", "adapter"}
    table = (out / "results.md").read_text()
    assert "| local_arc_easy | acc | 6 |" in table and "adapter - base" in table
    base, adapted = report["models"]["base"], report["models"]["adapter"]
    # Standard errors are lm-eval's own (analytic for acc: sqrt(p(1-p)/(n-1)) over the n items), shown as value ± se.
    for name, res in report["models"].items():
        acc, n = res["results"]["local_arc_easy"]["acc,none"], 6
        stderr = res["results"]["local_arc_easy"]["acc_stderr,none"]
        assert stderr == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)), abs=1e-12), name
        assert f"{acc:.4f} ± {stderr:.4f}" in table

    # The base column equals evaluating the base checkpoint on its own (adapters switched off = base).
    alone = tmp_path / "alone"
    res = run_cli("eval/run.py", "--checkpoint-dir", str(tiny_checkpoint), *args, "--out", str(alone), "--log-samples")
    assert res.returncode == 0, res.stderr[-3000:]
    plain = json.loads((alone / "results.json").read_text())["models"]["model"]
    for task in ("local_arc_easy", "local_piqa"):
        assert plain["results"][task] == base["results"][task]
        assert _loglikelihoods(plain, task) == _loglikelihoods(base, task)
        # ...and the adapter column is another model: every item scores differently.
        assert all(a != b for a, b in zip(_loglikelihoods(adapted, task), _loglikelihoods(base, task), strict=True))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "local_arc_eazy"], "unknown task 'local_arc_eazy'; local tasks: local_arc_challenge"),
        (["--tasks", "local_piqa", "--device", "gpu0"], "unknown --device 'gpu0'; valid: auto, cpu, cuda"),
        (["--tasks", "local_piqa", "--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data is not a folder"),
        (["--tasks", "local_piqa", "--adapter", "/nonexistent/adapter"], "no adapter at /nonexistent/adapter"),
    ],
)
def test_eval_script_bad_input_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, args, message):
    out = tmp_path / "eval"
    res = run_cli("eval/run.py", "--checkpoint-dir", str(tiny_checkpoint), *args, "--out", str(out))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not out.exists()


# ---------------------------------------------------------------- the real model on the real files


@pytest.mark.slow
def test_smollm2_on_shared_arc_easy_equals_lm_evals_hf_backend(smollm2_checkpoint, tmp_path):
    from lit_peft.checkpoints.hub import export_smollm2_hf
    from lit_peft.inference.evaluation import task_manager

    shared_data("llmfoundry_eval/world_knowledge/arc_easy.jsonl")
    manager = task_manager(ROOT.parent / "shared/data")
    hf_dir = export_smollm2_hf(tmp_path / "hf")
    tasks = ["local_arc_easy", "local_piqa"]
    ours = _evaluate(_lit_lm(smollm2_checkpoint, batch_size=8), tasks, manager, limit=16)
    theirs = _evaluate(_hf_lm(hf_dir, batch_size=8), tasks, manager, limit=16)
    for task in tasks:
        assert ours["results"][task] == theirs["results"][task]
        torch.testing.assert_close(
            torch.tensor(_loglikelihoods(ours, task)), torch.tensor(_loglikelihoods(theirs, task))
        )
    assert ours["results"]["local_arc_easy"]["acc,none"] > 0.4  # well above chance (about 0.26) on these 16


# ---------------------------------------------------------------- eval/run.py: prompt format and dtype


def _sft_adapter(tiny_checkpoint, folder, data_format="alpaca"):
    from lit_peft.checkpoints.adapter import save_adapter
    from lit_peft.models.load import install_method, load_base, trainable_state_dict

    model = load_base(tiny_checkpoint)
    _, settings = install_method(model, "lora", {"r": 4, "targets": ["query", "value"]})
    meta = {
        "method": "lora",
        "settings": settings.to_dict(),
        "base_checkpoint": str(tiny_checkpoint),
        "template": "chatml",
        "config": {"model": {"system_prompt": "Be brief."}, "data": {"format": data_format}, "precision": "32-true"},
    }
    return save_adapter(folder, trainable_state_dict(model), meta)


def _contexts(report, task="local_arc_easy", model="adapter"):
    return [json.dumps(s["arguments"]) for s in report["models"][model]["samples"][task]]


def test_eval_uses_an_instruction_tuned_adapters_template_and_system_prompt(tiny_checkpoint, data_dir, tmp_path):
    adapter = _sft_adapter(tiny_checkpoint, tmp_path / "adapter")
    args = ["--adapter", str(adapter), "--data-dir", str(data_dir), "--tasks", "local_arc_easy", "--limit", "2"]
    res = run_cli("eval/run.py", *args, "--log-samples", "--out", str(tmp_path / "on"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        f"prompts: chat template applied (instruction-tuned, per adapter {adapter}; --no-apply-chat-template turns "
        f"it off): template chatml, system prompt 'Be brief.' (adapter {adapter})"
    ) in res.stdout
    assert f"dtype: float32 (stored in {tiny_checkpoint / 'lit_model.pth'})" in res.stdout
    report = json.loads((tmp_path / "on" / "results.json").read_text())
    settings = report["settings"]
    assert (settings["apply_chat_template"], settings["template"], settings["system_prompt"]) == (
        True,
        "chatml",
        "Be brief.",
    )
    contexts = _contexts(report)
    assert contexts and all("<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\n" in c for c in contexts)

    res = run_cli("eval/run.py", *args, "--log-samples", "--no-apply-chat-template", "--out", str(tmp_path / "off"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "prompts: lm-eval's plain prompts, no chat template (--no-apply-chat-template)" in res.stdout
    report = json.loads((tmp_path / "off" / "results.json").read_text())
    assert report["settings"]["apply_chat_template"] is False
    assert not any("<|im_start|>" in c for c in _contexts(report))

    # A pretraining (raw text) adapter keeps lm-eval's plain prompts; flags override the recorded system prompt.
    text_adapter = _sft_adapter(tiny_checkpoint, tmp_path / "text", data_format="text")
    res = run_cli(
        "eval/run.py", *args[2:], "--adapter", str(text_adapter), "--dtype", "bfloat16", "--out", str(tmp_path / "t")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"no chat template (trained on plain text, per adapter {text_adapter}" in res.stdout
    assert "dtype: bfloat16 (--dtype bfloat16)" in res.stdout
    settings = json.loads((tmp_path / "t" / "results.json").read_text())["settings"]
    assert (settings["dtype"], settings["apply_chat_template"]) == ("bfloat16", False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "fp16"], "unknown --dtype 'fp16'; valid: auto, float32, bfloat16, float16"),
        (
            ["--template", "chatgpt"],
            "unknown template 'chatgpt'; valid templates: alpaca, chatml, gemma, llama2, llama3, mistral, phi3, "
            "zephyr, none",
        ),
        (["--template", "none", "--apply-chat-template"], "--apply-chat-template needs a template"),
    ],
)
def test_eval_bad_dtype_or_template_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, args, message):
    out = tmp_path / "eval"
    res = run_cli(
        "eval/run.py", "--checkpoint-dir", str(tiny_checkpoint), "--tasks", "local_piqa", *args, "--out", str(out)
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not out.exists()


def test_a_merged_models_record_turns_the_chat_template_on(tiny_checkpoint, tmp_path):
    from lit_peft.export.merge import merge_checkpoint
    from lit_peft.inference.evaluation import chat_template_choice
    from lit_peft.inference.load import prompt_format

    merged = merge_checkpoint(_sft_adapter(tiny_checkpoint, tmp_path / "adapter"), tmp_path / "merged")
    fmt = prompt_format(merged)
    record = f"merged record {merged / 'lit_peft_merge.json'}"
    assert (fmt.template, fmt.system_prompt, fmt.template_from, fmt.system_from) == (
        "chatml",
        "Be brief.",
        record,
        record,
    )
    assert chat_template_choice(fmt, None) == (
        True,
        f"instruction-tuned, per {record}; --no-apply-chat-template turns it off",
    )
    assert chat_template_choice(fmt, None, no_template=True) == (False, "--template none")
    plain = prompt_format(tiny_checkpoint)  # a downloaded checkpoint: nothing recorded, lm-eval's plain prompts
    assert (plain.template_from, plain.instruction_tuned) == ("guessed from the tokenizer", None)
    assert chat_template_choice(plain, None)[0] is False
