"""Atomic publishing (exchange, crash recovery, stale staging), --out containment, damaged weight files named as such,
and checkpoint tools pointed at an adapter folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

from lit_peft.checkpoints import files as io
from lit_peft.checkpoints.adapter import ADAPTER_META, ADAPTER_WEIGHTS, load_adapter, read_adapter_meta, save_adapter
from lit_peft.checkpoints.files import MODEL_RECORD, atomic_path, check_new_output, clean_stale, recover
from lit_peft.env import host_for_file_names
from lit_peft.methods import METHODS
from lit_peft.models.load import check_checkpoint_dir, install_method, load_base, trainable_state_dict


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def lora_adapter(tiny_checkpoint: Path, folder: Path) -> Path:
    model = load_base(tiny_checkpoint)
    _, settings = install_method(model, "lora", {"r": 2, "targets": ["query", "value"]})
    meta = {"method": "lora", "settings": settings.to_dict(), "base_checkpoint": str(tiny_checkpoint)}
    return save_adapter(folder, trainable_state_dict(model), meta)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- publishing


def test_renameat2_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new").write_text("n")
    (b / "old").write_text("o")
    if not io.rename2(a, b, io._RENAME_EXCHANGE):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported on this system")
    assert [p.name for p in b.iterdir()] == ["new"] and [p.name for p in a.iterdir()] == ["old"]


def test_replacing_a_folder_swaps_it_whole_and_leaves_nothing_hidden(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("first")
    calls = []
    real = io.rename2
    monkeypatch.setattr(io, "rename2", lambda s, d, f: calls.append(f) or real(s, d, f))
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("second")
        assert (target / "a.txt").read_text() == "first"  # the old folder stays until the new one is whole
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert hidden(tmp_path) == []
    assert io._RENAME_EXCHANGE in calls or io._libc_renameat2() is False  # Linux: one exchange, not two renames


def test_a_failed_write_keeps_what_exists(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and hidden(tmp_path) == []


def test_a_crash_between_the_two_renames_is_recovered_by_the_next_reader(tiny_checkpoint, tmp_path, monkeypatch):
    """Where the exchange is unavailable, replacing takes two renames; a crash between them leaves only
    `.adapter.old`, which every loader (and the next writer) puts back."""
    adapter = lora_adapter(tiny_checkpoint, tmp_path / "adapter")
    before, _ = load_adapter(adapter)
    monkeypatch.setattr(io, "rename2", lambda s, d, f: False)  # no renameat2: the fallback path
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(adapter, {k: v + 1 for k, v in before.items()}, {"method": "lora", "settings": {}})
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert not adapter.exists() and (tmp_path / ".adapter.old").is_dir()
    weights, meta = load_adapter(adapter)  # the reader restores it
    assert adapter.is_dir() and not (tmp_path / ".adapter.old").exists()
    assert all(torch.equal(weights[k], before[k]) for k in before) and meta["method"] == "lora"


def test_recover_removes_a_leftover_old_beside_a_published_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / ".model.old").mkdir()
    recover(tmp_path / "model")
    assert hidden(tmp_path) == []


def test_only_staging_folders_of_dead_processes_on_this_host_are_cleaned(tmp_path):
    target, host, dead = tmp_path / "adapter", host_for_file_names(), dead_pid()
    stale = tmp_path / f".adapter.{host}.{dead}.abc123.tmp"
    live = tmp_path / f".adapter.{host}.{os.getpid()}.def456.tmp"
    remote = tmp_path / f".adapter.otherhost.{dead}.ghi789.tmp"
    legacy_new, legacy_old = tmp_path / ".adapter.k2j4h5g6.tmp", tmp_path / ".adapter.z9y8x7w6.tmp"
    user = tmp_path / ".adapter.notes"
    for p in (stale, live, remote, legacy_new, legacy_old, user):
        p.mkdir()
    os.utime(legacy_old, (0, 0))
    assert sorted(clean_stale(target)) == sorted([stale, legacy_old])
    assert not stale.exists() and not legacy_old.exists()
    assert live.exists() and remote.exists() and legacy_new.exists() and user.exists()


def test_a_killed_write_leaves_staging_that_the_next_write_removes(tmp_path):
    target = tmp_path / "adapter"
    code = (
        f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); from lit_peft.checkpoints.files import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'half').write_text('x'); os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert not target.exists() and len(hidden(tmp_path)) == 1
    with atomic_path(target) as tmp:
        tmp.mkdir()
    assert target.is_dir() and hidden(tmp_path) == []


def test_replace_false_never_touches_a_folder_made_meanwhile(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="already exists"), atomic_path(target, replace=False) as tmp:
        tmp.mkdir()
        target.mkdir()
        (target / "theirs.txt").write_text("someone else's")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"] and hidden(tmp_path) == []


def test_full_fine_tuning_publishes_the_model_with_its_record_in_one_rename(tiny_checkpoint, tmp_path, monkeypatch):
    from lit_peft.training.callbacks import ExportAdapter

    published = {}
    real = io.publish

    def spy(staged, path, replace=True):
        published[Path(path).name] = sorted(os.listdir(staged))
        return real(staged, path, replace)

    monkeypatch.setattr(io, "publish", spy)
    model = load_base(tiny_checkpoint)
    trainer = types.SimpleNamespace(strategy=None, is_global_zero=True, global_step=3)
    export = ExportAdapter(tmp_path, {"method": "full"}, tiny_checkpoint, full=True)
    export.export(trainer, types.SimpleNamespace(model=model))
    assert MODEL_RECORD in published["model"] and "lit_model.pth" in published["model"]
    assert json.loads((tmp_path / "model" / MODEL_RECORD).read_text())["step"] == 3
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------- --out never contains, or sits inside, an input


@pytest.fixture
def layout(tmp_path):
    base = tmp_path / "ckpts" / "base"
    base.mkdir(parents=True)
    (base / "lit_model.pth").write_bytes(b"x")
    adapter = tmp_path / "runs" / "r1" / "adapter"
    adapter.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "ckpts")
    return tmp_path, {"base checkpoint": base, "adapter": adapter}


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("ckpts/base", "is the base checkpoint"),
        ("ckpts", "contains the base checkpoint"),
        (".", "contains the base checkpoint"),
        ("ckpts/base/merged", "is inside the base checkpoint"),
        ("link/base", "is the base checkpoint"),  # a symlink to the base's parent
        ("link", "contains the base checkpoint"),
        ("runs/r1/adapter", "is the adapter"),
        ("runs/r1", "contains the adapter"),
        ("runs/r1/adapter/merged", "is inside the adapter"),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_never_contains_or_sits_inside_an_input(layout, out, message, overwrite):
    root, inputs = layout
    with pytest.raises(ValueError, match=message):
        check_new_output(root / out, inputs, overwrite, "merging")


def test_overwrite_replaces_only_a_checkpoint_folder(layout):
    root, inputs = layout
    (root / "docs").mkdir()
    (root / "docs" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        check_new_output(root / "docs", inputs, True, "merging")
    (root / "old-merge").mkdir()
    (root / "old-merge" / "lit_model.pth").write_bytes(b"x")
    check_new_output(root / "old-merge", inputs, True, "merging")
    with pytest.raises(ValueError, match="already exists; pick a new folder or pass --overwrite"):
        check_new_output(root / "old-merge", inputs, False, "merging")


@pytest.mark.parametrize("out", ["{base}/..", "{adapter}/..", "{adapter}"])
def test_merge_overwrite_never_deletes_an_input(tiny_checkpoint, tmp_path, out):
    base = tmp_path / "ckpts" / "tiny-random"
    shutil.copytree(tiny_checkpoint, base)
    adapter = lora_adapter(base, tmp_path / "run" / "adapter")
    target = out.format(base=base, adapter=adapter)
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", target, "--overwrite")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: --out {target} ")
    assert (base / "lit_model.pth").is_file() and (adapter / ADAPTER_WEIGHTS).is_file()


# ---------------------------------------------------------------- damaged files and adapter folders, named


def test_corrupt_or_truncated_weights_are_named(tiny_checkpoint, tmp_path):
    adapter = lora_adapter(tiny_checkpoint, tmp_path / "adapter")
    weights = adapter / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"^{weights} is corrupt or truncated \(SafetensorError"):
        load_adapter(adapter)
    (adapter / ADAPTER_META).write_text("{not json")
    with pytest.raises(ValueError, match=rf"^{adapter / ADAPTER_META} is corrupt or truncated"):
        read_adapter_meta(adapter)

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    pth = ckpt / "lit_model.pth"
    data = pth.read_bytes()
    for damaged in (data[: len(data) // 2], b"\0" * 64, b"not a checkpoint at all"):
        pth.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"^{pth} is corrupt or truncated \("):
            load_base(ckpt)


def test_merge_names_a_corrupt_adapter_in_one_line(tiny_checkpoint, tmp_path):
    adapter = lora_adapter(tiny_checkpoint, tmp_path / "adapter")
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith(f"error: {adapter / ADAPTER_WEIGHTS} is corrupt or truncated (")
    assert not (tmp_path / "merged").exists() and hidden(tmp_path) == []


def test_a_checkpoint_tool_pointed_at_an_adapter_says_to_merge_it_first(tiny_checkpoint, tmp_path):
    adapter = lora_adapter(tiny_checkpoint, tmp_path / "run" / "adapter")
    command = f"python scripts/merge.py --adapter {adapter} --out {adapter}-merged"
    for folder in (adapter, adapter.parent):  # the adapter itself, or the run folder holding it
        with pytest.raises(ValueError, match="merge it into its base first") as err:
            check_checkpoint_dir(folder)
        assert str(err.value).endswith(command)
    res = run_cli("scripts/convert_lit_checkpoint.py", "--checkpoint-dir", str(adapter), "--out", str(tmp_path / "hf"))
    assert res.returncode == 2
    expected = f"error: {adapter} is an adapter, not a model checkpoint: merge it into its base first: {command}"
    assert res.stderr == expected + "\n"
    assert not (tmp_path / "hf").exists()
    res = run_cli(
        "scripts/merge.py", "--adapter", str(adapter), "--base", str(adapter), "--out", str(tmp_path / "m")
    )  # --base pointed at the adapter
    assert res.returncode == 2 and res.stderr.startswith(f"error: {adapter} is an adapter, not a model checkpoint")
    from lit_peft.inference.load import load_for_inference

    with pytest.raises(ValueError, match="is an adapter, not a model checkpoint"):
        load_for_inference(adapter, None, tiny_checkpoint)  # chat/eval --checkpoint-dir <adapter>
    with pytest.raises(FileNotFoundError, match="model_config.yaml missing"):
        check_checkpoint_dir(tmp_path / "nothing")


# ---------------------------------------------------------------- adapter_config.json: checked once, for every reader


def test_adapter_config_shape_is_checked_where_it_is_read(tiny_checkpoint, tmp_path):
    adapter = lora_adapter(tiny_checkpoint, tmp_path / "adapter")
    path = adapter / ADAPTER_META
    good = json.loads(path.read_text())
    valid = ", ".join(sorted(METHODS))
    cases = [
        ([good], rf"^{path} holds a list, not a JSON object; expected .*{valid}"),
        (None, rf"^{path} holds null, not a JSON object"),
        ({k: v for k, v in good.items() if k != "method"}, rf'^{path} has no "method"; valid methods: {valid}$'),
        ({**good, "method": "LoRA"}, rf'^{path}: unknown method "LoRA"; valid methods: {valid}$'),
        ({**good, "settings": None}, rf"^{path}: 'settings' is null \(null\); expected an object"),
        ({**good, "settings": {**good["settings"], "dropout": "0.1"}}, rf'^{path}: settings.dropout="0.1" is not'),
        ({**good, "settings": {**good["settings"], "r": True}}, rf"^{path}: settings.r=true is not valid .* integer$"),
        ({**good, "settings": {**good["settings"], "targets": ["query", 1]}}, r"expected a list of strings$"),
        ({**good, "settings": {**good["settings"], "targets": ["querry"]}}, rf"^{path}: unknown target 'querry'"),
        ({**good, "template": 3}, rf"^{path}: 'template' is 3; expected a template name or null$"),
        ({"lrc": [384]}, rf"^{path}: 'lrc' is \[384\]; expected an object of LRC settings$"),
    ]
    for meta, message in cases:
        path.write_text(json.dumps(meta))
        for read in (read_adapter_meta, load_adapter):
            with pytest.raises(ValueError, match=message):
                read(adapter)
    # a Low-Rank Clone's export (task=lrc) has `lrc` settings instead of a method: read, for convert_lrc.py
    path.write_text(json.dumps({"lrc": {"target_hidden_size": 16}, "base_checkpoint": str(tiny_checkpoint)}))
    assert read_adapter_meta(adapter)["lrc"] == {"target_hidden_size": 16}
    path.write_text(json.dumps(good))
    assert read_adapter_meta(adapter)["method"] == "lora"
    (adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(
        ValueError, match=rf"^{path}: the adapter's weights file {adapter / ADAPTER_WEIGHTS} is missing"
    ):
        load_adapter(adapter)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"^no adapter at {adapter} \(expected {ADAPTER_WEIGHTS} and"):
        read_adapter_meta(adapter)


# ---------------------------------------------------------------- copies of a checkpoint: known files, never a link


@pytest.fixture
def littered_base(tiny_checkpoint, tmp_path):
    """The tiny checkpoint with a symlink to a secret outside it, a .env and stray files beside its own."""
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    (tmp_path / "secret").write_text("hunter2")
    (base / "notes.txt").symlink_to("../secret")
    (base / ".env").write_text("API_KEY=hunter2")
    (base / "stray.json").write_text("{}")
    (base / "prompt_style.yaml").write_text("class_path: litgpt.prompts.ChatML\n")
    return base


def test_a_checkpoint_copy_takes_only_the_known_files(littered_base, tmp_path):
    from lit_peft.export.hf import export_hf

    state = torch.load(littered_base / "lit_model.pth", weights_only=True)
    out = io.save_lit_checkpoint(tmp_path / "copy", state, littered_base)
    known = {p.name for p in littered_base.iterdir() if p.name in io.CHECKPOINT_FILES}
    assert "prompt_style.yaml" in known and "tokenizer.json" in known
    assert {p.name for p in out.iterdir()} == known | {"lit_model.pth"}
    assert all((out / n).read_bytes() == (littered_base / n).read_bytes() for n in known)
    hf = export_hf(littered_base, tmp_path / "hf")
    tokenizer = {n for n in io.TOKENIZER_FILES if (littered_base / n).is_file()}
    assert {p.name for p in hf.iterdir()} == tokenizer | {"model.safetensors", "config.json"}
    for folder in (out, hf):
        assert not any(p.is_symlink() or b"hunter2" in p.read_bytes() for p in folder.iterdir())


def test_a_checkpoint_file_that_is_a_link_is_never_followed(littered_base, tmp_path, monkeypatch):
    from lit_peft.export.hf import export_hf

    link = littered_base / "tokenizer.json"
    (tmp_path / "tokenizer.json").write_bytes(link.read_bytes())
    link.unlink()
    link.symlink_to(tmp_path / "tokenizer.json")
    state = torch.load(littered_base / "lit_model.pth", weights_only=True)
    message = rf"^{link} is a symbolic link \(to {tmp_path / 'tokenizer.json'}\); .* never through a link"
    with pytest.raises(ValueError, match=message):
        io.save_lit_checkpoint(tmp_path / "copy", state, littered_base)
    with pytest.raises(ValueError, match=message):
        export_hf(littered_base, tmp_path / "hf")
    assert not (tmp_path / "copy").exists() and not (tmp_path / "hf").exists() and hidden(tmp_path) == []
    # a file swapped for a link after the folder was listed: the copy opens it without following the link
    dest = tmp_path / "dest"
    dest.mkdir()
    monkeypatch.setattr(io, "checkpoint_files", lambda folder, names=(): [link])
    with pytest.raises(ValueError, match=message):
        io.copy_checkpoint_files(littered_base, dest)
    assert list(dest.iterdir()) == []
