"""DOTS selection (shared/dots.py) and rollout replay (shared/replay.py, the replay branch of ppo_clip)."""

from __future__ import annotations

import math

import pytest
import torch

from shared.aggregation import StepNorm
from shared.config import AlgorithmConfig
from shared.dots import DOTSSampler, attention_pass_rates, pearson, sample_without_replacement, selection_logits
from shared.objectives import ppo_clip
from shared.replay import BEHAVIOUR, ReplayBuffer, mark_fresh
from shared.rollout import Rollout


# ------------------------------------------------------------------------------------ pure functions

def test_attention_pass_rates_by_hand():
    # query along e1; references e1 (cos 1), e2 (cos 0), -e1 (cos -1); tau 0.5
    q = torch.tensor([[2.0, 0.0]])
    ref = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    p = torch.tensor([0.9, 0.5, 0.1])
    e = [math.exp(1 / 0.5), math.exp(0.0), math.exp(-1 / 0.5)]
    want = sum(w * v for w, v in zip(e, [0.9, 0.5, 0.1])) / sum(e)
    assert float(attention_pass_rates(q, ref, p, 0.5)[0]) == pytest.approx(want, rel=1e-6)
    # a tiny temperature copies the nearest reference's pass rate
    assert float(attention_pass_rates(q, ref, p, 1e-4)[0]) == pytest.approx(0.9)


def test_selection_prefers_pass_rates_near_the_target():
    pred = torch.tensor([0.0, 0.1, 0.45, 0.5, 0.58, 0.9, 1.0])
    logits = selection_logits(pred, 0.5, 1e-3)
    assert logits.tolist() == pytest.approx([-500.0, -400.0, -50.0, 0.0, -80.0, -400.0, -500.0])
    pick = sample_without_replacement(logits, 3, torch.Generator().manual_seed(0))
    assert sorted(pick.tolist()) == [2, 3, 4]  # near-greedy: the three closest to 0.5


def test_gumbel_top_k_first_draw_follows_softmax():
    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)])  # probabilities 1/8, 2/8, 5/8
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(3)
    for _ in range(4000):
        counts[sample_without_replacement(logits, 1, g)[0]] += 1
    torch.testing.assert_close(counts / 4000, torch.tensor([1 / 8, 2 / 8, 5 / 8]), atol=0.025, rtol=0)
    both = sample_without_replacement(logits, 3, g)
    assert sorted(both.tolist()) == [0, 1, 2]  # without replacement


def test_pearson():
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 1, 1]), torch.tensor([3.0, 2, 1])) == 0.0


# ------------------------------------------------------------------------------------ the sampler

class CategoryProbe:
    """Prompts of category c have pass rate RATES[c] and embedding one_hot(c) (a probe with known answers)."""

    RATES = [0.0, 0.5, 1.0, 0.25]

    def __init__(self):
        self.measured: list[list[int]] = []

    def embed(self, rows):
        return torch.nn.functional.one_hot(torch.tensor([r["c"] for r in rows]), 4).float()

    def pass_rates(self, rows, n, step, draw):
        self.measured.append([r["c"] for r in rows])
        return torch.tensor([self.RATES[r["c"]] for r in rows])


ROWS = [{"c": i % 4, "prompt": str(i)} for i in range(200)]


def test_dots_selects_prompts_predicted_near_half():
    s = DOTSSampler(ROWS, batch_size=8, seed=0, every=2, reference=40, rollouts=4, attention_tau=0.05)
    probe = CategoryProbe()
    s.prepare(1, probe)
    assert len(probe.measured) == 1 and len(probe.measured[0]) == 40
    batch = s.next_batch()
    s.prepare(2, probe)  # not a re-estimation step while the queue lasts
    assert len(probe.measured) == 1
    batch += s.next_batch()
    assert {ROWS[i]["c"] for i in batch} == {1}  # the category at pass rate 0.5
    assert len(set(batch)) == 16  # without replacement
    s.prepare(3, probe)
    assert len(probe.measured) == 2
    m = s.metrics()
    assert m["sampler/dots_pred_corr"] == pytest.approx(1.0) and m["sampler/dots_pred_mae"] == pytest.approx(0.0, abs=1e-6)
    assert {ROWS[i]["c"] for i in s.next_batch(5)} == {1}
    # used prompts are not chosen again: the 50 prompts of category 1 run out, then 0.25 is the closest
    for step in range(4, 12):
        s.prepare(step, probe)
        s.next_batch()
    assert len([i for i in range(200) if s.used[i] and ROWS[i]["c"] == 1]) == 50
    assert any(ROWS[i]["c"] == 3 for i in range(200) if s.used[i])


def test_dots_state_round_trip_continues_exactly():
    a = DOTSSampler(ROWS, batch_size=8, seed=4, every=2, reference=20, attention_tau=0.5)
    pa = CategoryProbe()
    for step in (1, 2, 3):
        a.prepare(step, pa)
        a.next_batch()
    b = DOTSSampler(ROWS, batch_size=8, seed=4, every=2, reference=20, attention_tau=0.5)
    b.load_state_dict(a.state_dict())
    pb = CategoryProbe()
    for step in (4, 5, 6, 7):
        a.prepare(step, pa)
        b.prepare(step, pb)
        assert a.next_batch() == b.next_batch()
        assert a.metrics() == b.metrics()


def test_dots_before_any_estimate_draws_uniformly_without_repeats():
    s = DOTSSampler(ROWS[:10], batch_size=4, seed=0)
    seen = s.next_batch() + s.next_batch()
    assert len(set(seen)) == 8
    rest = s.next_batch()  # 2 unused left, then a new epoch
    assert len(rest) == 4 and set(seen[:0]) <= set(range(10))


# ------------------------------------------------------------------------------------ replay loss

def _cfg(**kw):
    return AlgorithmConfig(**{"eps_low": 0.2, "eps_high": 0.2, **kw})


def test_replay_loss_by_hand():
    """L_t = max(-A r, -A clip(r, r_old (1-eps), r_old (1+eps))), r = pi/mu, r_old = pi_old/mu; token mean."""
    logp = torch.tensor([[math.log(0.5), math.log(0.9)], [math.log(0.2), math.log(0.3)]], requires_grad=True)
    old = torch.log(torch.tensor([[0.4, 0.6], [0.25, 0.3]]))
    mu = torch.log(torch.tensor([[0.2, 0.5], [0.5, 0.3]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 2)
    loss, m = ppo_clip(logp, old, None, adv, mask, _cfg(), StepNorm(4, 2, 2), behaviour_logp=mu)
    want = 0.0
    for i in range(2):
        for t in range(2):
            r, r_old, a = math.exp(logp[i, t].item() - mu[i, t]), math.exp(old[i, t] - mu[i, t]), float(adv[i])
            want += max(-a * r, -a * min(max(r, r_old * 0.8), r_old * 1.2)) / 4
    assert float(loss) == pytest.approx(want, rel=1e-6)
    # e.g. sample 0 token 0: r = 2.5, r_old = 2 -> clipped at 2.4 for A > 0
    loss.backward()
    assert logp.grad[0, 0] == 0.0  # the clipped token gives no gradient


def test_replay_loss_with_nan_behaviour_is_the_plain_surrogate():
    torch.manual_seed(0)
    logp, old = torch.randn(3, 4) * 0.1 - 1, torch.randn(3, 4) * 0.1 - 1
    adv, mask = torch.randn(3), (torch.rand(3, 4) > 0.2).float()
    norm = StepNorm(float(mask.sum()), 3.0, 4.0)
    for kw in ({}, {"ratio_level": "sequence"}):
        plain, pm = ppo_clip(logp, old, None, adv, mask, _cfg(**kw), norm)
        nan = torch.full((3, 4), float("nan"))
        fresh, fm = ppo_clip(logp, old, None, adv, mask, _cfg(**kw), norm, behaviour_logp=nan)
        assert float(plain) == pytest.approx(float(fresh), rel=1e-6)
        assert {k: float(v) for k, v in pm.items()} == pytest.approx({k: float(v) for k, v in fm.items()})
        # mu = pi_old gives the same loss as the on-policy case
        same, _ = ppo_clip(logp, old, None, adv, mask, _cfg(**kw), norm, behaviour_logp=old.clone())
        assert float(same) == pytest.approx(float(plain), rel=1e-6)


# ------------------------------------------------------------------------------------ the buffer

def _groups(first_gid: int, n_groups: int, G: int = 2, T: int = 3) -> Rollout:
    B = n_groups * G
    r = Rollout(inputs={"input_ids": torch.arange(B * (T + 2)).view(B, T + 2),
                        "attention_mask": torch.ones(B, T + 2, dtype=torch.long)},
                mask=torch.ones(B, T), group_ids=torch.arange(first_gid, first_gid + n_groups).repeat_interleave(G),
                rewards=torch.arange(B, dtype=torch.float32), completions=[str(i) for i in range(B)],
                rows=[{"i": i} for i in range(B)])
    return mark_fresh(r)


def test_buffer_keeps_newest_copy_per_prompt_and_trims_fifo():
    buf = ReplayBuffer(capacity=3, seed=0)
    buf.add(_groups(0, 2), torch.zeros(4, 3), keys=[10, 11])
    buf.add(_groups(2, 2), torch.ones(4, 3), keys=[11, 12])  # prompt 11 again: the older copy goes
    assert [k for k, _ in buf.groups] == [10, 11, 12]
    assert buf.groups[1][1].group_ids.tolist() == [2, 2]
    assert torch.equal(buf.groups[1][1].extras[BEHAVIOUR], torch.ones(2, 3))
    assert buf.groups[0][1].old_logp is None and buf.groups[0][1].advantages is None
    buf.add(_groups(4, 1), torch.full((2, 3), 2.0), keys=[13])
    assert [k for k, _ in buf.groups] == [11, 12, 13]  # oldest trimmed


def test_buffer_draws_are_seeded_and_shares_partition_the_draw():
    buf = ReplayBuffer(capacity=8, seed=5)
    buf.add(_groups(0, 6), torch.zeros(12, 3), keys=list(range(6)))
    whole = buf.draw(4, step=7)
    assert torch.equal(whole.group_ids, buf.draw(4, step=7).group_ids)
    halves = [buf.draw(4, step=7, rank=k, world=2) for k in range(2)]
    assert torch.cat([h.group_ids for h in halves]).tolist() == whole.group_ids.tolist()
    assert len(set(whole.group_ids.tolist())) == 4
    with pytest.raises(ValueError, match="cannot draw"):
        buf.draw(7, step=1)
    state = buf.state_dict()
    other = ReplayBuffer(capacity=8, seed=5)
    other.load_state_dict(state)
    assert torch.equal(other.draw(4, step=7).inputs["input_ids"], whole.inputs["input_ids"])


def test_replay_config_errors():
    from shared.config import ConfigError, validate_config
    from tests.helpers.tiny import tiny_config_dict

    with pytest.raises(ConfigError, match="rollout.replay_buffer"):
        validate_config(tiny_config_dict(__import__("pathlib").Path("/tmp"), rollout={"replay_buffer": 4},
                                         algorithm={"objective": "nft"}), "t")
    with pytest.raises(ConfigError, match="rollout.replay_buffer"):
        validate_config(tiny_config_dict(__import__("pathlib").Path("/tmp"),
                                         rollout={"replay_buffer": 4, "dynamic_sampling": True}), "t")
