"""The online RL loop shared by every domain, written out top to bottom.

    prompts -> policy.sample -> rewards -> advantages -> (reference / old log-probs)
            -> for each optimizer step: micro-batches -> objective -> backward -> clip -> step
            -> metrics -> eval / checkpoint

Domain packages provide the pieces (`shared.recipe.Components`): a policy, a task, and a combined
reward. Everything about the update (objective, advantage, aggregation, KL) comes from
`cfg.algorithm` and the pure functions in shared/.

Distribution goes through `accelerate`: prompts are split across processes by whole groups; the
rewards of all processes are gathered so advantages are computed on the global batch; every
loss share is normalised by counts of the whole optimizer step on all processes (shared/aggregation),
so 1 process and N processes take the same optimizer step for the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from transformers import get_scheduler

from shared.advantages import ADVANTAGES, PerPromptTracker, clip_advantages, compute_advantages, group_stats, zero_std_group_fraction
from shared.aggregation import StepNorm
from shared.attempts import two_attempts
from shared.baselines import build_baseline
from shared.checkpoint import latest_checkpoint, load_hf_weights, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from shared.config import RunConfig, dump_config, optimizer_steps_per_rollout
from shared.dots import PolicyProbe
from shared.evaluate import evaluate
from shared.hybrids import HybridSFT, hard_groups
from shared.kl import kl_penalty
from shared.mrt import mrt_extras, mrt_prefixes
from shared.objectives import OBJECTIVES
from shared.offline import check_offline_rows, offline_rollout
from shared.prefill import with_flawed_prefixes
from shared.recipe import build_components
from shared.replay import ReplayBuffer, mark_fresh
from shared.rollout import Rollout, first_in_group
from shared.sampler import build_sampler
from shared.step_values import step_values
from shared.temperature import choose_temperature
from shared.tracking import RunLogger, plot_metrics


def make_accelerator(cfg: RunConfig) -> Accelerator:
    cpu = not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision if not cpu else "no")


def make_optimizer(params, o):
    """AdamW, or LIFT's AdamW on the principal weights of each matrix (`optim.name: lift`)."""
    adamw = {"lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    if o.name == "lift":
        from shared.analysis.lift import LIFTAdamW

        return LIFTAdamW(params, o.lift_filter_rank, o.lift_lora_rank, o.lift_update_interval, **adamw)
    return torch.optim.AdamW(params, **adamw)


def global_step_norm(masks: list[torch.Tensor], norm_len: float, accelerator: Accelerator) -> StepNorm:
    """Token and sequence counts of one optimizer step over all its micro-batches and processes."""
    local = torch.tensor([sum(float(m.sum()) for m in masks), sum(float((m.sum(-1) > 0).sum()) for m in masks)],
                         dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum")
    return StepNorm(float(total[0]), float(total[1]), float(norm_len))


def train(cfg: RunConfig, accelerator: Accelerator | None = None) -> dict:
    """Run RL from the config; returns the summary written to runs/<name>/summary.json."""
    acc = accelerator or make_accelerator(cfg)
    t_start = time.time()
    set_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    steps_per_rollout = optimizer_steps_per_rollout(cfg, acc.num_processes)
    a, r, t = cfg.algorithm, cfg.rollout, cfg.train

    comps = build_components(cfg, acc)  # policy (warm-started if configured), task, reward
    t_rl = time.time()
    policy, task, reward_fn = comps.policy, comps.task, comps.reward
    train_rows = task.split("train")
    if r.prefill == "flawed":  # Mixed-CoT-RL: part of the prompts start with one-error reasoning to recover from
        train_rows = with_flawed_prefixes(task, train_rows, r.prefill_frac, r.prefill_errors, cfg.seed)
    for split in cfg.eval.extra_splits:  # a missing split fails here, not after training
        task.split(split)
    if r.target_entropy is not None:  # AceReason: before the reference copies the module's temperature
        comps.info["temperature"] = choose_temperature(policy, train_rows[: r.probe_prompts], r.target_entropy,
                                                       r.temperature_candidates, seed=cfg.seed)
        acc.print(f"temperature {comps.info['temperature']['temperature']} (probe: {comps.info['temperature']['probe']})")
    objective = OBJECTIVES[a.objective]
    use_ref = (a.beta > 0 or getattr(objective, "uses_reference", False)
               or (r.attempts > 1 and a.first_attempt_beta > 0 and a.score_stage1_steps > 0))
    if use_ref:
        policy.build_reference()
    forward_options = getattr(objective, "forward_options", lambda _: {})(a)
    if r.source == "offline":
        check_offline_rows(train_rows, r.samples_per_prompt)
    baseline = build_baseline(a.advantage, policy, task, reward_fn, cfg, acc)  # ReMax / A-LoL: b(x) per prompt
    sampler = build_sampler(cfg.sampler, train_rows, r.prompts_per_step, cfg.seed)
    probe = PolicyProbe(policy, reward_fn, cfg, acc) if hasattr(sampler, "prepare") else None  # DOTS measures
    replay = ReplayBuffer(r.replay_buffer, cfg.seed) if r.replay_buffer else None
    hybrid = (HybridSFT(cfg.hybrid, policy, reward_fn, a.positive_threshold, cfg.seed, task)  # ReLIFT / ReGFT / InT
              if cfg.hybrid.name != "none" else None)
    tracker = (PerPromptTracker(a.tracker_buffer, a.tracker_min_count, a.adv_eps)
               if a.advantage == "per_prompt_tracker" else None)

    optimizer = make_optimizer(policy.trainable_parameters(), cfg.optim)
    total_opt_steps = t.steps * steps_per_rollout * a.epochs
    scheduler = get_scheduler(
        {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.optim.schedule],
        optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=total_opt_steps)
    # The scheduler stays outside accelerate.prepare: an AcceleratedScheduler steps once per process
    # per optimizer step, which would make the LR schedule depend on the process count.
    policy.module, optimizer = acc.prepare(policy.module, optimizer)
    policy.unwrap = acc.unwrap_model

    # ---------------------------------------------------------------- resume or start
    start_step, state = 0, {}
    ckpt_dir = run_dir / "checkpoints"
    if cfg.checkpoint.resume and (last := latest_checkpoint(ckpt_dir)) is not None:
        load_hf_weights(acc.unwrap_model(policy.module).model, last / "model")
        state = load_trainer_state(last)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if tracker is not None:
            tracker.load_state_dict(state["tracker"])
        if replay is not None:
            replay.load_state_dict(state["replay"])
        if hybrid is not None:
            hybrid.load_state_dict(state["hybrid"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        acc.print(f"resumed from {last} at step {start_step}")
    if acc.is_main_process:
        dump_config(cfg, run_dir / "config.yaml")
    def held_out(at_step: int) -> dict[str, float]:  # greedy held-out metrics (both attempts in two-attempt runs)
        out = evaluate(policy, task, "eval", cfg.eval.max_prompts, cfg.eval.batch_size, acc,
                       samples_to=run_dir / "samples" / f"step_{at_step:06d}.png",
                       revision_template=r.revision_template if r.attempts > 1 else None)
        for split in cfg.eval.extra_splits:
            out |= {f"{split}/{k}": v for k, v in evaluate(policy, task, split, cfg.eval.max_prompts,
                                                           cfg.eval.batch_size, acc).items()}
        return out

    before = state.get("before")
    if before is None:
        before = held_out(0)
    logger = RunLogger(run_dir, t.steps, start_step, enabled=acc.is_main_process, tensorboard=cfg.logging.tensorboard,
                       progress=cfg.logging.progress)
    if start_step == 0:
        logger.log(0, {f"eval/{k}": v for k, v in before.items()})

    needs_old_logp = steps_per_rollout > 1 or a.epochs > 1 or replay is not None  # replay stores mu = pi_old
    for step in range(start_step + 1, t.steps + 1):
        t_step = time.perf_counter()
        if hasattr(policy, "begin_step"):  # CORY: the agents swap pioneer / observer roles every T_REx steps
            policy.begin_step(step)
        # 1-2. prompts -> samples -> rewards (each component scored; failures isolated in reward_fn);
        # with rollout replay (DOTS) part of the step's groups come from the buffer instead
        if probe is not None:
            sampler.prepare(step, probe)
        n_replay = replay_groups(replay, cfg, acc.num_processes)
        rollout, idx, info = collect_rollout(policy, sampler, train_rows, reward_fn, cfg, acc, step, baseline,
                                             n_prompts=r.prompts_per_step - n_replay)
        sample_stats = rollout.stats
        if replay is not None:
            n_fresh, fresh_rewards = len(rollout), rollout.rewards.clone()
            rollout = mark_fresh(rollout.to(acc.device))
            if n_replay:
                replayed = replay.draw(n_replay, step, acc.process_index, acc.num_processes).to(acc.device)
                rollout = Rollout.cat([rollout, replayed])
        rewards = rollout.rewards.to(acc.device)

        # 3. reference log-probs (no grad); KL-in-reward shapes the reward before advantages.
        # A policy whose sampler knows its exact log-probs (diffusion steps) has set old_logp already.
        if rollout.old_logp is None and (needs_old_logp or (a.beta > 0 and a.kl_placement == "reward")):
            rollout.old_logp = _no_grad_logp(policy, rollout)
        if use_ref:
            with acc.autocast():
                rollout.ref_logp = policy.reference_log_probs(rollout)
            if a.beta > 0 and a.kl_placement == "reward":  # r <- r - beta * sum_t k1 (METHODS.md A, KL placement)
                kl_seq = (kl_penalty(rollout.old_logp, rollout.ref_logp, "k1", a.kl_clamp) * rollout.mask).sum(-1)
                rewards = rewards - a.beta * kl_seq.to(rewards.device)

        # 4. advantages on the global batch (groups are whole on each process)
        all_rewards = acc.gather(rewards)
        all_groups = acc.gather(rollout.group_ids.to(acc.device))
        if tracker is not None:  # DDPO: statistics per prompt over its recent rewards (stateful)
            keys = [row["prompt"] for row in rollout.rows]
            keys = gather_object(keys) if acc.num_processes > 1 else keys
            adv_all = tracker(keys, all_rewards.double().cpu()).to(acc.device)
        else:  # the per-sample extras the estimator needs (baselines, dedup flags) are gathered like the rewards
            needs = getattr(ADVANTAGES.get(a.advantage), "needs", ())
            extras = {k: acc.gather(acc.pad_across_processes(v.to(acc.device), dim=1, pad_index=math.nan)
                                    if v.dim() == 2 else v.to(acc.device))
                      for k, v in rollout.extras.items() if k in needs}
            adv_all = compute_advantages(a.advantage, all_rewards.double(), all_groups, a.adv_eps,
                                         threshold=a.positive_threshold, **extras)
        adv_all = clip_advantages(adv_all, a.adv_clip).float()
        n_local = len(rollout)
        rollout.advantages = adv_all[acc.process_index * n_local : (acc.process_index + 1) * n_local]
        if adv_all.dim() == 2:  # per-token advantages: this process's width, and per-sample means for samplers
            rollout.advantages = rollout.advantages[:, : rollout.mask.shape[1]]
            adv_all = adv_all.sum(-1) / (adv_all != 0).sum(-1).clamp(min=1)
        rollout.rewards = rewards

        # 5. updates: epochs x optimizer steps x micro-batches, gradients accumulated by hand
        per_opt = t.micro_batch_size * t.grad_accum_steps
        sums: dict[str, float] = {}
        grad_norms = []
        t_train = time.perf_counter()
        for _epoch in range(a.epochs):
            for s in range(steps_per_rollout):
                chunk = rollout.select(slice(s * per_opt, (s + 1) * per_opt))
                micro = [chunk.select(slice(m * t.micro_batch_size, (m + 1) * t.micro_batch_size))
                         for m in range(t.grad_accum_steps)]
                norm = global_step_norm([mb.mask for mb in micro], cfg.norm_len, acc)
                for m, mb in enumerate(micro):
                    sync = m == len(micro) - 1
                    ctx = contextlib.nullcontext() if sync else acc.no_sync(policy.module)
                    with ctx:
                        logp, entropy, *aux = policy.log_probs(mb, with_entropy=True, **forward_options)
                        old = mb.old_logp if mb.old_logp is not None else logp.detach()
                        loss, metrics = objective(logp, old, mb.ref_logp, mb.advantages, mb.mask, a, norm,
                                                  group_ids=mb.group_ids, rewards=mb.rewards, **mb.extras,
                                                  **(aux[0] if aux else {}))
                        # DDP averages gradients over processes; the loss shares are global sums.
                        acc.backward(loss * acc.num_processes)
                    metrics["loss"] = loss.detach()
                    if entropy is not None:
                        metrics["entropy"] = (entropy * mb.mask).sum() / max(norm.num_tokens, 1.0)
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / (a.epochs * steps_per_rollout)
                if cfg.optim.max_grad_norm is not None:
                    gn = acc.clip_grad_norm_(policy.trainable_parameters(), cfg.optim.max_grad_norm)
                    grad_norms.append(float(gn))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if hybrid is not None:  # hard questions of this step (fresh groups only) -> buffer -> maybe one SFT step
            fresh_n = n_fresh if replay is not None else len(rollout)
            hard = hard_groups(rollout.rewards[:fresh_n].cpu(), rollout.group_ids[:fresh_n].cpu(), a.positive_threshold,
                               any_failure=cfg.hybrid.questions == "failed")
            demos = hybrid.demonstrations([{k: v for k, v in rollout.rows[i].items() if k != "completion_length"}
                                           for i in hard], step, [rollout.completions[i] for i in hard])
            for part in (gather_object([demos]) if acc.num_processes > 1 else [demos]):
                hybrid.add(part)
            hybrid_metrics = hybrid.maybe_step(acc)
        train_seconds = time.perf_counter() - t_train

        # 6. metrics (objective metrics are summed over processes: each is a share of a global mean)
        reduced = acc.reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=acc.device), "sum")
        metrics_out = dict(zip(sums.keys(), reduced.tolist()))
        comp = {f"reward/{k}": float(acc.gather(v.to(acc.device)).mean()) for k, v in rollout.components.items()}
        fails = acc.reduce(torch.tensor([float(v) for v in info["failures"].values()], device=acc.device), "sum")
        comp.update({f"reward_failures/{k}": float(f) for k, f in zip(info["failures"], fails.tolist())})
        if cfg.rollout.dynamic_sampling:
            comp["dynamic/gen_batches"] = float(info["gen_batches"])
            comp["dynamic/kept_group_frac"] = float(acc.reduce(torch.tensor(info["kept_groups"], dtype=torch.float64,
                                                                            device=acc.device), "sum")) / (
                info["gen_batches"] * r.prompts_per_step)
        n_seq = float(len(rollout))
        tot = acc.reduce(torch.tensor([sample_stats["sample_tokens"], n_seq, sample_stats["truncated_frac"] * n_seq],
                                      dtype=torch.float64, device=acc.device), "sum").tolist()
        len_max = float(acc.reduce(torch.tensor(sample_stats["completion_len_max"], device=acc.device), "max"))
        tokens = tot[0]
        metrics_out.update(comp)
        metrics_out.update({
            "reward/total": float(all_rewards.mean()),
            "reward/std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
            "zero_adv_group_frac": zero_std_group_fraction(all_rewards.cpu(), all_groups.cpu()),
            "completion_len_mean": tot[0] / tot[1],
            "completion_len_max": len_max,
            "truncated_frac": tot[2] / tot[1],
            "tokens_per_s/sample": tokens / max(sample_stats["sample_seconds"], 1e-9),
            "tokens_per_s/train": float(acc.reduce(rollout.mask.sum().double().to(acc.device), "sum")) * a.epochs
            / max(train_seconds, 1e-9),
            "lr": scheduler.get_last_lr()[0],
            "step_seconds": time.perf_counter() - t_step,
        })
        if grad_norms:
            metrics_out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        if hybrid is not None:
            metrics_out.update(hybrid_metrics)
        sampler.update(all_groups.cpu(), {"rewards": all_rewards.cpu(), "advantages": adv_all.cpu()})
        metrics_out.update(sampler.metrics())
        if replay is not None:  # this step's fresh groups, with mu = the policy that sampled them
            metrics_out["replay/groups"] = float(n_replay)
            fresh = rollout.select(slice(0, n_fresh))
            fresh.rewards = fresh_rewards  # before any KL shaping (re-applied when replayed)
            n_local = (r.prompts_per_step - n_replay) // acc.num_processes
            keys = idx[acc.process_index * n_local : (acc.process_index + 1) * n_local]
            entries = [(fresh.to("cpu"), rollout.old_logp[:n_fresh].cpu(), keys)]
            for part, behaviour, part_keys in (gather_object(entries) if acc.num_processes > 1 else entries):
                replay.add(part, behaviour, part_keys)
        if tracker is not None:
            metrics_out.update(tracker.stats())
        for k in ("baseline", "progress_bonus"):  # per-sample baselines (ReMax, A-LoL, MRT's termination value)
            if k in rollout.extras:
                metrics_out[f"extras/{k}"] = float(acc.gather(rollout.extras[k].to(acc.device)).float().mean())

        # 7. periodic evaluation and checkpoint
        evaluated = bool(cfg.eval.every and step % cfg.eval.every == 0 and step != t.steps)
        if evaluated:
            metrics_out.update({f"eval/{k}": v for k, v in held_out(step).items()})
        if evaluated or step % cfg.logging.every == 0 or step == t.steps:
            logger.log(step, metrics_out)
        if not math.isfinite(metrics_out.get("loss", 0.0)):
            raise FloatingPointError(f"step {step}: loss is not finite ({metrics_out.get('loss')}); "
                                     "lower optim.lr or check the rewards")
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.steps:
            _checkpoint(acc, cfg, ckpt_dir, step, policy, optimizer, scheduler, sampler, before, tracker, replay, hybrid)

    # ---------------------------------------------------------------- final evaluation and summary
    after = held_out(t.steps)
    logger.log(t.steps, {f"eval/{k}": v for k, v in after.items()})
    logger.close()
    summary = {
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "before": before[task.metric],
        "after": after[task.metric],
        "before_metrics": before,  # every held-out metric (e.g. AP50, mIoU, reward_sde, kl_to_base)
        "after_metrics": after,
        "seed": cfg.seed,
        "wall_seconds": time.time() - t_start,
        "rl_wall_seconds": time.time() - t_rl,
        "steps": t.steps,
        "eval_examples": after.get("n"),
        "warmup": comps.info.get("warmup"),
        "temperature": comps.info.get("temperature"),
        "run_dir": str(run_dir),
    }
    if acc.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.logging.plots:
            plot_metrics(run_dir)
    if accelerator is None:  # we made it, so we shut it down (a live gloo/NCCL group can abort the exit)
        acc.end_training()
    return summary


def replay_groups(replay: ReplayBuffer | None, cfg: RunConfig, num_processes: int) -> int:
    """Groups replayed this step, all processes together: (1 - sigma) of the step once the buffer holds
    that many (fewer before), a multiple of the process count (every process replays its share)."""
    if replay is None:
        return 0
    want = cfg.rollout.prompts_per_step - round(cfg.rollout.prompts_per_step * cfg.rollout.replay_fresh_frac)
    n = min(want, len(replay))
    return n - n % num_processes


def collect_rollout(policy, sampler, train_rows, reward_fn, cfg: RunConfig, acc,
                    step: int | None = None, baseline=None, n_prompts: int | None = None) -> tuple[Rollout, list[int], dict]:
    """Sample this process's groups and score them (reward weights of RL step `step`, see `rewards[].start_step`).

    Every process draws the same global prompt batch and keeps its slice of whole groups. Group ids
    are the prompts' global draw positions (`sampler.cursor`), so they stay unique over extra draws
    and resumes, and sample ids (which key the sampling noise) do not depend on the process layout.

    With `rollout.dynamic_sampling` (DAPO), groups whose rewards are all equal are dropped and new
    batches drawn until every process holds its share of informative groups or
    `rollout.max_gen_batches` batches were drawn; the batch is then cut to its share, and a shortfall
    is filled with dropped groups whose mask is zeroed (they neither train nor count in the
    loss normalisation), so the optimizer-step geometry never changes.

    With `rollout.source: offline` nothing is sampled: the rows' own completions (shared/offline.py)
    form the groups, scored by the data's rewards when it has them, else by the reward functions.
    `baseline(rows, step)` (ReMax, A-LoL) adds each prompt's baseline as `extras["baseline"]`.
    """
    r = cfg.rollout
    n_prompts = r.prompts_per_step if n_prompts is None else n_prompts
    G, P_local = r.samples_per_prompt, n_prompts // acc.num_processes
    want = P_local * G
    kept, dropped, drawn, failures = [], [], [], Counter()
    for gen_batch in range(1, (r.max_gen_batches if r.dynamic_sampling else 1) + 1):
        first = sampler.cursor + acc.process_index * P_local  # global index of this process's first prompt
        idx = sampler.next_batch(n_prompts)
        drawn += idx
        rows = [train_rows[i] for i in idx[acc.process_index * P_local : (acc.process_index + 1) * P_local]]
        if cfg.algorithm.advantage == "mrt":  # MRT: the groups continue prefixes of pi_old's own traces
            rows = mrt_prefixes(policy, rows, cfg, first)
        if r.source == "offline":
            part, data_rewards = offline_rollout(policy, rows, first)
        else:
            data_rewards = None
            with acc.autocast():  # same precision as the training forward (a no-op without mixed precision)
                part = policy.sample(rows, G, seed=cfg.seed, first_sample_id=first * G, first_group_id=first)
        if data_rewards is not None:
            part.rewards, part.components = data_rewards, {"data": data_rewards}
        else:
            res = reward_fn(part.completions, part.fields(), step=step)
            part.rewards, part.components = res.total, res.components
            failures.update(res.failures)
        if r.attempts == 2:  # SCoRe: a second attempt at every answer, seeing it
            part, res2 = two_attempts(policy, part, reward_fn, cfg, step, first * G)
            failures.update(res2.failures)
        if "unique" in getattr(ADVANTAGES.get(cfg.algorithm.advantage), "needs", ()):  # expert iteration's dedup
            part.extras["unique"] = first_in_group(part.completions, part.group_ids)
        if baseline is not None:
            part.extras["baseline"] = baseline(rows, step).repeat_interleave(G)
        if cfg.algorithm.advantage == "mrt":  # termination values of the prefixes, progress of the first episodes
            part.extras.update(mrt_extras(policy, part, reward_fn, cfg, step, first * G))
        if cfg.algorithm.advantage == "per_step":  # Monte Carlo values of the steps of incorrect answers
            part.extras["step_values"] = step_values(policy, part, part.rewards, reward_fn, cfg, step)
        if not r.dynamic_sampling:
            return part, drawn, {"failures": failures, "gen_batches": 1, "kept_groups": P_local}
        informative = group_stats(part.rewards, part.group_ids)[1] > 0
        kept.append(part.select(informative.nonzero().squeeze(-1)))
        dropped.append(part.select((~informative).nonzero().squeeze(-1)))
        have = torch.tensor([sum(len(k) for k in kept)], device=acc.device)
        if int(acc.gather(have).min()) >= want:
            break
    n_kept = min(sum(len(k) for k in kept), want)
    batch = Rollout.cat([k for k in kept if len(k)] or kept[:1]).select(slice(0, n_kept))
    if n_kept < want:
        filler = Rollout.cat([d for d in dropped if len(d)]).select(slice(0, want - n_kept))
        filler.mask = torch.zeros_like(filler.mask)
        batch = Rollout.cat([batch, filler]) if n_kept else filler
    return batch, drawn, {"failures": failures, "gen_batches": gen_batch, "kept_groups": n_kept // G}


def _no_grad_logp(policy, rollout: Rollout) -> torch.Tensor:
    with torch.no_grad():
        return policy.log_probs(rollout)[0]


def _checkpoint(acc, cfg, ckpt_dir, step, policy, optimizer, scheduler, sampler, before, tracker=None,
                replay=None, hybrid=None) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "sampler": sampler.state_dict(), "rng": rng_state(), "step": step, "before": before,
                 "tracker": tracker.state_dict() if tracker is not None else None,
                 "replay": replay.state_dict() if replay is not None else None,
                 "hybrid": hybrid.state_dict() if hybrid is not None else None}
        save_checkpoint(ckpt_dir, step, policy.save_pretrained, state, cfg.checkpoint.keep_last)
    acc.wait_for_everyone()
