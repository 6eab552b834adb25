"""SFT-RL hybrids that help the RL loop on the questions it cannot solve (METHODS.md B.11).

All keep a buffer of *hard* questions (every sample of the group failed: no reward above
`algorithm.positive_threshold`; with `hybrid.questions: failed`, any question with a failed sample)
paired with a correct solution, and interleave supervised steps
with RL: once the buffer holds `hybrid.sft_batch` items, one SFT step (token-mean NLL at temperature
1, its own AdamW at `hybrid.sft_lr`) on the newest `sft_batch` items, which then leave the buffer.
The SFT and RL losses are never mixed in one loss.

- ReLIFT (Ma et al. 2025, arXiv 2506.07527) pairs a hard question with its stored demonstration
  (the row's `completion`). [APPROX] The authors' SFT loss also subtracts 0.001 x entropy; our
  per-token entropy carries no gradient, so that term is left out.
- ReGFT (reference-guided fine-tuning) synthesises the solution instead: the policy continues a
  partial reference solution (the first `hint_frac` of the row's `completion`, as the start of its
  answer) `hint_samples` times, and the first continuation the reward functions accept becomes the
  demonstration, so the model learns from a solution written in its own words. [APPROX: the hint
  is a prefix of the reference answer given as the start of the completion; no authors' code.]
- InT (intervention training) repairs the policy's own failed attempt: the task locates its first
  wrong step (`task.first_error(completion, row)`, a character offset), the policy re-writes from
  there `hint_samples` times, and the first continuation that passes is the demonstration: the
  model's correct steps, a corrected step, and its own continuation. [APPROX: the step is checked by
  the task's verifier rather than proposed and judged by the model itself.]

Every process holds the same buffer (hard items are gathered from all processes in process order)
and trains on its share of each SFT batch, so the SFT steps do not depend on the process layout;
the buffer is part of the checkpoint.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from shared.rollout import row_fields
from shared.sft import untempered


def hard_groups(rewards: Tensor, group_ids: Tensor, threshold: float, any_failure: bool = False) -> list[int]:
    """Index of the first failed sample (reward not above `threshold`) of every group none of whose samples
    passed, or with `any_failure` of every group with at least one failed sample."""
    best: dict[int, float] = {}
    first_failed: dict[int, int] = {}
    for i, (g, r) in enumerate(zip(group_ids.tolist(), rewards.tolist())):
        best[g] = max(best.get(g, -math.inf), r)
        if r <= threshold:
            first_failed.setdefault(g, i)
    return [i for g, i in first_failed.items() if any_failure or best[g] <= threshold]


def nll_token_mean(logp: Tensor, mask: Tensor, total_tokens: float) -> Tensor:
    """Sum of -log p over trained tokens divided by the SFT batch's token count on all processes."""
    return -(logp * mask.to(logp.dtype)).sum() / max(total_tokens, 1.0)


class HybridSFT:
    """The buffer and the interleaved SFT step of ReLIFT / ReGFT / InT (`hybrid.name`)."""

    def __init__(self, hcfg, policy, reward_fn, threshold: float, seed: int, task=None):
        if hasattr(task, "split") and any("completion" not in row for row in task.split("train")[:1]):
            raise ValueError(f"hybrid.name {hcfg.name!r}: train rows need a reference solution in 'completion'")
        if hcfg.name == "int" and not hasattr(task, "first_error"):
            raise ValueError("hybrid.name 'int': the task must locate a completion's first wrong step "
                             "(task.first_error); the embedded arithmetic task does")
        self.cfg, self.policy, self.reward_fn, self.task = hcfg, policy, reward_fn, task
        self.threshold, self.seed = threshold, seed
        self.buffer: list[dict] = []  # rows with the demonstration in "completion", oldest first
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=hcfg.sft_lr)
        self.sft_steps = 0

    # ------------------------------------------------------------------ collecting hard questions
    def demonstrations(self, rows: list[dict], step: int, failed: list[str] | None = None) -> list[dict]:
        """Hard `rows` paired with a solution: ReLIFT their own; ReGFT a passing continuation of half the
        reference; InT a passing continuation of `failed` (one failed attempt per row) from its first error."""
        if self.cfg.name == "relift":
            return [dict(r) for r in rows]
        if self.cfg.name == "regft":
            hints = [r["completion"][: max(1, math.floor(len(r["completion"]) * self.cfg.hint_frac))] for r in rows]
        else:
            hints = [c[: self.task.first_error(c, r)] for c, r in zip(failed, rows)]
        return self._hinted(rows, hints, step)

    @torch.no_grad()
    def _hinted(self, rows: list[dict], hints: list[str], step: int) -> list[dict]:
        """For each row, the first of `hint_samples` continuations of its hint that the rewards accept."""
        if not rows:
            return []
        n = self.cfg.hint_samples
        batch = self.policy.rollout_from(rows, [[h] for h in hints], 0)
        cuts = (batch.mask.sum(-1) - 1).tolist()  # hint tokens (the appended EOS is not part of the hint)
        out: list[dict | None] = [None] * len(rows)
        for cut in sorted(set(cuts)):
            idx = [i for i, c in enumerate(cuts) if c == cut]
            texts, lengths = self.policy.continue_completions(batch, idx, int(cut), n, seed=self.seed + 0x4E6F,
                                                              first_sample_id=(step * 1_000_003 + idx[0]) * n)
            fields = row_fields([rows[i] for i in idx for _ in range(n)])
            fields["completion_length"] = lengths
            total = self.reward_fn(texts, fields, step=step).total
            for j, i in enumerate(idx):
                ok = [k for k in range(n) if float(total[j * n + k]) > self.threshold]
                if ok:
                    out[i] = dict(rows[i], completion=texts[j * n + ok[0]])
        return [r for r in out if r is not None]

    def add(self, items: list[dict]) -> None:
        """Append (newest last); an older copy of the same prompt is replaced; at most `buffer_size` kept."""
        new = {r["prompt"] for r in items}
        self.buffer = [r for r in self.buffer if r["prompt"] not in new] + items
        self.buffer = self.buffer[max(0, len(self.buffer) - self.cfg.buffer_size):]

    # ------------------------------------------------------------------ the SFT step
    def maybe_step(self, acc) -> dict[str, float]:
        """One SFT step on the newest `sft_batch` items once the buffer holds that many (they leave it)."""
        B = self.cfg.sft_batch
        metrics = {"hybrid/buffer": float(len(self.buffer))}
        if len(self.buffer) < B:
            return metrics
        batch_rows, self.buffer = self.buffer[-B:], self.buffer[:-B]
        share = B // acc.num_processes
        mine = batch_rows[acc.process_index * share : (acc.process_index + 1) * share]
        demo = self.policy.demo_batch(mine)
        total = float(acc.reduce(demo.mask.sum().double().to(acc.device), "sum"))
        with untempered(self.policy):
            logp = self.policy.log_probs(demo)[0]
        loss = nll_token_mean(logp, demo.mask, total)
        acc.backward(loss * acc.num_processes)  # DDP averages over processes; the loss is a global share
        torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sft_steps += 1
        metrics.update({"hybrid/sft_loss": float(acc.reduce(loss.detach(), "sum")),
                        "hybrid/sft_steps": float(self.sft_steps), "hybrid/buffer": float(len(self.buffer))})
        return metrics

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer), "optimizer": self.optimizer.state_dict(), "sft_steps": self.sft_steps}

    def load_state_dict(self, state: dict) -> None:
        self.buffer, self.sft_steps = list(state["buffer"]), int(state["sft_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
