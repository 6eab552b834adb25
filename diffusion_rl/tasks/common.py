"""What every diffusion task shares: sampling options, the held-out report, and prompt rows from files."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from shared.config import Strict, register_task_schema
from shared.jsonl import jsonl_objects


class DiffusionTaskConfig(Strict):
    """Sampling options of training rollouts and of the held-out report."""

    step: Literal["ddim", "flow_sde"] = Field("ddim", description="denoising step kind (diffusion_rl/steps.py): "
                                              "ddim = DDIM with eta (noise-predicting UNet: SD v1/v2, DDPO, PRDP); "
                                              "flow_sde = Flow-GRPO's SDE step (velocity-predicting UNet)")
    num_steps: int = Field(10, gt=0, description="denoising steps per image")
    guidance_scale: float = Field(3.0, ge=1, description="classifier-free guidance g (1 disables)")
    eta: float = Field(1.0, gt=0, description="noise level of training rollouts: DDIM's eta (DDPO: 1), or "
                     "Flow-GRPO's a in std = a sqrt(s / (1 - s)) (paper: 0.7)")
    eval_eta: float = Field(1.0, ge=0, description="noise level of the held-out report's images (fixed seeds); "
                            "1 = the training sampler (DDPO/PRDP), 0 = the deterministic ODE sampler")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="fraction of each trajectory's steps trained "
                                     "(a random subset per sample; DDPO's timestep_fraction)")
    eval_images: int = Field(8, gt=0, description="images per held-out prompt in the report (fixed seeds); "
                             "eval.max_prompts counts images")
    sample_batch_size: int = Field(64, gt=0, description="images denoised and decoded at once when sampling")
    eval_train_images: int = Field(0, ge=0, description="also report `reward_train_prompts`: this many fresh-seed "
                                   "images per RL prompt (in-distribution, as DDPO evaluates), after the held-out ones")


def held_out_metrics(reward, completions: list[dict], rows: list[dict]) -> dict[str, float]:
    """Over the held-out prompts: mean reward (`reward`, the summary metric; sampler `eval_eta`), of the
    deterministic ODE images (`reward_ode`: train-time SDE and eval-time ODE samples can diverge), per
    reward component, and the mean trajectory KL to the base (`kl_to_base`). Rows marked
    `eval_set: train_prompts` (fresh seeds of the RL prompts) give `reward_train_prompts` instead."""
    mean = lambda xs: float(sum(xs) / max(len(xs), 1))  # noqa: E731
    held = [i for i, r in enumerate(rows) if r.get("eval_set", "held_out") == "held_out"]
    seen = [i for i, r in enumerate(rows) if r.get("eval_set") == "train_prompts"]

    def score(idx: list[int], key: str):
        fields = {k: [rows[i].get(k) for i in idx] for k in rows[idx[0]]}
        return reward([completions[i][key] for i in idx], fields)

    main, ode = score(held, "image"), score(held, "ode_image")
    out = {"reward": mean(main.total.tolist()), "reward_ode": mean(ode.total.tolist())}
    out |= {f"reward_{k}": mean(v.tolist()) for k, v in main.components.items()}
    if seen:
        out["reward_train_prompts"] = mean(score(seen, "image").total.tolist())
    kls = [completions[i]["kl"] for i in held if completions[i].get("kl") is not None]
    if kls:
        out["kl_to_base"] = mean(kls)
    return out


class PromptTask:
    """Rows with a `prompt`: RL draws from `train`, the report samples `eval_images` seeds per eval prompt."""

    metric = "reward"
    higher_is_better = True

    def __init__(self, train: list[dict], held_out: list[dict], eval_images: int, eval_train_images: int = 0):
        report = [dict(r, seed=k, eval_set="held_out") for r in held_out for k in range(eval_images)]
        report += [dict(r, seed=eval_images + k, eval_set="train_prompts") for r in train for k in range(eval_train_images)]
        self._splits = {"train": train, "eval": report}
        self.reward = None  # bound by the recipe: the run's combined reward is the held-out metric

    def split(self, name: str) -> list[dict]:
        return self._splits.get(name, [])

    def metrics(self, completions: list[dict], rows: list[dict]) -> dict[str, float]:
        return held_out_metrics(self.reward, completions, rows)

    def sample_grid(self, completions: list[dict], rows: list[dict], per_row: int = 8):
        """Held-out images, one row per prompt (the report's sampler above, the ODE sampler below)."""
        from PIL import Image

        prompts = list(dict.fromkeys(r["prompt"] for r in rows))
        w, h = completions[0]["image"].size
        grid = Image.new("RGB", (w * per_row, 2 * h * len(prompts)), "white")
        seen: dict[str, int] = {}
        for c, r in zip(completions, rows):
            i, j = prompts.index(r["prompt"]), seen.get(r["prompt"], 0)
            if j < per_row:
                grid.paste(c["image"], (j * w, 2 * i * h))
                grid.paste(c["ode_image"], (j * w, (2 * i + 1) * h))
            seen[r["prompt"]] = j + 1
        return grid


def read_prompts(path: str) -> list[dict]:
    """A .txt file (one prompt per line) or .jsonl (objects with a "prompt" and any reward fields)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: prompt file not found")
    if p.suffix == ".jsonl":
        rows = []
        for n, row in jsonl_objects(p):
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'prompt'")
            rows.append(row)
    else:
        rows = [{"prompt": line.strip()} for line in p.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


@register_task_schema("prompt_file")
class PromptFileConfig(DiffusionTaskConfig):
    name: Literal["prompt_file"] = "prompt_file"
    train_path: str = Field(description="RL prompts: .txt (one per line) or .jsonl (with reward fields); "
                            "relative paths are from the working directory")
    eval_path: str = Field(description="held-out prompts, same formats")

    @field_validator("train_path", "eval_path")
    @classmethod
    def _exists(cls, path: str) -> str:
        if not Path(path).is_file():
            raise ValueError(f"prompt file {path!r} not found (relative to {Path.cwd()})")
        return path


def prompt_file_task(cfg: PromptFileConfig) -> PromptTask:
    return PromptTask(read_prompts(cfg.train_path), read_prompts(cfg.eval_path), cfg.eval_images, cfg.eval_train_images)
