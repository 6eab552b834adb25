"""Run every text recipe on the embedded arithmetic task with one budget and write a results table.

    python scripts/compare_llm_methods.py --seeds 0 1 2 --steps 100 --jobs 2 --out docs/results_llm_methods

Each (recipe, seed) is `rlft train configs/llm/arithmetic_<method>.yaml seed=S train.steps=N` in its
own process (the same warm start per seed, cached), so every method gets the same number of
optimizer steps on 32 prompts per step. Afterwards the script measures, for each run, the KL from
the warm start to the trained model, E_{y ~ pi}[log pi(y|x) - log pi_0(y|x)] over sampled held-out
completions, and reads the training reward from metrics.jsonl. Writes <out>.md and <out>.json:
nothing in the table is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (method, recipe stem, what it trains on)
METHODS = [
    ("GRPO", "arithmetic_grpo", "online, verifier"),
    ("GRPO + SEC curriculum", "arithmetic_sec", "online, verifier; prompts by a bandit over carry counts"),
    ("Dr. GRPO", "arithmetic_dr_grpo", "online, verifier"),
    ("DAPO", "arithmetic_dapo", "online, verifier"),
    ("RLOO", "arithmetic_rloo", "online, verifier"),
    ("GSPO", "arithmetic_gspo", "online, verifier"),
    ("ReMax", "arithmetic_remax", "online, verifier"),
    ("Expert iteration", "arithmetic_expert_iteration", "online, verifier"),
    ("RAFT", "arithmetic_raft", "online, verifier"),
    ("Per-step negatives", "arithmetic_per_step", "online, verifier + step continuations"),
    ("NFT", "arithmetic_nft", "online, verifier"),
    ("CoPG", "arithmetic_copg", "online, verifier"),
    ("ReLIFT", "arithmetic_relift", "online, verifier + SFT on demonstrations of unsolved questions"),
    ("ReGFT-style hints", "arithmetic_regft", "online, verifier + SFT on own solutions from half-answer hints"),
    ("SCoRe (two attempts; first attempt scored)", "arithmetic_score", "online, verifier; a second attempt sees the first"),
    ("DPO", "arithmetic_dpo", "offline pairs"),
    ("IPO", "arithmetic_ipo", "offline pairs"),
    ("MODPO", "arithmetic_modpo", "offline pairs + length margin"),
    ("A-LoL", "arithmetic_alol", "offline scored answers"),
    ("DFT", "arithmetic_dft", "offline demonstrations"),
    ("ASFT", "arithmetic_asft", "offline demonstrations"),
    ("IFT", "arithmetic_ift", "offline demonstrations"),
]


# data selection and curricula vs uniform sampling (issue: SEC and DOTS against uniform over 3 seeds);
# (method, recipe stem, what it trains on, extra overrides, run tag)
CURRICULA = [
    ("GRPO, uniform prompts", "arithmetic_grpo", "online, verifier", (), ""),
    ("SEC, arms = carry count", "arithmetic_sec", "online, verifier", (), ""),
    ("SEC, arms = shorter operand's digits", "arithmetic_sec_shorter", "online, verifier", (), ""),
    ("DOTS selection", "arithmetic_dots", "online, verifier", ("rollout.replay_buffer=0",), "select"),
    ("Rollout replay (uniform prompts)", "arithmetic_replay", "online, verifier; half the groups replayed", (), ""),
    ("GRPO, 16 fresh prompts per step (replay's sampling budget)", "arithmetic_grpo", "online, verifier",
     ("rollout.prompts_per_step=16", "train.micro_batch_size=128"), "p16"),
    ("DOTS selection + rollout replay", "arithmetic_dots", "online, verifier; half the groups replayed", (), ""),
]
# step-level methods on the scratchpad variant (column-by-column steps, then the sum)
SCRATCHPAD = [
    ("GRPO (scratchpad)", "arithmetic_scratchpad_grpo", "online, verifier", (), ""),
    ("InT-style interventions (scratchpad)", "arithmetic_scratchpad_int",
     "online, verifier + SFT on failed attempts re-written from their first wrong step", (), ""),
    ("Mixed-CoT-RL (scratchpad)", "arithmetic_scratchpad_mixed_cot",
     "online, verifier; half the prompts start with steps holding one injected error", (), ""),
    ("MRT (scratchpad)", "arithmetic_scratchpad_mrt",
     "online, verifier; groups continue pi_old's prefixes, termination-value baseline + progress bonus", (), ""),
]
SUITES = {"methods": [(*m, (), "") for m in METHODS], "curricula": CURRICULA, "scratchpad": SCRATCHPAD}


def run_one(stem: str, seed: int, steps: int, out_dir: Path, extra: list[str], tag: str = "") -> Path:
    run = f"{stem}{'_' + tag if tag else ''}_s{seed}"
    if (out_dir / run / "summary.json").exists():
        return out_dir / run
    cmd = [sys.executable, "-m", "shared.cli", "train", str(ROOT / "configs" / "llm" / f"{stem}.yaml"), f"seed={seed}",
           f"train.steps={steps}", f"name={run}", f"output_dir={out_dir}", "eval.every=0", "logging.progress=false",
           "logging.tensorboard=false", "checkpoint.every=0", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = out_dir / f"{run}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{run} failed (exit {rc}); see {log}")
    return out_dir / run


def kl_to_start(run_dir: Path, n_prompts: int = 200, samples: int = 4) -> float:
    """Mean over sampled held-out completions of sum_t [log pi(y_t) - log pi_0(y_t)] (a sequence KL)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_rl.policy import CausalLMPolicy
    from llm_rl.recipe import make_task
    from llm_rl.tasks.arithmetic import build_tokenizer
    from shared.checkpoint import latest_checkpoint
    from shared.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    tok = build_tokenizer()
    final = AutoModelForCausalLM.from_pretrained(latest_checkpoint(run_dir / "checkpoints") / "model")
    start = AutoModelForCausalLM.from_pretrained(summary["warmup"]["cache"])
    mk = lambda m: CausalLMPolicy(m, tok, temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens)
    policy, reference = mk(final), mk(start)
    rows = make_task(cfg).split("eval")[:n_prompts]
    torch.manual_seed(0)
    with torch.no_grad():
        batch = policy.sample(rows, samples, seed=cfg.seed, first_sample_id=0, first_group_id=0)
        lp = policy.log_probs(batch)[0]
        lp0 = reference.log_probs(batch)[0]
    return float(((lp - lp0) * batch.mask).sum(-1).mean())


def flawed_accuracy(run_dir: Path) -> tuple[float, float] | None:
    """Greedy accuracy of the warm start and of the trained model on the held-out problems prefilled with one
    flawed step (the scratchpad task's eval_flawed split: Mixed-CoT-RL's robustness test); None otherwise."""
    from transformers import AutoModelForCausalLM

    from llm_rl.policy import CausalLMPolicy
    from llm_rl.recipe import make_task
    from llm_rl.tasks.arithmetic import build_tokenizer
    from shared.checkpoint import latest_checkpoint
    from shared.config import load_config
    from shared.evaluate import evaluate

    cfg = load_config(run_dir / "config.yaml")
    if cfg.task.get("format") != "scratchpad":
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    task, tok = make_task(cfg), build_tokenizer()
    out = []
    for path in (summary["warmup"]["cache"], latest_checkpoint(run_dir / "checkpoints") / "model"):
        policy = CausalLMPolicy(AutoModelForCausalLM.from_pretrained(path), tok, max_new_tokens=cfg.rollout.max_new_tokens)
        out.append(evaluate(policy, task, "eval_flawed", 500, 100)[task.metric])
    return out[0], out[1]


def train_reward(run_dir: Path, window: int = 10) -> tuple[float, float] | None:
    """Mean reward/total over the first and the last `window` RL steps (None for offline data rewards)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/total" in r and "reward/data" not in r]
    if not steps:
        return None
    return (statistics.mean(r["reward/total"] for r in steps[:window]),
            statistics.mean(r["reward/total"] for r in steps[-window:]))


def generation_cost(run_dir: Path) -> dict:
    """Samples generated per RL step (fresh groups + DOTS reference rollouts) and the DOTS predictor's mean
    correlation with the next measurement, from the run's config and metrics."""
    from shared.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/total" in r]
    replayed = statistics.mean(r.get("replay/groups", 0.0) for r in steps)
    s = cfg.sampler
    reference = s.dots_reference * s.dots_rollouts / s.dots_every if s.name == "dots" else 0.0
    corr = [r["sampler/dots_pred_corr"] for r in steps if "sampler/dots_pred_corr" in r]
    return {"samples_per_step": (cfg.rollout.prompts_per_step - replayed) * cfg.rollout.samples_per_prompt + reference,
            "dots_pred_corr": statistics.mean(corr) if corr else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs", default="runs/compare_llm", help="where the runs go")
    ap.add_argument("--suite", choices=sorted(SUITES), default="methods")
    ap.add_argument("--out", help="default: docs/results_llm_methods (methods), docs/results_curricula (curricula)")
    ap.add_argument("--only", nargs="*", help="recipe stems to run (default: all)")
    ap.add_argument("--tables-only", action="store_true", help="rewrite <out>.md from <out>.json (no runs)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    args.out = args.out or {"methods": "docs/results_llm_methods", "curricula": "docs/results_curricula",
                            "scratchpad": "docs/results_scratchpad"}[args.suite]
    if args.tables_only:
        out = Path(ROOT / args.out)
        write_tables(json.loads(out.with_suffix(".json").read_text()), args, out)
        return
    out_dir = (ROOT / args.runs).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in SUITES[args.suite] if not args.only or m[1] in args.only]
    jobs = [(stem, seed, over, tag) for _, stem, _, over, tag in methods for seed in args.seeds]
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        # the first method's runs go first, one per seed: each trains (and caches) that seed's warm start,
        # so no two parallel runs ever train the same warm-up
        go = lambda j: run_one(j[0], j[1], args.steps, out_dir, [*args.overrides, *j[2]], j[3])  # noqa: E731
        first = list(pool.map(go, jobs[: len(args.seeds)]))
        rest = list(pool.map(go, jobs[len(args.seeds):]))
    dirs = dict(zip(jobs, first + rest))
    print(f"{len(jobs)} runs in {time.time() - t0:.0f} s")

    records = []
    for name, stem, data, over, tag in methods:
        for seed in args.seeds:
            d = dirs[(stem, seed, over, tag)]
            s = json.loads((d / "summary.json").read_text())
            records.append({"method": name, "recipe": stem, "data": data, "seed": seed, "before": s["before"],
                            "after": s["after"], "train_reward": train_reward(d), "kl_to_start": kl_to_start(d),
                            "rl_wall_seconds": s["rl_wall_seconds"], "steps": s["steps"], **generation_cost(d),
                            "flawed": flawed_accuracy(d) if args.suite == "scratchpad" else None})
    write_tables(records, args, Path(ROOT / args.out))


CURRICULA_NOTES = """\
How to read it:

- Every row is GRPO with the quickstart's settings; only how prompts are chosen (and, for replay, where
  half of each step's groups come from) differs. Held-out problems follow the natural distribution.
- On this task no selection rule beats uniform sampling at a fixed number of optimizer steps.
- SEC over carry counts ties with uniform: carry counts barely predict how hard a sum is for the warmed-up
  model (per-prompt pass rates correlate -0.08 with them), so the arms look alike and the bandit stays
  near uniform. Over the shorter operand's digits the arms do differ (4+4-digit sums ~82% solved, a
  3-digit operand ~27%, shorter ones ~0%), but the two tiny arms (2% of the data, nothing solvable)
  keep 12-15% of the draws each (Boltzmann over small, decaying arm values), so more groups carry no
  signal (zero-advantage fraction 0.63 vs 0.47 uniform, mean over steps and seeds) and the gain halves.
- DOTS selection does what it aims at, a little: fewer zero-advantage groups than uniform (0.43 vs 0.47).
  Its predictor is weak here (last-token states of the 2-layer policy predict the next
  reference set's pass rates with correlation ~0.3; the authors train projections offline), and the
  prompts nearest the predicted 0.5 are a narrow slice of the distribution: the held-out gain is 2/3 of
  uniform's, with 50% more samples generated (64 reference prompts x 8 every 2 steps).
- Rollout replay halves the samples generated per step, as the paper intends, but at this learning rate
  (2e-4, the authors use 1e-6) training twice on the same groups without an effective clip (the clip
  range is centred on pi_old / mu, where the ratio starts) moves the policy further (KL to start 0.90 vs
  0.59) without held-out gains. GRPO on the same 16 fresh prompts per step without replay gains +0.015
  (seed 0: +0.048 where replay gains +0.002). With DOTS selection replay ends below the start.
"""

SCRATCHPAD_NOTES = """\
How to read it:

- The scratchpad task's demonstrations write every column of the addition ("4+8=12 3+7+1=11 2+6+1=9 1+5=6
  6912"); the verifier reads the last number. Its warm starts (SFT to the validation plateau, ~0.70) are
  stronger than the answer-only task's.
- InT-style interventions: for every question with a failed sample, one failed attempt is cut at its first
  step that differs from the reference steps and the policy re-writes from there (4 tries); a re-write that
  reaches the right sum is a demonstration, and every 32 of them give one SFT step between RL steps.
- The last column is greedy accuracy on the same held-out problems prefilled with the steps up to one flawed
  step (a calculation error, or a carry dropped or added; Mixed-CoT-RL's robustness test), for the warm
  start and the trained model. Every warm start scores near 0 there: the 2-layer model writes the sum from
  the digits of its own steps, and its demonstrations never show a step being corrected.
- Mixed-CoT-RL trains on half clean prompts and half prompts prefilled that way. The prefilled half almost
  never earns a reward, so its groups carry no signal, and 100 steps do not teach recovery: robustness
  stays near 0 and the clean gain is below GRPO's.
- MRT's meta-prover, forced to answer after j of the k column steps, scores 0 until the last column is
  written (seed 0's warm start, reference steps of 64 problems: J = 0.0 for 0-3 of 4 steps, 0.98 with all),
  so the termination baseline is about 0 for most prefixes (mean 0.18 over training): the advantage is then
  r itself, without a negative signal, and the progress bonus fires only on the step that completes the
  sum. MRT suits traces where stopping early already gives a useful answer. Its forced answers (4 per group
  prefix and 4 per sample) make it ~6x slower than GRPO here.
- GRPO and InT ran with the earlier Gumbel-max sampler; Mixed-CoT-RL and MRT with the inverse-CDF sampler
  (the same distribution, different draws for a seed).
"""

NOTES = """\
How to read it:

- *Before* is each seed's warm start; seed 0's is the weakest, so most of every method's mean gain comes
  from it. *KL to start* is E[log pi(y|x) - log pi_0(y|x)] over 4 answers sampled at temperature 1 for
  each of 200 held-out prompts. *Train reward* is the sampled answers' mean reward (exact match; DAPO
  adds its overlong penalty, NFT and DAPO keep only groups with mixed outcomes, so theirs start higher).
- SEC draws prompts by carry count, favouring the counts whose samples have large |advantage| (mixed
  outcomes), so its training reward differs from GRPO's; its held-out gain equals uniform GRPO's here.
- The online methods see only the verifier. DFT, ASFT and IFT train on 3200 fresh correct
  demonstrations, more supervision than the 1000 of the warm-up, which is why they gain most per second.
- The preference methods (DPO, IPO, MODPO) learn from synthetic mistakes (a dropped carry, a one-digit
  slip), not the policy's own errors, and stay close to the start (small KL). With the papers' beta 0.1
  they also lowered the likelihood of the preferred answers and greedy accuracy collapsed (seed 0:
  0.548 -> 0.29 at lr 2e-4), so the recipes use beta 1 (IPO 0.5) at lr 2e-5: gains are small and one
  seed of DPO and IPO ends slightly below its start.
- ReLIFT and ReGFT add SFT steps on the questions none of the 16 samples solved (ReLIFT: their stored
  demonstrations; ReGFT: the policy's own verified completions of half the reference answer). SCoRe's row
  scores the first attempt; its second attempt never scores on held-out problems (accuracy@t2 = 0 in every
  run's summary): the warm start never saw the revision prompt "<problem><answer> <problem>", its second
  answers are malformed, so every second-attempt group has equal rewards and stage I has nothing to learn.
  SCoRe starts from a model that can follow a revision instruction. Warming up on revision demonstrations
  as well (`task.revision_template`: a plausible mistake or the right answer, then the problem again) did not
  help the 2-layer model: validation accuracy stayed 0.0 through 1500 SFT steps on the doubled data.
- A-LoL trains only on the offline answers that beat the value estimate; half of its answers are wrong
  (A = 0), and the value head, fit on the reference's greedy results for 200 validation prompts, predicts
  little beyond their mean, so the advantage is close to R minus a constant. It gains on the weak warm
  start and loses a little on the two strong ones: the table does not show A-LoL beating its start.
"""


def write_tables(records: list[dict], args, out: Path) -> None:
    steps, seeds = records[0]["steps"], sorted({r["seed"] for r in records})
    out.with_suffix(".json").write_text(json.dumps(records, indent=2))
    import platform

    import torch

    suite = getattr(args, "suite", "methods")
    curricula = suite == "curricula"
    flawed = suite == "scratchpad"
    title = {"methods": "Text methods on", "curricula": "Data selection and curricula on",
             "scratchpad": "Step-level methods on the scratchpad variant of"}[suite]
    lines = [f"# {title} the embedded arithmetic task (generated by scripts/compare_llm_methods.py)", "",
             f"Same warm start per seed (SFT to its validation plateau), then {steps} optimizer steps of 32 prompts "
             f"per method; held-out accuracy on 500 unseen problems (greedy). Seeds {', '.join(map(str, seeds))}; "
             f"machine: {platform.machine()}, 1 thread per run, torch {torch.__version__}.", "",
             "| method | trains on | held-out accuracy, before → after (mean) | change per seed | train reward, first → last 10 steps | KL to start (nats/answer) | RL wall time (s) |"
             + (" samples generated per step | DOTS predictor corr. |" if curricula else "")
             + (" prefilled with one flawed step, before → after (mean) | change per seed |" if flawed else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if curricula or flawed else "")]
    by = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    for method, rs in by.items():
        b, a = statistics.mean(r["before"] for r in rs), statistics.mean(r["after"] for r in rs)
        changes = ", ".join(f"{r['after'] - r['before']:+.3f}" for r in rs)
        tr = [r["train_reward"] for r in rs if r["train_reward"] is not None]
        reward = (f"{statistics.mean(t[0] for t in tr):.3f} → {statistics.mean(t[1] for t in tr):.3f}" if tr
                  else "(data rewards)")
        kl = statistics.mean(r["kl_to_start"] for r in rs)
        wall = statistics.mean(r["rl_wall_seconds"] for r in rs)
        line = (f"| {method} | {rs[0]['data']} | {b:.3f} → {a:.3f} ({a - b:+.3f}) | {changes} | {reward} | "
                f"{kl:.3f} | {wall:.0f} |")
        if curricula:
            corr = [r["dots_pred_corr"] for r in rs if r.get("dots_pred_corr") is not None]
            line += (f" {statistics.mean(r['samples_per_step'] for r in rs):.0f} | "
                     f"{f'{statistics.mean(corr):.2f}' if corr else '–'} |")
        if flawed:
            fb, fa = (statistics.mean(r["flawed"][k] for r in rs) for k in (0, 1))
            line += f" {fb:.3f} → {fa:.3f} ({fa - fb:+.3f}) | " + ", ".join(
                f"{r['flawed'][1] - r['flawed'][0]:+.3f}" for r in rs) + " |"
        lines.append(line)
    notes = {"methods": NOTES, "curricula": CURRICULA_NOTES, "scratchpad": SCRATCHPAD_NOTES}[suite]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n\n" + notes)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
