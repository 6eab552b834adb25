"""AceReason's temperature rule on a tiny Qwen2: probe entropies, the choice, and the loop wiring."""

from __future__ import annotations

import pytest

from shared.config import validate_config
from tests.helpers.tiny import tiny_config_dict


def _policy(tmp_path):
    from accelerate import Accelerator

    from shared.recipe import build_components

    comps = build_components(validate_config(tiny_config_dict(tmp_path), "test"), Accelerator(cpu=True))
    return comps.policy, comps.task.split("train")[:8]


def test_entropy_rises_with_temperature_and_the_closest_is_chosen(tmp_path):
    from shared.temperature import choose_temperature, probe_entropy

    policy, rows = _policy(tmp_path)
    ents = [probe_entropy(policy, rows, t, 4, seed=0) for t in (0.3, 1.0, 3.0)]
    assert ents[0] < ents[1] < ents[2]
    target = ents[1]  # closest to T = 1.0 among the candidates
    out = choose_temperature(policy, rows, target, [0.3, 1.0, 3.0], n=4, seed=0)
    assert out["temperature"] == 1.0 and [p["entropy"] for p in out["probe"]] == pytest.approx(ents)
    assert policy.temperature == policy.unwrap(policy.module).temperature == 1.0


def test_the_loop_applies_the_probed_temperature_before_the_reference(tmp_path):
    from shared.loop import train

    d = tiny_config_dict(tmp_path, rollout={"target_entropy": 1e-3, "temperature_candidates": [0.25, 2.0],
                                            "probe_prompts": 4}, train={"steps": 1})
    summary = train(validate_config(d, "test"))
    assert summary["temperature"]["temperature"] == 0.25  # the lower temperature has the lower entropy
    assert len(summary["temperature"]["probe"]) == 2
