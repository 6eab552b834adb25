"""The rollout batch that flows through the RL step, for every domain.

`inputs` holds the per-sample tensors a policy needs to recompute log-probs (token ids and
attention masks for LM/VLM; latents, timesteps and embeddings for diffusion), all with the batch
dimension first. `mask` [B, T] marks the steps that are trained (completion tokens or denoising
steps); `old_logp`, `ref_logp` are [B, T]. Python-side fields (completions, rows) are lists.

Layout convention that lets rollouts of different lengths be concatenated (`Rollout.cat`): a 2-D
input as wide as `inputs["attention_mask"]` (every 2-D input when there is none) is a sequence
[B, L] that ends with the T trained positions (a left-padded prefix, then a right-padded suffix
aligned with `mask`); other 2-D inputs ([B, 3] image grids) are per-sample values; an input with 3 or more dimensions [B, N, ...] holds per-sample items (image
patches) padded at the end of dim 1; `pad_values` gives each input's padding value (0 when absent).
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
    components: dict[str, Tensor] = field(default_factory=dict)  # per-reward scores [B], for logging
    extras: dict[str, Tensor] = field(default_factory=dict)  # other per-sample values [B] (baselines, margins)
    pad_values: dict[str, float] = field(default_factory=dict)  # padding value of each input

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
            components={k: pick(v) for k, v in self.components.items()},
            extras={k: pick(v) for k, v in self.extras.items()},
        )

    def to(self, device) -> "Rollout":
        """The same rollout with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, inputs={k: move(v) for k, v in self.inputs.items()}, mask=move(self.mask),
            group_ids=move(self.group_ids), old_logp=move(self.old_logp), ref_logp=move(self.ref_logp),
            rewards=move(self.rewards), advantages=move(self.advantages),
            components={k: move(v) for k, v in self.components.items()},
            extras={k: move(v) for k, v in self.extras.items()},
        )

    @staticmethod
    def cat(parts: list["Rollout"]) -> "Rollout":
        """Concatenate rollouts along the batch, re-padding prefixes (left) and trained suffixes (right)."""
        if len(parts) == 1:
            return parts[0]
        T = max(p.mask.shape[1] for p in parts)

        def right(t: Tensor | None, width: int, value: float = 0.0) -> Tensor | None:
            return None if t is None else torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        def cat_opt(ts: list[Tensor | None]) -> Tensor | None:
            return None if any(t is None for t in ts) else torch.cat(ts)

        inputs = {}
        pads = parts[0].pad_values
        seq_len = [p.inputs["attention_mask"].shape[1] if "attention_mask" in p.inputs else None for p in parts]
        pre = max((L or p.mask.shape[1]) - p.mask.shape[1] for L, p in zip(seq_len, parts))
        for k, v0 in parts[0].inputs.items():
            vs = [p.inputs[k] for p in parts]
            sequence = v0.dim() == 2 and all(v.shape[1] == (L or v.shape[1]) and v.shape[1] >= p.mask.shape[1]
                                             for v, L, p in zip(vs, seq_len, parts))
            if sequence:  # [prefix | trained suffix]: left-pad prefixes to `pre`, right-pad suffixes to T
                val = pads.get(k, 0.0)
                vs = [torch.cat([torch.nn.functional.pad(v[:, : v.shape[1] - p.mask.shape[1]],
                                                         (pre - (v.shape[1] - p.mask.shape[1]), 0), value=val),
                                 right(v[:, v.shape[1] - p.mask.shape[1]:], T, val)], 1) for v, p in zip(vs, parts)]
            elif v0.dim() >= 3 and len({v.shape[1] for v in vs}) > 1:  # per-sample items (image patches): pad dim 1
                width = max(v.shape[1] for v in vs)
                vs = [torch.cat([v, v.new_full((v.shape[0], width - v.shape[1], *v.shape[2:]), pads.get(k, 0.0))], 1)
                      for v in vs]
            inputs[k] = torch.cat(vs)
        n = [len(p) for p in parts]
        stats: dict[str, float] = {}
        for key in parts[0].stats:
            vals = [p.stats.get(key, 0.0) for p in parts]
            if key in ("sample_tokens", "sample_seconds"):
                stats[key] = sum(vals)
            elif key.endswith("_max"):
                stats[key] = max(vals)
            else:  # per-sample means
                stats[key] = sum(v * m for v, m in zip(vals, n)) / max(sum(n), 1)
        comps = {k: torch.cat([p.components[k] for p in parts]) for k in parts[0].components}
        extras = {k: torch.cat([right(p.extras[k], T, float("nan")) if p.extras[k].dim() == 2 else p.extras[k]
                                for p in parts]) for k in parts[0].extras}
        return Rollout(
            inputs=inputs, mask=torch.cat([right(p.mask, T) for p in parts]),
            group_ids=torch.cat([p.group_ids for p in parts]),
            completions=[c for p in parts for c in p.completions], rows=[r for p in parts for r in p.rows],
            old_logp=cat_opt([right(p.old_logp, T) for p in parts]),
            ref_logp=cat_opt([right(p.ref_logp, T) for p in parts]),
            rewards=cat_opt([p.rewards for p in parts]), advantages=cat_opt([p.advantages for p in parts]),
            stats=stats, components=comps, extras=extras, pad_values=pads,
        )

    def fields(self) -> dict[str, list]:
        """Dataset columns aligned with completions, as reward functions receive them (without the
        row's own offline completions and private keys such as `_where`, which are not reward inputs)."""
        return row_fields(self.rows)


def first_in_group(completions: list, group_ids: Tensor) -> Tensor:
    """1.0 for a completion whose text is the first of its kind in its group, else 0.0 [B] (expert
    iteration trains each distinct verified answer once). Non-text completions count as distinct."""
    seen: set = set()
    flags = []
    for c, g in zip(completions, group_ids.tolist()):
        key = (g, c) if isinstance(c, str) else None
        flags.append(key is None or key not in seen)
        if key is not None:
            seen.add(key)
    return torch.tensor(flags, dtype=torch.float32)


NOT_REWARD_INPUTS = ("completions",)  # an offline row's group: would collide with the rewards' first argument


def row_fields(rows: list[dict]) -> dict[str, list]:
    """Columns of `rows` as reward keyword arguments (see `Rollout.fields`)."""
    keys = [k for k in (rows[0] if rows else {}) if k not in NOT_REWARD_INPUTS and not k.startswith("_")]
    return {k: [r.get(k) for r in rows] for k in keys}
