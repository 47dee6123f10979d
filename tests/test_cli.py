"""Every bad input is one line: `error: ...` naming the value and what is valid, exit status 2, no folder left.

Most checks run in-process (the rule table, Hydra composition errors, the argparse types); a handful go through the
real entry points to show the whole path: nothing written before the check, a failed run's folder removed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN, run_cli
from hydra import compose, initialize_config_dir

from lit_peft import errors
from lit_peft.cli import args as cli_args
from lit_peft.cli import preflight as cli_preflight
from lit_peft.cli.validate import validate_config

CONF = ROOT / "lit_peft" / "conf"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    cfg.out_dir = "/nonexistent/out"  # Hydra's runtime folder is not known outside a run
    return cfg


def one_error(stderr: str, alone: bool = True) -> str:
    """The one `error:` line (with alone=False, after a run's own log lines such as Lightning's 'Seed set to')."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr[-2000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr[-2000:]
    assert len(lines) == 1 or not alone, stderr[-2000:]
    return lines[-1]


# ---------------------------------------------------------------- the rule table (in-process)


def test_the_shipped_configs_pass(tiny_checkpoint):
    validate_config(composed("model=tiny-random"))
    validate_config(composed("method=oft", "task=dpo", "data=hh_rlhf"))
    validate_config(composed("experiment=lrc_smollm2"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 is not valid; expected an integer >= 1"),
        ("trainer.micro_batch_size=2.5", "trainer.micro_batch_size=2.5 is not valid; expected an integer >= 1"),
        ("trainer.micro_batch_size=true", "trainer.micro_batch_size=true is not valid; expected an integer"),
        ("trainer.global_batch_size=-8", "trainer.global_batch_size=-8 is not valid; expected an integer >= 1"),
        ("trainer.global_batch_size=6", "trainer.global_batch_size=6 is not a multiple of micro_batch_size"),
        ("trainer.max_steps=0", "trainer.max_steps=0 is not valid; expected null or -1 or an integer >= 1"),
        ("trainer.max_epochs=abc", "trainer.max_epochs=abc is not valid"),
        ("trainer.save_every_n_steps=0", "trainer.save_every_n_steps=0 is not valid"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 is not valid; expected an integer >= 1"),
        ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5 is not valid; expected null or an"),
        ("trainer.limit_val_batches=-1", "trainer.limit_val_batches=-1 is not valid"),
        ("trainer.devices=0", "trainer.devices=0 is not valid"),
        ("trainer.accelerator=tpu9", "trainer.accelerator=tpu9 is not valid; expected auto | cpu"),
        ("trainer.progress_bar=maybe", "trainer.progress_bar=maybe is not valid; expected true | false"),
        ("optim.lr=-1", "optim.lr=-1 is not valid; expected a number > 0"),
        ("optim.lr=0", "optim.lr=0 is not valid; expected a number > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is not valid; expected a number >= 0"),
        ("optim.betas=[0.9,1.5]", "optim.betas=[0.9,1.5] is not valid; expected a pair"),
        ("+optim.foo=1", "unknown key optim.foo for torch.optim.AdamW; valid keys of optim: params, lr"),
        ("optim._target_=torch.optim.Nope", "optim._target_=torch.optim.Nope: cannot import it"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps=-1 is not valid; expected an integer >= 0"),
        ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio=2 is not valid; expected a number in [0, 1]"),
        ("data.max_seq_length=0", "data.max_seq_length=0 is not valid; expected an integer >= 2"),
        ("data.val_size=0", "data.val_size=0 is not valid; expected an integer >= 1 or a fraction in (0, 1)"),
        ("data.val_size=1.0", "data.val_size=1.0 is not valid"),
        ("data.max_examples=0", "data.max_examples=0 is not valid; expected null or an integer >= 1"),
        ("data.num_workers=-1", "data.num_workers=-1 is not valid; expected an integer >= 0"),
        ("data.format=csv", "unknown data format 'csv'; valid formats: alpaca"),
        ("seed=-1", "seed=-1 is not valid; expected an integer in [0, 4294967295]"),
        ("precision=bf32", "precision=bf32 is not valid; expected 32-true | bf16-true"),
        ("quantize=nf5", "unknown quantize mode 'nf5'; valid: nf4"),
        ("resume=3", "resume=3 is not valid; expected auto | true | false | the path of a .ckpt file"),
        ("resume=/missing/last.ckpt", "resume=/missing/last.ckpt: no such checkpoint file"),
        ("resume=true", "resume=true: no checkpoint at /nonexistent/out/checkpoints/last.ckpt"),
        ("method.r=0", "method.r=0 is not valid; expected an integer >= 1"),
        ("method.alpha=-2", "method.alpha=-2 is not valid; expected a number > 0"),
        ("method.dropout=1", "method.dropout=1 is not valid; expected a number in [0, 1)"),
        ("method.targets=[query,kv]", "unknown target 'kv'; valid targets: query"),
        ("model.template=gpt", "unknown template 'gpt'; valid templates: alpaca, chatml"),
        ("cqil.groups=[[3,5]]", "cqil group [3, 5] is not consecutive layers"),
        ("cqil.bypass=-1", "cqil.bypass=-1 is not valid; expected null or an integer >= 0"),
        ("lrc.target_hidden_size=16", "lrc.target_hidden_size=16 applies to task=lrc, not task=sft"),
        ("optim.lr=${nosuch}", "optim.lr=${nosuch}: interpolation key 'nosuch' not found"),
        ("trainer=fast", "trainer=fast is not valid; expected a mapping of settings"),
    ],
)
def test_rule_table_names_key_value_and_valid_range(override, message):
    with pytest.raises(ValueError) as err:
        validate_config(composed(override))
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=oft", "method.nb=0"], "method.nb=0 is not valid; expected an integer >= 1"),
        (["task=dpo", "data=hh_rlhf", "task.beta=-1"], "task.beta must be positive, got -1"),
        (["task=dpo", "data=hh_rlhf", "task.beta=abc"], "task.beta=abc is not valid; expected a number"),
        (["task=dpo", "data=hh_rlhf", "+task.gamma=1"], "unknown key task.gamma; valid keys of task: name, beta"),
        (["task=distill", "task.alpha=2"], "task.alpha must be in [0, 1], got 2"),
        (["task=dpo"], "task=dpo trains on preference data; data.format=alpaca is conversation data"),
        (["task=lrc", "method=full"], "task=lrc needs lrc.target_hidden_size"),
        (["method=full", "+method.r=4"], "unknown setting 'r' for this method; it has no settings"),
    ],
)
def test_method_and_task_settings_are_checked_by_their_owners_before_the_run(overrides, message):
    with pytest.raises(ValueError) as err:
        validate_config(composed(*overrides))
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU refuses")
@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.accelerator=gpu", "trainer.accelerator=gpu: this machine has no GPU; valid here: auto, cpu"),
        ("trainer.devices=[3]", "trainer.devices=[3]: on CPU, devices is a process count (an integer >= 1)"),
    ],
)
def test_devices_this_machine_lacks_are_named_before_the_run(override, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        validate_config(composed(override))


# ---------------------------------------------------------------- Hydra's composition errors (in-process)


def preflight(*argv: str) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        cli_preflight.hydra_preflight(list(argv), CONF, "config", validate_config, cli_preflight.OutputFolders())
    return exit_.value.code, stderr.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["trainer.nosuchkey=1"],
            "error: unknown key trainer.nosuchkey; valid keys of trainer: accelerator, compile, deterministic, "
            "devices,",
        ),
        (["trainer.max_step=3"], "error: unknown key trainer.max_step (did you mean trainer.max_steps?); valid keys"),
        (["nosuch=1"], "error: unknown key nosuch; valid keys at the top level: cqil, data, logger, lrc, method"),
        (["+trainer.foo=1"], "error: unknown key trainer.foo; valid keys of trainer: accelerator"),
        (["+trainer.max_steps=3"], "error: +trainer.max_steps: trainer.max_steps already exists; set it with"),
        (["~trainer.nosuch"], "error: ~trainer.nosuch: no key trainer.nosuch to delete; valid keys of trainer:"),
        (["trainer.max_steps"], "error: cannot parse override 'trainer.max_steps' (missing EQUAL at '<EOF>')"),
        (["data.path='abc"], 'error: cannot parse override "data.path=\'abc"; write key=value'),
        (["trainer.max_steps=1,2"], "error: trainer.max_steps=1,2: several values sweep only with -m (--multirun)"),
        (["hydra/job_logging=nope"], "error: unknown config 'hydra/job_logging/nope'; valid choices: default,"),
        (["hydra.job.chdir=abc"], "error: Error merging override hydra.job.chdir=abc: Value 'abc' is not a valid"),
        (["-m", "trainer.micro_batch_size=2,0"], "error: trainer.micro_batch_size=0 is not valid"),
        (["-m", "trainer.nosuch=1,2"], "error: unknown key trainer.nosuch; valid keys of trainer"),
        (["-m", "optim.lr=interval(0,1)"], "error: optim.lr=interval(0,1): the basic sweeper sweeps lists of values"),
        (["--cfg", "job", "trainer.nosuch=1"], "error: unknown key trainer.nosuch"),
    ],
)
def test_hydra_composition_errors_are_one_line(argv, message):
    code, stderr = preflight(*argv)
    assert code == 2
    assert one_error(stderr).startswith(message)


def test_preflight_pins_the_run_folder_and_remembers_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the dated default folder is claimed (created) here
    outputs = cli_preflight.OutputFolders()
    argv = cli_preflight.hydra_preflight(["model=tiny-random"], CONF, "config", validate_config, outputs)
    assert argv[-1] == "hydra.output_subdir=null"  # the run writes .hydra/ once its settings are accepted
    pinned = argv[-2]
    assert pinned.startswith("hydra.run.dir=outputs/") and pinned.endswith("_lora")
    assert outputs.created(pinned.partition("=")[2]) and Path(pinned.partition("=")[2]).is_dir()
    again = cli_preflight.hydra_preflight(
        ["model=tiny-random"], CONF, "config", validate_config, cli_preflight.OutputFolders()
    )[-2]
    assert again != pinned  # a second run in the same second gets its own folder (`-2`), or a later second's
    sweep = cli_preflight.hydra_preflight(
        ["-m", "method=lora,oft"], CONF, "config", validate_config, cli_preflight.OutputFolders()
    )
    assert sweep[-2].startswith("hydra.sweep.dir=multirun/")
    assert cli_preflight.hydra_preflight(["--help"], CONF, "config", validate_config) == ["--help"]  # Hydra answers it


# ---------------------------------------------------------------- only what this run created is removed


def test_failed_run_removes_only_the_folders_it_created(tmp_path):
    mine = tmp_path / "theirs"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "last.ckpt").write_bytes(b"keep")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "0_old").mkdir()
    outputs = cli_preflight.OutputFolders()
    for path in (mine, tmp_path / "new" / "deep" / "run", tmp_path / "sweep"):
        outputs.remember(path)
    assert not outputs.created(mine) and not outputs.created(tmp_path / "sweep" / "0_old")
    assert outputs.created(tmp_path / "new" / "deep" / "run") and outputs.created(tmp_path / "sweep" / "1_new")
    assert not outputs.created(tmp_path.parent / "elsewhere")  # never seen: assumed to be the user's
    for path in (mine, tmp_path / "new" / "deep" / "run", tmp_path / "sweep" / "0_old", tmp_path / "sweep" / "1_new"):
        path.mkdir(parents=True, exist_ok=True)
        (path / ".hydra").mkdir(exist_ok=True)
    outputs.remove_created(mine, tmp_path / "new" / "deep" / "run", tmp_path / "sweep" / "0_old")
    outputs.remove_created(tmp_path / "sweep" / "1_new", None)
    assert (mine / "checkpoints" / "last.ckpt").read_bytes() == b"keep"
    assert not (tmp_path / "new").exists()  # the run folder and the parents it made
    assert (tmp_path / "sweep" / "0_old").is_dir() and not (tmp_path / "sweep" / "1_new").exists()


# ---------------------------------------------------------------- argparse: shared types, one line


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (cli_args.positive_int, "0", "0 is out of range; valid: an integer >= 1"),
        (cli_args.positive_int, "1.5", "'1.5' is not an integer"),
        (cli_args.non_negative_int, "-1", "-1 is out of range; valid: an integer >= 0"),
        (cli_args.non_negative_float, "-0.5", "-0.5 is out of range; valid: a number >= 0"),
        (cli_args.non_negative_float, "inf", "'inf' is not a finite number"),
        (cli_args.unit_interval, "0", "0 is out of range; valid: a number in (0, 1]"),
        (cli_args.seed_int, "-3", "-3 is out of range; valid: an integer in [0, 2^32)"),
        (cli_args.repo_id, "justaname", "'justaname' is not a hub repository id; expected org/name"),
        (cli_args.choice_of(["a", "b"], "mode"), "c", "unknown mode 'c'; valid: a, b"),
    ],
)
def test_argparse_types_name_the_value_and_the_valid_range(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match="^" + re.escape(message)):
        parse(text)


def _module(path: str):
    """The module a checkout script runs (scripts/merge.py -> lit_peft.cli.merge)."""
    text = (ROOT / path).read_text()
    return importlib.import_module(re.search(r'run_module\("([\w.]+)"', text).group(1))


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("chat/base.py", ["--temperature", "-1"], "error: argument --temperature: -1 is out of range; valid: a number"),
        ("chat/base.py", ["--top-k", "0"], "error: argument --top-k: 0 is out of range; valid: an integer >= 1"),
        ("chat/base.py", ["--top-p", "1.5"], "error: argument --top-p: 1.5 is out of range; valid: a number in (0"),
        ("chat/base.py", ["--max-new-tokens", "0"], "error: argument --max-new-tokens: 0 is out of range"),
        ("chat/base.py", ["--nosuch"], "error: unrecognized arguments: --nosuch (see "),
        ("eval/run.py", ["--limit", "0"], "error: argument --limit: 0 is not valid; expected a whole count >= 1"),
        ("eval/run.py", ["--limit", "2.5"], "error: argument --limit: 2.5 is not valid"),
        ("eval/run.py", ["--batch-size", "0"], "error: argument --batch-size: 0 is out of range"),
        ("eval/run.py", ["--num-fewshot", "-1"], "error: argument --num-fewshot: -1 is out of range"),
        ("eval/run.py", ["--tasks", " , "], "error: --tasks ' , ' names no task"),
        ("eval/run.py", ["--cqil-bypass", "1"], "error: --cqil-bypass needs --cqil"),
        ("eval/run.py", ["--precision", "fp8"], "error: argument --precision: invalid choice: 'fp8'"),
    ],
)
def test_script_arguments_are_one_line_errors(script, argv, message):
    assert_one_line_exit(_module(script).parse_args, argv, message)


def assert_one_line_exit(entry, argv: list[str], message: str) -> None:
    """`entry(argv)` exits with status 2 after one `error: ...` line that starts with `message`."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        entry(argv)
    assert exit_.value.code == 2
    assert one_error(stderr.getvalue()).startswith(message)


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("scripts/convert_lrc.py", ["--truncate", "0", "--out", "x"], "error: argument --truncate: 0 is out of range"),
        ("scripts/convert_lrc.py", ["--out", "x"], "error: one of the arguments --clone --truncate is required"),
        ("scripts/download.py", ["--repo-id", "a/b/c"], "error: argument --repo-id: 'a/b/c' is not a hub repository"),
        ("scripts/merge.py", ["--adapter", "a"], "error: the following arguments are required: --out"),
        ("scripts/convert_lit_checkpoint.py", [], "error: the following arguments are required: --checkpoint-dir"),
        ("scripts/convert_hf_checkpoint.py", ["--hf-dir"], "error: argument --hf-dir: expected one argument"),
    ],
)
def test_every_script_parser_answers_in_one_line(script, argv, message):
    assert_one_line_exit(_module(script).main, argv, message)


# ---------------------------------------------------------------- corrupt weight files, named


def test_deserializer_errors_name_the_corrupt_file(tmp_path):
    good = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(64)}, good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(Exception) as err:
        torch.load(bad, weights_only=True)
    assert errors.user_error_message(err.value).startswith(f"{bad} is corrupt or truncated (")

    from safetensors.torch import load_file

    junk = tmp_path / "adapter.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(Exception) as err:
        load_file(str(junk))
    assert errors.user_error_message(err.value).startswith(f"{junk} is corrupt or truncated (SafetensorError")
    assert errors.user_error_message(KeyError("a bug")) is None  # a bug keeps its traceback


# ---------------------------------------------------------------- through the real entry points


def test_finetune_bad_values_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    res = run_cli("finetune/run.py", "model=tiny-random", "trainer.micro_batch_size=0", f"out_dir={out}")
    message = "error: trainer.micro_batch_size=0 is not valid; expected an integer >= 1"
    assert res.returncode == 2 and one_error(res.stderr).startswith(message)
    assert not out.exists()
    sweep = tmp_path / "sweep"
    res = run_cli("finetune/run.py", "-m", "optim.lr=1e-3,-1", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 2 and one_error(res.stderr).startswith("error: optim.lr=-1 is not valid")
    assert not sweep.exists() and list(tmp_path.iterdir()) == []


def test_a_run_failing_after_its_folder_was_made_removes_it(tiny_checkpoint, tmp_path):
    """The data file is read after Hydra made the run folder: the folder, and the parents this run made, go."""
    data = tmp_path / "no.json"
    args = [*TINY_RUN, f"model.checkpoint_dir={tiny_checkpoint}", "data=alpaca", f"data.path={data}"]
    res = run_cli("finetune/run.py", *args, f"out_dir={tmp_path / 'new' / 'run'}")
    assert res.returncode == 2 and one_error(res.stderr, alone=False) == f"error: data file not found: {data}"
    assert list(tmp_path.iterdir()) == []  # (a folder that existed is kept: test_failed_run_removes_only_...)


def test_chat_and_convert_answer_bad_values_in_one_line(tmp_path):
    res = run_cli("chat/base.py", "--temperature", "-1", stdin="hi\n")
    assert res.returncode == 2 and res.stdout == ""
    assert one_error(res.stderr).startswith("error: argument --temperature: -1 is out of range; valid: a number >= 0")
    res = run_cli(
        "scripts/convert_hf_checkpoint.py", "--hf-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "x")
    )
    message = f"error: --hf-dir {tmp_path / 'missing'} is not a folder"
    assert res.returncode == 2 and one_error(res.stderr).startswith(message)
    assert not (tmp_path / "x").exists()
