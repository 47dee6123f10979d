"""What the report reads back, on synthetic sweep folders: moved and copied sweeps, relative and absolute job paths,
records after a cut line, how a dead job ended, and the evaluation cache keyed by what was evaluated (a fake
eval/run.py: no model runs here)."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from lit_peft.sweeps import evals
from lit_peft.sweeps.evals import EvalFailed, check_eval_tasks, evaluate_jobs, read_metrics
from lit_peft.sweeps.jobs import EvalValue, Job, ReportError, append_record, collect, read_records
from lit_peft.sweeps.report import write_report
from lit_peft.training.run_folder import write_run_metrics

HOST = socket.gethostname()
NAN_ERROR = "non-finite gradient at step 3 (loss nan); the last good checkpoint is kept"


def make_job(folder: Path, val_loss: float | None = 1.5, adapter: bytes = b"weights-1") -> Path:
    """A job folder as finetune/run.py leaves it: Hydra's config, an adapter, metrics.json when it finished."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("method:\n  name: lora\ntask:\n  name: sft\n")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter.safetensors").write_bytes(adapter)
    (folder / "adapter" / "adapter_config.json").write_text('{"method": "lora"}\n')
    if val_loss is not None:
        write_run_metrics(folder, final={"val/loss": val_loss}, steps=4, method="lora", task="sft")
    return folder


def write_records(sweep: Path, records: list[dict]) -> None:
    (sweep / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def job_records(num: int, out_dir: str, status: str = "ok", error: str = "", pid: int = 0) -> list[dict]:
    common = {"num": num, "out_dir": out_dir, "overrides": [f"method.r={num}"], "pid": pid, "host": HOST}
    return [{"event": "start", **common}, {"event": "end", "status": status, "error": error, **common}]


def by_name(jobs: list[Job]) -> dict[str, Job]:
    names = [job.name for job in jobs]
    assert len(names) == len(set(names)), names
    return {job.name: job for job in jobs}


# ------------------------------------------------------------------------------------------- where jobs are


@pytest.mark.parametrize("origin_recorded", [True, False])
def test_a_copied_or_moved_sweep_reports_each_job_once_from_its_own_folders(tmp_path, origin_recorded):
    """Old records hold the absolute paths of the sweep as written; a copy maps them into itself."""
    orig = tmp_path / "multirun" / "sweep"
    make_job(orig / "0_method=lora", 1.5)
    make_job(orig / "lr=0.1" / "1_method=oft", 2.5)  # nested: a path-valued override
    sweep = {"event": "sweep", "pid": dead_pid(), "host": HOST, "jobs": [{"num": i} for i in range(3)]}
    if origin_recorded:
        sweep["sweep_dir"] = str(orig)
    records = [
        sweep,
        *job_records(0, str(orig / "0_method=lora")),
        *job_records(1, str(orig / "lr=0.1" / "1_method=oft")),
        *job_records(2, str(orig / "2_method=bad"), "failed", "rank 0 is not valid"),  # its folder was removed
        {"event": "sweep_end", "pid": sweep["pid"], "host": HOST},
    ]
    write_records(orig, records)
    copied = tmp_path / "copy"
    shutil.copytree(orig, copied)
    write_run_metrics(orig / "0_method=lora", final={"val/loss": 9.0}, method="lora")  # the original goes on

    for original in ("in place", "moved away"):
        jobs = by_name(collect([copied], copied))
        assert list(jobs) == ["0_method=lora", "lr=0.1/1_method=oft", "2_method=bad"]
        assert jobs["0_method=lora"].folder == copied.resolve() / "0_method=lora"
        assert jobs["0_method=lora"].metrics["final"] == {"val/loss": 1.5}
        assert jobs["lr=0.1/1_method=oft"].metrics["final"] == {"val/loss": 2.5}
        assert [job.num for job in jobs.values()] == [0, 1, 2]
        assert [job.status for job in jobs.values()] == ["ok", "ok", "failed"]
        assert jobs["2_method=bad"].error == "rank 0 is not valid" and jobs["2_method=bad"].folder is None
        if original == "in place":
            orig.parent.rename(tmp_path / "moved")

    # The original, read where it is now (moved), is still one row per job.
    moved = tmp_path / "moved" / "sweep"
    jobs = by_name(collect([moved], moved))
    assert len(jobs) == 3 and jobs["0_method=lora"].metrics["final"] == {"val/loss": 9.0}


def test_relative_records_absolute_folders_and_a_job_run_again(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    make_job(sweep / "0_method=lora", 1.5)
    make_job(sweep / "1_method=oft", 2.5)
    records = [
        {"event": "sweep", "pid": dead_pid(), "host": HOST, "sweep_dir": "/somewhere/else/sweep"},
        *job_records(0, "0_method=lora"),
        *job_records(1, "1_method=oft", "failed", "out of memory"),  # a first run of the job failed ...
        *job_records(1, "1_method=oft"),  # ... the same job ran again in its folder and finished: its start resets
    ]
    write_records(sweep, records)
    monkeypatch.chdir(tmp_path)
    jobs = by_name(collect([Path("sweep")], Path("sweep")))
    assert list(jobs) == ["0_method=lora", "1_method=oft"]
    assert jobs["1_method=oft"].status == "ok" and jobs["1_method=oft"].error == ""
    for name, job in jobs.items():
        assert job.folder.is_absolute() and job.folder == sweep.resolve() / name  # not relative to where we ran
        assert job.overrides == [f"method.r={job.num}"]


def test_a_record_appended_after_a_cut_line_is_read(tmp_path):
    first = {"event": "sweep", "pid": 1, "host": HOST}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(first) + '\n{"event": "start", "num": 0, "out_d')  # a crash
    append_record(tmp_path, {"event": "end", "num": 0, "status": "ok"})
    append_record(tmp_path, {"event": "end", "num": 1, "status": "ok"})
    assert [(r["event"], r.get("num")) for r in read_records(tmp_path)] == [("sweep", None), ("end", 0), ("end", 1)]
    lines = (tmp_path / "jobs.jsonl").read_text().split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # the cut line kept apart, no blank lines between whole records
    (tmp_path / "new").mkdir()
    append_record(tmp_path / "new", {"event": "sweep"})
    assert (tmp_path / "new" / "jobs.jsonl").read_text() == '{"event": "sweep"}\n'


@pytest.mark.parametrize(
    "records",
    [
        "start, process dead",
        "end killed",
        "end failed without an error",
        "no record, nothing written lately",
    ],
)
@pytest.mark.parametrize("logged", [True, False])
def test_a_dead_job_that_logged_an_error_failed_with_it(tmp_path, records, logged):
    sweep = tmp_path / "sweep"
    folder = make_job(sweep / "0", val_loss=None)
    if logged:
        (folder / "run.log").write_text(
            f"2026-12-07 17:00:00 INFO lit_peft: step 3\n2026-12-07 ERROR lit_peft: error: {NAN_ERROR}\n"
        )
    start, end = job_records(0, "0", pid=dead_pid())
    chosen = {
        "start, process dead": [start],
        "end killed": [start, {**end, "status": "killed"}],
        "end failed without an error": [start, {**end, "status": "failed"}],
        "no record, nothing written lately": [],
    }[records]
    write_records(sweep, chosen)
    job = collect([sweep], sweep, stale_after_s=0.001)[0]
    if logged:
        assert (job.status, job.error) == ("failed", NAN_ERROR)
    else:
        assert job.status == ("failed" if records == "end failed without an error" else "killed")


# ------------------------------------------------------------------------------------------- evaluation


def canned_results(acc: float = 0.5, n: int = 4) -> dict:
    """What eval/run.py writes to results.json (the parts the report reads), for one local task and a generation
    task with two filters."""
    return {
        "settings": {"tasks": ["local_arc_easy"]},
        "models": {
            "adapter": {
                "results": {
                    "local_arc_easy": {
                        "alias": "local_arc_easy",
                        "acc,none": acc,
                        "acc_stderr,none": 0.2887,
                        "acc_norm,none": 0.75,
                        "acc_norm_stderr,none": 0.25,
                    },
                    "gsm": {
                        "alias": "gsm",
                        "exact_match,strict-match": 0.25,
                        "exact_match_stderr,strict-match": "N/A",
                        "exact_match,flexible-extract": 0.5,
                        "exact_match_stderr,flexible-extract": 0.2,
                    },
                },
                "n-samples": {
                    "local_arc_easy": {"original": 10, "effective": n},
                    "gsm": {"original": 4, "effective": n},
                },
            }
        },
    }


@pytest.fixture
def fake_eval(monkeypatch):
    """eval/run.py replaced: counts its runs; each run's acc is 0.1 * the run's number."""
    calls: list[tuple] = []

    def run(target, tasks, limit, data_dir, extra_args, scratch_parent, evaluator=None):
        calls.append((target[1], tasks, limit, data_dir, tuple(extra_args)))
        return canned_results(acc=0.1 * len(calls))

    monkeypatch.setattr(evals, "run_eval_script", run)
    monkeypatch.setattr(evals, "known_tasks", lambda data_dir: frozenset({"arc_easy", "arc_challenge", "hellaswag"}))
    return calls


def test_all_metrics_of_every_task_are_read_with_stderr_and_n():
    job = Job(name="0", folder=None)
    read_metrics(job, canned_results())
    assert job.evals == {
        "local_arc_easy": {
            "acc": EvalValue(0.5, 0.2887, 4, "lm-eval"),
            "acc_norm": EvalValue(0.75, 0.25, 4, "lm-eval"),
        },
        "gsm": {
            # lm-eval gave no standard error: the binomial one of a 0/1 metric over n items
            "exact_match,strict-match": EvalValue(0.25, (0.25 * 0.75 / 3) ** 0.5, 4, "binomial"),
            "exact_match,flexible-extract": EvalValue(0.5, 0.2, 4, "lm-eval"),
        },
    }


def test_the_eval_cache_follows_the_adapters_content_and_the_settings(tmp_path, fake_eval, monkeypatch):
    sweep = tmp_path / "sweep"
    folder = make_job(sweep / "0")
    weights = folder / "adapter" / "adapter.safetensors"

    def evaluate(tasks="local_arc_easy", limit=4, data_dir=None, extra=()):
        jobs = collect([sweep], sweep)
        assert evaluate_jobs(jobs, tasks, limit, data_dir, extra, log=lambda *_: None) == []
        return jobs[0].evals["local_arc_easy"]["acc"].value

    assert evaluate() == pytest.approx(0.1) and len(fake_eval) == 1
    cache = folder / "eval" / "local_arc_easy-4.json"
    key = json.loads(cache.read_text())["report_key"]
    content = hashlib.sha256()
    for name, data in (("adapter.safetensors", b"weights-1"), ("adapter_config.json", b'{"method": "lora"}\n')):
        content.update(name.encode() + b"\0" + data + b"\0")
    assert key["digest"] == content.hexdigest() and key["tasks"] == ["local_arc_easy"] and key["limit"] == 4
    assert key["lm_eval"] == evals.lm_eval_version() and key["data_dir"] is None and key["args"] == []

    assert evaluate() == pytest.approx(0.1) and len(fake_eval) == 1  # unchanged: cached
    os.utime(weights)  # touched, same content (e.g. copied without its times): hashed again, still cached
    assert evaluate() == pytest.approx(0.1) and len(fake_eval) == 1

    # The job trained more: new adapter bytes (same size), so the cached result is stale and replaced.
    stamp = weights.stat().st_mtime_ns
    weights.write_bytes(b"weights-2")
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))
    assert evaluate() == pytest.approx(0.2) and len(fake_eval) == 2
    assert json.loads(cache.read_text())["report_key"]["digest"] != key["digest"]
    assert evaluate() == pytest.approx(0.2) and len(fake_eval) == 2

    # Every other setting is part of the key.
    data = tmp_path / "data"
    data.mkdir()
    assert evaluate(limit=8) == pytest.approx(0.3)
    assert evaluate(extra=("--num-fewshot", "5")) == pytest.approx(0.4)
    assert evaluate(data_dir=data) == pytest.approx(0.5)
    monkeypatch.setattr(evals, "lm_eval_version", lambda: "9.9.9")
    assert evaluate(data_dir=data) == pytest.approx(0.6) and len(fake_eval) == 6
    assert evaluate(limit=8, data_dir=data) == pytest.approx(0.7)
    files = {p.name for p in (folder / "eval").iterdir()}
    assert len(files) == 3 and {"local_arc_easy-4.json", "local_arc_easy-8.json"} < files


def test_the_report_without_eval_keeps_cached_results_of_the_current_adapter(tmp_path, fake_eval):
    sweep = tmp_path / "sweep"
    make_job(sweep / "0")
    make_job(sweep / "1", adapter=b"other")
    evaluate_jobs(collect([sweep], sweep), "local_arc_easy", 4, log=lambda *_: None)
    assert len(fake_eval) == 2

    jobs = by_name(collect([sweep], sweep))  # what the callback's refresh reads: no evaluation
    assert jobs["0"].evals["local_arc_easy"]["acc_norm"] == EvalValue(0.75, 0.25, 4, "lm-eval")
    write_report([sweep], plots=False, log=lambda *_: None)
    with (sweep / "report.csv").open() as f:
        rows = {row["job"]: row for row in csv.DictReader(f)}
    assert rows["0"]["eval/local_arc_easy acc"] == "0.1" and rows["1"]["eval/local_arc_easy acc"] == "0.2"
    assert rows["0"]["eval/local_arc_easy acc_norm"] == "0.75" and rows["0"]["eval/local_arc_easy n"] == "4"
    assert (sweep / rows["0"]["folder"]).resolve() == (sweep / "0").resolve()  # absolute, or from the report

    (sweep / "1" / "adapter" / "adapter.safetensors").write_bytes(b"retrained")
    jobs = by_name(collect([sweep], sweep))
    assert jobs["0"].evals and jobs["1"].evals == {}  # a result of the old adapter is not shown as this one's
    assert len(fake_eval) == 2


def test_an_unknown_task_fails_before_any_job_is_evaluated(tmp_path, fake_eval, monkeypatch):
    sweep = tmp_path / "sweep"
    make_job(sweep / "0")
    jobs = collect([sweep], sweep)
    with pytest.raises(ReportError, match=r"^unknown eval task 'arc_esay' \(valid: arc_easy, "):
        evaluate_jobs(jobs, "local_arc_easy,arc_esay", 4, log=lambda *_: None)
    with pytest.raises(ReportError, match=r"^unknown eval task 'local_arc_eazy' \(valid: local_arc_easy, "):
        check_eval_tasks("local_arc_eazy")

    res = run_cli("scripts/report.py", str(sweep), "--eval", "local_arc_easy,arc_esay", "--limit", "2")
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown eval task 'arc_esay' (valid: arc_easy"), res.stderr
    assert fake_eval == [] and not (sweep / "report.md").exists()

    # Local names are checked against eval/tasks/ alone: lm-eval's task index is not built for them.
    monkeypatch.setattr(evals, "known_tasks", None)
    assert check_eval_tasks(" local_arc_easy, local_core,local_mmlu") == ["local_arc_easy", "local_core", "local_mmlu"]


def test_a_failed_evaluation_is_reported_and_exits_non_zero(tmp_path, fake_eval, monkeypatch):
    sweep = tmp_path / "sweep"
    make_job(sweep / "0")
    make_job(sweep / "1")

    def run(target, *args, **kwargs):
        if target[1].parent.name == "1":
            raise EvalFailed("CUDA out of memory")
        return copy.deepcopy(canned_results())

    monkeypatch.setattr(evals, "run_eval_script", run)
    res = run_cli("scripts/report.py", str(sweep), "--eval", "local_arc_easy", "--limit", "4", "--no-plots")
    assert res.returncode == 1, res.stderr
    assert res.stdout.count("evaluating ") == 2 and f"report: {sweep / 'report.md'}" in res.stdout
    assert "warning: evaluation of 1 failed: CUDA out of memory" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: the evaluation of 1 job(s) failed")
    assert "evaluation of 1 failed: CUDA out of memory" in (sweep / "report.md").read_text()
    assert not (sweep / "1" / "eval" / "local_arc_easy-4.json").exists()
    assert (sweep / "0" / "eval" / "local_arc_easy-4.json").is_file()
