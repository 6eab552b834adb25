"""Tiny configs and models shared by the loop tests."""

from __future__ import annotations

import copy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tiny_config_dict(tmp_path: Path, **over) -> dict:
    d = {
        "name": "tiny",
        "domain": "llm",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "embedded"},
        "task": {"name": "arithmetic", "digits": 2, "sft_size": 20, "train_size": 40, "val_size": 8,
                 "eval_size": 16, "hidden_size": 32, "num_layers": 1, "num_heads": 2},
        # exact match rarely fires for a random model; the length shaping gives every group a signal
        "rewards": [{"name": "exact_match", "kwargs": {"extract": "full"}},
                    {"name": "overlong", "weight": 0.5, "kwargs": {"max_len": 3, "cache_len": 2}}],
        "warmup": {"enabled": False, "cache_dir": str(tmp_path / "cache")},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 3, "temperature": 1.0},
        "algorithm": {"advantage": "grpo", "beta": 0.04, "loss_agg": "token_mean", "epochs": 1},
        "optim": {"lr": 1e-2, "schedule": "linear", "max_grad_norm": 1.0},
        "train": {"steps": 4, "micro_batch_size": 4, "grad_accum_steps": 2},
        "eval": {"every": 0, "max_prompts": 16, "batch_size": 16},
        "checkpoint": {"every": 2, "keep_last": 3},
        "logging": {"progress": False, "tensorboard": True, "plots": True},
    }
    return merge(d, over)


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def crash_on_sample(monkeypatch, at: int = 3) -> None:
    """Make the next `train` raise KeyboardInterrupt at its `at`-th rollout (a simulated crash mid-run)."""
    import shared.loop as loop

    real_build = loop.build_components

    def build(cfg, acc):
        comps = real_build(cfg, acc)
        real_sample, calls = comps.policy.sample, {"n": 0}

        def sample(*a, **k):
            calls["n"] += 1
            if calls["n"] == at:
                raise KeyboardInterrupt("simulated crash")
            return real_sample(*a, **k)

        comps.policy.sample = sample
        return comps

    monkeypatch.setattr(loop, "build_components", build)
