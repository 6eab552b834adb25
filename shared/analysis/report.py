"""`rlft analyze`: compare a base and a fine-tuned checkpoint; writes analysis.json and one plot per analysis.

    rlft analyze CONFIG base=PATH tuned=PATH [what=weights,tokens,tuco,diversity] [prompts=64] [k=16] [frac=0.05] [out=DIR]

PATH is a trainer checkpoint (`runs/<name>/checkpoints/step_N`, its `model/` is read) or any
`save_pretrained` folder; `base=warmup` means the run's cached warm start. The config names the task
whose held-out prompts the token-level analyses use.

| analysis    | what                                                                           | module |
|-------------|--------------------------------------------------------------------------------|--------|
| `weights`   | spectral drift, principal-subspace angles, update vs principal-mask overlap    | shared/analysis/weights.py (Path Not Taken) |
| `tokens`    | per-token JS divergence on the tuned model's greedy answers; where it concentrates | shared/analysis/divergence.py (Sparse-but-Critical) |
| `tuco`      | tuning contribution of the fine-tuned residual updates                          | shared/analysis/tuco.py (TuCo) |
| `diversity` | distinct-n and self-similarity of sampled answers, base vs tuned                | shared/analysis/diversity.py |
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ANALYSES = ("weights", "tokens", "tuco", "diversity")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the *.safetensors files of a save_pretrained folder (sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (expected a save_pretrained folder)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def weights_analysis(base: Path, tuned: Path, k: int, frac: float, out: Path) -> dict:
    from shared.analysis.weights import compare_state_dicts

    report = compare_state_dicts(load_state_dict(base), load_state_dict(tuned), k=k, frac=frac)
    _plot_weights(report, out / "weights.png")
    return report


def _plot_weights(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["per_matrix"])
    if not names:
        return
    keys = ("spectral_drift", "left_mean_deg", "overlap", "energy_fraction")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), max(3, 0.25 * len(names) + 1)), sharey=True)
    for ax, key in zip(axes, keys):
        ax.barh(range(len(names)), [report["per_matrix"][n].get(key, float("nan")) for n in names])
        ax.set_title(key)
        if key == "overlap":  # random-chance rate of the principal mask
            ax.axvline(next(iter(report["per_matrix"].values()))["chance"], color="k", ls="--", lw=1)
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_analyses(what: list[str], base: Path, tuned: Path, out: Path, *, k: int = 16, frac: float = 0.05,
                 extra: dict | None = None) -> dict:
    """Run the named analyses; `extra` maps an analysis name to a callable(out) -> dict for the token-level
    analyses that need a task and models (built by the CLI). Writes out/analysis.json."""
    unknown = [w for w in what if w not in ANALYSES]
    if unknown:
        raise ValueError(f"what={','.join(unknown)}: unknown analysis; choose from {', '.join(ANALYSES)}")
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"base": str(base), "tuned": str(tuned)}
    for name in what:
        result[name] = weights_analysis(base, tuned, k, frac, out) if name == "weights" else (extra or {})[name](out)
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    return result


def text_analyses(cfg, base: Path, tuned: Path, n_prompts: int, samples: int, top_frac: float = 0.05) -> dict:
    """The token-level analyses for a text run, as callables(out) -> dict, over the task's held-out prompts.

    tokens: JS(pi_tuned || pi_base) at every token of the tuned model's greedy answers, its profile over
    relative position, and the cross-sampling intervention of Sparse-but-Critical: greedy decoding with
    the base model that takes the tuned model's token at the top-`top_frac` JS positions, scored by the
    task next to both models' own greedy answers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_rl.policy import CausalLMPolicy
    from llm_rl.recipe import make_task
    from shared.analysis.divergence import (
        cross_sample,
        js_profile,
        token_js,
        top_js_positions,
    )
    from shared.analysis.diversity import diversity_report
    from shared.analysis.tuco import tuco_batch

    tok = AutoTokenizer.from_pretrained(tuned)
    tok.padding_side = "left"
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in (("base", base), ("tuned", tuned))}
    r = cfg.rollout
    policies = {name: CausalLMPolicy(m, tok, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                     max_new_tokens=r.max_new_tokens) for name, m in models.items()}
    task = make_task(cfg)
    rows = task.split("eval")[:n_prompts]
    prompt = policies["tuned"].encode_rows(rows, "cpu")

    def tokens(out: Path) -> dict:
        inputs, mask, texts, _ = policies["tuned"].generate(rows, 1, seed=None)
        js = token_js(models["base"], models["tuned"], inputs["input_ids"], inputs["attention_mask"], mask)
        switch = top_js_positions(js, mask, top_frac)
        crossed = cross_sample(models["base"], models["tuned"], tok, prompt["input_ids"], prompt["attention_mask"],
                               switch, r.max_new_tokens, eos_ids=policies["tuned"].eos_ids, pad_id=policies["tuned"].pad_id)
        mean = lambda xs: sum(xs) / max(len(xs), 1)
        result = js_profile(js, mask, top_frac=top_frac) | {
            "score_base": mean(task.score(policies["base"].complete(rows), rows)),
            "score_tuned": mean(task.score(texts, rows)),
            "score_base_with_tuned_top_js_tokens": mean(task.score(crossed, rows)),
            "switched_positions_frac": float(switch.sum() / mask.sum().clamp(min=1)),
        }
        _plot_profile(result, out / "tokens.png")
        return result

    def tuco(out: Path) -> dict:
        ids = [prompt["input_ids"][i, prompt["attention_mask"][i].bool()].unsqueeze(0) for i in range(len(rows))]
        return tuco_batch(models["base"], models["tuned"], ids)

    def diversity(out: Path) -> dict:
        chars = tok.tokenize
        report = {}
        for name, policy in policies.items():
            texts = policy.generate(rows, samples, seed=cfg.seed)[2]
            per_prompt = [diversity_report(texts[i * samples:(i + 1) * samples], tokenize=chars) for i in range(len(rows))]
            report[name] = {k: sum(p[k] for p in per_prompt) / len(per_prompt) for k in per_prompt[0]}
        return report

    return {"tokens": tokens, "tuco": tuco, "diversity": diversity}


def _plot_profile(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = result["relative_position_hist"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([(i + 0.5) / len(hist) for i in range(len(hist))], hist, width=1 / len(hist))
    ax.set_xlabel("relative position in the answer")
    ax.set_ylabel("mean JS(tuned || base)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
