"""The Policy contract every domain implements (documentation and a typing Protocol).

    module: nn.Module                        the trained module; accelerate wraps it
    unwrap: Callable[[nn.Module], nn.Module] set by the loop to accelerator.unwrap_model
    sample(rows, n, seed, first_sample_id, first_group_id) -> Rollout
                                             n samples per row, no grad; sample ids are global so
                                             sampling is identical for any process layout
    log_probs(rollout, with_entropy, **options) -> (logp [B, T], entropy [B, T] | None[, extras])
                                             per trained step (token or denoising step), with grad;
                                             `options` come from the objective's `forward_options`
                                             (text: `vocab_kl` adds {"vocab_kl": [B, T]}, ASFT;
                                             `residual_lambda`, IFT) and only text policies take them
    reference_log_probs(rollout) -> [B, T]   frozen reference (adapter disabled under LoRA)
    build_reference()                        snapshot the reference (no-op under LoRA)
    complete(rows) -> list                   greedy / deterministic outputs for evaluation
    demo_batch(rows) -> Rollout              teacher-forcing batch of demonstrations (SFT)
    rollout_from(rows, completions, first_group_id) -> Rollout
                                             teacher-forcing rollout of given completions (offline data;
                                             token policies)
    trainable_parameters() -> list[Parameter]
    save_pretrained(path)                    model (or adapter) in the library's own format
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

from shared.rollout import Rollout


class Policy(Protocol):
    module: nn.Module

    def sample(self, rows: list[dict], n: int, seed: int, first_sample_id: int, first_group_id: int) -> Rollout: ...

    def log_probs(self, batch: Rollout, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]: ...

    def reference_log_probs(self, batch: Rollout) -> Tensor: ...

    def build_reference(self) -> None: ...

    def complete(self, rows: list[dict]) -> list[Any]: ...

    def demo_batch(self, rows: list[dict]) -> Rollout: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def save_pretrained(self, path) -> None: ...
