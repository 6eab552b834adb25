"""`rlft` command line.

    rlft train CONFIG [key.sub=value ...]            RL (after the configured SFT warm-up); resume=true continues
    rlft eval CONFIG checkpoint=PATH|latest [key=value ...]  held-out metric of a checkpoint -> eval.json
    rlft validate CONFIG [key=value ...]             check a config and print it resolved
    rlft sample CONFIG checkpoint=PATH|latest [ws=[0,0.5,1,1.5,2]] [w_end=W] [out=DIR]
                                                     diffusion RLG sweep: base + w (RL - base) -> grid, rewards, plot
    rlft mixture CONFIG [pilots=N] [out=DIR]         MoDoMoDo over the datasets named in sampler.weights:
                                                     pilot runs, quadratic surrogate, run at its optimum
    rlft split CONFIG [rollouts=8] [sft_below=0.125] [drop_solved=false] [prompts=N] [out=DIR]
                                                     measure train pass rates, split hard -> sft.jsonl, rest -> rl.jsonl
    rlft analyze CONFIG base=PATH|warmup tuned=PATH|latest [what=weights,tokens,tuco,diversity] [prompts=64]
                                                     weight-space, token-JS (+ cross-sampling), TuCo and
                                                     diversity comparison -> analysis.json + plots

A bad config, a missing file or a malformed data row is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from shared.config import ConfigError, load_config

EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix (printed as one line, exit code 2)."""


def _split_special(overrides: list[str], special: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    rest, found = [], {}
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in special and "=" in o:
            found[key] = o.split("=", 1)[1]
        else:
            rest.append(o)
    return rest, found


def cmd_train(args) -> int:
    overrides, special = _split_special(args.overrides, ("resume",))
    if "resume" in special:
        overrides.append(f"checkpoint.resume={special['resume']}")
    cfg = load_config(args.config, overrides)
    from shared.loop import train

    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    print(f"held-out {summary['metric']}: {summary['before']:.3f} before RL -> {summary['after']:.3f} after "
          f"({summary['steps']} steps, {summary['wall_seconds']:.0f} s); outputs in {summary['run_dir']}/")
    return 0


def cmd_eval(args) -> int:
    overrides, special = _split_special(args.overrides, ("checkpoint",))
    cfg = load_config(args.config, overrides)
    from shared.evaluate import evaluate
    from shared.loop import make_accelerator
    from shared.recipe import build_components

    from shared.recipe import checkpoint_replaces_warmup

    ckpt = _checkpoint_path(cfg, special["checkpoint"]) if "checkpoint" in special else None
    if ckpt is not None and checkpoint_replaces_warmup(cfg):
        cfg.warmup.enabled = False  # the checkpoint's weights replace the warm start
    acc = make_accelerator(cfg)
    comps = build_components(cfg, acc)
    if ckpt is not None:
        from shared.checkpoint import load_hf_weights

        load_hf_weights(comps.policy.module.model, _weights_dir(ckpt))
    result = evaluate(comps.policy, comps.task, "eval", cfg.eval.max_prompts, cfg.eval.batch_size, acc)
    out_dir = ckpt if ckpt is not None else cfg.run_dir
    out = {"metric": comps.task.metric, "value": result[comps.task.metric], "n": result["n"],
           "metrics": {k: v for k, v in result.items() if k != "n"},  # e.g. AP50 and per-class AP, mIoU
           "checkpoint": str(ckpt) if ckpt else None, "config": str(args.config)}
    if acc.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "eval.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    acc.end_training()
    return 0


def _checkpoint_path(cfg, value: str) -> Path:
    """checkpoint=PATH, or checkpoint=latest for the run's newest checkpoint."""
    from shared.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(cfg.run_dir / "checkpoints") if value == "latest" else Path(value)
    if ckpt is None or not ckpt.exists():
        raise UserError(f"checkpoint={value}: no such checkpoint" + (f" under {cfg.run_dir}/checkpoints" if value == "latest" else ""))
    return ckpt


def _weights_dir(ckpt: Path) -> Path:
    """The model weights of a trainer checkpoint (its model/ folder), or a bare save_pretrained folder."""
    return ckpt / "model" if (ckpt / "model").is_dir() else ckpt


def cmd_sample(args) -> int:
    """RLG (diffusion): sweep the guidance weight between the base (reference) and the RL checkpoint."""
    from shared.config import yaml_load

    overrides, special = _split_special(args.overrides, ("checkpoint", "ws", "w_end", "out"))
    cfg = load_config(args.config, overrides)
    if cfg.domain != "diffusion":
        raise UserError(f"rlft sample: RL guidance is defined for diffusion configs; {args.config} has domain {cfg.domain!r}")
    if "checkpoint" not in special:
        raise UserError("rlft sample: give checkpoint=PATH (or checkpoint=latest) of the RL model")
    ckpt = _checkpoint_path(cfg, special["checkpoint"])
    try:
        ws = [float(w) for w in yaml_load(special.get("ws", "[0, 0.5, 1, 1.5, 2]"))]
        w_end = float(special["w_end"]) if "w_end" in special else None
    except (TypeError, ValueError):
        raise UserError(f"ws={special.get('ws')!r} / w_end={special.get('w_end')!r}: expected numbers, e.g. ws=[0,1,2]") from None
    from diffusion_rl.guidance import sweep
    from shared.checkpoint import load_hf_weights
    from shared.loop import make_accelerator
    from shared.recipe import build_components

    acc = make_accelerator(cfg)
    comps = build_components(cfg, acc)  # the policy's reference is the base: snapshotted before loading
    load_hf_weights(comps.policy.module.model, _weights_dir(ckpt))
    rows = [r for r in comps.task.split("eval")[: cfg.eval.max_prompts] if r.get("eval_set", "held_out") == "held_out"]
    out = Path(special.get("out", cfg.run_dir / "rlg"))
    result = sweep(comps.policy, rows, comps.reward, ws, out, w_end)
    for w, r in zip(result["ws"], result["mean_reward"]):
        print(f"w = {w:g}: mean reward {r:.4f}")
    print(f"grid, plot and rewards in {out}/")
    acc.end_training()
    return 0


def cmd_analyze(args) -> int:
    """Compare a base and a tuned checkpoint (shared/analysis/report.py): weights, token JS, TuCo, diversity."""
    overrides, special = _split_special(args.overrides, ("base", "tuned", "what", "prompts", "samples", "k", "frac", "out"))
    cfg = load_config(args.config, overrides)
    from shared.analysis.report import ANALYSES, run_analyses, text_analyses

    if "base" not in special or "tuned" not in special:
        raise UserError("rlft analyze: give base=PATH (or base=warmup, the run's cached warm start) and tuned=PATH "
                        "(or tuned=latest)")
    tuned = _weights_dir(_checkpoint_path(cfg, special["tuned"]))
    if special["base"] == "warmup":
        from shared.sft import cached_warmup_dir

        base = cached_warmup_dir(cfg)
        if not base.is_dir():
            raise UserError(f"base=warmup: no cached warm start at {base} (train the config first)")
    else:
        base = _weights_dir(_checkpoint_path(cfg, special["base"]))
    what = [w for w in special.get("what", ",".join(ANALYSES)).split(",") if w]
    try:
        prompts, samples = int(special.get("prompts", 64)), int(special.get("samples", 8))
        k, frac = int(special.get("k", 16)), float(special.get("frac", 0.05))
    except ValueError:
        raise UserError("prompts, samples and k are integers, frac a number, e.g. prompts=64 k=16 frac=0.05") from None
    if cfg.domain != "llm" and any(w != "weights" for w in what):
        raise UserError(f"rlft analyze: only what=weights is defined for domain {cfg.domain!r}")
    extra = text_analyses(cfg, base, tuned, prompts, samples) if any(w != "weights" for w in what) else {}
    out = Path(special.get("out", cfg.run_dir / "analysis"))
    result = run_analyses(what, base, tuned, out, k=k, frac=frac, extra=extra)
    for name in what:
        summary = result[name].get("summary", result[name])
        flat = {f"{a}/{b}" if isinstance(v, dict) else a: (w if isinstance(v, dict) else v)
                for a, v in summary.items() for b, w in (v.items() if isinstance(v, dict) else [(None, v)])}
        brief = {key: round(v, 4) for key, v in flat.items() if isinstance(v, float)}
        print(f"{name}: {brief}")
    print(f"analysis.json and plots in {out}/")
    return 0


def cmd_mixture(args) -> int:
    """MoDoMoDo: pilot runs at sampled weights over the datasets named in sampler.weights, surrogate, best run."""
    overrides, special = _split_special(args.overrides, ("pilots", "out"))
    cfg = load_config(args.config, overrides)
    datasets = list(cfg.sampler.weights)
    try:
        n_pilots = int(special.get("pilots", max(4, len(datasets) * (len(datasets) + 1) // 2 + 1)))
    except ValueError:
        raise UserError(f"pilots={special['pilots']!r}: expected an integer") from None
    from shared.loop import train
    from shared.mixture import mixture_search

    def load(suffix: str, weights: dict[str, float]):
        flow = "{" + ", ".join(f"{d}: {w!r}" for d, w in weights.items()) + "}"
        return load_config(args.config, overrides + ["sampler.name=mixture", f"sampler.weights={flow}",
                                                     f"name={cfg.name}_{suffix}"])

    out = Path(special.get("out", cfg.run_dir.parent / f"{cfg.name}_mixture"))
    record = mixture_search(load, datasets, n_pilots, cfg.seed, train, out)
    print((out / "mixture.md").read_text(), end="")
    return 0 if record else 1


def cmd_split(args) -> int:
    """DeReason-style split of the train prompts by the policy's measured pass rate (shared/difficulty.py)."""
    overrides, special = _split_special(args.overrides, ("rollouts", "sft_below", "drop_solved", "prompts", "out"))
    cfg = load_config(args.config, overrides)
    try:
        rollouts, sft_below = int(special.get("rollouts", 8)), float(special.get("sft_below", 0.125))
        limit = int(special["prompts"]) if "prompts" in special else None
    except ValueError:
        raise UserError("rollouts and prompts are integers, sft_below a number, e.g. rollouts=8 sft_below=0.125") from None
    drop = special.get("drop_solved", "false").lower()
    if drop not in ("true", "false"):
        raise UserError(f"drop_solved={special['drop_solved']!r}: expected true or false")
    from shared.difficulty import measure_and_split

    out = Path(special.get("out", cfg.run_dir / "split"))
    record = measure_and_split(cfg, rollouts, sft_below, drop == "true", limit, out)
    if record:
        print(f"{record['prompts']} prompts (mean pass rate {record['mean_pass_rate']:.3f}): {record['sft']} -> "
              f"{out / 'sft.jsonl'}, {record['rl']} -> {out / 'rl.jsonl'}, {record['dropped']} dropped")
    return 0


def cmd_validate(args) -> int:
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlft", description="Reinforcement-learning fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("train", cmd_train, "run RL from a config"),
                            ("eval", cmd_eval, "evaluate a checkpoint on the held-out split"),
                            ("validate", cmd_validate, "check a config and print it resolved"),
                            ("sample", cmd_sample, "diffusion: RL-guidance sweep between the base and a checkpoint"),
                            ("split", cmd_split, "split the train prompts by measured difficulty into SFT and "
                             "RL files"),
                            ("mixture", cmd_mixture, "MoDoMoDo: pilot runs over dataset mixtures, surrogate fit, "
                             "best predicted mixture"),
                            ("analyze", cmd_analyze, "compare a base and a tuned checkpoint: weights, token JS, TuCo, "
                             "diversity")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RLFT_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ConfigError, UserError) as e:
        print(f"rlft: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as e:
        # data problems raised while building the task carry their own file:line context
        print(f"rlft: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
