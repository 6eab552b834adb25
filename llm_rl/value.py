"""A-LoL's value estimate V(x) (Baheti et al. 2023, "Leftover Lunch", arXiv 2305.14718).

A-LoL weights each offline sequence by the advantage A = R(x, y) - V(x) of the reference policy
π_ref, and drops the negative-advantage rows: A = max(R(x, y) - V(x), 0). V(x) is a small head on
the *frozen* π_ref last-layer hidden states of the prompt, fitted once before training by MSE
regression on the rewards of π_ref's greedy outputs on the validation set (10 epochs, lr 1e-5, the
checkpoint with the best held-out MSE kept), then frozen.

[APPROX] The reference gives only "an attention head on the prompt states, max 1"; the layout here
(one learned query attending over the unmasked prompt positions, then LayerNorm -> Linear(H, H) ->
GELU -> Linear(H, 1), output clamped above at `max_value`) and its sizes are our reconstruction.
Our held-out split for checkpoint selection is carved out of the regression rows (`holdout_frac`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from shared.baselines import BASELINES, greedy_rewards


class ValueHead(nn.Module):
    """forward(states [B, L, H], mask [B, L]) -> V [B], attention-pooled over the unmasked positions."""

    def __init__(self, hidden_size: int, max_value: float | None = 1.0):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden_size))  # zero query: mean pooling at initialisation
        self.mlp = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, 1))
        self.max_value = max_value

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        m = mask.bool()
        scores = (states @ self.query) / math.sqrt(states.shape[-1])
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        # masked positions get weight exactly 0; an all-masked row pools to the zero vector (not NaN)
        w = torch.softmax(scores, -1) * m
        pooled = (w.unsqueeze(-1) * states.masked_fill(~m.unsqueeze(-1), 0.0)).sum(1)
        v = self.mlp(pooled).squeeze(-1)
        return v.clamp(max=self.max_value) if self.max_value is not None else v


@torch.no_grad()
def prompt_states(module: nn.Module, policy, rows: list[dict]) -> tuple[Tensor, Tensor]:
    """(last-layer states [B, L, H] float32, attention mask [B, L]) of the rows' left-padded prompts,
    from `module` (an LMForward: the frozen reference or the initial policy) run in eval mode."""
    device = next(module.parameters()).device
    enc = policy.encode_rows(rows, device)
    was_training = module.training
    module.eval()
    try:
        states = module.hidden_states(enc["input_ids"], enc["attention_mask"]).float()
    finally:
        module.train(was_training)
    return states, enc["attention_mask"]


def _mse(head: ValueHead, states: Tensor, mask: Tensor, targets: Tensor, batch_size: int) -> float:
    with torch.no_grad():
        err = [(head(states[i:i + batch_size], mask[i:i + batch_size]) - targets[i:i + batch_size]).pow(2)
               for i in range(0, len(targets), batch_size)]
    return torch.cat(err).mean().item()


def fit_value_head(states: Tensor, mask: Tensor, targets: Tensor, *, epochs: int = 10, lr: float = 1e-5,
                   batch_size: int = 32, holdout_frac: float = 0.2, seed: int = 0,
                   max_value: float | None = 1.0) -> tuple[ValueHead, dict]:
    """Regress V on `targets` (rewards of π_ref's greedy outputs) from precomputed prompt states.

    Rows are split (seeded) into fit / holdout parts; the head is trained with AdamW on MSE for
    `epochs` shuffled passes over the fit part. The holdout MSE is measured before training
    (`holdout_mse_first`, epoch 0) and after each epoch; the best state is returned, frozen, in eval mode."""
    if states.dim() != 3:
        raise ValueError(f"value head: states must be [N, L, H], got shape {tuple(states.shape)}")
    N = states.shape[0]
    if N == 0:
        raise ValueError("value head: no rows to fit (N == 0)")
    if tuple(mask.shape) != tuple(states.shape[:2]):
        raise ValueError(f"value head: mask shape {tuple(mask.shape)} does not match states [N, L] = {tuple(states.shape[:2])}")
    if tuple(targets.shape) != (N,):
        raise ValueError(f"value head: targets shape {tuple(targets.shape)} does not match N = {N}")
    if epochs < 1:
        raise ValueError(f"value head: epochs must be >= 1, got {epochs}")
    if batch_size < 1 or not 0.0 <= holdout_frac < 1.0:
        raise ValueError(f"value head: need batch_size >= 1 and 0 <= holdout_frac < 1, got {batch_size}, {holdout_frac}")
    device = states.device
    states, targets = states.float(), targets.float().to(device)
    mask = mask.to(device)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    if N == 1:
        fit_idx = hold_idx = perm
    else:
        n_hold = min(max(1, round(N * holdout_frac)), N - 1)
        hold_idx, fit_idx = perm[:n_hold], perm[n_hold:]
    hs, hm, ht = states[hold_idx], mask[hold_idx], targets[hold_idx]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ValueHead(states.shape[-1], max_value).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    head.eval()
    first = best = _mse(head, hs, hm, ht, batch_size)
    best_state, best_epoch = copy.deepcopy(head.state_dict()), 0
    for epoch in range(1, epochs + 1):
        head.train()
        order = fit_idx[torch.randperm(len(fit_idx), generator=g)]
        for i in range(0, len(order), batch_size):
            b = order[i:i + batch_size]
            loss = (head(states[b], mask[b]) - targets[b]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        mse = _mse(head, hs, hm, ht, batch_size)
        if mse < best:
            best, best_state, best_epoch = mse, copy.deepcopy(head.state_dict()), epoch
    head.load_state_dict(best_state)
    head.eval().requires_grad_(False)
    record = {"n": N, "n_holdout": len(hold_idx), "epochs": epochs, "holdout_mse_first": first,
              "holdout_mse_best": best, "best_epoch": best_epoch, "target_mean": targets.mean().item()}
    return head, record


def value_baseline(head: ValueHead, module: nn.Module, policy, rows: list[dict], batch_size: int = 256) -> Tensor:
    """V(x) for each row's prompt: float32 [len(rows)] on CPU."""
    device = next(head.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            states, mask = prompt_states(module, policy, rows[i:i + batch_size])
            out.append(head(states.to(device), mask.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def value_head_baseline(policy, task, reward_fn, cfg, accelerator, batch_size: int = 64):
    """The `value_head` baseline of `advantage: alol`: fit V to the rewards of the frozen reference's greedy
    outputs on the task's validation split, then b(x) = V(x) from the reference's prompt states."""
    module = policy._reference if policy._reference is not None else policy.unwrap(policy.module)
    rows = task.split("val")
    if not rows:
        raise ValueError("advantage 'alol' fits its value head on the task's validation split, which is empty")
    targets = torch.cat([greedy_rewards(policy, reward_fn, rows[s : s + batch_size])
                         for s in range(0, len(rows), batch_size)])
    states, mask = prompt_states(module, policy, rows)
    a = cfg.algorithm
    head, record = fit_value_head(states, mask, targets, epochs=a.value_epochs, lr=a.value_lr, seed=cfg.seed)
    accelerator.print(f"A-LoL value head on {len(rows)} validation prompts: holdout MSE "
                      f"{record['holdout_mse_first']:.4f} -> {record['holdout_mse_best']:.4f} (epoch {record['best_epoch']}), "
                      f"mean reward {record['target_mean']:.3f}")
    return lambda batch_rows, step=None: value_baseline(head, module, policy, batch_rows)


BASELINES["value_head"] = value_head_baseline
