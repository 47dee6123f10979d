"""What a job measures about itself, also when a sweep runs many jobs in one process: its own peak memory, nothing
of it alive after it ends, the held-out loss with its standard error and per-example losses, one final validation,
HParams metrics TensorBoard can rank runs by; and block counts checked against the model before any job starts."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, TINY_RUN, tiny_config
from hydra import compose, initialize_config_dir
from litgpt import GPT

from lit_peft.methods import build_settings
from lit_peft.tasks import DPO, SFT, Distill, ExampleLosses
from lit_peft.tasks.lrc import LowRankCloneTask
from lit_peft.training import memory as job_module
from lit_peft.training.lit_module import gather_examples, loss_standard_error
from lit_peft.training.memory import JobMemory

CONF = ROOT / "lit_peft" / "conf"
RUN = [*TINY_RUN, "data.val_size=8", "trainer.accelerator=cpu"]


def compose_run(tiny_checkpoint: Path, out: Path, *overrides: str):
    if not any(o.startswith("data=") for o in overrides):
        overrides = ("data.synthetic.num_examples=48", *overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config", overrides=[*RUN, f"model.checkpoint_dir={tiny_checkpoint}", f"out_dir={out}", *overrides]
        )


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged, tag -> [(step, value)] in the order written. A run's stages write separate event
    files, which TensorBoard reads in name order; the files of one second sort by a counter that is not zero-padded
    (...10 before ...9), so conftest's `scalars` can list a later stage's points first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {
        t: [(e.step, e.value) for e in sorted(acc.Scalars(t), key=lambda e: e.wall_time)] for t in acc.Tags()["scalars"]
    }


def train_in_process(tiny_checkpoint: Path, out: Path, *overrides: str) -> dict:
    from lit_peft.training.train import train

    return train(compose_run(tiny_checkpoint, out, *overrides))


# ------------------------------------------------------------------------------------------ 1. per-job peak memory


def touch(megabytes: int) -> torch.Tensor:
    """A tensor whose pages are all resident."""
    return torch.ones(megabytes * 2**20 // 4)


@pytest.mark.parametrize("kind", ["cpu_job_peak_rss", "cpu_job_sampled_rss"])
def test_a_job_peak_starts_at_its_own_beginning(kind, monkeypatch):
    if kind == "cpu_job_peak_rss" and not job_module.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs cannot reset the peak resident size here")
    if kind == "cpu_job_sampled_rss":
        monkeypatch.setattr(job_module, "reset_peak_rss", lambda: False)  # as on macOS or in a locked-down container
    first = JobMemory().start()
    big = touch(256)
    time.sleep(0.2)  # a few of the sampler's periods
    del big
    peak, measured = first.read()
    first.stop()
    assert measured == kind
    second = JobMemory().start()  # the next job, in the same process
    started = job_module.current_rss()
    small = touch(32)
    time.sleep(0.2)
    del small
    again, _ = second.read()
    second.stop()
    assert peak - again > 150 * 2**20, (peak, again)  # the first job's 256 MiB is not the second job's
    assert again >= started + 30 * 2**20, (again, started)  # its own 32 MiB is


# A model wide enough that full fine-tuning (weights, gradients and AdamW's two states: ~270 MB) clearly needs more
# memory than LoRA on it; two steps, no validation, no logger: the jobs differ in memory, not in what they run.
WIDE = {**TINY, "name": "tiny-wide", "n_embd": 512, "n_head": 8, "n_query_groups": 8, "intermediate_size": 2048}
WIDE_RUN = [
    "model=tiny-random",
    "data.max_seq_length=96",
    "data.val_size=4",
    "data.synthetic.num_examples=16",
    "trainer.max_steps=2",
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=2",
    "trainer.val_check_interval=100",
    "trainer.save_every_n_steps=100",
    "trainer.validate_first=false",
    "trainer.validate_last=false",
    "trainer.progress_bar=false",
    "logger=null",
]

# What Hydra's basic launcher does with the jobs of a sweep: train() one after another in one process.
JOBS_IN_ONE_PROCESS = """
import json, sys
from hydra import compose, initialize_config_dir
from lit_peft.training.train import train
peaks = []
for overrides in json.loads(sys.argv[2]):
    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        metrics = train(compose("config", overrides=overrides))["metrics"]
    peaks.append([metrics["peak_memory_bytes"], metrics["peak_memory_kind"]])
print("PEAKS " + json.dumps(peaks))
"""


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> Path:
    from lit_peft.checkpoints.hub import create_tiny_checkpoint

    return create_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "tiny-wide", {**WIDE, "padded_vocab_size": 8192})


@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_a_lora_job_after_a_full_job_reports_its_own_peak(wide_checkpoint, tmp_path, accelerator):
    """The review's acceptance: in one process, a LoRA job after a full fine-tuning job reports LoRA's own peak,
    within 10 % of the same LoRA job alone in a fresh process (the process's lifetime peak gave both the full job's)."""

    def job(name: str, method: str) -> list[str]:
        return [
            *WIDE_RUN,
            f"model.checkpoint_dir={wide_checkpoint}",
            f"trainer.accelerator={accelerator}",
            f"method={method}",
            f"out_dir={tmp_path / name}",
        ]

    sweeps = {"full then lora": [job("full", "full"), job("lora", "lora")], "lora alone": [job("alone", "lora")]}
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", JOBS_IN_ONE_PROCESS, str(CONF), json.dumps(jobs)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        for name, jobs in sweeps.items()
    }
    peaks = {}
    for name, proc in running.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        peaks[name] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("PEAKS "))[6:])
    (full, full_kind), (lora, lora_kind) = peaks["full then lora"]
    ((alone, alone_kind),) = peaks["lora alone"]
    expected = "cuda_max_allocated" if accelerator == "cuda" else ("cpu_job_peak_rss", "cpu_job_sampled_rss")
    assert full_kind == lora_kind == alone_kind and full_kind in expected
    assert full > 1.3 * alone, (full, alone)  # the jobs differ clearly: a lifetime peak would give LoRA full's
    assert abs(lora - alone) <= 0.1 * alone, (lora, alone)


def test_nothing_of_a_compiled_job_is_alive_after_it_returns(tiny_checkpoint, tmp_path, monkeypatch):
    """A compiled block holds itself through its compiled call, and Lightning's trainer, callbacks and module hold
    each other: after train() returns, the GPT it trained is gone without waiting for a garbage collection."""
    from torch._dynamo.utils import counters

    import lit_peft.training.train as train_module

    models = []
    load_base = train_module.load_base

    def watched(*args, **kwargs):
        model = load_base(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(train_module, "load_base", watched)
    counters.clear()
    gc.collect()
    gc.disable()  # only train() may collect: the test must not do it for it
    try:
        result = train_in_process(tiny_checkpoint, tmp_path / "compiled", "trainer.compile=eager")
        alive = models[0]() is not None
    finally:
        gc.enable()
    assert result["metrics"]["steps"] == 4 and counters["stats"]["unique_graphs"] >= 1  # the blocks ran compiled
    assert len(models) == 1 and not alive


# ----------------------------------------------------------------- 2. per-example held-out losses, standard error


def test_the_standard_error_is_the_ratio_estimators():
    rng = np.random.default_rng(0)
    w = rng.integers(1, 40, size=25).astype(float)
    sums = w * rng.uniform(0.5, 3.0, size=25)
    mean = sums.sum() / w.sum()
    expected = math.sqrt(((sums - mean * w) ** 2).sum() / (25 * 24)) / w.mean()
    got = loss_standard_error(torch.tensor(sums), torch.tensor(w))
    assert got == pytest.approx(expected, rel=1e-12)
    # One example has no spread to estimate.
    assert loss_standard_error(torch.tensor([2.0]), torch.tensor([3.0])) is None
    # Equal weights: the familiar standard error of a mean.
    losses = rng.uniform(0, 2, size=10)
    se = loss_standard_error(torch.tensor(losses), torch.ones(10, dtype=torch.float64))
    assert se == pytest.approx(losses.std(ddof=1) / math.sqrt(10), rel=1e-12)


def _gather_on_rank(rank: int, world: int, port: int, size: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    padded = list(range(size)) + list(range(world * math.ceil(size / world) - size))  # DistributedSampler's padding
    mine = torch.tensor([[float(i), 1.0] for i in padded[rank::world]])  # rank r: examples r, r + W, ...
    rows = gather_examples(mine, size)
    torch.save(rows, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ranks_per_example_losses_are_gathered_in_the_held_out_sets_order(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world, size = 3, 7
    torch.multiprocessing.spawn(_gather_on_rank, args=(world, port, size, str(tmp_path / "rows")), nprocs=world)
    for rank in range(world):
        rows = torch.load(tmp_path / f"rows.{rank}")
        assert rows[:, 0].tolist() == list(range(size))  # every rank: the whole set, in order, padding cut off
    assert gather_examples(torch.tensor([[3.0, 1.0], [4.0, 2.0]]), None).tolist() == [[3.0, 1.0], [4.0, 2.0]]


def token_batch(vocab: int = 200) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 14), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompts
    labels[1, 9:] = -100  # padding
    labels[2, :11] = -100  # a long prompt: few targets
    return {"input_ids": ids, "labels": labels}


def pair_batch(vocab: int = 200) -> dict[str, torch.Tensor]:
    batch = token_batch(vocab)
    g = torch.Generator().manual_seed(2)
    rejected = torch.randint(0, vocab, (3, 14), generator=g)
    labels = rejected.clone()
    labels[:, :4] = -100
    return {
        "input_ids": torch.cat([batch["input_ids"], rejected]),
        "labels": torch.cat([batch["labels"], labels]),
        "index": torch.arange(3),
    }


def rows_of(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Example i of a batch as a batch of its own (a pair: its chosen and rejected rows)."""
    if "index" in batch:
        n = len(batch["index"])
        keep = torch.tensor([i, n + i])
        return {"input_ids": batch["input_ids"][keep], "labels": batch["labels"][keep], "index": batch["index"][[i]]}
    return {k: v[i : i + 1] for k, v in batch.items()}


def lora_model() -> torch.nn.Module:
    """The tiny GPT with a LoRA whose B is not zero: adapters on and off differ (a teacher, a reference)."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).double().eval()
    method, settings = build_settings("lora", {"r": 4, "targets": ["query", "value", "mlp"]})
    method.apply(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def lrc_model() -> torch.nn.Module:
    from lit_peft.models.lrc import LowRankClone, LRCSettings

    torch.manual_seed(0)
    return LowRankClone(GPT(tiny_config()), LRCSettings(16)).double().eval()


TASK_CASES = {
    "sft": (SFT, {}, lora_model, token_batch),
    "distill": (Distill, {"teacher": "self", "alpha": 0.3, "temperature": 2.0}, lora_model, token_batch),
    "dpo": (DPO, {"beta": 0.2}, lora_model, pair_batch),
    "lrc": (LowRankCloneTask, {"temperature": 3.0, "kl_reduction": "token"}, lrc_model, token_batch),
    "lrc-sequence": (LowRankCloneTask, {"temperature": 3.0}, lrc_model, token_batch),
}


@pytest.mark.parametrize("chunk", [5, 1000])  # 1000: one chunk for every target position
@pytest.mark.parametrize("name", list(TASK_CASES))
def test_every_task_records_per_example_losses_without_changing_its_loss(name, chunk):
    """The contract of `examples`: the batch's loss and metrics are what they are without it; example i's loss
    (loss[i] / weight[i]) is the task's loss on example i alone; over the batch they average to the batch's loss
    (weighted by the units), except for lrc, whose loss adds means over different units."""
    cls, settings, make_model, make_batch = TASK_CASES[name]
    task = cls(**settings)
    task.head_chunk = chunk
    model = make_model()
    batch = make_batch()
    with torch.no_grad():
        loss, metrics = task(model, batch)
        examples = ExampleLosses()
        again, metrics_again = task(model, batch, examples=examples)
        alone = [task(model, rows_of(batch, i))[0].item() for i in range(len(examples.loss))]
    assert torch.equal(loss, again) and metrics.keys() == metrics_again.keys()
    assert all(torch.equal(torch.as_tensor(metrics[k]), torch.as_tensor(metrics_again[k])) for k in metrics)
    weights = examples.weight
    if name == "dpo":
        assert weights.tolist() == [1.0, 1.0, 1.0]
    else:
        assert weights.tolist() == (batch["labels"][:, 1:] != -100).sum(-1).double().tolist()
    np.testing.assert_allclose((examples.loss / weights).numpy(), alone, rtol=1e-6)  # lrc: float32 clone terms
    if not name.startswith("lrc"):
        assert (examples.loss.sum() / weights.sum()).item() == pytest.approx(loss.item(), rel=1e-9)


def held_out_batches(cfg, tiny_checkpoint: Path):
    """The held-out examples the run validated on, one at a time, rebuilt as train() builds them."""
    from litgpt import Tokenizer

    from lit_peft.data.templates import get_template
    from lit_peft.tasks import get_task
    from lit_peft.training.train import build_datamodule

    task = get_task(cfg.task.name, **{k: v for k, v in cfg.task.items() if k != "name"})
    template = get_template(cfg.model.template, cfg.model.get("system_prompt"))
    data = build_datamodule(cfg, Tokenizer(tiny_checkpoint), template, task, Path(cfg.out_dir), None)
    data.setup("fit")
    collate = data.collate_fn()
    return [collate([example]) for example in data.val]


class CountedValidations:
    """Counts FineTuneModule's validations (the held-out set evaluated once each) and the steps they ran at."""

    def __init__(self, patcher) -> None:
        from lit_peft.training.lit_module import FineTuneModule

        self.steps: list[int] = []
        start = FineTuneModule.on_validation_epoch_start

        def counted(module) -> None:
            self.steps.append(module.trainer.global_step)
            start(module)

        patcher.setattr(FineTuneModule, "on_validation_epoch_start", counted)


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint, tmp_path_factory):
    """One LoRA SFT run in this process: 4 steps, a validation before, every 2 steps (at steps 2 and 4), after."""
    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as patcher:
        validations = CountedValidations(patcher)
        result = train_in_process(tiny_checkpoint, out, "method=lora")
    return out, result, validations.steps, compose_run(tiny_checkpoint, out, "method=lora")


def per_example_cross_entropy(model: torch.nn.Module, batches) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the target tokens' cross-entropies, their number) per example, from the model's logits."""
    sums, weights = [], []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"])[0, :-1]  # (T-1, V)
            targets = batch["labels"][0, 1:]
            keep = targets != -100
            sums.append(F.cross_entropy(logits[keep].double(), targets[keep], reduction="sum").item())
            weights.append(int(keep.sum()))
    return np.array(sums), np.array(weights, dtype=float)


def numpy_se(sums: np.ndarray, weights: np.ndarray) -> float:
    m = len(weights)
    mean = sums.sum() / weights.sum()
    return math.sqrt(((sums - mean * weights) ** 2).sum() / (m * (m - 1))) / weights.mean()


def test_held_out_loss_its_standard_error_and_per_example_losses_match_the_logits(lora_run, tiny_checkpoint):
    from lit_peft.models.load import load_adapter_into, load_base

    out, result, _, cfg = lora_run
    metrics = json.loads((out / "metrics.json").read_text())
    held_out = json.loads((out / "heldout_losses.json").read_text())
    batches = held_out_batches(cfg, tiny_checkpoint)
    assert len(batches) == metrics["held_out_examples"] == 8
    before = load_base(tiny_checkpoint).eval()  # the LoRA starts as the base (B = 0)
    after = load_base(tiny_checkpoint)
    load_adapter_into(after, out / "adapter")
    for when, model in (("initial", before), ("final", after.eval())):
        sums, weights = per_example_cross_entropy(model, batches)
        assert held_out[when]["weight"] == weights.astype(int).tolist()  # in the held-out set's order
        np.testing.assert_allclose(held_out[when]["loss"], sums / weights, rtol=1e-5)
        assert metrics[when]["val/loss"] == pytest.approx(sums.sum() / weights.sum(), rel=1e-5)  # as before
        assert metrics[when]["val/loss_se"] == pytest.approx(numpy_se(sums, weights), rel=1e-4)
        assert metrics[when]["val/loss_se"] > 0
    assert held_out["initial"]["loss"] != held_out["final"]["loss"]
    logged = scalars(out)
    assert logged["val/loss_se"][-1][1] == pytest.approx(metrics["final"]["val/loss_se"], rel=1e-6)
    i, f = metrics["initial"], metrics["final"]
    line = (
        f"held-out loss: {i['val/loss']:.4f} ± {i['val/loss_se']:.4f} -> {f['val/loss']:.4f} ± {f['val/loss_se']:.4f}"
    )
    log = (out / "run.log").read_text()
    assert line in log and "peak memory: " in log and "(peak resident, this job" in log


def test_dpo_held_out_losses_are_per_pair(tiny_checkpoint, tmp_path):
    path = tmp_path / "pairs.jsonl"
    words = "abcdefghijklmnopqrstuvwx"
    path.write_text(
        "".join(json.dumps({"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"No {w}."}) + "\n" for w in words)
    )
    out = tmp_path / "dpo"
    result = train_in_process(
        tiny_checkpoint, out, "task=dpo", "data=pairs", f"data.path={path}", "data.val_size=6", "optim.lr=0.05"
    )
    held_out = json.loads((out / "heldout_losses.json").read_text())
    metrics = result["metrics"]
    assert held_out["initial"]["weight"] == held_out["final"]["weight"] == [1] * 6 == [1] * metrics["held_out_examples"]
    np.testing.assert_allclose(held_out["initial"]["loss"], math.log(2), rtol=1e-6)  # the policy is the reference
    losses = np.array(held_out["final"]["loss"])
    assert losses.std() > 0
    assert metrics["final"]["val/loss"] == pytest.approx(losses.mean(), rel=1e-5)
    assert metrics["final"]["val/loss_se"] == pytest.approx(losses.std(ddof=1) / math.sqrt(6), rel=1e-4)


# ------------------------------------------------------------------------------ 3. the final validation runs once


def test_the_final_validation_is_not_repeated_at_the_step_of_the_last_one(lora_run):
    out, result, steps, _ = lora_run
    assert steps == [0, 2, 4]  # before training, at steps 2 and 4; not again after the last step
    val = scalars(out)["val/loss"]
    assert [s for s, _ in val] == [0, 1, 3]  # Lightning logs a validation inside the loop at the step index from 0
    assert result["final"]["val/loss"] == pytest.approx(val[-1][1], rel=1e-6)  # the numbers of the step-4 one
    held_out = json.loads((out / "heldout_losses.json").read_text())
    assert len(held_out["final"]["loss"]) == 8


def test_the_final_validation_runs_when_the_last_step_had_none(tiny_checkpoint, tmp_path, monkeypatch):
    validations = CountedValidations(monkeypatch)
    result = train_in_process(tiny_checkpoint, tmp_path / "run", "trainer.val_check_interval=6")
    assert validations.steps == [0, 3, 4]
    assert [s for s, _ in scalars(tmp_path / "run")["val/loss"]] == [0, 2, 4]  # the last one outside the loop
    assert result["final"]["val/loss"] == pytest.approx(scalars(tmp_path / "run")["val/loss"][-1][1], rel=1e-6)


# ------------------------------------------------------------------------------------- 4. TensorBoard's HParams


def test_hparams_rank_runs_by_the_final_held_out_metrics(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, result, _, _ = lora_run
    acc = EventAccumulator(str(out / "tensorboard"), purge_orphaned_data=False)
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    names = {m.name.tag for m in experiment.metric_infos}
    assert {"hparams/val_loss", "hparams/val_ppl", "hparams/val_loss_se"} <= names and "hp_metric" not in names
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["method.name"].string_value == "lora" and session.hparams["method.r"].number_value == 8
    logged = scalars(out)
    assert "hp_metric" not in logged  # no constant -1 to rank by
    assert logged["hparams/val_loss"] == [(4, pytest.approx(result["final"]["val/loss"], rel=1e-6))]
    assert logged["hparams/val_loss_se"][0][1] == pytest.approx(result["final"]["val/loss_se"], rel=1e-6)


# ----------------------------------------------------------------------- 5. block counts against the model's widths


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method=oft"],
            "method.nb=32 leaves blocks of 1 feature on the input of query in transformer.h.0.attn.qkv (width 32), "
            "which cannot rotate (model tiny-random); valid method.nb for this model: 1, 2, 4, 8, 16",
        ),
        (
            ["method=oft", "method.flip_side=true", "method.nb=16"],
            "method.nb=16 leaves blocks of 1 feature on the output of value in transformer.h.0.attn.qkv (width 16), "
            "which cannot rotate (model tiny-random); valid method.nb for this model: 1, 2, 4, 8",
        ),
        (
            ["method=ether", "method.nb=3"],
            "method.nb=3 does not divide the width 32 of the input of query in transformer.h.0.attn.qkv "
            "(model tiny-random); valid method.nb for this model: 1, 2, 4, 8, 16, 32",
        ),
        (
            ["method=etherplusHH", "method.nb=32"],  # both sides: value's output is 16 wide
            "method.nb=32 does not divide the width 16 of the output of value in transformer.h.0.attn.qkv "
            "(model tiny-random); valid method.nb for this model: 1, 2, 4, 8, 16",
        ),
        (
            ["method=ether", "method.block_size=12", "method.targets=[mlp]"],  # widths 32 (in) and 64 (proj's in)
            "method.block_size=12 does not divide the width 32 of the input of transformer.h.0.mlp.fc_1 "
            "(model tiny-random); valid method.block_size for this model: 1, 2, 4, 8, 16, 32",
        ),
    ],
)
def test_block_counts_are_checked_against_the_models_widths_before_the_run(overrides, message):
    from test_cli import composed

    from lit_peft.cli.validate import validate_config

    cfg = composed("model=tiny-random", *overrides)
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny-random", "method=oft", "method.nb=4"],
        ["model=tiny-random", "method=ether", "method.nb=32"],  # input sides only: 32 wide
        ["model=tiny-random", "method=etherplusHH", "method.nb=16"],
        ["method=oft"],  # SmolLM2 (576 wide, k/v 192): nb=32 fits, its config known without the checkpoint
    ],
)
def test_block_counts_that_fit_pass(overrides):
    from test_cli import composed

    from lit_peft.cli.validate import validate_config

    validate_config(composed(*overrides))


def test_a_sweep_with_a_method_that_does_not_fit_stops_before_any_job(tmp_path):
    from test_cli import preflight

    sweep = tmp_path / "sweep"
    code, stderr = preflight(
        "-m", "hydra/launcher=submitit_local", "model=tiny-random", "method=lora,oft", f"hydra.sweep.dir={sweep}"
    )
    assert code == 2
    assert stderr.strip().splitlines() == [
        "error: method.nb=32 leaves blocks of 1 feature on the input of query in transformer.h.0.attn.qkv (width 32), "
        "which cannot rotate (model tiny-random); valid method.nb for this model: 1, 2, 4, 8, 16"
    ]
    assert not sweep.exists()
