"""The SFT warm-up's stopping rule (shared/sft.py): patience counts only once validation has improved on the
starting model's score, and the best weights are the ones kept."""

from __future__ import annotations

import pytest
import torch

from llm_rl.policy import CausalLMPolicy
from llm_rl.tasks.arithmetic import ArithmeticTask, ArithmeticTaskConfig, build_model, build_tokenizer
from shared.config import WarmupConfig
from shared.sft import run_sft

CFG = dict(digits=1, hidden_size=16, num_layers=1, num_heads=2, sft_size=8, train_size=4, val_size=2, eval_size=2)


class ScriptedValidation(ArithmeticTask):
    """The real task (demonstrations, prompts, greedy decoding), with each validation pass scored from a script:
    the i-th evaluation gives every row `scores[i]`."""

    def __init__(self, scores: list[float]):
        super().__init__(ArithmeticTaskConfig(**CFG))
        self.scores, self.calls = scores, 0

    def score(self, completions, rows):
        value = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return [value] * len(completions)


def _run(scores: list[float], max_steps: int = 12, patience: int = 2) -> tuple[dict, CausalLMPolicy]:
    torch.manual_seed(0)
    tok = build_tokenizer()
    policy = CausalLMPolicy(build_model(ArithmeticTaskConfig(**CFG), tok), tok, max_new_tokens=3)
    wcfg = WarmupConfig(enabled=True, max_steps=max_steps, batch_size=4, lr=1e-3, warmup_steps=0, eval_every=1,
                        patience=patience)
    return run_sft(policy, ScriptedValidation(scores), wcfg, seed=0, log=lambda _: None), policy


@pytest.mark.parametrize("scores, steps_run, best_step", [
    # evaluation 0 is the starting model; no improvement for 5 evaluations, then one, then 2 without: stop at 8
    ([0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5], 8, 6),
    # an improvement at once: patience 2 stops at step 3
    ([0, 0.5, 0.4, 0.5, 0.9], 3, 1),
    # never better than the start: runs to max_steps and keeps the starting weights
    ([0.3, 0.3, 0.1, 0.2], 12, 0),
])
def test_patience_counts_from_the_first_improvement(scores, steps_run, best_step):
    record, _ = _run(scores)
    assert record["steps_run"] == steps_run and record["best_step"] == best_step
    assert [s for s, _ in record["history"]] == list(range(steps_run + 1))


def test_the_best_weights_are_kept():
    record, policy = _run([0, 0.9, 0.1, 0.1], max_steps=3, patience=5)
    assert record["best_step"] == 1 and record["steps_run"] == 3
    _, one_step = _run([0, 0.9], max_steps=1, patience=5)  # the same start and first batch, one step
    for (name, a), b in zip(policy.module.state_dict().items(), one_step.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
