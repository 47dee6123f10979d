"""The sweep report's table on synthetic sweeps (job folders written here, no training): settings from the resolved
configs, groups of seeds (mean ± sd, n), standard errors of the held-out loss and of differences (paired, independent,
Welch), the best row and a baseline, failed and killed jobs, the plots it writes and Optuna's best trial."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lit_peft.sweeps.jobs import ReportError, append_record
from lit_peft.sweeps.report import write_report
from lit_peft.training.run_folder import write_run_metrics

METHODS = {
    "lora": {"name": "lora", "lr": 1.0e-3, "r": 8, "alpha": 16.0, "targets": ["query", "value"]},
    "ether": {"name": "ether", "lr": 5.0e-3, "nb": 4, "targets": ["query", "value"]},
}


def config(method: str, seed: int, **top) -> dict:
    """A job's composed config as Hydra saves it: unresolved, `${hydra:...}` included."""
    return {
        "seed": seed,
        "out_dir": "${hydra:runtime.output_dir}",
        "trainer": {"max_steps": 4, "global_batch_size": 4},
        "optim": {"_target_": "torch.optim.AdamW", "lr": "${method.lr}", "weight_decay": 0.0},
        "logger": {"save_dir": "${out_dir}", "name": "tensorboard"},
        "method": dict(METHODS[method]),
        "data": {"path": "/data/alpaca.json", "val_size": 8},
        "model": {"key": "tiny", "checkpoint_dir": "/checkpoints/tiny"},
        "task": {"name": "sft"},
        **top,
    }


def make_job(
    sweep: Path,
    name: str,
    cfg: dict,
    overrides: list[str],
    val: list[tuple[int, float]] = (),
    train: list[tuple[int, float]] = (),
    val_se: float | None = None,
    **metrics,
) -> Path:
    """A job folder: .hydra/config.yaml and overrides.yaml, tensorboard events (written in the order given: `val`
    points with step 0 first, then train, then the others) and, with `metrics`, metrics.json."""
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    if val or train:
        write_events(folder, val, train, val_se)
    if metrics:
        write_run_metrics(folder, **metrics)
    return folder


def write_events(folder: Path, val, train, se: float | None = None) -> None:
    """Events as Lightning writes them: the validation before training, each step's train scalars, validations
    (with `se`: val/loss_se beside each val/loss)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tensorboard"))

    def validation(value: float, step: int, walltime: float) -> None:
        writer.add_scalar("val/loss", value, step, walltime=walltime)
        if se is not None:
            writer.add_scalar("val/loss_se", se, step, walltime=walltime)

    t = 1000.0
    first = [p for p in val if p[0] == 0][:1]
    for step, value in first:
        validation(value, step, t)
    later = [p for p in val if p not in first]
    for step, value in train:
        t += 1
        writer.add_scalar("train/loss", value, step, walltime=t)
        writer.add_scalar("train/peak_memory_bytes", 2.0**20 * (step + 1), step, walltime=t)
        for v_step, v_value in [p for p in later if p[0] == step]:  # a validation inside the loop, after the step
            validation(v_value, v_step, t + 0.5)
            later.remove((v_step, v_value))
    for step, value in later:  # after fit
        t += 1
        validation(value, step, t)
    writer.close()


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def by_job(folder: Path) -> dict[str, dict[str, str]]:
    return {row["job"]: row for row in rows(folder / "report.csv")}


def md_table(md: str, first_header: str) -> list[dict[str, str]]:
    """The markdown table whose first header is `first_header`, as dicts."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    split = lambda ln: [c.strip() for c in ln.strip().strip("|").split(" | ")]  # noqa: E731
    header = split(lines[start])
    out = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        out.append(dict(zip(header, split(ln), strict=True)))
    return out


def lora_ether_seeds(sweep: Path, losses: dict[str, list[float]], se: float | None = 0.01) -> None:
    """3 seeds x 2 methods, `-m method=lora,ether seed=1,2,3`: only method and seed are overrides."""
    num = 0
    for method, values in losses.items():
        for seed, loss in zip((1, 2, 3), values, strict=True):
            final = {"val/loss": loss, **({"val/loss_se": se} if se is not None else {})}
            make_job(
                sweep,
                str(num),
                config(method, seed),
                [f"method={method}", f"seed={seed}"],
                val=[(0, 2.0), (4, loss)],
                train=[(s, 2.0 - 0.1 * s) for s in range(4)],
                method=method,
                task="sft",
                initial={"val/loss": 2.0},
                final=final,
                steps=4,
                trainable_params=1000 if method == "lora" else 100,
                total_params=10000,
                peak_memory_bytes=2**30,
                peak_memory_kind="cpu_job_peak_rss",
            )
            num += 1


# ------------------------------------------------------------------------------------------------------------- (a)


def test_resolved_settings_that_differ_are_columns_not_only_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    for num, method in enumerate(("lora", "ether")):
        make_job(sweep, str(num), config(method, 42), [f"method={method}"], method=method, final={"val/loss": 1.0})
    md = write_report([sweep], plots=False).read_text()
    table = by_job(sweep)
    # optim.lr is `${method.lr}`, never typed on the command line: its resolved values differ, so it is a column
    assert (table["0"]["optim.lr"], table["1"]["optim.lr"]) == ("0.001", "0.005")
    assert "method.lr" not in table["0"]  # the same values as optim.lr (its source): one column
    assert (table["0"]["method.r"], table["1"]["method.r"]) == ("8", "")  # ETHER has no rank: empty, not LoRA's
    assert (table["0"]["method.nb"], table["1"]["method.nb"]) == ("", "4")
    for same_or_own in ("seed", "out_dir", "logger.save_dir", "data.path", "method.targets", "trainer.max_steps"):
        assert same_or_own not in table["0"], same_or_own
    jobs = {row["Job"]: row for row in md_table(md, "Job")}
    assert jobs["0"]["lr"] == "1e-3" and jobs["1"]["lr"] == "5e-3"
    assert jobs["0"]["nb"] == "—" and jobs["1"]["r"] == "—"  # that job's config has no such key
    assert table["0"]["group"] == "lora lr=1e-3" and table["1"]["group"] == "ether lr=5e-3"


def test_settings_from_data_and_the_seed_is_shown_but_not_grouped(tmp_path):
    sweep = tmp_path / "sweep"
    for num, (path, seed) in enumerate((("/data/a.json", 1), ("/data/b.json", 1), ("/data/a.json", 2))):
        cfg = config("lora", seed)
        cfg["data"]["path"] = path
        make_job(sweep, str(num), cfg, [f"data.path={path}", f"seed={seed}"], final={"val/loss": 1.0 + num})
    md = write_report([sweep], plots=False).read_text()
    table = by_job(sweep)
    assert [table[j]["data.path"] for j in "012"] == ["/data/a.json", "/data/b.json", "/data/a.json"]
    assert [table[j]["seed"] for j in "012"] == ["1", "1", "2"]
    assert table["0"]["group"] == table["2"]["group"] == "data.path=/data/a.json" != table["1"]["group"]
    header = md_table(md, "Job")[0].keys()
    assert "data.path" in header and "seed" in header  # a generic leaf keeps its parent: not just "path"
    groups = {row["Group"]: row for row in md_table(md, "Group")}
    assert groups["data.path=/data/a.json"]["n (seeds)"] == "2"
    assert groups["data.path=/data/b.json"]["n (seeds)"] == "1"


# ------------------------------------------------------------------------------------------------------------- (b)


def test_groups_of_seeds_mean_sd_best_and_difference(tmp_path):
    sweep = tmp_path / "sweep"
    losses = {"lora": [1.10, 1.20, 1.15], "ether": [1.30, 1.26, 1.40]}
    lora_ether_seeds(sweep, losses)
    md_path = write_report([sweep])
    md = md_path.read_text()

    groups = {row["Group"]: row for row in md_table(md, "Group")}
    assert set(groups) == {"lora lr=1e-3", "ether lr=5e-3"}
    lora, ether = np.array(losses["lora"]), np.array(losses["ether"])
    for label, values in (("lora lr=1e-3", lora), ("ether lr=5e-3", ether)):
        row = groups[label]
        assert row["n (seeds)"] == "3"
        mean, sd = values.mean(), values.std(ddof=1)
        assert row["val/loss after (mean ± sd)"].startswith(f"{mean:.4f} ± {sd:.4f}")
    assert groups["lora lr=1e-3"]["val/loss after (mean ± sd)"].endswith("★")
    assert "★" not in groups["ether lr=5e-3"]["val/loss after (mean ± sd)"]
    welch = math.sqrt(lora.var(ddof=1) / 3 + ether.var(ddof=1) / 3)
    delta = ether.mean() - lora.mean()
    assert groups["ether lr=5e-3"]["Δ val/loss vs best"] == f"{delta:+.4f} ± {welch:.4f} (Welch)"
    assert groups["lora lr=1e-3"]["Δ val/loss vs best"] == "best"
    assert "Welch: sqrt(sd_a²/n_a + sd_b²/n_b)" in md

    # every job below the groups, nothing hidden; its after ± the held-out SE of metrics.json
    jobs = {row["Job"]: row for row in md_table(md, "Job")}
    assert len(jobs) == 6 and jobs["3"]["Group"] == "ether lr=5e-3" and jobs["3"]["seed"] == "1"
    assert jobs["0"]["val/loss after"] == "1.1000 ± 0.0100 ★"
    assert jobs["4"]["Δ val/loss vs best"] == f"{1.26 - 1.10:+.4f} ± {math.hypot(0.01, 0.01):.4f} (independent)"
    assert jobs["0"]["Peak memory"] == "1.00 GiB (RSS, job)"

    group_rows = {row["group"]: row for row in rows(sweep / "report_groups.csv")}
    assert float(group_rows["ether lr=5e-3"]["val/loss after mean"]) == pytest.approx(ether.mean())
    assert float(group_rows["ether lr=5e-3"]["val/loss after sd"]) == pytest.approx(ether.std(ddof=1))
    assert float(group_rows["ether lr=5e-3"]["delta se"]) == pytest.approx(welch)
    assert group_rows["lora lr=1e-3"]["ok"] == "3" and group_rows["lora lr=1e-3"]["seeds"] == "1 2 3"
    assert [r["group"] for r in rows(sweep / "report.csv")] == ["lora lr=1e-3"] * 3 + ["ether lr=5e-3"] * 3

    # the learning rate differs (resolved from each method's default): a plot of the loss against it, linked
    for name in ("loss_curves.png", "loss_vs_params.png", "step_time.png", "metric_vs_optim.lr.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in md, name
    assert not (sweep / "metric_vs_method.r.png").exists()  # a method's own setting that does not vary

    # against a baseline group: the Δ column says so, the best stays marked
    md = write_report([sweep], baseline="ether lr=5e-3", plots=False).read_text()
    groups = {row["Group"]: row for row in md_table(md, "Group")}
    assert groups["lora lr=1e-3"]["Δ val/loss vs ether lr=5e-3"] == f"{-delta:+.4f} ± {welch:.4f} (Welch)"
    assert groups["ether lr=5e-3"]["Δ val/loss vs ether lr=5e-3"] == "baseline"
    assert groups["lora lr=1e-3"]["val/loss after (mean ± sd)"].endswith("★")
    with pytest.raises(ReportError, match=r"--baseline 'nope' is neither a job nor a group.*'lora lr=1e-3'"):
        write_report([sweep], baseline="nope", plots=False)


def test_baseline_job_without_seed_groups_and_stale_metric_plots(tmp_path):
    sweep = tmp_path / "sweep"
    for num, lr in enumerate((1e-4, 1e-3, 1e-2)):
        cfg = config("lora", 42)
        cfg["optim"]["lr"] = lr
        make_job(sweep, str(num), cfg, [f"optim.lr={lr}"], final={"val/loss": 2.0 - num * 0.1, "val/loss_se": 0.03})
    (sweep / "metric_vs_method.r.png").write_bytes(b"an earlier report's")
    md = write_report([sweep], baseline="0").read_text()
    assert "## Groups" not in md  # no seeds: one table
    jobs = {row["Job"]: row for row in md_table(md, "Job")}
    assert jobs["0"]["Δ val/loss vs 0"] == "baseline"
    assert jobs["2"]["Δ val/loss vs 0"] == f"{-0.2:+.4f} ± {math.hypot(0.03, 0.03):.4f} (independent)"
    assert jobs["2"]["val/loss after"].endswith("★") and jobs["2"]["lr"] == "1e-2"
    assert (sweep / "metric_vs_optim.lr.png").is_file() and not (sweep / "metric_vs_method.r.png").exists()


# ------------------------------------------------------------------------------------------------------------- (c)


def test_failed_and_killed_jobs_after_steps_and_memory(tmp_path):
    sweep = tmp_path / "sweep"
    # failed after 2 steps: its only validation is the one before training (step 0): no 'after'
    failed = make_job(sweep, "0", config("lora", 1), ["seed=1"], val=[(0, 2.5)], train=[(0, 2.4), (1, 2.3)])
    append_record(sweep, {"event": "end", "num": 0, "out_dir": str(failed), "status": "failed", "error": "boom"})
    # killed after 6 steps with a validation inside the loop after step 4 (logged at step index 3) and one more
    make_job(
        sweep,
        "1",
        config("lora", 2),
        ["seed=2"],
        val=[(0, 2.5), (3, 2.2)],
        train=[(s, 2.4) for s in range(6)],
        val_se=0.05,
    )
    # finished: metrics.json; its last validation in the loop and the final one are the same state (step 4)
    make_job(
        sweep,
        "2",
        config("lora", 3),
        ["seed=3"],
        val=[(0, 2.5), (1, 2.3), (3, 2.1), (4, 2.1)],
        train=[(s, 2.4) for s in range(4)],
        initial={"val/loss": 2.5},
        final={"val/loss": 2.1},
        steps=4,
        peak_memory_bytes=3 * 2**20,
        peak_memory_kind="cpu_max_rss",
    )
    md = write_report([sweep], stale_after_s=0.001).read_text()
    table = by_job(sweep)
    assert table["0"]["status"] == "failed" and table["0"]["val/loss after"] == ""
    assert float(table["0"]["val/loss before"]) == 2.5 and table["0"]["steps"] == "2"
    assert table["1"]["status"] == "killed" and float(table["1"]["val/loss after"]) == pytest.approx(2.2)
    assert table["1"]["steps"] == "6" and float(table["1"]["val/loss after se"]) == pytest.approx(
        0.05
    )  # logged beside it
    assert table["1"]["val/loss after se from"] == "events" and table["0"]["val/loss after se"] == ""
    assert table["0"]["peak_memory_kind"] == "logged" and table["2"]["peak_memory_kind"] == "cpu_max_rss"
    jobs = {row["Job"]: row for row in md_table(md, "Job")}
    assert jobs["0"]["val/loss after"] == "" and jobs["0"]["Steps"] == "2"
    assert jobs["0"]["Peak memory"] == "2 MiB (logged)" and jobs["2"]["Peak memory"] == "3 MiB (RSS, process)"
    # only finished jobs compete for best
    assert jobs["2"]["val/loss after"] == "2.1000 ★" and "★" not in jobs["1"]["val/loss after"]
    groups = {row["Group"]: row for row in md_table(md, "Group")}
    assert groups["lora"]["n (seeds)"] == "1 of 3"  # one finished job of three seeds

    from lit_peft.sweeps.jobs import collect
    from lit_peft.sweeps.table import val_points

    killed, done = (j for j in collect([sweep], sweep) if j.name in ("1", "2"))
    assert val_points(killed) == [(0, 2.5), (4, pytest.approx(2.2))]  # taken after 4 steps, logged at index 3
    assert [s for s, _ in val_points(done)] == [0, 2, 4]  # 1 -> 2, 3 -> 4 and the final 4: one point


# ------------------------------------------------------------------------------------------------------------- (d)


def test_paired_standard_error_of_a_difference(tmp_path):
    sweep = tmp_path / "sweep"
    a = np.array([2.0, 1.5, 3.0, 2.5, 1.0])
    b = np.array([1.8, 1.6, 2.5, 2.2, 1.1])
    for num, (method, losses) in enumerate((("lora", a), ("ether", b))):
        folder = make_job(
            sweep, str(num), config(method, 42), [f"method={method}"], final={"val/loss": float(losses.mean())}
        )
        heldout = {"final": {"loss": losses.tolist(), "weight": [1.0] * 5}}
        (folder / "heldout_losses.json").write_text(json.dumps(heldout))
    md = write_report([sweep], plots=False).read_text()
    table = by_job(sweep)
    d = a - b
    paired = d.std(ddof=1) / math.sqrt(len(d))  # by hand: sd of the per-example differences over sqrt(n)
    assert table["1"]["best"] == "True" and table["0"]["delta se kind"] == "paired"
    assert float(table["0"]["delta"]) == pytest.approx(d.mean())
    assert float(table["0"]["delta se"]) == pytest.approx(paired, rel=1e-12)
    assert float(table["0"]["val/loss after se"]) == pytest.approx(a.std(ddof=1) / math.sqrt(5))
    assert table["0"]["val/loss after se from"] == "heldout_losses.json"
    jobs = {row["Job"]: row for row in md_table(md, "Job")}
    assert jobs["0"]["Δ val/loss vs best"] == f"{d.mean():+.4f} ± {paired:.4f} (paired)"
    assert "paired: the SE of the mean per-example difference" in md
    assert paired < math.hypot(a.std(ddof=1), b.std(ddof=1)) / math.sqrt(5)  # pairing removes the shared part


def test_standard_error_of_a_token_weighted_loss(tmp_path):
    sweep = tmp_path / "sweep"
    x, w = np.array([2.0, 1.0, 4.0, 3.0]), np.array([10.0, 30.0, 5.0, 20.0])
    mean = (w * x).sum() / w.sum()
    folder = make_job(sweep, "0", config("lora", 1), [], final={"val/loss": float(mean)})
    (folder / "heldout_losses.json").write_text(json.dumps({"final": {"loss": x.tolist(), "weight": w.tolist()}}))
    make_job(sweep, "1", config("ether", 1), [], final={"val/loss": 9.0, "val/loss_se": 0.5})
    write_report([sweep], plots=False)
    table = by_job(sweep)
    n = len(x)  # the ratio estimator's variance: n/(n-1) * sum(w^2 (x - mean)^2) / (sum w)^2
    expected = math.sqrt(n / (n - 1) * (w**2 * (x - mean) ** 2).sum() / w.sum() ** 2)
    assert float(table["0"]["val/loss after se"]) == pytest.approx(expected, rel=1e-12)
    # the other job has no per-example losses: independent, from its metrics.json SE
    assert table["1"]["delta se kind"] == "independent" and table["1"]["val/loss after se from"] == "metrics.json"
    assert float(table["1"]["delta se"]) == pytest.approx(math.hypot(expected, 0.5))


# ------------------------------------------------------------------------------------------------------------- (e)


def test_optuna_best_trial_on_top(tmp_path):
    sweep = tmp_path / "sweep"
    for num, lr in enumerate((1e-3, 3e-3)):
        cfg = config("lora", 42)
        cfg["optim"]["lr"] = lr
        make_job(sweep, str(num), cfg, [f"optim.lr={lr}", "method.r=16"], final={"val/loss": 1.5 - num * 0.25})
    results = {"name": "optuna", "best_params": {"optim.lr": 0.003, "method.r": 16}, "best_value": 1.25}
    OmegaConf.save(OmegaConf.create(results), sweep / "optimization_results.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {"direction": "minimize"}}}), sweep / "multirun.yaml")
    md = write_report([sweep], plots=False).read_text()
    line = next(ln for ln in md.splitlines() if "Optuna best trial" in ln)
    assert "minimize" in line and "objective 1.2500" in line and "optim.lr=3e-3, method.r=16" in line
    assert "(job 1)" in line
    assert md.index("Optuna best trial") < md.index("| Job |")


def test_odd_files_leave_blank_cells(tmp_path):
    sweep = tmp_path / "sweep"
    folder = make_job(sweep, "0", config("lora", 1), [], final={"val/loss": 1.0})
    (folder / "heldout_losses.json").write_text('{"final": {"loss": [1, "x"]}}')
    bad = sweep / "1"
    (bad / ".hydra").mkdir(parents=True)
    (bad / ".hydra" / "config.yaml").write_text("seed: [unclosed\n")
    (bad / "metrics.json").write_text(json.dumps({"status": "ok", "final": [1], "steps": "many"}))
    (sweep / "optimization_results.yaml").write_text("best_value: [\n")
    md = write_report([sweep]).read_text()
    table = by_job(sweep)
    assert table["0"]["val/loss after se"] == "" and table["1"]["val/loss after"] == "" and table["1"]["steps"] == ""
    assert "optimization_results.yaml is unreadable" in md


def test_a_failed_job_whose_folder_is_gone_joins_its_seed_group(tmp_path):
    sweep = tmp_path / "sweep"
    for num, seed in enumerate((1, 2)):
        overrides = ["model=tiny", "method=lora", f"seed={seed}"]
        make_job(sweep, str(num), config("lora", seed), overrides, final={"val/loss": 1.0 + num})
    make_job(sweep, "3", config("ether", 1), ["model=tiny", "method=ether", "seed=1"], final={"val/loss": 3.0})
    gone = {"event": "end", "num": 2, "out_dir": str(sweep / "2"), "status": "failed", "error": "boom"}
    append_record(sweep, {**gone, "overrides": ["model=tiny", "method=lora", "seed=3"]})
    md = write_report([sweep], plots=False).read_text()
    table = by_job(sweep)
    assert table["2"]["status"] == "failed" and table["2"]["group"] == table["0"]["group"] == "lora lr=1e-3"
    groups = {row["Group"]: row for row in md_table(md, "Group")}
    assert groups["lora lr=1e-3"]["n (seeds)"] == "2 of 3"
    jobs = {row["Job"]: row for row in md_table(md, "Job")}
    assert jobs["2"]["seed"] == "3" and jobs["2"]["lr"] == "" and jobs["2"]["nb"] == ""  # unknown, not absent
    assert jobs["0"]["nb"] == "—" and "model" not in table["2"]  # a config group's choice is no setting


def test_cli_baseline(tmp_path):
    from conftest import run_cli

    sweep = tmp_path / "sweep"
    for num, method in enumerate(("lora", "ether")):
        make_job(sweep, str(num), config(method, 42), [f"method={method}"], final={"val/loss": 1.0 + num})
    res = run_cli("scripts/report.py", str(sweep), "--no-plots", "--baseline", "ether lr=5e-3")
    assert res.returncode == 0, res.stderr
    jobs = {row["Job"]: row for row in md_table((sweep / "report.md").read_text(), "Job")}
    assert (
        jobs["0"]["Δ val/loss vs ether lr=5e-3"] == "-1.0000" and jobs["1"]["Δ val/loss vs ether lr=5e-3"] == "baseline"
    )
    res = run_cli("scripts/report.py", str(sweep), "--baseline", "2")
    assert res.returncode == 2 and res.stderr.startswith("error: --baseline '2' is neither a job nor a group")
    assert len(res.stderr.strip().splitlines()) == 1


def test_config_resolved_outside_hydra(tmp_path):
    from lit_peft.sweeps.jobs import Job
    from lit_peft.sweeps.table import job_settings

    cfg = config("ether", 7, choice="${hydra:runtime.choices.method}", ckpt="${out_dir}/ckpt", home="${oc.env:NOPE_1}")
    folder = make_job(tmp_path, "0", cfg, [])
    settings, interpolated = job_settings(Job(name="0", folder=folder))
    assert settings["optim.lr"] == 5e-3 and interpolated["optim.lr"] == "${method.lr}"
    assert settings["out_dir"] == str(folder) and settings["ckpt"] == f"{folder}/ckpt"  # the job's folder, not ours
    assert settings["choice"] == "${hydra:runtime.choices.method}"  # Hydra state of that job: as written
    assert settings["home"] == "${oc.env:NOPE_1}" and settings["method.targets"] == ["query", "value"]
