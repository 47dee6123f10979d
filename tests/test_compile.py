"""trainer.compile: per-block torch.compile equals eager, for every method, with CQIL and gradient checkpointing, and
for DPO (whose reference runs the blocks with adapters off); a compiled run's checkpoints and adapter keep their keys.

Compiled here with the aot_eager backend: dynamo's graph capture and AOTAutograd, what this code controls, run with
eager kernels (seconds on CPU; equal to eager in practice, asserted to rtol 1e-5). Inductor's generated kernels differ
from eager by float32 rounding: over these seven cases, by at most 7e-6 of a gradient's largest entry and 1e-6 on a
loss (measured by hand on CPU); compiling them takes minutes on a CPU, too long for the suite.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, TINY_RUN, tiny_config
from litgpt import GPT
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from lit_peft.methods import build_settings
from lit_peft.models import cqil
from lit_peft.models.load import enable_gradient_checkpointing
from lit_peft.tasks import get_task
from lit_peft.training.compile import compile_blocks

TARGETS = ["query", "value", "mlp"]
CASES = {  # name: (method, settings, task, task settings, CQIL groups + gradient checkpointing)
    "lora": ("lora", {"r": 4}, "sft", {}, False),
    "ether": ("ether", {"nb": 2}, "sft", {}, False),
    "etherplusHH": ("etherplusHH", {"nb": 2}, "sft", {}, False),
    "oft": ("oft", {"nb": 4}, "sft", {}, False),
    "full": ("full", {}, "sft", {}, False),
    "lora, dpo": ("lora", {"r": 4}, "dpo", {"beta": 0.5, "reference": "adapters_off"}, False),
    "lora, cqil + checkpointing": ("lora", {"r": 4}, "sft", {}, True),
}


def batch(task: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 259, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, 9:] = -100  # padding
    return {"input_ids": ids, "labels": labels, "index": torch.tensor([0, 1])}


def two_steps(model: torch.nn.Module, task_name: str, settings: dict) -> list[tuple[torch.Tensor, dict]]:
    """(loss, {name: gradient}) of two SGD steps."""
    task = get_task(task_name, **settings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    steps = []
    for _ in range(2):
        loss, _ = task(model, batch(task_name))
        loss.backward()
        steps.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        opt.step()
        opt.zero_grad()
    return steps


def build(name: str, values: dict, rewired: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config())
    if rewired:
        cqil.install(model, cqil.build_settings({"groups": [[0, 1]]}, 2))
    method, settings = build_settings(name, {**values, **({"targets": TARGETS} if name != "full" else {})})
    method.apply(model, settings)
    for p in model.parameters():  # adapters away from their identity start, so that they matter
        if p.requires_grad:
            p.data.add_(0.1 * torch.randn_like(p))
    if rewired:
        enable_gradient_checkpointing(model)
    return model  # built twice rather than deep-copied: CQIL's rewired forwards would run the original's blocks


def test_compiled_blocks_equal_eager_for_every_method_and_a_preference_task():
    breaks = {}  # case: dynamo's reasons; asserted last, after every case's numbers
    for case, (name, values, task, task_settings, rewired) in CASES.items():
        torch._dynamo.reset()  # each case compiles from scratch (the cache is shared by every Block instance)
        counters.clear()
        model, compiled = build(name, values, rewired), build(name, values, rewired)
        assert compile_blocks(compiled, "aot_eager") == 2
        assert compiled.state_dict().keys() == model.state_dict().keys()
        eager_steps, compiled_steps = two_steps(model, task, task_settings), two_steps(compiled, task, task_settings)
        assert counters["stats"]["unique_graphs"] >= 1, f"{case}: nothing was compiled"
        if counters["graph_break"]:
            breaks[case] = sorted(reason.splitlines()[0] for reason in counters["graph_break"])
        for step, ((loss, grads), (c_loss, c_grads)) in enumerate(zip(eager_steps, compiled_steps, strict=True)):
            assert c_grads.keys() == grads.keys() and grads
            for k, expected in [("loss", loss), *grads.items()]:
                got = c_loss if k == "loss" else c_grads[k]
                where = f"{case}, step {step}, {k}"
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m, w=where: f"{w}: {m}")
    torch._dynamo.reset()
    assert not breaks, f"graph breaks in a block (each one splits its graph and costs a compile): {breaks}"


def test_a_compiled_run_checkpoints_exports_and_resumes_with_the_eager_keys(tiny_checkpoint, tmp_path):
    from hydra import compose, initialize_config_dir

    from lit_peft.training.train import train

    base = [
        *TINY_RUN,
        f"model.checkpoint_dir={tiny_checkpoint}",
        "trainer.compile=aot_eager",
        "trainer.validate_first=false",
        "trainer.val_check_interval=100",
        "trainer.deterministic=true",
        "trainer.keep_last_checkpoints=2",
        "data.val_size=4",
        "data.synthetic.num_examples=16",
    ]

    def run(out, *overrides):
        with initialize_config_dir(config_dir=str(ROOT / "lit_peft" / "conf"), version_base="1.3"):
            train(compose("config", overrides=[*base, f"out_dir={out}", *overrides]))

    torch._dynamo.reset()
    counters.clear()
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(full)
    run(resumed, f"resume={full / 'checkpoints' / 'step-000002.ckpt'}")
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    torch._dynamo.reset()
    model = GPT(tiny_config())  # the names an eager model with this adapter has
    method, settings = build_settings("lora", {"targets": ["query", "value"]})  # conf/method/lora.yaml
    method.apply(model, settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for out in (full, resumed):
        state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert set(state) == {f"model.{n}" for n in trainable}
        assert set(load_file(out / "adapter" / "adapter.safetensors")) == trainable
    a, b = (load_file(out / "adapter" / "adapter.safetensors") for out in (full, resumed))
    for k in a:
        torch.testing.assert_close(b[k], a[k])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.compile=fast"], "trainer.compile=fast is not valid; expected true | false or inductor"),
        (
            ["trainer.compile=true", "task=lrc", "lrc.target_hidden_size=16", "method=full"],
            "trainer.compile=True does not apply to task=lrc",
        ),
    ],
)
def test_bad_compile_settings_are_one_line_errors(overrides, message):
    from hydra import compose, initialize_config_dir

    from lit_peft.cli.validate import validate_config

    with initialize_config_dir(config_dir=str(ROOT / "lit_peft" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-random", *overrides])
    cfg.out_dir = "/nonexistent/out"
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)
