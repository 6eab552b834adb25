"""ReLIFT / ReGFT interleaved SFT (shared/hybrids.py) on a tiny real Qwen2 policy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from shared.config import HybridConfig, validate_config
from shared.hybrids import HybridSFT, hard_groups, nll_token_mean
from shared.recipe import build_components
from tests.helpers.tiny import tiny_config_dict


def test_hard_groups_by_hand():
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5, 0.2, 0.0, 0.0])
    groups = torch.tensor([7, 7, 8, 8, 9, 9, 3, 3])
    # group 7: nothing above 0.5; 8: one correct; 9: 0.5 is not above the threshold; 3: nothing
    assert hard_groups(rewards, groups, 0.5) == [0, 4, 6]
    assert hard_groups(rewards, groups, 0.4) == [0, 6]
    # any failure: group 8 fails at its second sample; the index is always a failed sample's
    assert hard_groups(rewards, groups, 0.5, any_failure=True) == [0, 3, 4, 6]
    assert hard_groups(rewards, groups, 0.4, any_failure=True) == [0, 3, 5, 6]


def test_nll_token_mean_uses_the_global_token_count():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(nll_token_mean(logp, mask, 3.0)) == pytest.approx(3.5 / 3)
    assert float(nll_token_mean(logp, mask, 6.0)) == pytest.approx(3.5 / 6)  # another process holds 3 more


@pytest.fixture()
def policy_and_reward(tmp_path):
    cfg = validate_config(tiny_config_dict(tmp_path), "t")
    comps = build_components(cfg, Accelerator(cpu=True))
    return comps.policy, comps.reward, comps.task


def _hcfg(**kw):
    return HybridConfig(**{"name": "relift", "sft_batch": 4, "sft_lr": 1e-2, "buffer_size": 6, **kw})


def test_buffer_replaces_older_copies_and_keeps_the_newest(policy_and_reward):
    policy, reward, _ = policy_and_reward
    h = HybridSFT(_hcfg(), policy, reward, 0.5, seed=0)
    h.add([{"prompt": p, "completion": "1"} for p in "abcd"])
    h.add([{"prompt": "b", "completion": "2"}, {"prompt": "e", "completion": "3"}, {"prompt": "f", "completion": "4"}])
    assert [r["prompt"] for r in h.buffer] == ["a", "c", "d", "b", "e", "f"]
    h.add([{"prompt": "g", "completion": "5"}])
    assert [r["prompt"] for r in h.buffer] == ["c", "d", "b", "e", "f", "g"]  # at most 6


def test_sft_step_runs_on_the_newest_batch_and_lowers_their_nll(policy_and_reward):
    policy, reward, task = policy_and_reward
    acc = Accelerator(cpu=True)
    h = HybridSFT(_hcfg(), policy, reward, 0.5, seed=0)
    rows = task.split("train")[:5]
    h.add([dict(r) for r in rows[:3]])
    assert "hybrid/sft_loss" not in h.maybe_step(acc)  # 3 < sft_batch
    h.add([dict(r) for r in rows[3:]])

    def nll(rs):
        with torch.no_grad():
            b = policy.demo_batch(rs)
            return float(nll_token_mean(policy.log_probs(b)[0], b.mask, float(b.mask.sum())))

    newest = rows[1:]
    before, untouched = nll(newest), [p.detach().clone() for p in policy.trainable_parameters()]
    m = h.maybe_step(acc)
    assert m["hybrid/sft_steps"] == 1.0 and m["hybrid/buffer"] == 1.0
    assert m["hybrid/sft_loss"] == pytest.approx(before, rel=1e-4)  # the loss of exactly those 4 demonstrations
    assert [r["prompt"] for r in h.buffer] == [rows[0]["prompt"]]
    assert any(not torch.equal(a, b) for a, b in zip(untouched, policy.trainable_parameters()))
    assert nll(newest) < before
    state = h.state_dict()
    other = HybridSFT(_hcfg(), policy, reward, 0.5, seed=0)
    other.load_state_dict(state)
    assert other.buffer == h.buffer and other.sft_steps == 1


class StartsWith:
    """Accepts a completion iff it starts with `prefix[row]` (a verifier with a known answer)."""

    def __init__(self, accept: bool):
        self.accept, self.seen = accept, []

    def __call__(self, completions, fields, step=None):
        self.seen.append((list(completions), fields))
        ok = [float(self.accept and c.startswith(a[: len(a) // 2])) for c, a in zip(completions, fields["answer"])]
        return SimpleNamespace(total=torch.tensor(ok))


def test_regft_demonstrations_continue_the_hint(policy_and_reward):
    policy, _, task = policy_and_reward
    rows = [dict(r) for r in task.split("train")[:3]]
    accept = StartsWith(True)
    h = HybridSFT(_hcfg(name="regft", hint_frac=0.5, hint_samples=2), policy, accept, 0.5, seed=0)
    demos = h.demonstrations(rows, step=1)
    assert len(demos) == 3
    for d, r in zip(demos, rows):
        hint = r["completion"][: max(1, len(r["completion"]) // 2)]
        assert d["prompt"] == r["prompt"] and d["completion"].startswith(hint)
    texts, fields = accept.seen[0]
    assert len(texts) == 2 * len([r for r in rows if len(r["completion"]) // 2 == len(rows[0]["completion"]) // 2]) \
        or len(accept.seen) > 1
    assert all(len(lst) == len(texts) for lst in fields.values())  # fields aligned with the sampled continuations
    assert h.demonstrations(rows, step=1) == demos  # seeded
    assert HybridSFT(_hcfg(name="regft"), policy, StartsWith(False), 0.5, seed=0).demonstrations(rows, 1) == []


def test_relift_in_the_loop_takes_sft_steps(tmp_path):
    from shared.loop import train

    d = tiny_config_dict(tmp_path, hybrid={"name": "relift", "sft_batch": 2, "sft_lr": 1e-3})
    train(validate_config(d, "t"))
    import json

    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # a random tiny model solves nothing: 4 hard questions per step, one SFT step per RL step
    assert [r["hybrid/sft_steps"] for r in steps] == [1.0, 2.0, 3.0, 4.0]
    assert [r["hybrid/buffer"] for r in steps] == [2.0, 4.0, 6.0, 8.0]


def test_hybrid_config_errors(tmp_path):
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="hybrid.name"):
        validate_config(tiny_config_dict(tmp_path, hybrid={"name": "relift"}, rollout={"source": "offline"},
                                         task={"offline": "demos"}), "t")
    with pytest.raises(ConfigError, match="hybrid.name"):
        validate_config(tiny_config_dict(tmp_path, hybrid={"name": "sft"}), "t")


def test_int_rewrites_a_failed_attempt_from_its_first_wrong_step(tmp_path):
    from llm_rl.tasks.arithmetic import ArithmeticTask, ArithmeticTaskConfig

    cfg = validate_config(tiny_config_dict(tmp_path, task={"format": "scratchpad"}), "t")
    comps = build_components(cfg, Accelerator(cpu=True))
    task = comps.task
    rows = [dict(r) for r in task.split("train")[:3]]
    steps = [r["completion"].split(" ") for r in rows]
    failed = [" ".join(s[:1] + ["9+9=99"] + s[2:]) if len(s) > 2 else "0+0=1 7" for s in steps]

    def accept(completions, fields, step=None):  # every continuation passes: the test is about the prefix kept
        return SimpleNamespace(total=torch.ones(len(completions)))

    h = HybridSFT(_hcfg(name="int", hint_samples=2), comps.policy, accept, 0.5, seed=0, task=task)
    demos = h.demonstrations(rows, step=1, failed=failed)
    assert len(demos) == 3
    for d, f, r in zip(demos, failed, rows):
        keep = f[: task.first_error(f, r)]
        assert keep == (r["completion"].split(" ")[0] + " " if len(r["completion"].split(" ")) > 2 else "")
        assert d["completion"].startswith(keep) and d["prompt"] == r["prompt"]
    with pytest.raises(ValueError, match="task.first_error"):
        HybridSFT(_hcfg(name="int"), comps.policy, accept, 0.5, seed=0, task=object())
    assert isinstance(task, ArithmeticTask) and ArithmeticTaskConfig  # the embedded task implements first_error
