"""Where the query, key and value rows sit inside LitGPT's fused `qkv` Linear.

Output rows of `qkv.weight` (shape ((n_head + 2 * n_query_groups) * head_size, n_embd)):
- "concatenated" (LitGPT >= 0.5): [q (n_head*hs) | k (n_query_groups*hs) | v (n_query_groups*hs)]
- "interleaved" (older LitGPT checkpoints, the ETHER reference): per query group g,
  [q heads of g (q_per_kv*hs) | k head of g (hs) | v head of g (hs)], groups one after another.
Adapters treat q, k and v as three separate matrices; these indices say which rows each one owns.
"""

from __future__ import annotations

import torch
from litgpt import Config

from lit_peft.errors import UserError

QKV_LAYOUTS = ("concatenated", "interleaved")
QKV_PARTS = ("query", "key", "value")


def qkv_rows(config: Config, layout: str = "concatenated") -> dict[str, torch.Tensor]:
    """Row indices of q, k and v in the fused weight, each in the order the attention reads them."""
    if layout not in QKV_LAYOUTS:
        raise UserError(f"unknown qkv layout {layout!r}; valid: {', '.join(QKV_LAYOUTS)}")
    hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
    q_size, kv_size = nh * hs, ng * hs
    if layout == "concatenated":
        return {
            "query": torch.arange(0, q_size),
            "key": torch.arange(q_size, q_size + kv_size),
            "value": torch.arange(q_size + kv_size, q_size + 2 * kv_size),
        }
    q_per_kv = nh // ng
    group = (q_per_kv + 2) * hs  # rows per query group
    starts = torch.arange(ng) * group  # (ng,)
    q = (starts[:, None] + torch.arange(q_per_kv * hs)).reshape(-1)
    k = (starts[:, None] + q_per_kv * hs + torch.arange(hs)).reshape(-1)
    v = (starts[:, None] + (q_per_kv + 1) * hs + torch.arange(hs)).reshape(-1)
    return {"query": q, "key": k, "value": v}


def to_interleaved(weight: torch.Tensor, config: Config) -> torch.Tensor:
    """Reorder concatenated qkv rows into the legacy interleaved layout (for tests and old checkpoints)."""
    rows = qkv_rows(config, "interleaved")
    out = torch.empty_like(weight)
    out[torch.cat([rows["query"], rows["key"], rows["value"]])] = weight
    return out
