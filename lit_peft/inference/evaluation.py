"""lm-evaluation-harness over a loaded LitGPT model (base, adapter or merged), and the local offline tasks.

`LitLM` is an lm-eval `TemplateLM`: lm-eval's own context/continuation encoding (`_encode_pair`, the empty-context
prefix token), with our batched scoring on the LitGPT model. Tokenization follows lm-eval's HF backend so that the
same model scores the same through either (tests/test_eval.py checks it on an exported model).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lit_peft.errors import UserError
from lit_peft.paths import EVAL_TASKS_DIR

TASKS_DIR = EVAL_TASKS_DIR

Request = tuple[tuple[str, str] | None, list[int], list[int]]


class LitLM(TemplateLM):
    """Scores and generates with a LitGPT model already on its device.

    batch_size: sequences per forward in loglikelihood requests (longest first, right-padded), and requests generated
        together in generate_until (same generation settings, longest prompt first; see `_generate_batch`).
    max_length: the longest input; longer ones are cut from the left, as lm-eval's HF backend does.
    template: a lit_peft chat template, used when lm-eval is asked to apply a chat template.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        template=None,
        name: str = "lit-peft",
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.lit_tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.block_size)
        self._max_gen_toks = max_gen_toks
        self.template = template
        self.name = name
        self._device = next(model.parameters()).device
        self.model.max_seq_length = self._max_length
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")

    # ---------------------------------------------------------------- tokenization (as lm-eval's HF backend)

    @property
    def eot_token_id(self) -> int:
        return self.lit_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.lit_tokenizer.bos_id
        return bos if bos is not None else self.lit_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lit_tokenizer, "model_name", self.name))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        tok = self.lit_tokenizer
        if add_special_tokens is None:
            bos = tok.processor.id_to_token(self.prefix_token_id) if tok.backend == "huggingface" else None
            add_special_tokens = not (bos and string.startswith(bos))
        if tok.backend == "huggingface":
            # The tokenizer.json post-processor decides BOS, exactly as transformers' fast tokenizer does.
            return tok.processor.encode(string, add_special_tokens=add_special_tokens).ids
        return tok.encode(string, bos=None if add_special_tokens else False).tolist()

    def tok_decode(self, tokens: list[int]) -> str:
        return self.lit_tokenizer.decode(torch.tensor(tokens, dtype=torch.long))

    # ---------------------------------------------------------------- scoring

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs):
        def sort_key(req: Request):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        # Requests whose context + continuation[:-1] agree (one-token answers to one question) share one forward.
        order = Collator(requests, sort_fn=sort_key, group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            inputs, lengths = [], []
            for _, context, continuation in chunk:
                if not context or not continuation:
                    raise UserError("lm-eval passed an empty context or continuation")
                window = (context + continuation)[-(self.max_length + 1) :][:-1]
                inputs.append(window)
                lengths.append(len(window))
            width = max(lengths)
            batch = torch.zeros((len(inputs), width), dtype=torch.long)
            for i, window in enumerate(inputs):
                batch[i, : len(window)] = torch.tensor(window, dtype=torch.long)
            logprobs = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)
            for (key, context, continuation), row, length in zip(chunk, logprobs, lengths, strict=True):
                row = row[length - len(continuation) : length].unsqueeze(0)  # (1, cont, vocab)
                greedy = row.argmax(dim=-1)
                for key_, cont, row_ in order.get_cache(
                    req_str=key, cxt_toks=context, cont_toks=continuation, logits=row
                ):
                    cont_t = torch.tensor(cont, dtype=torch.long, device=row_.device).unsqueeze(0)
                    exact = bool((greedy[:, -cont_t.shape[1] :] == cont_t).all())
                    logp = float(torch.gather(row_, 2, cont_t.unsqueeze(-1)).sum())
                    results.append((logp, exact))
                    if key_ is not None:
                        self.cache_hook.add_partial("loglikelihood", key_, (logp, exact))
                    bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of `max_length` tokens (perplexity tasks)."""
        windows: list[Request] = []
        owners: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # Tokens (rows x prompt columns) per prefill forward: a long few-shot batch is prefilled in chunks of columns so
    # that its attention scores stay bounded. Only each row's last prompt position reaches the output head.
    prefill_tokens: int = 2**13

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuation until a stop string, EOS or max_gen_toks.

        Requests are grouped by identical generation settings (lm-eval's `Collator`, as its HF backend does), sorted
        longest prompt first and generated `batch_size` at a time with the KV cache (see `_generate_batch`).
        """
        tok = self.lit_tokenizer
        hf = tok.backend == "huggingface"
        eos_text = tok.processor.decode([self.eot_token_id], skip_special_tokens=False) if hf else None
        args = [req.args for req in requests]
        encoded: dict[str, list[int]] = {}

        def encode(context: str) -> list[int]:
            if context not in encoded:
                encoded[context] = self.tok_encode(context) or [self.prefix_token_id]
            return encoded[context]

        order = Collator(
            args, sort_fn=lambda a: (-len(encode(a[0])), a[0]), group_by="gen_kwargs", group_fn=lambda a: a[1]
        )
        outputs: list[str] = []
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            kwargs = normalize_gen_kwargs(dict(chunk[0][1]), self.max_gen_toks)  # one group: the same settings
            budget = int(kwargs.pop("max_gen_toks"))
            if budget >= self.max_length:
                raise UserError(f"max_gen_toks {budget} must be below the model's max length {self.max_length}")
            kwargs.pop("until", None)
            stops = [handle_stop_sequences(copy.deepcopy(g.get("until")), eos=eos_text) for _, g in chunk]
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
            sampling = (
                {
                    "temperature": float(kwargs["temperature"]),
                    "top_k": kwargs.get("top_k"),
                    "top_p": float(kwargs.get("top_p", 1.0)),
                }
                if sample
                else None
            )
            prompts = [encode(context)[-(self.max_length - budget) :] for context, _ in chunk]
            texts = self._generate_batch(prompts, budget, stops, sampling)
            for (context, gen_kwargs), text in zip(chunk, texts, strict=True):
                outputs.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(chunk))
        bar.close()
        return order.get_original(outputs)

    def _generate_batch(
        self, prompts: list[list[int]], budget: int, stops: list[list[str]], sampling: dict | None
    ) -> list[str]:
        """Continue every prompt by up to `budget` tokens in one batch; each row ends at EOS or its stop strings.

        Right-padded rows with per-row positions: row i's prompt fills columns 0..L_i-1 at positions 0..L_i-1, exactly
        as when it is generated alone, and its n-th new token is fed at position L_i + n (a (B, 1) `input_pos`, which
        LitGPT's `GPT.forward` takes: per-row rotary angles, KV-cache slots and causal-mask rows). Pad columns sit
        after a row's prompt, so the causal mask hides them during the prefill; their cache slots L_i.. are written
        over by the row's own new tokens before its mask reaches them. Each row therefore attends to the same keys at
        the same positions as alone. (Left padding would need shifted positions or a padding mask, which GPT.forward
        does not take.) The prefill runs the output head on each row's last prompt position only, and a row that has
        stopped leaves the batch: the live rows move to the front of the KV cache, which litgpt's cache reads as its
        first `rows` entries, so later steps cost what the rows still generating cost.
        `sampling`: None for greedy (argmax), else litgpt `sample` settings applied row by row.
        """
        from litgpt.generate.base import sample

        from lit_peft.tasks.chunked_head import final_hidden, head_logits

        model, device = self.model, self._device
        rows, eos_id = len(prompts), self.eot_token_id
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        width = int(lengths.max())
        batch = torch.zeros((rows, width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            batch[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        batch = batch.to(device)

        def pick(logits: torch.Tensor) -> torch.Tensor:  # (rows, vocab) -> (rows,)
            if sampling is None:
                return logits.argmax(dim=-1)
            return torch.cat([sample(row.view(1, 1, -1), **sampling) for row in logits]).view(-1)

        ids: list[list[int]] = [[] for _ in range(rows)]
        texts = [""] * rows
        model.set_kv_cache(batch_size=rows, max_seq_length=width + budget, device=device)
        try:
            step = max(1, self.prefill_tokens // rows)
            last = torch.empty(rows, model.config.n_embd, device=device, dtype=model.lm_head.weight.dtype)
            for start in range(0, width, step):
                end = min(width, start + step)
                hidden = final_hidden(
                    model, batch[:, start:end], torch.arange(start, end, device=device), input_pos_maxp1=end
                )
                inside = ((lengths - 1 >= start) & (lengths - 1 < end)).nonzero().view(-1)
                last[inside] = hidden[inside, lengths[inside] - 1 - start].to(last.dtype)
            logits = head_logits(model, last)
            live = list(range(rows))  # the original row of each batch row still generating
            positions = lengths.clone()
            for n in range(budget):
                tokens = pick(logits)
                keep = []
                for slot, (i, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
                    if token == eos_id:
                        continue
                    ids[i].append(token)
                    texts[i] = self.tok_decode(ids[i])
                    if not any(stop and stop in texts[i] for stop in stops[i]):
                        keep.append(slot)
                if not keep or n == budget - 1:
                    break
                if len(keep) < len(live):
                    index = torch.tensor(keep, device=device)
                    for block in model.transformer.h:
                        cache = block.attn.kv_cache
                        cache.k[: len(keep)] = cache.k[index]
                        cache.v[: len(keep)] = cache.v[index]
                    live = [live[slot] for slot in keep]
                    tokens, positions = tokens[index], positions[index]
                maxp1 = int(positions.max()) + 1
                logits = model(tokens.view(-1, 1), positions.view(-1, 1), input_pos_maxp1=maxp1)[:, -1]
                positions = positions + 1
        finally:
            model.clear_kv_cache()
        for i in range(rows):
            for stop in filter(None, stops[i]):
                texts[i] = texts[i].split(stop)[0]
        return texts

    # ---------------------------------------------------------------- chat template (`--apply-chat-template`)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return type(self.template).__name__ if (chat_template and self.template is not None) else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise UserError("this model has no chat template; pass --template")
        from lit_peft.data.tokenize import special_strings

        bos, eos = special_strings(self.lit_tokenizer)
        text = "".join(t for t, _ in self.template.segments(chat_history, bos, eos))
        return text + (self.template.generation_prompt() if add_generation_prompt else "")


def chat_template_choice(fmt, requested: bool | None, no_template: bool = False) -> tuple[bool, str]:
    """Whether lm-eval wraps prompts in the chat template, and why (for the printed line and results.json).

    `fmt` is an inference.load.PromptFormat; `requested` is --apply-chat-template (True), --no-apply-chat-template
    (False) or neither (None: on for a model trained on conversations, as its record says).
    """
    if no_template:
        return False, "--template none"
    if requested is not None:
        return requested, "--apply-chat-template" if requested else "--no-apply-chat-template"
    if fmt.instruction_tuned:
        return True, f"instruction-tuned, per {fmt.instruction_from}; --no-apply-chat-template turns it off"
    if fmt.instruction_tuned is False:
        return False, f"trained on plain text, per {fmt.instruction_from}; --apply-chat-template turns it on"
    return False, "no record of instruction tuning; --apply-chat-template turns it on"


def task_manager(data_dir: str | Path | None):
    """lm-eval's task index plus the local tasks of eval/tasks/, which read their files under `data_dir`."""
    from lm_eval.tasks import TaskManager

    metadata = {"data_dir": str(Path(data_dir).expanduser().resolve())} if data_dir else None
    return TaskManager(include_path=str(TASKS_DIR), metadata=metadata)


def check_tasks(names: list[str], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        local = sorted(n for n in known if n.startswith("local_") and not n.startswith("local_mmlu_"))
        raise UserError(
            f"unknown task {unknown[0]!r}; local tasks: {', '.join(local)}, or any of lm-eval's "
            f"{len(known) - len(local)} tasks (`lm_eval ls tasks`)"
        )


def evaluate(
    lm: LitLM,
    tasks: list[str],
    manager,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed: int = 1234,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on our model; adds the wall time to the results.

    Standard errors are lm-eval's own: analytic for means such as acc (sqrt(p(1-p)/(n-1))), `bootstrap_iters`
    resamples for the metrics it bootstraps (f1, mcc, bleu, ...); 0 computes none.
    """
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=bootstrap_iters,
    )
    results["wall_seconds"] = time.perf_counter() - start
    return results


def _metrics(results: dict[str, Any]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """{task: {metric: (value, lm-eval's standard error or None)}}."""
    table: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and "stderr" not in metric and metric not in ("alias", "sample_len"):
                stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
                ok = isinstance(stderr, (int, float)) and math.isfinite(stderr)
                row[metric if filt in ("none", "") else f"{metric} ({filt})"] = (
                    float(value),
                    float(stderr) if ok else None,
                )
        table[task] = row
    return table


def comparison_table(named: dict[str, dict[str, Any]], samples: dict[str, dict[str, int]] | None = None) -> str:
    """A Markdown table: one row per task and metric, one column per evaluated model (value ± lm-eval's standard
    error), and the change to the first with the standard error of the difference of two independent estimates."""
    heads = {name: _metrics(res) for name, res in named.items()}
    names = list(heads)
    cols = names + ([f"{names[-1]} - {names[0]}"] if len(names) > 1 else [])
    lines = ["| task | metric | n | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    first = heads[names[0]]
    for task in sorted(first):
        for metric in first[task]:
            values = [heads[n].get(task, {}).get(metric) for n in names]
            cells = [
                "-" if v is None else f"{v[0]:.4f}" + (f" ± {v[1]:.4f}" if v[1] is not None else "") for v in values
            ]
            if len(names) > 1 and values[0] is not None and values[-1] is not None:
                (a, sa), (b, sb) = values[0], values[-1]
                diff = f"{b - a:+.4f}"
                if sa is not None and sb is not None:
                    diff += f" ± {math.hypot(sa, sb):.4f}"
                cells.append(diff)
            n = (samples or {}).get(task, {}).get("effective", "")
            lines.append(f"| {task} | {metric} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
