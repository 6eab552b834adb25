"""The GPU recipe for a real checkpoint runs end-to-end with a tiny model substituted by overrides.

The tiny Qwen2 and its tokenizer (with a chat template) are saved with `save_pretrained` and loaded
back by the recipe through AutoModelForCausalLM / AutoTokenizer, so the real loading code runs.
"""

from __future__ import annotations

import json
import math

import pytest

from llm_rl.tasks.arithmetic import ArithmeticTaskConfig, build_model, build_tokenizer
from shared.config import load_config
from tests.helpers.tiny import ROOT

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


@pytest.mark.parametrize("recipe, rewards", [
    ("qwen2.5_math_grpo", "[{name: math_verify}, {name: overlong, weight: 0.5, kwargs: {max_len: 4, cache_len: 2}}]"),
    ("qwen2.5_math_rlsp", None),  # the recipe's own rewards: verifier + exploration
])
def test_qwen_math_config_runs_with_tiny_model(tmp_path, recipe, rewards):
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model = build_model(ArithmeticTaskConfig(hidden_size=32, num_layers=1, num_heads=2), tok)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for split, n in (("train", 16), ("test", 8)):
        rows = [{"prompt": f"{i}+{i + 1}", "answer": str(2 * i + 1)} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(ROOT / f"configs/llm/{recipe}.yaml", [
        f"model.name_or_path={tmp_path / 'model'}", "model.dtype=float32", "model.gradient_checkpointing=true",
        f"task.train_path={tmp_path / 'train.jsonl'}", f"task.eval_path={tmp_path / 'test.jsonl'}",
        "task.prompt_template='{prompt}'", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=4", "train.steps=2", "train.micro_batch_size=4", "train.grad_accum_steps=2",
        "train.mixed_precision=no", "eval.every=0", "eval.max_prompts=8", "checkpoint.every=0",
        f"output_dir={tmp_path / 'runs'}", "logging.progress=false", "optim.warmup_steps=0",
    ] + ([f"rewards={rewards}"] if rewards else []))
    from shared.loop import train

    summary = train(cfg)
    assert math.isfinite(summary["before"]) and math.isfinite(summary["after"])
    rows = [json.loads(l) for l in (tmp_path / "runs" / cfg.name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl_ref"]) for r in steps)
    assert "reward/math_verify" in steps[0] and "reward_failures/math_verify" in steps[0]
    if rewards is None:
        assert "reward/exploration" in steps[0]
