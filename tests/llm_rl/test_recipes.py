"""Every shipped text recipe runs a few RL steps on a shrunken copy of itself and stays finite."""

from __future__ import annotations

import json
import math

import pytest

from shared.config import load_config
from tests.helpers.tiny import ROOT

RECIPES = sorted((ROOT / "configs" / "llm").glob("arithmetic_*.yaml"))
SHRINK = [
    "task.sft_size=20", "task.train_size=64", "task.val_size=8", "task.eval_size=16", "task.hidden_size=32",
    "task.num_layers=1", "task.num_heads=2", "warmup.enabled=false", "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4", "train.steps=2", "train.micro_batch_size=4", "train.grad_accum_steps=2",
    "eval.every=0", "eval.max_prompts=16", "logging.progress=false", "logging.tensorboard=false",
    "logging.plots=false",
    "rewards=[{name: exact_match, kwargs: {extract: full}}, {name: overlong, weight: 0.5, kwargs: {max_len: 5, cache_len: 3}}]",
]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_a_few_steps(path, tmp_path):
    from shared.loop import train

    cfg = load_config(path, SHRINK + [f"output_dir={tmp_path}"])
    summary = train(cfg)
    assert math.isfinite(summary["after"])
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
