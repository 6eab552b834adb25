"""LIFT: sparse fine-tuning of the principal weights (Liu et al. 2025, arXiv 2505.24075), METHODS.md B.19.

[CODE] from zihanghliu/LIFT src/sparseAdam.py (`update_masks`, `step`).

Mask, per 2-D weight W ∈ R^{m×n} (`lift_masks`):
    W_r = U_r Σ_r V_rᵀ                      rank-r approximation, r = filter_rank (paper: 32–64)
    M   = top-k entries of |W_r|,           k = min((m + n) · lora_rank, m · n)
k matches the parameter count of a rank-`lora_rank` LoRA adapter (paper: lora_rank 128, ≈ 5–6 % of a
4096×4096 matrix). Parameters that are not 2-D get no mask and train densely.

Update (`MaskedAdamW`): AdamW whose update, moments and decoupled weight decay touch only M. The
mask is recomputed from the current weights every `update_interval` steps (paper: 10–400, default
200; call `refresh`), and the moments move to the new mask. Setup in the paper: lr 2e-4.

Deviations from the authors' optimizer, all deliberate:
- Moments are dense tensors, exactly zero outside the mask; the authors store only the masked
  entries (``exp_avg = exp_avg[mask]``), which is what saves LIFT's optimizer memory. Ours trades
  that saving for simplicity; the arithmetic on masked entries is the same.
- The update follows torch.optim.AdamW (decay p ← p·(1 − lr·λ) first, then
  p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)), so a full mask reproduces AdamW. The
  authors' transformers-style step adds eps before the bias correction and decays after the update;
  their masked decay (``p.data[mask].add_(...)``) writes into an advanced-indexing copy, so it has no
  effect there, while ours decays the masked entries.
- The step count t (bias correction) is per parameter and survives `refresh`, as in the authors'
  code: entries that enter the mask start from zero moments under the current t.

Use::

    opt = MaskedAdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    named = dict(model.named_parameters())
    masks = lift_masks({n: p.detach() for n, p in named.items()}, filter_rank=64, lora_rank=128)
    opt.set_masks({named[n]: m for n, m in masks.items()})
    ...  # every update_interval steps:
    opt.refresh(filter_rank=64, lora_rank=128)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from shared.analysis.weights import low_rank_approximation, top_entries_mask


def lift_mask(w: Tensor, filter_rank: int, lora_rank: int) -> Tensor:
    """LIFT mask of one 2-D weight: the top min((m+n)·lora_rank, m·n) entries of |W_r|, r = filter_rank.

    r is clipped to min(m, n). The SVD runs in float32 on w's device, as in the authors' code; ties
    are broken by torch.topk on the flattened tensor. Returns a bool tensor shaped and placed like w.
    """
    if w.dim() != 2:
        raise ValueError(f"lift_mask needs a 2-D weight, got shape {tuple(w.shape)}")
    if filter_rank < 1 or lora_rank < 1:
        raise ValueError(f"filter_rank and lora_rank must be >= 1, got {filter_rank} and {lora_rank}")
    m, n = w.shape
    w_r = low_rank_approximation(w.detach().float(), min(filter_rank, m, n))
    return top_entries_mask(w_r.abs(), min((m + n) * lora_rank, m * n))


def lift_masks(params: dict[str, Tensor], filter_rank: int, lora_rank: int) -> dict[str, Tensor]:
    """LIFT masks for every 2-D floating parameter (see `lift_mask`); others are absent (trained densely)."""
    if filter_rank < 1 or lora_rank < 1:
        raise ValueError(f"filter_rank and lora_rank must be >= 1, got {filter_rank} and {lora_rank}")
    return {
        name: lift_mask(p, filter_rank, lora_rank)
        for name, p in params.items()
        if p.dim() == 2 and torch.is_floating_point(p)
    }


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW that updates only the masked entries of masked parameters (LIFT, arXiv 2505.24075).

    Hyperparameters and defaults are torch.optim.AdamW's. Per parameter p with gradient g, mask M
    (all True when p has no mask) and step t:
        g ← g ⊙ M
        p ← p · (1 − lr·λ) on M                                   (decoupled weight decay)
        m ← β1·m + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g²           (zero outside M)
        p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)  (zero change outside M)
    Entries outside M never change. `masks` maps id(param) → bool mask; it is not part of
    `state_dict`, so call `set_masks` or `refresh` again after loading a checkpoint.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.masks: dict[int, Tensor] = {}

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def set_masks(self, masks_by_param: dict[Tensor, Tensor]) -> None:
        """Set (or replace) the masks of the given parameters; moments outside a new mask are zeroed.

        Moments on entries that stay in the mask are kept; entries that enter it start from zero.
        """
        known = {id(p) for p in self._params()}
        for p, mask in masks_by_param.items():
            if id(p) not in known:
                raise ValueError(f"set_masks: a parameter of shape {tuple(p.shape)} is not in this optimizer")
            if mask.dtype != torch.bool or mask.shape != p.shape:
                got = f"{mask.dtype} {tuple(mask.shape)}"
                raise ValueError(f"set_masks: mask must be bool with shape {tuple(p.shape)}, got {got}")
            mask = mask.to(p.device)
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].masked_fill_(~mask, 0.0)
            self.masks[id(p)] = mask

    def refresh(self, filter_rank: int, lora_rank: int) -> None:
        """Recompute the masks of the masked parameters from their current weights (`lift_mask`).

        The authors do this every `update_interval` steps. Moments move to the new mask: entries
        leaving it have their moments zeroed. Parameters without a mask stay dense.
        """
        self.set_masks({
            p: lift_mask(p.detach(), filter_rank, lora_rank) for p in self._params() if id(p) in self.masks
        })

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MaskedAdamW does not support sparse gradients")
                mask = self.masks.get(id(p))
                grad = p.grad if mask is None else torch.where(mask, p.grad, torch.zeros_like(p.grad))
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]

                if wd != 0.0:
                    if mask is None:
                        p.mul_(1.0 - lr * wd)
                    else:
                        p.copy_(torch.where(mask, p * (1.0 - lr * wd), p))
                m.lerp_(grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1**t
                bias_correction2_sqrt = (1.0 - beta2**t) ** 0.5
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                if mask is None:
                    p.addcdiv_(m, denom, value=-lr / bias_correction1)
                else:  # explicit zero outside M (0/0 would be NaN there when eps = 0)
                    p.add_(torch.where(mask, m / denom, torch.zeros_like(m)), alpha=-lr / bias_correction1)
        return loss


class LIFTAdamW(MaskedAdamW):
    """The LIFT optimizer of a recipe (`optim.name: lift`): MaskedAdamW whose masks are the principal
    weights of every 2-D trainable parameter (`lift_mask`), recomputed every `update_interval` optimizer
    steps (the authors: 200). Other parameters (norms, biases) train densely. After a resume the masks
    are recomputed from the loaded weights."""

    def __init__(self, params, filter_rank: int, lora_rank: int, update_interval: int, **adamw):
        super().__init__(params, **adamw)
        self.filter_rank, self.lora_rank, self.update_interval = filter_rank, lora_rank, update_interval
        self.steps_taken = 0
        self.set_masks({p: lift_mask(p.detach(), filter_rank, lora_rank) for p in self._params() if p.dim() == 2})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = super().step(closure)
        self.steps_taken += 1
        if self.steps_taken % self.update_interval == 0:
            self.refresh(self.filter_rank, self.lora_rank)
        return loss
