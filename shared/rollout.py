"""The rollout batch that flows through the RL step, for every domain.

`inputs` holds the per-sample tensors a policy needs to recompute log-probs (token ids and
attention masks for LM/VLM; latents, timesteps and embeddings for diffusion), all with the batch
dimension first. `mask` [B, T] marks the steps that are trained (completion tokens or denoising
steps); `old_logp`, `ref_logp` are [B, T]. Python-side fields (completions, rows) are lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    inputs: dict[str, Tensor]
    mask: Tensor  # [B, T] trained steps
    group_ids: Tensor  # [B] global prompt index: samples of one prompt share it
    completions: list[Any] = field(default_factory=list)  # decoded outputs (text) or images
    rows: list[dict] = field(default_factory=list)  # the dataset row each sample came from
    old_logp: Tensor | None = None  # [B, T] log-probs under the sampling policy
    ref_logp: Tensor | None = None  # [B, T] log-probs under the reference
    rewards: Tensor | None = None  # [B]
    advantages: Tensor | None = None  # [B]
    stats: dict[str, float] = field(default_factory=dict)  # sampling statistics (lengths, truncation)

    def __len__(self) -> int:
        return self.mask.shape[0]

    def select(self, idx: Tensor | list[int] | slice) -> "Rollout":
        if isinstance(idx, slice):
            idx = list(range(len(self)))[idx]
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx_t.to(t.device)]  # noqa: E731
        lst = [int(i) for i in idx_t]
        return replace(
            self,
            inputs={k: pick(v) for k, v in self.inputs.items()},
            mask=pick(self.mask),
            group_ids=pick(self.group_ids),
            completions=[self.completions[i] for i in lst] if self.completions else [],
            rows=[self.rows[i] for i in lst] if self.rows else [],
            old_logp=pick(self.old_logp),
            ref_logp=pick(self.ref_logp),
            rewards=pick(self.rewards),
            advantages=pick(self.advantages),
        )

    def fields(self) -> dict[str, list]:
        """Dataset columns aligned with completions, as reward functions receive them."""
        keys = self.rows[0].keys() if self.rows else []
        return {k: [r.get(k) for r in self.rows] for k in keys}
