"""DeReason-style data split by measured difficulty: `rlft split CONFIG`.

The policy (after the configured warm-up) answers every train prompt `rollouts` times; a prompt's
pass rate is the fraction of answers whose reward exceeds `sampler.dots_pass_threshold`. Questions it
(almost) never solves give RL no signal (every group reward is equal), so they go to supervised
fine-tuning on their demonstrations; the rest go to RL, optionally without those it always solves.

    pass_rate <= sft_below          -> sft.jsonl  (needs the row's `completion`)
    sft_below < pass_rate           -> rl.jsonl   (pass_rate == 1 dropped with drop_solved)

[APPROX: the split rule is ours; the papers' exact thresholds were not retrieved.] The files hold the
prompts as the policy saw them (after any prompt_template): train on them with
task.prompt_template='{prompt}', task.sft_path=<out>/sft.jsonl, task.train_path=<out>/rl.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

KEEP = ("prompt", "answer", "completion")


def check_demonstrations(rows: list[dict]) -> None:
    """ValueError naming the first row without a demonstration ('completion'), which the SFT part needs."""
    missing = next((r for r in rows if "completion" not in r), None)
    if missing is not None:
        raise ValueError(f"rlft split: train row {missing.get('_where', missing.get('prompt'))} has no demonstration "
                         "('completion'), which the SFT part needs")


def split_by_difficulty(rows: list[dict], rates: torch.Tensor, sft_below: float,
                        drop_solved: bool = False) -> tuple[list[int], list[int]]:
    """(SFT indices, RL indices) of `rows` from their pass rates."""
    sft = [i for i, p in enumerate(rates.tolist()) if p <= sft_below]
    rl = [i for i, p in enumerate(rates.tolist()) if p > sft_below and not (drop_solved and p >= 1.0)]
    return sft, rl


def write_split(rows: list[dict], rates: torch.Tensor, sft: list[int], rl: list[int], out: Path,
                meta: dict) -> dict:
    """sft.jsonl, rl.jsonl (prompt, answer, completion, pass_rate) and split.json (counts, histogram)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, idx in (("sft", sft), ("rl", rl)):
        with open(out / f"{name}.jsonl", "w") as f:
            for i in idx:
                f.write(json.dumps({k: rows[i][k] for k in KEEP if k in rows[i]} | {"pass_rate": float(rates[i])}) + "\n")
    hist = torch.histc(rates.float(), bins=10, min=0.0, max=1.0).tolist() if len(rates) else []
    record = {**meta, "prompts": len(rows), "sft": len(sft), "rl": len(rl), "dropped": len(rows) - len(sft) - len(rl),
              "mean_pass_rate": float(rates.mean()) if len(rates) else 0.0,
              "pass_rate_histogram": {f"{k / 10:.1f}-{(k + 1) / 10:.1f}": int(c) for k, c in enumerate(hist)}}
    (out / "split.json").write_text(json.dumps(record, indent=2))
    return record


def measure_and_split(cfg, rollouts: int, sft_below: float, drop_solved: bool, limit: int | None, out: Path) -> dict:
    """Build the run's components (warm start included), measure train pass rates, write the split."""
    from shared.dots import PolicyProbe
    from shared.loop import make_accelerator
    from shared.recipe import build_components

    acc = make_accelerator(cfg)
    comps = build_components(cfg, acc)
    rows = comps.task.split("train")[:limit]
    if sft_below >= 0:
        check_demonstrations(rows)
    rates = PolicyProbe(comps.policy, comps.reward, cfg, acc).pass_rates(rows, rollouts, step=0, draw=0)
    sft, rl = split_by_difficulty(rows, rates, sft_below, drop_solved)
    meta = {"config": cfg.name, "rollouts": rollouts, "sft_below": sft_below, "drop_solved": drop_solved,
            "pass_threshold": cfg.sampler.dots_pass_threshold}
    return write_split(rows, rates, sft, rl, out, meta) if acc.is_main_process else {}
