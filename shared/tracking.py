"""Run logging: metrics.jsonl, TensorBoard events, a progress bar, and PNG plots at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm

PROGRESS_KEYS = (("reward/total", "reward"), ("kl_ref", "kl"), ("tokens_per_s/sample", "tok/s"))
PLOT_KEYS = ("reward/total", "eval/*", "kl_ref", "completion_len_mean", "loss", "entropy")


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="rl", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {}
            for key, label in PROGRESS_KEYS:
                if clean.get(key) is not None:
                    shown[label] = f"{clean[key]:.3g}"
            for k, v in clean.items():
                if k.startswith("eval/") and v is not None:
                    shown[k[5:]] = f"{v:.3f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def truncate_metrics(path: Path, keep_upto_step: int) -> None:
    """Drop metric lines after `keep_upto_step` (a resumed run rewrites them)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= keep_upto_step]
    path.write_text("".join(l + "\n" for l in lines))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()] if Path(path).exists() else []


def plot_metrics(run_dir: Path, keys: tuple[str, ...] = PLOT_KEYS) -> Path | None:
    """One PNG with a panel per metric present in metrics.jsonl."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    names = list(dict.fromkeys(k for r in rows for k in r))
    expanded = [n for k in keys for n in ([n for n in names if n.startswith(k[:-1]) and n != "eval/n"]
                                          if k.endswith("*") else [k])]
    present = [k for k in expanded if any(r.get(k) is not None for r in rows)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, k in zip(axes[0], present):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
