"""strategy=fsdp end to end on 2 CPU processes (gloo): training, sharded and full checkpoints, resume, export.

Lightning's FSDPStrategy (FSDP1, `use_orig_params`) runs on CPU here; the runs compare against one process taking the
same global batch in two micro-batches, as the DDP tests in test_scale.py do.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
from conftest import TINY, TINY_RUN, run_cli, scalars
from safetensors.torch import load_file

from lit_peft.training.fsdp import SHARDED_METADATA, is_sharded_checkpoint

# A 3-layer tiny model with a 4-bit base and a CQIL group (blocks 1-2): the FSDP units are block 0 (4-bit Linears
# left out of its flat parameters) and the root, which holds the group's blocks.
FSDP_RUN = [
    *TINY_RUN,
    "model.config.n_layer=3",
    "data.val_size=8",
    "data.synthetic.num_examples=40",
    "data.shuffle=false",
    "trainer.max_steps=3",
    "trainer.save_every_n_steps=2",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.accelerator=cpu",
    "method=lora",
    "method.dropout=0.0",
    "method.targets=[query,value,mlp]",
    "quantize=nf4",
    "cqil.groups=[[1,2]]",
]
ON_TWO = ["strategy=fsdp", "trainer.devices=2"]


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    from lit_peft.checkpoints.hub import create_tiny_checkpoint

    return create_tiny_checkpoint(tmp_path_factory.mktemp("ckpt3") / "tiny-random", {**TINY, "n_layer": 3}, seed=0)


def finetune(checkpoint, out, *overrides: str):
    res = run_cli("finetune/run.py", *FSDP_RUN, f"model.checkpoint_dir={checkpoint}", f"out_dir={out}", *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def test_fsdp_trains_checkpoints_resumes_and_exports_as_one_process(three_layers, tmp_path):
    """32-true: the exported adapter equals one process's; the sharded step-2 checkpoint resumes (now writing full
    checkpoints) to the same step-3 adapter bit for bit; the full checkpoint has the single-process format."""
    single = finetune(three_layers, tmp_path / "single", "trainer.validate_first=false", "trainer.validate_last=false")
    out = tmp_path / "fsdp"
    sharded = finetune(three_layers, out, *ON_TWO, "strategy.state_dict_type=sharded")  # validates before and after
    assert single.keys() == sharded.keys() and single
    for k in single:
        assert sharded[k].dtype == torch.float32
        torch.testing.assert_close(sharded[k], single[k], rtol=1e-5, atol=1e-7)
    assert any(single[k].abs().max() > 0 for k in single if "lora_B" in k)  # it trained
    # The logged gradient norm and parameter counts are the whole model's (not rank 0's shards), as one process logs.
    logged = [scalars(run) for run in (tmp_path / "single", out)]
    norms = [[v for _, v in run["train/grad_norm"]] for run in logged]
    assert len(norms[0]) == 3 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    for key in ("params/trainable", "params/total"):
        assert logged[0][key] == logged[1][key] and logged[0][key][0][1] > 0

    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-000002.ckpt"]  # no staging folder left
    for name, step in (("step-000002.ckpt", 2), ("last.ckpt", 3)):
        assert is_sharded_checkpoint(ckpts / name)
        assert sum(1 for f in (ckpts / name).iterdir() if f.suffix == ".distcp") == 2  # one file per rank
        assert torch.load(ckpts / name / SHARDED_METADATA, weights_only=True)["global_step"] == step

    resumed = finetune(three_layers, out, *ON_TWO, f"resume={ckpts / 'step-000002.ckpt'}")  # state_dict_type=full
    assert resumed.keys() == sharded.keys()
    assert all(torch.equal(resumed[k], sharded[k]) for k in sharded)
    full = torch.load(ckpts / "last.ckpt", weights_only=True)  # a file now, replacing the sharded folder
    reference = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == reference["global_step"] == 3
    assert full["state_dict"].keys() == reference["state_dict"].keys()  # the adapter only
    for k, v in reference["state_dict"].items():
        torch.testing.assert_close(full["state_dict"][k], v, rtol=1e-5, atol=1e-7)
    (opt,), (ref,) = full["optimizer_states"], reference["optimizer_states"]
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref["param_groups"]]
    assert opt["state"].keys() == ref["state"].keys()  # keyed by index, as one process saves (and loads) it
    for i, state in ref["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(opt["state"][i][name], value, rtol=1e-4, atol=1e-9)


def test_fsdp_bf16_true_keeps_adapters_and_adamw_state_float32(three_layers, tmp_path):
    """bf16-true: frozen weights in bfloat16, adapters and AdamW's moments float32, computing as one process does (the
    adapters in float32): the export matches one process's to bf16 rounding of the reductions, not just to the size
    of an update."""
    short = ["precision=bf16-true", "trainer.validate_first=false", "trainer.validate_last=false"]
    single = finetune(three_layers, tmp_path / "single", *short)
    out = tmp_path / "fsdp"
    sharded = finetune(three_layers, out, *ON_TWO, *short)
    assert single.keys() == sharded.keys() and {w.dtype for w in sharded.values()} == {torch.float32}
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], rtol=1e-3, atol=2e-5)  # an update is ~1e-3
    assert any(single[k].abs().max() > 0 for k in single if "lora_B" in k)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}
    moments = [v for s in ckpt["optimizer_states"][0]["state"].values() for k, v in s.items() if k.startswith("exp_")]
    assert moments and {m.dtype for m in moments} == {torch.float32}


# ---------------------------------------------------------------- gradient clipping: a collective on every rank


def _clip_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lit_peft.training.lit_module import clip_sharded_grad_norm_

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _clip_model()
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))  # one flat parameter: 306 elements
    (wrapped(torch.ones(4, 16)) ** 2).sum().mul(10).backward()
    local = [p for p in model.parameters() if p.grad is not None]
    norm = clip_sharded_grad_norm_(wrapped, model, 0.5)
    with FSDP.summon_full_params(wrapped, with_grads=True):
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"norm": norm, "grads": grads, "local": len(local)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _clip_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
    model[0].requires_grad_(False)  # 272 frozen elements first: rank 0's shard (153) holds no trainable one
    return model


def test_sharded_clip_joins_on_a_rank_without_gradients(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_clip_rank, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    for _ in range(60):  # a rank that skipped the collective leaves the other waiting: fail instead of hanging
        if ctx.join(timeout=5):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("a rank never returned from the sharded clip (one rank skipped the collective)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["local"] == 0 and ranks[1]["local"] > 0  # the case: rank 0 holds no gradient

    reference = _clip_model()
    (reference(torch.ones(4, 16)) ** 2).sum().mul(10).backward()
    expected = torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 0.5)
    assert float(expected) > 0.5  # it clips
    for r in ranks:
        torch.testing.assert_close(r["norm"], expected, rtol=1e-5, atol=0)
        for n, p in reference.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- refused in one line


def test_a_sharded_checkpoint_resumes_only_under_fsdp(tmp_path):
    from lit_peft.training.fsdp import check_resume_strategy

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"global_step": 2}, folder / SHARDED_METADATA)
    check_resume_strategy(folder, {"_target_": "lit_peft.training.fsdp.fsdp"})
    check_resume_strategy(tmp_path / "missing.ckpt", {"name": "auto"})  # not sharded: not this check's business
    for cfg, named in (({"name": "auto"}, "auto"), ({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, "DDP")):
        with pytest.raises(
            ValueError, match=f"is sharded .* strategy .*{named}.* cannot read it; valid: strategy=fsdp"
        ):
            check_resume_strategy(folder, cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.state_dict_type=local", "strategy.state_dict_type=local; valid: full, sharded"),
        ("strategy.sharding_strategy=ZERO3", "strategy.sharding_strategy=ZERO3; valid: FULL_SHARD, SHARD_GRAD_OP"),
        ("strategy.use_orig_params=false", "strategy.use_orig_params=False; valid: true"),
    ],
)
def test_fsdp_settings_are_refused_in_one_line_before_the_run(override, message):
    from omegaconf import OmegaConf
    from test_cli import composed

    from lit_peft.cli.validate import validate_config
    from lit_peft.training.fsdp import fsdp

    cfg = composed("strategy=fsdp", override)
    settings = {k: v for k, v in OmegaConf.to_container(cfg.strategy).items() if k != "_target_"}
    for check in (lambda: validate_config(cfg), lambda: fsdp(**settings)):  # the run's check, and the builder's
        with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")) as err:
            check()
        assert "\n" not in str(err.value)
    validate_config(composed("strategy=fsdp"))  # the defaults pass
