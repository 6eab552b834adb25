"""One GRPO step of our loop (shared/loop.py) vs TRL's GRPOTrainer on the same model and data, CPU fp32.

Why: the loop's claim is that one readable RL step is not slower than the reference implementation most
users would otherwise reach for. This measures that claim on identical work:

- the SAME tiny Qwen2ForCausalLM (the arithmetic task's `build_model`/`build_tokenizer`, briefly SFT-warmed on
  the task's demonstrations with `shared.sft.sft_step` so completions have answer-like lengths, about 5.5
  tokens ending in EOS, instead of running to the limit; then `save_pretrained` to a temporary directory that
  both sides load). After so short a warm-up the exact-match reward is mostly 0, so the update barely moves the
  weights, but both sides still run every forward, backward and optimizer step in full;
- the same prompt pool (the task's RL split, 4-digit additions), the same exact-match reward function
  (`llm_rl.rewards.exact_match(extract="full")`, called by both sides), G completions per prompt,
  the same max completion length, temperature 1 (no top-k/top-p), beta = 0 (no reference model),
  PPO clip 0.2, token-mean loss, AdamW at the same constant lr, grad-norm clip 1.0, sdpa attention,
  no gradient checkpointing, fp32 on CPU;
- one RL step = one rollout of P x G completions followed by exactly ONE optimizer step over all of them,
  as `micro x accum` micro-batches (ours: train.micro_batch_size x grad_accum_steps; TRL:
  per_device_train_batch_size x gradient_accumulation_steps with steps_per_generation = accum, so its
  generation_batch_size = P x G and it generates once per optimizer step; num_iterations = 1, so neither
  side runs an extra no-grad "old log-prob" forward).

What one timed step contains on each side:

- ours (`step_seconds` of runs/<name>/metrics.jsonl): draw P prompts, `CausalLMPolicy.sample` (HF
  `generate` with KV cache and counter-based sampling), decode, exact-match rewards, group
  advantages, micro-batch forward (selective log-probs + entropy) / PPO-clip loss / backward, grad clip,
  AdamW step, step metrics. Not included: metrics.jsonl/TensorBoard writing, held-out eval, checkpoints
  (disabled or after the last timed step).
- TRL (a TrainerCallback, from `on_step_begin` to `on_step_end`): tokenise the prompts, `generate`
  (do_sample=True, KV cache), decode, rewards, group advantages, micro-batch forward (fused LM head
  log-probs + entropy) / loss / backward, grad clip, AdamW step, scheduler step. Not included: fetching
  the generation batch from its DataLoader (before `on_step_begin`) and `_maybe_log_save_evaluate`
  (logging, saving and eval are disabled). This window is the favourable one for TRL; the interval between
  consecutive `on_step_end` calls (which adds the DataLoader fetch) is also recorded as `trl_interval_s`.

Ours runs twice per round: with the default padded training forward ("ours") and with `train.shared_prompt`
("ours, shared prompt": each prompt of a micro-batch runs once and its G completions against its KV cache,
llm_rl/shared_prompt.py; same results, ~64% fewer decoder positions here). Each gives one row against TRL.

Each side runs in a fresh child process (no shared allocator/thread state), rounds alternate
(ours, ours shared prompt, TRL, ours, ...) so drift on a shared machine hits all sides alike; the first step of every
round is a warm-up and is dropped; the figure is the median of the remaining steps. Both children also
time their pieces (generation, rewards, log-prob forward, backward) by wrapping the calls, so the table
says where each step's time goes. Target: ours >= 1.5x faster (trl_s / ours_s >= 1.5).

TRL is a benchmark-only dependency (`pip install -e '.[bench]'`); without it the script prints a
"skipped" row, writes it to the JSON and exits 0.

    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_step.py [--prompts 32 --group 16 --max-new-tokens 7 --steps 8 --rounds 3]
Prints a table and writes benchmarks/results/grpo_step.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "grpo_step.json"
TARGET = ">= 1.5"  # trl_s / ours_s
SIDES = {"ours": "ours", "ours_shared": "ours, shared prompt", "trl": "TRL"}  # child name -> label
DIGITS = 4  # the quickstart's 4-digit additions


def machine_line(extra: str = "") -> str:
    import transformers

    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return (f"{platform.processor() or platform.machine()} CPU, {threads} thread(s), torch {torch.__version__}, "
            f"transformers {transformers.__version__}{extra}, fp32")


# ------------------------------------------------------------------------------------------ shared model
def task_config(train_size: int = 4000):
    from llm_rl.tasks.arithmetic import ArithmeticTaskConfig

    # hidden 128 / 2 layers / 4 heads: the quickstart's embedded model
    return ArithmeticTaskConfig(digits=DIGITS, sft_size=1000, train_size=train_size, val_size=0, eval_size=16)


def build_bench_model(model_dir: Path, sft_steps: int, seed: int = 0, max_new_tokens: int = 7) -> dict:
    """The arithmetic task's tiny Qwen2 + tokenizer, warmed by `sft_steps` SFT steps (batch 64, lr 2e-3) on the
    task's demonstrations, saved with save_pretrained to `model_dir`. Returns a small record (loss, accuracy)."""
    from llm_rl.policy import CausalLMPolicy
    from llm_rl.tasks.arithmetic import ArithmeticTask, build_model, build_tokenizer
    from shared.sft import sft_step

    torch.manual_seed(seed)
    tcfg = task_config()
    task = ArithmeticTask(tcfg)
    tok = build_tokenizer()
    model = build_model(tcfg, tok).float()
    model.config.use_cache = True
    policy = CausalLMPolicy(model, tok, max_new_tokens=max_new_tokens)
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    rng = random.Random(seed)
    demos = task.split("sft")
    t0, loss = time.perf_counter(), float("nan")
    for _ in range(sft_steps):
        loss = float(sft_step(policy, rng.sample(demos, 64), params, opt))
    rows = task.split("eval")
    acc = sum(task.score(policy.complete(rows), rows)) / len(rows)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    return {"sft_steps": sft_steps, "sft_loss": loss, "greedy_accuracy_16": acc, "sft_seconds": time.perf_counter() - t0}


class Timers:
    """Accumulates wall seconds per named piece; `wrap` times every call of a function."""

    def __init__(self):
        self.total: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.total = self.total, {}
        return out


# ------------------------------------------------------------------------------------------ our loop
def run_ours(args) -> dict:
    """K steps of shared.loop.train on the saved model (child "ours_shared": with train.shared_prompt); per-step
    seconds from metrics.jsonl and piece timings."""
    from shared import loop
    from shared.config import validate_config

    run_root = Path(args.work) / f"{args.child}_{args.round}"
    data = {
        "name": "bench_grpo_step", "domain": "llm", "seed": args.seed, "output_dir": str(run_root),
        "model": {"name_or_path": args.model_dir, "dtype": "float32", "attention": "sdpa",
                  "gradient_checkpointing": False},
        "task": {"name": "arithmetic", **task_config().model_dump(exclude={"name"})},
        "rewards": [{"name": "exact_match", "kwargs": {"extract": "full"}}],
        "warmup": {"enabled": False},
        "rollout": {"prompts_per_step": args.prompts, "samples_per_prompt": args.group,
                    "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
        "algorithm": {"advantage": "grpo", "objective": "ppo_clip", "beta": 0.0, "loss_agg": "token_mean",
                      "epochs": 1, "eps_low": 0.2, "eps_high": 0.2},
        "optim": {"lr": args.lr, "schedule": "constant", "max_grad_norm": 1.0, "weight_decay": 0.0},
        "train": {"steps": args.steps, "micro_batch_size": args.micro, "grad_accum_steps": args.accum,
                  "shared_prompt": args.child == "ours_shared"},
        "eval": {"every": 0, "max_prompts": 16, "batch_size": 16},
        "checkpoint": {"every": 0},
        "logging": {"progress": False, "tensorboard": False, "plots": False},
    }
    cfg = validate_config(data, "bench_grpo_step")
    timers, per_step, tokens = Timers(), [], []
    real_build = loop.build_components

    def build(cfg_, acc):  # time the pieces of every step by wrapping the calls the loop makes
        comps = real_build(cfg_, acc)
        pol = comps.policy
        real_sample = pol.sample

        def sample(*a, **k):
            if timers.total:  # a new step begins: keep the previous step's pieces
                per_step.append(timers.take())
            roll = timers.wrap("generate", real_sample)(*a, **k)
            completion = int(roll.mask.sum())
            tokens.append({"prompt": int(roll.inputs["attention_mask"].sum()) - completion, "completion": completion})
            return roll

        pol.sample = sample
        pol.log_probs = timers.wrap("logprob_forward", pol.log_probs)
        comps.reward = timers.wrap("rewards", comps.reward)
        real_backward = acc.backward
        acc.backward = timers.wrap("backward", real_backward)
        return comps

    loop.build_components = build
    loop.train(cfg)
    per_step.append(timers.take())
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step_seconds") is not None]
    return {
        "step_s": [r["step_seconds"] for r in steps],
        "completion_len_mean": [r["completion_len_mean"] for r in steps],
        "reward_mean": [r["reward/total"] for r in steps],
        "pieces": per_step[: len(steps)], "tokens": tokens[: len(steps)],
    }


# ------------------------------------------------------------------------------------------ TRL
def run_trl(args) -> dict:
    """K steps of trl.GRPOTrainer on the saved model; per-step seconds from a callback and piece timings."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llm_rl.rewards import exact_match
    from llm_rl.tasks.arithmetic import ArithmeticTask

    ours_reward = exact_match(extract="full")

    def reward_exact_match(prompts, completions, answer, **_):
        """The same function our loop calls (None -> NaN in TRL, like our failure value path)."""
        return ours_reward(completions, answer=answer)

    task = ArithmeticTask(task_config())
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in task.split("train")])
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    timers, per_step = Timers(), []

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.window, self.interval, self.begin, self.last_end = [], [], None, None
            self.lengths, self.rewards, self.trainer = [], [], None

        def on_step_begin(self, a, state, control, **kw):
            timers.take()  # pieces outside the window (none expected) are not attributed to the step
            self.begin = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            self.window.append(now - self.begin)
            if self.last_end is not None:
                self.interval.append(now - self.last_end)
            self.last_end = now
            per_step.append(timers.take())
            m = self.trainer._metrics["train"]  # TRL clears these when it logs (at the end of train())
            self.lengths.append(m["completions/mean_length"][-1])
            self.rewards.append(m["reward"][-1])

    cfg = GRPOConfig(
        output_dir=str(Path(args.work) / f"trl_{args.round}"), seed=args.seed, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=args.micro, gradient_accumulation_steps=args.accum,
        steps_per_generation=args.accum, num_iterations=1, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, gradient_checkpointing=False, max_steps=args.steps,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        log_completions=False, use_vllm=False, dataloader_num_workers=0,
    )
    assert cfg.generation_batch_size == args.prompts * args.group, (cfg.generation_batch_size, args.prompts, args.group)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_exact_match], args=cfg, train_dataset=dataset,
                          processing_class=tok, callbacks=[timer])
    timer.trainer = trainer
    trainer._generate_single_turn = timers.wrap("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timers.wrap("rewards", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timers.wrap("logprob_forward",
                                                             trainer._get_per_token_logps_and_entropies)
    trainer.accelerator.backward = timers.wrap("backward", trainer.accelerator.backward)
    trainer.train()
    return {
        "step_s": timer.window, "interval_s": timer.interval, "completion_len_mean": timer.lengths,
        "reward_mean": timer.rewards, "pieces": per_step, "trl_version": trl.__version__,
    }


# ------------------------------------------------------------------------------------------ driver
def child(args, side: str, round_: int) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--round", str(round_), "--model-dir", args.model_dir,
           "--work", args.work, "--prompts", str(args.prompts), "--group", str(args.group),
           "--max-new-tokens", str(args.max_new_tokens), "--micro", str(args.micro), "--accum", str(args.accum),
           "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write(result: dict) -> None:
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


def median_pieces(pieces: list[dict]) -> dict[str, float]:
    names = sorted({k for p in pieces for k in p})
    return {k: statistics.median(p.get(k, 0.0) for p in pieces) for k in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step (quickstart: 32)")
    ap.add_argument("--group", type=int, default=16, help="completions per prompt G (quickstart: 16)")
    ap.add_argument("--max-new-tokens", type=int, default=7, help="max completion length (quickstart: 7)")
    ap.add_argument("--micro", type=int, default=256, help="sequences per micro-batch")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=8, help="steps per round (the first is a warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT warm-up of the shared model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=list(SIDES))
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--model-dir")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        res = run_trl(args) if args.child == "trl" else run_ours(args)
        print(json.dumps(res))
        return

    benchmark = f"GRPO step ({args.prompts} prompts x G={args.group}, <= {args.max_new_tokens} new tokens)"
    if importlib.util.find_spec("trl") is None:
        print("skipped: trl not installed (benchmark-only dependency: pip install -e '.[bench]')")
        print("| benchmark | baseline | ours s | TRL s | ratio | target |")
        print("|---|---|---|---|---|---|")
        print(f"| {benchmark} | TRL GRPOTrainer | - | - | skipped: trl not installed | {TARGET} |")
        write({"machine": machine_line(), "target": f"trl_s / ours_s {TARGET}", "args": vars(args),
               "rows": [{"benchmark": benchmark, "baseline": "TRL GRPOTrainer", "skipped": "trl not installed",
                         "target": TARGET}]})
        return
    if (args.prompts * args.group) % (args.micro * args.accum) or args.prompts * args.group != args.micro * args.accum:
        ap.error("one optimizer step per rollout: --prompts x --group must equal --micro x --accum")

    import trl

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir, args.work = str(Path(tmp) / "model"), tmp
        warm = build_bench_model(Path(args.model_dir), args.sft_steps, args.seed, args.max_new_tokens)
        print(f"shared model: SFT {warm['sft_steps']} steps, loss {warm['sft_loss']:.3f}, greedy accuracy "
              f"{warm['greedy_accuracy_16']:.2f} on 16 held-out sums ({warm['sft_seconds']:.0f} s)", file=sys.stderr)
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for r in range(args.rounds):
            for side in SIDES:
                res = child(args, side, r)
                runs[side].append(res)
                print(f"  round {r} {side}: steps {', '.join(f'{s:.3f}' for s in res['step_s'])} s",
                      file=sys.stderr, flush=True)

    def steady(side: str, key: str = "step_s") -> list[float]:
        return [s for res in runs[side] for s in res[key][1:]]  # drop every round's first (warm-up) step

    def steady_pieces(side: str) -> list[dict]:
        return [p for res in runs[side] for p in res["pieces"][1:]]

    seconds = {side: statistics.median(steady(side)) for side in SIDES}
    trl_s = seconds["trl"]
    machine = machine_line(f", trl {trl.__version__}")
    pieces = {side: median_pieces(steady_pieces(side)) for side in runs}
    lengths = {side: statistics.mean(steady(side, "completion_len_mean")) for side in runs}

    def row(side: str, name: str) -> dict:
        """Our `side` against TRL (the first row keeps the original keys: ours_steps_s, ours_tokens_per_step)."""
        ratio = trl_s / seconds[side]
        return {
            "benchmark": name, "baseline": f"TRL {trl.__version__} GRPOTrainer",
            "ours_s": seconds[side], "baseline_s": trl_s, "ratio": ratio,
            "ratio_definition": "TRL s / ours s", "target": TARGET, "target_met": ratio >= 1.5,
            "shared_prompt": side == "ours_shared",
            "ours_steps_s": steady(side), "trl_steps_s": steady("trl"),
            "trl_interval_s": statistics.median(steady("trl", "interval_s")) if steady("trl", "interval_s") else None,
            "completion_len_mean": {"ours": lengths[side], "trl": lengths["trl"]},
            "pieces_median_s": {"ours": pieces[side], "trl": pieces["trl"]},
            "ours_tokens_per_step": {k: statistics.mean(t[k] for res in runs[side] for t in res["tokens"][1:])
                                     for k in ("prompt", "completion")},
            "sequences_per_step": args.prompts * args.group, "optimizer_steps_per_step": 1,
        }

    rows = [row("ours", benchmark), row("ours_shared", f"{benchmark}, ours with train.shared_prompt")]
    print(f"one GRPO step, ours vs TRL ({machine}); target: ours >= 1.5x faster")
    print("| benchmark | baseline | ours s | TRL s | TRL s / ours s | target met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['baseline']} | {r['ours_s']:.3f} | {trl_s:.3f} | {r['ratio']:.2f}x | "
              f"{'yes' if r['target_met'] else 'no'} |")
    print("\nmedian seconds per step by piece (the rest: prompt handling, advantages, loss, optimizer, bookkeeping)")
    print("| side | step | generate | rewards | log-prob forward | backward | mean completion tokens |")
    print("|---|---|---|---|---|---|---|")
    for side, label in SIDES.items():
        p = pieces[side]
        print(f"| {label} | {seconds[side]:.3f} | {p.get('generate', 0):.3f} | {p.get('rewards', 0):.4f} | "
              f"{p.get('logprob_forward', 0):.3f} | {p.get('backward', 0):.3f} | {lengths[side]:.2f} |")
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    write({
        "machine": machine, "target": f"trl_s / ours_s {TARGET}", "args": vars(args) | {"model_dir": None, "work": None},
        "shared_model": warm,
        "step_contents": {
            "ours": "shared.loop.train step_seconds: prompts, CausalLMPolicy.sample (HF generate + counter-based "
                    "sampling), decode, exact-match rewards, GRPO advantages, micro-batch forward (selective "
                    "log-probs + entropy), PPO-clip token-mean loss, backward, grad clip, AdamW step, step metrics",
            "ours_shared": "the same with train.shared_prompt: the micro-batch forward runs each distinct prompt once "
                           "and its completions against the prompt's KV cache (llm_rl/shared_prompt.py)",
            "trl": "GRPOTrainer on_step_begin..on_step_end: tokenise, generate (do_sample), decode, exact-match "
                   "rewards, group advantages, micro-batch forward (fused LM-head log-probs + entropy), dapo "
                   "(token-mean) loss, backward, grad clip, AdamW step, scheduler step; DataLoader fetch excluded",
        },
        "rows": rows,
    })

if __name__ == "__main__":
    main()
