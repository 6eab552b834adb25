"""Every shipped text recipe runs a few steps on a shrunken copy of itself, changes the weights and stays finite."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.config import load_config
from tests.helpers.tiny import ROOT

RECIPES = sorted((ROOT / "configs" / "llm").glob("arithmetic_*.yaml"))
SHRINK = [
    "task.sft_size=20", "task.train_size=64", "task.val_size=8", "task.eval_size=16", "task.hidden_size=32",
    "task.num_layers=1", "task.num_heads=2", "warmup.enabled=false", "rollout.prompts_per_step=4",
    "train.steps=2", "train.grad_accum_steps=2",
    "eval.every=0", "eval.max_prompts=16", "logging.progress=false", "logging.tensorboard=false",
    "logging.plots=false",
    # an untrained model is never exactly right: call "not truncated" verified, so EI and NFT have positives
    "algorithm.positive_threshold=-0.25",
    "rewards=[{name: exact_match, kwargs: {extract: full}}, {name: overlong, weight: 0.5, kwargs: {max_len: 5, cache_len: 3}}]",
]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_a_few_steps(path, tmp_path, monkeypatch):
    import shared.loop as loop

    offline = load_config(path).rollout.source == "offline"  # offline groups keep the data's size
    G = load_config(path).rollout.samples_per_prompt if offline else 4
    cfg = load_config(path, SHRINK + [f"output_dir={tmp_path}", f"rollout.samples_per_prompt={G}",
                                      f"train.micro_batch_size={2 * G}"])
    built = {}

    def build(c, acc):
        built["comps"] = comps = real_build(c, acc)
        built["before"] = [p.detach().clone() for p in comps.policy.trainable_parameters()]
        return comps

    real_build = loop.build_components
    monkeypatch.setattr(loop, "build_components", build)
    summary = loop.train(cfg)
    assert math.isfinite(summary["after"])
    after = built["comps"].policy.trainable_parameters()
    assert any(not torch.equal(b, a.detach().cpu()) for b, a in zip(built["before"], after)), "no weight changed"
    rows = [json.loads(l) for l in (tmp_path / cfg.name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)


def test_recipes_differ_only_in_what_they_name():
    base = load_config(ROOT / "configs/llm/arithmetic_grpo.yaml").algorithm
    dr = load_config(ROOT / "configs/llm/arithmetic_dr_grpo.yaml").algorithm
    gspo = load_config(ROOT / "configs/llm/arithmetic_gspo.yaml").algorithm
    assert (dr.advantage, dr.loss_agg, dr.loss_agg_norm_len) == ("dr_grpo", "seq_mean_token_sum_norm", 7)
    assert (gspo.ratio_level, gspo.eps_low, gspo.eps_high) == ("sequence", 3e-4, 4e-4)
    assert base.advantage == "grpo" and base.ratio_level == "token"
