"""The sweep report: a real `-m` sweep on the tiny model (one job failing inside the job), its report.md/report.csv
against the jobs' own tensorboard events, the plots, mixed SFT and DPO runs, evaluation columns and bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, run_cli

from lit_peft.sweeps.jobs import PLOT_DPI, PLOTS
from lit_peft.sweeps.report import write_report
from lit_peft.training.run_folder import write_run_metrics

SWEEP_RUN = [*TINY_RUN, "hydra.sweep.subdir=${hydra.job.num}"]
SFT_DATA = ["data.val_size=8", "data.synthetic.num_examples=48"]
NB_ERROR = "method.nb=7 does not divide the width 32 of the input of query"
NAN_ERROR = "non-finite gradient"


def events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The job's scalars as tensorboard reads them, under both metric-name schemes (val_loss and val/loss)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    for old, new in (("val_loss", "val/loss"), ("val_ppl", "val/ppl"), ("tokens_per_sec", "train/tokens_per_sec")):
        if old in out:
            out.setdefault(new, out[old])
    for tag in list(out):
        if tag.startswith("val_"):
            out.setdefault("val/" + tag[4:], out[tag])
    return out


def rows(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "report.csv").open() as f:
        return {row["job"]: row for row in csv.DictReader(f)}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def md_row(md: str, job: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {job} |"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def md_header(md: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith("| Job |"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.fixture(scope="module")
def sweep(tiny_checkpoint, tmp_path_factory):
    """LoRA at three learning rates: the third diverges and fails inside the job (a non-finite gradient)."""
    folder = tmp_path_factory.mktemp("sweeps") / "lora"
    res = run_cli(
        "finetune/run.py",
        "-m",
        *SWEEP_RUN,
        *SFT_DATA,
        f"model.checkpoint_dir={tiny_checkpoint}",
        "method=lora",
        "optim.lr=1e-3,2e-3,1e12",
        f"hydra.sweep.dir={folder}",
    )
    return folder, res


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    rows_ = [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"No {w}."} for w in "abcdefghijklmnop"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return path


def test_sweep_report_equals_what_the_jobs_logged(sweep):
    folder, res = sweep
    # The failing job is a failed row with its one-line error; the sweep ran every job and exits 1.
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"error: {NAN_ERROR}" in res.stderr
    table = rows(folder)
    assert list(table) == ["0", "1", "2"]

    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        row, logged = table[job], events(folder / job)
        metrics = json.loads((folder / job / "metrics.json").read_text())
        assert row["status"] == "ok" and row["error"] == "" and float(row["optim.lr"]) == lr
        assert row["method"] == "lora" and row["task"] == "sft"
        assert float(row["val/loss before"]) == pytest.approx(logged["val/loss"][0][1], rel=1e-6)
        assert logged["val/loss"][0][0] == 0
        assert float(row["val/loss after"]) == pytest.approx(logged["val/loss"][-1][1], rel=1e-6)
        assert float(row["val/ppl after"]) == pytest.approx(logged["val/ppl"][-1][1], rel=1e-6)
        assert int(row["trainable_params"]) == logged["params/trainable"][0][1]
        assert int(row["total_params"]) == logged["params/total"][0][1]
        assert float(row["trainable_share"]) == pytest.approx(
            logged["params/trainable"][0][1] / logged["params/total"][0][1]
        )
        assert int(row["steps"]) == max(step for points in logged.values() for step, _ in points) == 4
        assert float(row["tokens_per_s"]) == pytest.approx(
            statistics.median(v for _, v in logged["train/tokens_per_sec"]), rel=1e-6
        )
        if "train/step_time_s" in logged:
            assert float(row["s_per_step"]) == pytest.approx(
                statistics.median(v for _, v in logged["train/step_time_s"]), rel=1e-6
            )
        for key in ("tokens", "peak_memory_bytes", "held_out_examples"):
            assert int(row[key]) == metrics[key], key
        assert float(row["wall_time_s"]) == metrics["wall_time_s"]
        assert row["peak_memory_kind"] == metrics["peak_memory_kind"]

    failed = table["2"]
    assert failed["status"] == "failed" and failed["error"].startswith(NAN_ERROR) and float(failed["optim.lr"]) == 1e12
    # it logged its parameters and one step before the next diverged: no held-out loss after training
    assert failed["trainable_params"] == table["0"]["trainable_params"] and failed["val/loss after"] == ""
    assert failed["steps"] == "1"  # its first step was taken (the update that diverged), the second not
    # Only the swept setting differs between the jobs: no column for the overrides they share.
    assert "trainer.max_steps" not in failed and "model.checkpoint_dir" not in failed

    md = (folder / "report.md").read_text()
    header, job0 = md_header(md), md_row(md, "0")
    assert job0[header.index("Status")] == "ok" and float(job0[header.index("lr")]) == 1e-3  # short: optim.lr
    assert job0[header.index("val/loss after")].startswith(f"{float(table['0']['val/loss after']):.4f}")  # ± SE, ★
    assert job0[header.index("Trainable")] == f"{int(table['0']['trainable_params']):,}"
    job2 = md_row(md, "2")
    assert job2[header.index("Status")] == "failed [1]" and job2[header.index("Trainable")] == "1,792"
    assert f"[1] 2: {NAN_ERROR}" in md

    records = [json.loads(line) for line in (folder / "jobs.jsonl").read_text().splitlines()]
    ends = [(r["num"], r["status"]) for r in records if r["event"] == "end"]
    assert ends == [(0, "ok"), (1, "ok"), (2, "failed")]

    for name, (w, h) in PLOTS.items():
        assert png_size(folder / name) == (int(w * PLOT_DPI), int(h * PLOT_DPI)), name
        assert f"]({name})" in md


def test_mixed_sft_and_dpo_runs_give_empty_cells(sweep, tiny_checkpoint, pairs_file, tmp_path):
    sft, _ = sweep
    dpo_sweep = tmp_path / "dpo"  # a one-job sweep that succeeds: the report comes from on_multirun_end
    res = run_cli(
        "finetune/run.py",
        "-m",
        *SWEEP_RUN,
        f"model.checkpoint_dir={tiny_checkpoint}",
        "task=dpo",
        "data=pairs",
        f"data.path={pairs_file}",
        "data.val_size=4",
        f"hydra.sweep.dir={dpo_sweep}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"sweep done: 1 ok; report: {dpo_sweep / 'report.md'}" in res.stdout
    assert rows(dpo_sweep)["0"]["status"] == "ok"

    out = tmp_path / "both"
    out.mkdir()
    res = run_cli("scripts/report.py", str(sft), str(dpo_sweep), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    table = rows(out)
    dpo = next(row for row in table.values() if row["task"] == "dpo")
    sft_ok = [row for row in table.values() if row["task"] == "sft" and row["status"] == "ok"]
    assert len(table) == 4 and len(sft_ok) == 2
    logged = events(dpo_sweep / "0")
    assert float(dpo["val/reward_accuracy after"]) == pytest.approx(logged["val/reward_accuracy"][-1][1], rel=1e-6)
    assert float(dpo["val/loss after"]) == pytest.approx(logged["val/loss"][-1][1], rel=1e-6)
    for row in sft_ok:  # SFT jobs logged no DPO metrics, the DPO job no perplexity: empty cells
        assert row["val/reward_accuracy after"] == row["val/reward_margin after"] == ""
        assert row["train/reward_accuracy last"] == ""
        assert row["val/ppl after"] != ""
    assert dpo["val/ppl after"] == ""
    md = (out / "report.md").read_text()
    header, dpo_md = md_header(md), md_row(md, dpo["job"])
    assert dpo_md[header.index("val/ppl after")] == "" and dpo_md[header.index("Task")] == "dpo"
    for name, (w, h) in PLOTS.items():
        assert png_size(out / name) == (int(w * PLOT_DPI), int(h * PLOT_DPI))


def test_eval_columns_run_once_per_job_and_are_cached(sweep, tmp_path):
    folder, _ = sweep
    data = tmp_path / "evaldata"
    items = [
        {"query": "Question: Which gas do plants need?", "choices": ["oxygen", "carbon dioxide", "helium"], "gold": 1},
        {"query": "Question: What melts ice?", "choices": ["heat", "cold", "salt water", "wind"], "gold": 0},
        {"query": "Question: Which is a mammal?", "choices": ["shark", "whale"], "gold": 1},
        {"query": "Question: What do bees make?", "choices": ["milk", "silk", "honey"], "gold": 2},
    ]
    arc = data / "llmfoundry_eval/world_knowledge/arc_easy.jsonl"
    arc.parent.mkdir(parents=True)
    arc.write_text("".join(json.dumps(i) + "\n" for i in items))
    args = ["scripts/report.py", str(folder), "--eval", "local_arc_easy", "--limit", "4", "--data-dir", str(data)]

    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("evaluating ") == 2  # the two ok jobs, not the failed one
    table = rows(folder)
    caches = {job: folder / job / "eval" / "local_arc_easy-4.json" for job in ("0", "1")}
    md = (folder / "report.md").read_text()
    header = md_header(md)
    for job, cache in caches.items():
        result = json.loads(cache.read_text())["models"]["adapter"]
        acc, n = result["results"]["local_arc_easy"]["acc,none"], result["n-samples"]["local_arc_easy"]["effective"]
        assert n == 4 and float(table[job]["eval/local_arc_easy acc"]) == acc
        stderr = float(table[job]["eval/local_arc_easy acc_stderr"])
        assert md_row(md, job)[header.index("local_arc_easy acc")].startswith(f"{acc:.3f} ± {stderr:.3f}")
    assert table["2"]["eval/local_arc_easy acc"] == ""
    assert not (folder / "2" / "eval").exists()

    stamps = {job: cache.stat().st_mtime_ns for job, cache in caches.items()}
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluating " not in res.stdout  # read from the cache
    assert {job: cache.stat().st_mtime_ns for job, cache in caches.items()} == stamps
    assert rows(folder)["0"]["eval/local_arc_easy acc"] == table["0"]["eval/local_arc_easy acc"]


def test_running_and_killed_jobs_read_from_events_alone(sweep, tmp_path):
    """No metrics.json (a job still running or killed): numbers from the events, status from the process record."""
    source, _ = sweep
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copytree(source / "0", folder / "0")
    (folder / "0" / "metrics.json").unlink()
    logged = events(folder / "0")

    write_report([folder], plots=False)
    row = rows(folder)["0"]
    assert row["status"] == "running"  # written minutes ago, no process record: taken as running
    assert int(row["trainable_params"]) == logged["params/trainable"][0][1]
    assert float(row["val/loss after"]) == pytest.approx(logged["val/loss"][-1][1], rel=1e-6)
    assert row["tokens"] == row["wall_time_s"] == ""  # only metrics.json has them: not guessed
    write_report([folder], plots=False, stale_after_s=0.001)
    assert rows(folder)["0"]["status"] == "killed"

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    for pid, status in ((os.getpid(), "running"), (int(dead.stdout), "killed")):
        record = {"event": "start", "num": 0, "out_dir": str(folder / "0"), "pid": pid, "host": host}
        (folder / "jobs.jsonl").write_text(json.dumps(record) + "\n")
        write_report([folder], plots=False)
        assert rows(folder)["0"]["status"] == status

    # A planned job that never started: pending while the sweep process runs, not run once it has stopped.
    plan = {"event": "sweep", "jobs": [{"num": 0}, {"num": 1, "overrides": ["method=oft", "method.nb=8"]}]}
    start = {"event": "start", "num": 0, "out_dir": str(folder / "0"), "pid": os.getpid(), "host": host}
    for sweep_pid, status in ((os.getpid(), "pending"), (int(dead.stdout), "not run")):
        lines = [{**plan, "pid": sweep_pid, "host": host}, start]
        (folder / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        write_report([folder], plots=False)
        planned = rows(folder)["#1"]
        assert planned["status"] == status and planned["method.nb"] == "8" and planned["method"] == "oft"

    write_run_metrics(folder / "0", final={"val/loss": 1.25}, steps=4, trainable_params=7, total_params=70)
    saved = json.loads((folder / "0" / "metrics.json").read_text())
    assert saved["status"] == "ok" and saved["final"] == {"val/loss": 1.25}  # one metric-name scheme
    write_report([folder], plots=False)
    row = rows(folder)["0"]
    assert row["status"] == "ok" and row["val/loss after"] == "1.25" and row["trainable_share"] == "0.1"


def test_a_sweep_whose_only_job_fails_leaves_nothing(tiny_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    res = run_cli(
        "finetune/run.py",
        "-m",
        *SWEEP_RUN,
        *SFT_DATA,
        f"model.checkpoint_dir={tiny_checkpoint}",
        "method=oft",
        "method.nb=7",
        f"hydra.sweep.dir={sweep}",
    )
    assert res.returncode == 2 and f"error: {NB_ERROR}" in res.stderr
    assert list(tmp_path.iterdir()) == []  # as a failed single run: no records, no report, no folder


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (None, [], "error: {p}: no such folder"),
        ("file", [], "error: {p} is a file, not a sweep or run folder"),
        ("empty", [], "error: {p} is not a sweep folder (no multirun.yaml, jobs.jsonl or job folders)"),
        ("sweep", ["--limit", "5"], "error: --limit, --data-dir and --num-fewshot apply to --eval; add --eval TASKS"),
        ("sweep", ["--eval", ","], "error: --eval ',' names no task"),
        ("sweep", ["--eval", "x", "--limit", "2.5"], "error: argument --limit: 2.5 is not valid"),
    ],
)
def test_bad_input_is_one_line(tmp_path, make, extra, message):
    p = tmp_path / "in"
    if make == "file":
        p.write_text("x")
    elif make == "empty":
        (p / "notes").mkdir(parents=True)
    elif make == "sweep":
        p.mkdir()
        (p / "multirun.yaml").write_text("{}\n")
    res = run_cli("scripts/report.py", str(p), *extra)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(p=p)), res.stderr
    assert not (tmp_path / "in" / "report.md").exists()


def test_a_preempted_job_is_recorded_as_preempted_not_killed(sweep, tmp_path, monkeypatch):
    """A job stopped by SIGTERM/SIGUSR1 exits 3 after its checkpoint: the sweep record says so and how to resume."""
    from lit_peft.sweeps.callback import SweepReport
    from lit_peft.training.resume import Preemption

    source, _ = sweep
    folder = tmp_path / "preempted"
    folder.mkdir()
    shutil.copytree(source / "0", folder / "0")
    (folder / "0" / "metrics.json").unlink()
    callback = SweepReport(enabled=True)
    callback._sweep_dir = folder
    callback._current = {"event": "start", "num": 0, "out_dir": str(folder / "0"), "pid": os.getpid(), "host": "x"}
    monkeypatch.setattr(Preemption, "stopped", "SIGUSR1 at step 3")
    callback._at_exit()  # what runs when the job's SystemExit(3) ends the process
    end = [json.loads(line) for line in (folder / "jobs.jsonl").read_text().splitlines()][0]
    assert end["event"] == "end" and end["status"] == "preempted"
    assert end["error"] == "preempted by SIGUSR1 at step 3; run the same command to resume"
    assert rows(folder)["0"]["status"] == "preempted"
    assert "preempted" in (folder / "report.md").read_text()
