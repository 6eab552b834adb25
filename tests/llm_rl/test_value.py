"""A-LoL value head (llm_rl/value.py): masked attention pooling, the cap at 1, prompt states from a
tiny Qwen2 policy, fitting with best-holdout selection, the baseline V(x)."""

from __future__ import annotations

import pytest
import torch

from llm_rl.policy import CausalLMPolicy
from llm_rl.tasks.arithmetic import (
    ArithmeticTask,
    ArithmeticTaskConfig,
    build_model,
    build_tokenizer,
)
from llm_rl.value import ValueHead, fit_value_head, prompt_states, value_baseline

CFG = ArithmeticTaskConfig(digits=2, hidden_size=32, num_layers=1, num_heads=2, sft_size=10, train_size=20,
                           val_size=8, eval_size=8)


@pytest.fixture(scope="module")
def policy():
    tok = build_tokenizer()
    torch.manual_seed(0)
    return CausalLMPolicy(build_model(CFG, tok), tok, max_new_tokens=4)


def _head(H=8, max_value=1.0, seed=0):
    torch.manual_seed(seed)
    head = ValueHead(H, max_value)
    with torch.no_grad():
        head.query.normal_()  # a non-trivial query, so the softmax weights differ across positions
    return head


def test_masked_positions_do_not_matter_and_all_masked_row_is_finite():
    head = _head(max_value=None)
    states = torch.randn(3, 5, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    out = head(states, mask)
    altered = states.clone()
    altered[mask == 0] = 1e3 * torch.randn_like(altered[mask == 0])
    out2 = head(altered, mask)
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    assert torch.equal(out[:2], out2[:2])
    assert torch.equal(out[2], out2[2])  # the all-masked row ignores its states entirely
    # changing a real position does change the value
    altered[0, 3] += 1.0
    assert not torch.equal(head(altered, mask)[0], out[0])


def test_max_value_caps_the_output_and_gradient_flows_below_the_cap():
    capped, free = _head(max_value=1.0), _head(max_value=None)
    for h in (capped, free):
        with torch.no_grad():
            h.mlp[-1].bias.fill_(5.0)
    free.load_state_dict(capped.state_dict())
    states, mask = torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.long)
    assert (capped(states, mask) == 1.0).all()
    assert (free(states, mask) > 1.0).all()
    below = _head(max_value=1.0)
    with torch.no_grad():
        below.mlp[-1].bias.fill_(-5.0)
    below(states, mask).sum().backward()
    assert below.mlp[-1].bias.grad.abs().item() > 0


def test_prompt_states_shapes_and_left_padding_only_through_the_mask(policy):
    module = policy.unwrap(policy.module)
    module.train()
    rows = [{"prompt": "1+2="}, {"prompt": "34+58="}]
    states, mask = prompt_states(module, policy, rows)
    assert module.training  # mode restored
    assert states.dtype == torch.float32 and states.shape == (2, 6, CFG.hidden_size)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    alone, alone_mask = prompt_states(module, policy, rows[:1])
    assert alone.shape == (1, 4, CFG.hidden_size) and alone_mask.all()
    torch.testing.assert_close(states[0, 2:], alone[0], atol=1e-5, rtol=0)
    module.eval()
    prompt_states(module, policy, rows)
    assert not module.training


def _synthetic(seed=0, N=200, L=4, H=16):
    """Gaussian 'prompt states', left-padded; the last real position carries an end-of-prompt marker (as
    the '=' token's state does in a real LM) and the target is a step function of its first feature."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(N, L, H, generator=g)
    states[:, :, 0] *= 3.0
    states[:, -1, 1] = 16.0
    mask = torch.ones(N, L, dtype=torch.long)
    for i in range(N):
        mask[i, : i % 3] = 0
    return states, mask, (states[:, -1, 0] > 0).float()


def test_fit_value_head_learns_the_prompt_function_and_is_deterministic():
    states, mask, targets = _synthetic()
    head, rec = fit_value_head(states, mask, targets, lr=1e-2, epochs=30, seed=0)
    assert rec["n"] == 200 and rec["epochs"] == 30 and rec["n_holdout"] == 40
    assert rec["holdout_mse_best"] <= rec["holdout_mse_first"]
    assert rec["holdout_mse_best"] < 0.5 * targets.var().item()
    assert 0 <= rec["best_epoch"] <= 30
    assert rec["target_mean"] == pytest.approx(targets.mean().item())
    assert not head.training and not any(p.requires_grad for p in head.parameters())
    # the returned head is the best checkpoint: its MSE on all rows is near the holdout best, far below variance
    with torch.no_grad():
        assert (head(states, mask) - targets).pow(2).mean().item() < 0.5 * targets.var().item()
    _, rec2 = fit_value_head(states, mask, targets, lr=1e-2, epochs=30, seed=0)
    assert rec2 == rec
    _, rec3 = fit_value_head(states, mask, targets, lr=1e-2, epochs=30, seed=1)
    assert rec3 != rec


def test_fit_value_head_single_row_keeps_the_best_epoch_not_the_last():
    states, mask, _ = _synthetic(N=1)
    target = torch.tensor([0.5])
    # with one row, fit and holdout are that row; AdamW at this lr overshoots after reaching the target
    head, rec = fit_value_head(states, mask, target, epochs=12, lr=3e-2)
    assert rec["n"] == 1 and rec["n_holdout"] == 1
    assert 0 < rec["best_epoch"] < 12
    with torch.no_grad():
        assert (head(states, mask) - target).pow(2).item() == pytest.approx(rec["holdout_mse_best"], rel=1e-5, abs=1e-9)
    states, mask, targets = _synthetic(N=2)
    _, rec = fit_value_head(states, mask, targets, epochs=1, holdout_frac=0.0)
    assert rec["n_holdout"] == 1


def test_value_baseline_on_policy_prompts(policy):
    rows = ArithmeticTask(CFG).split("val")
    module = policy.unwrap(policy.module)
    states, mask = prompt_states(module, policy, rows)
    rewards = torch.linspace(0, 1, len(rows))
    head, _ = fit_value_head(states, mask, rewards, epochs=2, lr=1e-3)
    v = value_baseline(head, module, policy, rows, batch_size=3)  # batches of different padded lengths
    assert v.shape == (len(rows),) and v.dtype == torch.float32 and v.device.type == "cpu"
    assert torch.isfinite(v).all() and (v <= 1.0).all()
    with torch.no_grad():
        torch.testing.assert_close(v, head(states, mask), atol=1e-5, rtol=0)
    assert value_baseline(head, module, policy, rows[:0]).shape == (0,)


@pytest.mark.parametrize("kwargs, match", [
    ({"states": torch.zeros(4, 3)}, "states must be"),
    ({"states": torch.zeros(0, 3, 8), "mask": torch.zeros(0, 3), "targets": torch.zeros(0)}, "N == 0"),
    ({"mask": torch.ones(4, 2)}, "mask shape"),
    ({"targets": torch.zeros(3)}, "targets shape"),
    ({"epochs": 0}, "epochs must be"),
    ({"holdout_frac": 1.0}, "holdout_frac"),
])
def test_bad_inputs_raise(kwargs, match):
    args = {"states": torch.zeros(4, 3, 8), "mask": torch.ones(4, 3), "targets": torch.zeros(4)}
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_value_head(args["states"], args["mask"], args["targets"], **extra)
