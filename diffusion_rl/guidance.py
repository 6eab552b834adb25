"""RLG: Reinforcement-Learning Guidance at inference time (Jin et al. 2508.21016; METHODS.md D.4).

At every denoising step, with classifier-free guidance applied to each model first,

    eps = eps_ref + w (eps_RL - eps_ref)         computed as torch.lerp(eps_ref, eps_RL, w)

w = 0 is the base model and w = 1 the RL model, bit for bit (lerp returns its end points exactly, and
each model runs on the same batch as it would alone); 0 < w < 1 interpolates and w > 1 extrapolates
(if p_RL ∝ p_ref exp(R / beta), the guided target is p_ref exp(w R / beta): w acts like beta / w).
`w_end` gives a linear schedule of w over the steps. The base is the policy's reference: a second
UNet, or the same UNet with its LoRA adapter disabled. Cost: two model evaluations per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion_rl.policy import EVAL_SEED


def w_at(step: int, num_steps: int, w: float, w_end: float | None = None) -> float:
    """Guidance weight at denoising step `step` (0 = first): constant w, or linear from w to w_end."""
    if w_end is None or num_steps <= 1:
        return float(w)
    return float(w + (w_end - w) * step / (num_steps - 1))


def rlg_eps(policy, w: float, w_end: float | None = None):
    """eps_fn(x, t, cond, uncond) of the RLG combination for `policy.denoise`."""
    steps = {float(t): s for s, t in enumerate(policy.scheduler.timesteps.tolist())}
    rl = policy.unwrap(policy.module)

    def eps_fn(x, t, cond, uncond):
        with policy.reference() as ref:
            e_ref = ref(x, t, cond, uncond)
        weight = w_at(steps[float(t[0])], len(steps), w, w_end)
        return torch.lerp(e_ref, rl(x, t, cond, uncond), weight)

    return eps_fn


@torch.no_grad()
def guided_sample(policy, rows: list[dict], w: float, w_end: float | None = None, eta: float | None = None):
    """Images of `rows` (seeded by row["seed"] like the held-out report) under RLG with weight w."""
    noise = policy.noise(EVAL_SEED, [int(r.get("seed", i)) for i, r in enumerate(rows)])
    cond = policy.encode_prompts([r["prompt"] for r in rows])
    uncond = policy.encode_prompts([""]).expand_as(cond).contiguous()
    with policy.eval_mode():
        x0 = policy.denoise(rlg_eps(policy, w, w_end), noise, cond, uncond, policy.eval_eta if eta is None else eta)
    return policy.decode(x0)


def sweep(policy, rows: list[dict], reward, ws: list[float], out_dir: Path, w_end: float | None = None,
          grid_rows: int = 8) -> dict:
    """Sample every row at every w; write rlg.json (rewards), grid.png and reward_vs_w.png into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = {k: [r.get(k) for r in rows] for k in rows[0]}
    images, scores = {}, {}
    for w in ws:
        images[w] = guided_sample(policy, rows, w, w_end)
        scores[w] = reward(images[w], fields).total.tolist()
    result = {"ws": ws, "w_end": w_end, "mean_reward": [sum(scores[w]) / len(rows) for w in ws],
              "rewards": [scores[w] for w in ws], "prompts": [r["prompt"] for r in rows],
              "seeds": [r.get("seed") for r in rows]}
    (out_dir / "rlg.json").write_text(json.dumps(result, indent=2))
    pick = list(range(0, len(rows), max(1, len(rows) // grid_rows)))[:grid_rows]
    grid(images, scores, ws, pick, [rows[i]["prompt"] for i in pick]).save(out_dir / "grid.png")
    plot_reward_vs_w(ws, result["mean_reward"], out_dir / "reward_vs_w.png")
    return result


def grid(images: dict, scores: dict, ws: list[float], pick: list[int], labels: list[str], cell: int = 96):
    """Rows = prompts, columns = w; each cell shows the image and its reward."""
    from PIL import Image, ImageDraw

    label_w, text_h = 110, 14
    out = Image.new("RGB", (label_w + cell * len(ws), text_h + (cell + text_h) * len(pick)), "white")
    draw = ImageDraw.Draw(out)
    for c, w in enumerate(ws):
        draw.text((label_w + c * cell + 4, 1), f"w = {w:g}", fill="black")
    for r, (i, label) in enumerate(zip(pick, labels)):
        y = text_h + r * (cell + text_h)
        draw.text((2, y + cell // 2), label, fill="black")
        for c, w in enumerate(ws):
            out.paste(images[w][i].resize((cell, cell), Image.NEAREST), (label_w + c * cell, y))
            draw.text((label_w + c * cell + 4, y + cell), f"{scores[w][i]:.3f}", fill="black")
    return out


def plot_reward_vs_w(ws: list[float], rewards: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(ws, rewards, marker="o")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.axvline(1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("RLG weight w (0 = base, 1 = RL model)")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
