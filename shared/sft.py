"""Supervised warm-up (SFT) of the initial policy, run to its held-out plateau and cached.

The warm-up minimises the token-mean NLL of demonstrations (`task.split("sft")`), evaluates the
task metric on `task.split("val")` every `eval_every` steps, keeps the best weights and stops after
`patience` evaluations without improvement once the metric has improved on the starting model's (or at
`max_steps`): a model still at its starting score (e.g. accuracy 0 while the loss falls) keeps training.
The best weights are saved with `save_pretrained` under a directory named by a hash of everything that
determines them, so later runs (other RL seeds, tests, resumed runs) load the same warm start instead of
recomputing it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import get_scheduler

from shared.evaluate import evaluate


def warmup_key(cfg) -> str:
    """Hash of what determines the warm start. Task fields a schema lists in `WARMUP_NEUTRAL` (e.g. which
    offline data the RL stage trains on) do not change the warm-up, so they are left out of the hash; fields
    in `WARMUP_ADDED` (added to a schema later, name -> the default that reproduces the earlier behaviour)
    count only when set to something else, so adding a field does not invalidate every cached warm start."""
    from shared.config import TASK_SCHEMAS

    schema = TASK_SCHEMAS.get(cfg.task.get("name"))
    neutral, added = getattr(schema, "WARMUP_NEUTRAL", ()), getattr(schema, "WARMUP_ADDED", {})
    task = {k: v for k, v in cfg.task.items() if k not in neutral and not (k in added and v == added[k])}
    key = {"model": cfg.model.name_or_path, "task": task, "warmup": cfg.warmup.model_dump(exclude={"cache_dir"}),
           "seed": cfg.seed, "max_new_tokens": cfg.rollout.max_new_tokens}
    if cfg.domain == "vision" and cfg.model.freeze_vision is True:  # a warm-up that does not train the vision tower
        key["frozen_vision"] = True  # (absent otherwise, so warm starts cached before this field stay valid)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_warmup_dir(cfg) -> Path:
    return Path(cfg.warmup.cache_dir) / warmup_key(cfg)


@contextlib.contextmanager
def untempered(policy):
    """Log-probs at temperature 1 inside the block: SFT fits the model's own distribution, so a higher
    RL sampling temperature really explores around the warm start instead of being trained away."""
    module = policy.unwrap(policy.module)
    saved, module.temperature = module.temperature, 1.0
    try:
        yield
    finally:
        module.temperature = saved


def sft_step(policy, rows: list[dict], params, opt, max_grad_norm: float = 1.0) -> torch.Tensor:
    """One optimizer step on the token-mean NLL (temperature 1) of the demonstrations in `rows`."""
    batch = policy.demo_batch(rows)
    with untempered(policy):
        logp, _ = policy.log_probs(batch)
    mask = batch.mask.float()
    loss = -(logp * mask).sum() / mask.sum().clamp(min=1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def run_sft(policy, task, wcfg, seed: int, log=print) -> dict:
    """Train policy.module in place on demonstrations; returns the warm-up record."""
    demos, val = task.split("sft"), task.split("val")
    if not demos:
        raise ValueError("warmup.enabled is true but the task has no 'sft' demonstrations")
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=wcfg.lr, weight_decay=wcfg.weight_decay)
    sched = get_scheduler({"constant": "constant_with_warmup", "cosine": "cosine"}[wcfg.schedule], opt,
                          num_warmup_steps=wcfg.warmup_steps, num_training_steps=wcfg.max_steps)
    rng = random.Random(seed)
    best = evaluate(policy, task, "val", len(val), 256)[task.metric] if val else float("-inf")
    best_state, best_step, bad, history = copy.deepcopy(policy.module.state_dict()), 0, 0, [(0, best)]
    t0 = time.time()
    step = 0
    for step in range(1, wcfg.max_steps + 1):
        loss = sft_step(policy, rng.sample(demos, min(wcfg.batch_size, len(demos))), params, opt)
        sched.step()
        if step % wcfg.eval_every == 0 and val:
            score = evaluate(policy, task, "val", len(val), 256)[task.metric]
            history.append((step, score))
            log(f"warm-up step {step}: loss {loss.item():.4f} val {task.metric} {score:.4f}")
            if score > best:
                best, best_step, bad = score, step, 0
                best_state = copy.deepcopy(policy.module.state_dict())
            elif best_step > 0:  # patience counts from the first improvement: before it nothing has plateaued yet
                bad += 1
                if bad >= wcfg.patience:
                    break
    policy.module.load_state_dict(best_state)
    return {"best_val": best, "best_step": best_step, "steps_run": step, "seconds": time.time() - t0,
            "history": history}


def save_warmup(policy, record: dict, out: Path) -> None:
    """Write the warm-started model atomically into the cache."""
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp)
    (tmp / "warmup.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def continue_sft(policy, task, wcfg, seconds: float, seed: int) -> dict:
    """Reference arm: keep doing SFT on the same demonstrations for `seconds` of wall time."""
    demos = task.split("sft")
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=wcfg.lr * 0.1, weight_decay=wcfg.weight_decay)
    rng = random.Random(seed + 7)
    t0, steps = time.time(), 0
    while time.time() - t0 < seconds:
        sft_step(policy, rng.sample(demos, min(wcfg.batch_size, len(demos))), params, opt)
        steps += 1
    return {"steps": steps, "seconds": time.time() - t0}
