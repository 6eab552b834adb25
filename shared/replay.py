"""Rollout replay (DOTS, Sun et al. 2025, arXiv 2506.05316; METHODS.md B.8).

Whole groups are kept with the log-probs of the policy that sampled them (the behaviour policy mu,
`extras["behaviour_logp"]`). Each step trains on sigma * B fresh groups plus (1 - sigma) * B groups
drawn uniformly from the buffer; the objective (`shared.objectives.ppo_clip`) corrects replayed
samples with rho = pi_theta / mu and a clip range centred on pi_old / mu. After the step the fresh
groups go in: an older copy of the same prompt is dropped (the newest copy of each question is
kept) and the oldest groups are trimmed so the buffer holds at most `capacity` groups.

Every process holds the same buffer (the loop gathers each step's fresh groups from all processes
in process order, which is the global group order), draws the same groups and keeps its share, so
replay does not depend on the process layout, and the buffer the main process checkpoints is the
whole state: a resumed run replays exactly what the uninterrupted run would.
"""

from __future__ import annotations

import torch

from shared.rollout import Rollout

BEHAVIOUR = "behaviour_logp"  # the extras key; NaN marks fresh samples (their behaviour policy is pi_old)


def mark_fresh(rollout: Rollout) -> Rollout:
    """Give fresh samples a NaN behaviour log-prob, so they concatenate with replayed groups."""
    rollout.extras[BEHAVIOUR] = torch.full(rollout.mask.shape, float("nan"), device=rollout.mask.device)
    return rollout


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int = 0):
        if capacity <= 0:
            raise ValueError("rollout.replay_buffer: capacity must be > 0")
        self.capacity, self.seed = capacity, seed
        self.groups: list[tuple[int, Rollout]] = []  # (prompt key, one whole group on CPU), oldest first

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, fresh: Rollout, behaviour_logp: torch.Tensor, keys: list[int]) -> None:
        """Store the groups of `fresh` (samples of a group are contiguous, `keys[g]` names group g's prompt)
        with `behaviour_logp` [B, T], the log-probs of the policy that sampled them."""
        gids = fresh.group_ids.tolist()
        starts = [i for i in range(len(gids)) if i == 0 or gids[i] != gids[i - 1]]
        if len(starts) != len(keys):
            raise ValueError(f"replay: {len(starts)} groups but {len(keys)} prompt keys")
        stored = fresh.to("cpu")
        stored.extras = {**stored.extras, BEHAVIOUR: behaviour_logp.detach().float().cpu()}
        stored.old_logp = stored.ref_logp = stored.advantages = None  # recomputed under the current policy
        stored.stats = {}
        bounds = starts + [len(gids)]
        incoming = {int(k) for k in keys}
        self.groups = [(k, g) for k, g in self.groups if k not in incoming]
        self.groups += [(int(k), stored.select(slice(a, b))) for k, a, b in zip(keys, bounds[:-1], bounds[1:])]
        self.groups = self.groups[max(0, len(self.groups) - self.capacity):]

    def draw(self, n: int, step: int, rank: int = 0, world: int = 1) -> Rollout | None:
        """Process `rank`'s share of n distinct groups drawn uniformly (a generator seeded by (seed, step):
        every process draws the same n and keeps its n / world)."""
        if n <= 0:
            return None
        if n > len(self.groups) or n % world:
            raise ValueError(f"replay: cannot draw {n} groups over {world} processes from {len(self.groups)}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919)
        pick = torch.randperm(len(self.groups), generator=g)[:n].sort().values.tolist()
        share = n // world
        return Rollout.cat([self.groups[i][1] for i in pick[rank * share : (rank + 1) * share]])

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "groups": list(self.groups)}

    def load_state_dict(self, state: dict) -> None:
        self.groups = list(state["groups"])
