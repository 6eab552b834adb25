"""End-to-end tests of the RL loop on the embedded task with a tiny Qwen2 (CPU, seconds each)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shared.config import validate_config
from tests.helpers.tiny import ROOT, crash_on_sample, tiny_config_dict

TIMING_KEYS = ("step_seconds", "tokens_per_s/sample", "tokens_per_s/train")


def _train(d: dict):
    from shared.loop import train

    return train(validate_config(d, "test"))


def _weights(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors")


def _metrics(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_quickstart_smoke_changes_parameters_and_logs_finite_metrics(tmp_path):
    d = tiny_config_dict(tmp_path)
    summary = _train(d)
    run_dir = tmp_path / "runs" / "tiny"
    assert set(summary) >= {"metric", "higher_is_better", "before", "after", "seed", "wall_seconds"}
    assert json.loads((run_dir / "summary.json").read_text())["after"] == summary["after"]
    # parameters changed relative to the initial model (same seed -> same initialisation)
    from accelerate.utils import set_seed
    from llm_rl.tasks.arithmetic import ArithmeticTaskConfig, build_model, build_tokenizer

    set_seed(d["seed"])
    init = build_model(ArithmeticTaskConfig(**d["task"]), build_tokenizer()).state_dict()
    final = _weights(run_dir, 4)
    changed = [k for k in final if not torch.equal(final[k], init[k])]
    assert len(changed) > len(final) // 2
    rows = _metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for k in ("loss", "reward/total", "kl_ref", "entropy", "clip_frac_low", "grad_norm", "lr", "completion_len_mean"):
            assert r[k] is not None and math.isfinite(r[k]), (k, r)
    assert (run_dir / "metrics.png").stat().st_size > 0
    assert any((run_dir / "tensorboard").iterdir())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["algorithm"]["beta"] == 0.04 and saved["task"]["digits"] == 2


SAMPLERS = {"uniform": {"name": "uniform"}, "sec": {"name": "sec"},
            "mixture": {"name": "mixture", "weights": {"add": 1.0}}}  # arithmetic rows' dataset is "add"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, sampler):
    sampler = SAMPLERS[sampler]
    full = tiny_config_dict(tmp_path, name="full", sampler=sampler)
    _train(full)

    crash = tiny_config_dict(tmp_path, name="crash", sampler=sampler)
    crash_on_sample(monkeypatch, at=3)
    with pytest.raises(KeyboardInterrupt):
        _train(crash)
    monkeypatch.undo()
    crash_dir = tmp_path / "runs" / "crash"
    assert [p.name for p in (crash_dir / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_000002"]
    _train(tiny_config_dict(tmp_path, name="crash", checkpoint={"resume": True}, sampler=sampler))

    a, b = _weights(tmp_path / "runs" / "full", 4), _weights(crash_dir, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _metrics(tmp_path / "runs" / "full") == _metrics(crash_dir)


def test_checkpoint_roundtrip_from_pretrained(tmp_path):
    from transformers import Qwen2ForCausalLM

    _train(tiny_config_dict(tmp_path, train={"steps": 2}))
    path = tmp_path / "runs" / "tiny" / "checkpoints" / "step_000002" / "model"
    model = Qwen2ForCausalLM.from_pretrained(path)
    saved = load_file(path / "model.safetensors")
    for k, v in model.state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k])
    assert not list(path.parent.parent.glob(".tmp-*"))  # no temporary leftovers


def test_lora_run_trains_only_the_adapter(tmp_path):
    d = tiny_config_dict(tmp_path, model={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
                         train={"steps": 2})
    summary = _train(d)
    adapter = tmp_path / "runs" / "tiny" / "checkpoints" / "step_000002" / "model"
    assert (adapter / "adapter_model.safetensors").exists()
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)
    assert math.isfinite(summary["after"])


def test_multi_epoch_and_several_optimizer_steps_per_rollout(tmp_path):
    d = tiny_config_dict(tmp_path, algorithm={"epochs": 2, "beta": 0.0, "advantage": "dr_grpo",
                                              "loss_agg": "seq_mean_token_sum_norm"},
                         train={"steps": 2, "micro_batch_size": 2, "grad_accum_steps": 2})
    _train(d)
    rows = [r for r in _metrics(tmp_path / "runs" / "tiny") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["kl_old"]) for r in rows)
    assert rows[-1]["kl_old"] > 0  # later updates see a policy that moved away from the sampler


def test_warmup_is_cached_and_reused(tmp_path):
    d = tiny_config_dict(tmp_path, warmup={"enabled": True, "max_steps": 20, "eval_every": 10, "patience": 2,
                                           "batch_size": 8, "lr": 1e-3}, train={"steps": 2})
    s1 = _train(d)
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "warmup.json").exists()
    stamp = (caches[0] / "warmup.json").stat().st_mtime_ns
    s2 = _train(tiny_config_dict(tmp_path, name="again", warmup=d["warmup"], train={"steps": 2}))
    assert (caches[0] / "warmup.json").stat().st_mtime_ns == stamp  # reused, not recomputed
    assert s1["before"] == s2["before"]


def _free_port() -> int:
    """A port nobody listens on now (a fixed port can still be held by a previous run's store)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DIST_SCRIPT = """
import json, sys, torch
from accelerate import Accelerator
from shared.config import validate_config
from shared.loop import train
cfg = validate_config(json.load(open(sys.argv[1])), "dist")
acc = Accelerator(cpu=True)
train(cfg, acc)
acc.end_training()  # destroy the process group before exit, as the CLI does
"""


# Equal-step checks between process layouts use Adam with eps = 1e-4. With the default 1e-8, Adam's first
# steps are ~lr * sign(g), so an element whose gradient is ~1e-8 (e.g. a key bias, which shifts every attention
# logit of a query almost alike) turns reduction-order rounding of its gradient (2 processes sum in another order)
# into a weight difference of a sizeable fraction of lr. With eps = 1e-4 a gradient difference dg moves a weight
# by at most lr * dg / eps, so equal steps must agree to 1e-6 everywhere.
EQUAL_STEP_OPTIM = {"optim": {"eps": 1e-4}}  # merged into the tiny config's optim section


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def assert_same_run(tmp_path, keys: tuple[str, ...], weights=_weights) -> None:
    """Runs "one" and "two" end with the same weights after 2 steps and logged the same step metrics; the
    gradient norm (before clipping) catches a loss scaled by the process count, which Adam would hide."""
    assert_same_weights(weights(tmp_path / "runs" / "one", 2), weights(tmp_path / "runs" / "two", 2))
    ma = [r for r in _metrics(tmp_path / "runs" / "one") if "loss" in r]
    mb = [r for r in _metrics(tmp_path / "runs" / "two") if "loss" in r]
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb):
        for k in (*keys, "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_two_process_run_equals_one_process(tmp_path):
    """2 processes (gloo) with half the micro-batches each take the same optimizer steps as 1 process."""
    common = {"checkpoint": {"every": 0}, **EQUAL_STEP_OPTIM}
    _train(tiny_config_dict(tmp_path, name="one", train={"steps": 2, "micro_batch_size": 8, "grad_accum_steps": 2},
                            **common))
    _launch_two(tmp_path, tiny_config_dict(tmp_path, name="two", train={"steps": 2, "micro_batch_size": 4,
                                                                          "grad_accum_steps": 2}, **common))
    assert_same_run(tmp_path, ("reward/total", "loss", "kl_ref", "completion_len_mean"))


def test_rlft_eval_of_final_checkpoint_reproduces_summary(tmp_path):
    from shared.cli import main

    # a short warm-up on 1-digit addition gives a model whose accuracy is far from a fresh one's,
    # so evaluating the checkpoint can only reproduce `after` if its weights were really loaded
    d = tiny_config_dict(tmp_path, task={"digits": 1, "sft_size": 25, "train_size": 10, "val_size": 5, "eval_size": 10},
                         warmup={"enabled": True, "max_steps": 300, "eval_every": 100, "patience": 3, "batch_size": 25,
                                 "lr": 3e-3, "warmup_steps": 10},
                         train={"steps": 2}, optim={"lr": 1e-4})
    summary = _train(d)
    assert summary["after"] >= 0.2, summary
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "step_000002"
    assert main(["eval", str(cfg_path), f"checkpoint={ckpt}"]) == 0
    result = json.loads((ckpt / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["n"] == 10
    assert result["value"] == summary["after"]  # greedy decoding of the same weights
    # the same config without the warm-up or a checkpoint evaluates a fresh model: different result
    cfg_path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, task=d["task"], train={"steps": 2})))
    assert main(["eval", str(cfg_path)]) == 0
    fresh = json.loads((tmp_path / "runs" / "tiny" / "eval.json").read_text())
    assert fresh["value"] < summary["after"]


def _launch_two(tmp_path, d: dict) -> None:
    (tmp_path / f"{d['name']}.json").write_text(json.dumps(d))
    (tmp_path / "dist.py").write_text(DIST_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(tmp_path / "dist.py"), str(tmp_path / f"{d['name']}.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[:4000] + "\n...\n" + proc.stderr[-1500:] + "\nSTDOUT:\n" + proc.stdout[-2000:]


@pytest.mark.slow
def test_two_process_offline_dpo_equals_one_process(tmp_path):
    """Offline pairs split over 2 processes take the same DPO steps as 1 process."""
    common = {"task": {"offline": "pairs"}, "rollout": {"source": "offline", "samples_per_prompt": 2},
              "algorithm": {"objective": "dpo", "beta": 0.1, "advantage": "none"}, "checkpoint": {"every": 0},
              **EQUAL_STEP_OPTIM}
    _train(tiny_config_dict(tmp_path, name="one", train={"steps": 2, "micro_batch_size": 4, "grad_accum_steps": 2}, **common))
    _launch_two(tmp_path, tiny_config_dict(tmp_path, name="two", train={"steps": 2, "micro_batch_size": 2,
                                                                          "grad_accum_steps": 2}, **common))
    assert_same_run(tmp_path, ("loss", "pref_accuracy", "pref_margin"))


@pytest.mark.slow
def test_two_process_per_step_advantages_run(tmp_path):
    """Per-token advantages ([B, T] extras padded across processes) train on 2 processes."""
    _launch_two(tmp_path, tiny_config_dict(
        tmp_path, name="two", train={"steps": 2, "micro_batch_size": 4, "grad_accum_steps": 1},
        algorithm={"advantage": "per_step", "step_delimiter": "", "step_rollouts": 2, "positive_threshold": -0.25},
        checkpoint={"every": 0}))
    steps = [r for r in _metrics(tmp_path / "runs" / "two") if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)


DOTS = {"sampler": {"name": "dots", "dots_every": 2, "dots_reference": 8, "dots_rollouts": 2},
        "rollout": {"replay_buffer": 4, "replay_fresh_frac": 0.5}}


def _crash_and_resume_match(tmp_path, monkeypatch, crash_at: int, **over) -> list[dict]:
    """Train 4 steps straight, and again with a crash at the `crash_at`-th sampling call and a resume from the
    step-2 checkpoint; the weights and metrics must be identical. Returns the metric rows."""
    _train(tiny_config_dict(tmp_path, name="full", **over))
    crash_on_sample(monkeypatch, at=crash_at)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_config_dict(tmp_path, name="crash", **over))
    monkeypatch.undo()
    crash_dir = tmp_path / "runs" / "crash"
    assert [p.name for p in (crash_dir / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_000002"]
    _train(tiny_config_dict(tmp_path, name="crash", checkpoint={"resume": True}, **over))
    a, b = _weights(tmp_path / "runs" / "full", 4), _weights(crash_dir, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = _metrics(tmp_path / "runs" / "full")
    assert rows == _metrics(crash_dir)
    return rows


def test_resume_with_dots_and_replay_matches_uninterrupted_run(tmp_path, monkeypatch):
    """DOTS selection state and the replay buffer are checkpointed: a crash and resume changes nothing."""
    # sampling calls: step 1 = 2 reference chunks + 1 batch, step 2 = 1, so the 5th is step 3's first
    rows = _crash_and_resume_match(tmp_path, monkeypatch, 5, **DOTS)
    steps = [r for r in rows if "loss" in r]
    assert [r["replay/groups"] for r in steps] == [0.0, 2.0, 2.0, 2.0]  # half of 4 prompts once the buffer fills
    assert all(0.0 <= r["sampler/dots_ref_pass_mean"] <= 1.0 for r in steps)


def test_replay_stores_the_sampling_policys_log_probs(tmp_path):
    """The behaviour log-probs kept with a group are the log-probs of the weights that sampled it."""
    import shared.loop as loop
    from shared.checkpoint import load_trainer_state

    d = tiny_config_dict(tmp_path, rollout={"replay_buffer": 2, "replay_fresh_frac": 0.5},
                         train={"steps": 2}, checkpoint={"every": 1, "keep_last": 3})
    _train(d)
    run = tmp_path / "runs" / "tiny"
    state = load_trainer_state(run / "checkpoints" / "step_000002")
    groups = state["replay"]["groups"]
    assert len(groups) == 2  # capacity 2: step 2's two fresh groups replaced step 1's
    from shared.config import validate_config
    from shared.recipe import build_components
    from accelerate import Accelerator
    from shared.checkpoint import load_hf_weights

    comps = build_components(validate_config(d, "t"), Accelerator(cpu=True))
    load_hf_weights(comps.policy.module.model, run / "checkpoints" / "step_000001" / "model")  # sampled step 2
    for _, g in groups:
        with torch.no_grad():
            logp = comps.policy.log_probs(g)[0]
        m = g.mask.bool()
        torch.testing.assert_close(logp[m], g.extras["behaviour_logp"][m], rtol=1e-5, atol=1e-5)
    assert loop.replay_groups(None, validate_config(d, "t"), 1) == 0


def test_resume_with_relift_matches_uninterrupted_run(tmp_path, monkeypatch):
    """The hard-question buffer and the SFT optimizer are checkpointed."""
    rows = _crash_and_resume_match(tmp_path, monkeypatch, 3, hybrid={"name": "relift", "sft_batch": 2, "sft_lr": 1e-3})
    assert any(r.get("hybrid/sft_steps", 0) > 0 for r in rows)
