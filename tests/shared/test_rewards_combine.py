"""CombinedReward (shared/rewards.py): weighted sums, failure isolation and counting, spec errors."""

import logging

import pytest
import torch

from shared.config import RewardSpec
from shared.rewards import CombinedReward


def constant(value=1.0):
    """Factory: every completion scores `value`."""
    return lambda completions, **fields: [value] * len(completions)


def length():
    """Factory: score = number of characters."""
    return lambda completions, **fields: [float(len(c)) for c in completions]


def matches():
    """Factory: 1.0 where the completion equals the `answer` field."""
    return lambda completions, answer, **fields: [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def fragile():
    """Factory: raises on any batch holding "boom", else scores 1.0."""

    def fn(completions, **fields):
        if "boom" in completions:
            raise RuntimeError("cannot score boom")
        return [1.0] * len(completions)

    return fn


def echo():
    """Factory: returns the `raw` field as the scores (lets a test choose any return value)."""
    return lambda completions, raw, **fields: list(raw)


def always_one_score():
    """Factory: returns exactly one score whatever the batch size."""
    return lambda completions, **fields: [2.0]


def empty():
    """Factory: returns no scores at all."""
    return lambda completions, **fields: []


def scaled(scale):
    """Factory with a required kwarg."""
    return lambda completions, **fields: [scale] * len(completions)


REGISTRY = {
    "constant": constant,
    "length": length,
    "matches": matches,
    "fragile": fragile,
    "echo": echo,
    "always_one_score": always_one_score,
    "empty": empty,
    "scaled": scaled,
}


def combine(*specs):
    return CombinedReward.from_specs([RewardSpec(**s) for s in specs], registry=REGISTRY)


def test_weighted_sum_exact_values():
    r = combine(
        dict(name="length", weight=0.5),
        dict(name="matches", weight=2.0),
        dict(name="constant", weight=-1.0, kwargs={"value": 0.25}),
    )
    res = r(["ab", "abcd", ""], {"answer": ["ab", "x", ""]})
    # total = 0.5 * len + 2 * match - 0.25
    #   "ab":   0.5*2 + 2*1 - 0.25 = 2.75
    #   "abcd": 0.5*4 + 2*0 - 0.25 = 1.75
    #   "":     0.5*0 + 2*1 - 0.25 = 1.75
    assert res.total.dtype == torch.float32
    assert res.total.tolist() == [2.75, 1.75, 1.75]
    assert res.components["length"].tolist() == [2.0, 4.0, 0.0]  # unweighted
    assert res.components["matches"].tolist() == [1.0, 0.0, 1.0]
    assert res.components["constant"].tolist() == [0.25, 0.25, 0.25]
    assert res.failures == {"length": 0, "matches": 0, "constant": 0}


def test_batch_exception_retried_per_sample(caplog):
    r = combine(dict(name="fragile", failure_value=-3.0), dict(name="constant", weight=1.0))
    with caplog.at_level(logging.WARNING, logger="shared.rewards"):
        res = r(["ok", "boom", "fine"], {})
    # only the bad sample fails; the others keep their scores
    assert res.components["fragile"].tolist() == [1.0, -3.0, 1.0]
    assert res.total.tolist() == [2.0, -2.0, 2.0]
    assert res.failures == {"fragile": 1, "constant": 0}
    assert "fragile" in caplog.text and "cannot score boom" in caplog.text


@pytest.mark.parametrize(
    "raw_value",
    [None, float("nan"), float("inf"), float("-inf"), "not a number", object(), [1.0], "nan"],
)
def test_bad_scores_get_failure_value_and_count(raw_value):
    r = combine(dict(name="echo", weight=2.0, failure_value=-1.0))
    res = r(["a", "b", "c"], {"raw": [0.5, raw_value, 1]})
    assert res.components["echo"].tolist() == [0.5, -1.0, 1.0]
    assert res.total.tolist() == [1.0, -2.0, 2.0]
    assert res.failures == {"echo": 1}


def test_numeric_strings_and_bools_are_accepted():
    # _clean() uses float(): "0.25" and True are numbers to it
    r = combine(dict(name="echo"))
    res = r(["a", "b"], {"raw": ["0.25", True]})
    assert res.components["echo"].tolist() == [0.25, 1.0]
    assert res.failures == {"echo": 0}


def test_wrong_length_return():
    # a batch answer of the wrong length is redone sample by sample
    r = combine(dict(name="always_one_score"))
    res = r(["a", "b", "c"], {})
    assert res.components["always_one_score"].tolist() == [2.0, 2.0, 2.0]
    assert res.failures == {"always_one_score": 0}
    # ... and a sample whose own answer has the wrong length fails
    r = combine(dict(name="empty", failure_value=-0.5))
    res = r(["a", "b"], {})
    assert res.components["empty"].tolist() == [-0.5, -0.5]
    assert res.failures == {"empty": 2}


def test_failure_totals_accumulate_across_calls():
    r = combine(dict(name="fragile"), dict(name="echo"))
    r(["boom", "x"], {"raw": [None, 1.0]})
    r(["boom", "boom", "x"], {"raw": [1.0, float("nan"), float("nan")]})
    r(["x"], {"raw": [1.0]})
    assert r.failure_totals["fragile"] == 3
    assert r.failure_totals["echo"] == 3
    assert r.failure_totals["constant"] == 0


def test_empty_batch():
    r = combine(dict(name="length"))
    res = r([], {})
    assert res.total.shape == (0,)
    assert res.failures == {"length": 0}


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match=r"rewards\[1\]\.name: unknown reward 'lenght'.*did you mean 'length'"):
        combine(dict(name="constant"), dict(name="lenght"))
    with pytest.raises(ValueError, match="unknown reward 'zzz'; known: "):
        combine(dict(name="zzz"))


def test_unknown_name_in_builtin_registry():
    import llm_rl.rewards  # noqa: F401  (registers the built-in rewards)

    with pytest.raises(ValueError, match="did you mean 'exact_match'"):
        CombinedReward.from_specs([RewardSpec(name="exact_mach")])


def test_bad_kwargs_give_clear_error():
    with pytest.raises(ValueError, match=r"rewards\[0\] \(constant\): bad kwargs \{'valu': 2\}"):
        combine(dict(name="constant", kwargs={"valu": 2}))
    with pytest.raises(ValueError, match=r"rewards\[0\] \(scaled\): bad kwargs \{\}"):
        combine(dict(name="scaled"))  # required kwarg missing


def test_factory_validation_error_passes_through():
    import llm_rl.rewards  # noqa: F401

    with pytest.raises(ValueError, match="cache_len"):
        CombinedReward.from_specs([RewardSpec(name="overlong", kwargs={"max_len": 4, "cache_len": 8})])


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="once"):
        combine(dict(name="length"), dict(name="length", weight=2.0))


def test_builtin_rewards_combined():
    import llm_rl.rewards  # noqa: F401

    specs = [
        RewardSpec(name="exact_match", weight=1.0, kwargs={"extract": "answer_tag"}),
        RewardSpec(name="format", weight=0.5),
        RewardSpec(name="overlong", weight=1.0, kwargs={"max_len": 20, "cache_len": 4}),
    ]
    r = CombinedReward.from_specs(specs)
    completions = ["<think>t</think><answer>42</answer>", "<answer>41</answer>", "no tags"]
    res = r(completions, {"answer": ["42", "42", "42"], "completion_length": [10, 18, 30]})
    # exact_match: 1, 0, None->0 (failure); format: 1, 0, 0; overlong: 0, -0.5, -1
    assert res.components["exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert res.components["format"].tolist() == [1.0, 0.0, 0.0]
    assert res.components["overlong"].tolist() == [0.0, -0.5, -1.0]
    assert res.total.tolist() == [1.5, -0.5, -1.0]
    assert res.failures == {"exact_match": 1, "format": 0, "overlong": 0}


def test_start_step_is_a_curriculum_of_weights():
    """A reward with start_step counts in the total only from that RL step (MSRL's two stages); it is
    scored and reported before, and held-out evaluation (step=None) uses the full weights."""
    reg = {"const": constant, "len": length}
    comb = CombinedReward.from_specs([RewardSpec(name="const", weight=2.0),
                                      RewardSpec(name="len", weight=0.5, start_step=3)], reg)
    before, at, full = comb(["abcd"], {}, step=2), comb(["abcd"], {}, step=3), comb(["abcd"], {})
    assert before.total.tolist() == [2.0] and before.components["len"].tolist() == [4.0]
    assert at.total.tolist() == [4.0] and full.total.tolist() == [4.0]
    assert comb.weights(0) == {"const": 2.0, "len": 0.0} and comb.weights(None) == {"const": 2.0, "len": 0.5}
