"""Chart-to-code (MSRL, 2508.13587; METHODS.md C.5): a chart image in, the matplotlib program that draws it out.

Rows: `image` (the target rendering), `prompt`, `completion` (the gold program, the SFT target),
`gold_facts` (what the gold program draws: texts, subplot layout, plotting calls, colours, data; see
vision_rl/charts/harness.py) and `target` (the same image as an RGB array, for the visual reward).

- Synthetic (default, offline): `vision_rl.charts.generator` programs (bar, barh, line, scatter, pie,
  1x2 / 2x1 grids) with a tiny vocabulary, rendered in-process (trusted code; RL prompts on first
  use), train/held-out disjoint by program text.
- Real data: jsonl files of {"code": ..., "image": path (optional)}; the code is executed in the
  sandbox (dataset code is not trusted either) for its facts and, without "image", its rendering.

Held-out report (`rlft eval` too): ChartMimic's low-level metrics of the EXECUTED generated programs
(text, layout, type, colour F1 and their mean x 100, `low_level`, the headline metric), the execution
rate, the textual reward and the visual similarity. A program that does not run scores 0 everywhere.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from shared.config import register_task_schema
from shared.jsonl import jsonl_objects
from vision_rl.charts import generator
from vision_rl.charts.metrics import execution_rate, image_similarity, low_level_score, textual_reward
from vision_rl.tasks.common import EmbeddedVLMConfig
from vision_rl.tasks.shapes import LazyRows

CHART_PROMPT = "Write the matplotlib code that draws this chart."


@register_task_schema("charts")
class ChartsTaskConfig(EmbeddedVLMConfig):
    name: Literal["charts"] = "charts"
    think: bool = Field(False, description="unused: the answer is the program itself")
    train_file: str | None = Field(None, description="jsonl of {'code', 'image'?} for SFT and RL (default: synthetic)")
    eval_file: str | None = Field(None, description="held-out jsonl (required with train_file)")
    sft_size: int = Field(1000, ge=0, description="synthetic demonstrations (or the first rows of train_file)")
    train_size: int = Field(2000, gt=0, description="synthetic RL prompts (disjoint from the demonstrations)")
    val_size: int = Field(50, ge=0, description="held-out rows used for warm-up model selection")
    eval_size: int = Field(100, gt=0, description="held-out rows of the report")
    data_seed: int = Field(1234, description="seed of the synthetic generator (fixed across run seeds)")
    dpi: int = Field(50, gt=0, le=200, description="rendering resolution of targets and of generated programs")
    wall_s: float = Field(10.0, gt=0, description="sandbox wall-clock limit per program (evaluation)")
    memory_mb: int = Field(1024, gt=0, description="sandbox memory limit per program (evaluation)")
    workers: int = Field(2, gt=0, description="programs executed concurrently")

    def embedded_corpus(self) -> tuple[list[str], list[str]]:
        return tokenizer_corpus()


def render_target(code: str, dpi: int, trusted: bool, limits=None):
    """(facts, RGB array) of a gold program; ValueError if it does not draw."""
    from vision_rl.charts.harness import render_code, render_trusted

    run = render_trusted(code, dpi=dpi) if trusted else render_code(code, limits, dpi=dpi)
    if not run.ok or not run.facts or run.facts.get("n_figures", 0) < 1:
        raise ValueError(f"gold program does not draw a figure ({run.status}: {run.error})")
    return run.facts, run.image


def make_row(code: str, rid: str, dpi: int, trusted: bool = True, image: str | None = None, limits=None) -> dict:
    from PIL import Image

    facts, rendered = render_target(code, dpi, trusted, limits)
    img = Image.open(image).convert("RGB") if image else Image.fromarray(rendered)
    return {"id": rid, "image": img, "target": np.asarray(img), "prompt": CHART_PROMPT, "completion": code,
            "gold_facts": facts, "dpi": dpi, "task": "chart2code"}


def read_jsonl(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    rows = []
    for n, r in jsonl_objects(p):
        if not isinstance(r.get("code"), str):
            raise ValueError(f"{path}:{n}: a row needs a 'code' string")
        if "image" in r and not Path(r["image"]).is_file():
            raise ValueError(f"{path}:{n}: image {r['image']!r} not found")
        rows.append(r)
    return rows


class ChartsTask:
    metric = "low_level"
    higher_is_better = True

    def __init__(self, cfg: ChartsTaskConfig):
        from vision_rl.charts.rewards import render_cache

        self.cfg = cfg
        self.cache = render_cache(cfg.wall_s, cfg.memory_mb, cfg.workers)  # shared with the chart rewards
        self.limits = self.cache.limits
        if cfg.train_file:
            if not cfg.eval_file:
                raise ValueError("eval_file: required with train_file")
            train = [make_row(r["code"], f"train-{i}", cfg.dpi, False, r.get("image"), self.limits)
                     for i, r in enumerate(read_jsonl(cfg.train_file))]
            held = [make_row(r["code"], f"eval-{i}", cfg.dpi, False, r.get("image"), self.limits)
                    for i, r in enumerate(read_jsonl(cfg.eval_file))]
            sft, rl = train[: cfg.sft_size], train
        else:
            n_sft = cfg.sft_size
            tr, ev = generator.chart_splits(n_sft + cfg.train_size, cfg.val_size + cfg.eval_size, cfg.data_seed)
            sft = [make_row(r["code"], r["id"], cfg.dpi) for r in tr[:n_sft]]
            rl = LazyRows(len(tr) - n_sft, lambda i: make_row(tr[n_sft + i]["code"], tr[n_sft + i]["id"], cfg.dpi))
            held = [make_row(r["code"], r["id"], cfg.dpi) for r in ev]
        self._splits = {"sft": sft, "train": rl, "val": held[: cfg.val_size], "eval": held[cfg.val_size:] or held}

    def split(self, name: str) -> list[dict]:
        return self._splits[name]

    def _runs(self, completions: list[str], rows: list[dict]):
        return self.cache.runs(completions, [r["dpi"] for r in rows])

    def score(self, completions: list[str], rows: list[dict]) -> list[float]:
        """Per sample: the low-level score / 100 (0 when the program does not draw)."""
        return [low_level_score(facts_of(r), row["gold_facts"])["score"] / 100
                for r, row in zip(self._runs(completions, rows), rows)]

    def metrics(self, completions: list[str], rows: list[dict]) -> dict[str, float]:
        runs = self._runs(completions, rows)
        facts = [facts_of(r) for r in runs]
        low = [low_level_score(f, row["gold_facts"]) for f, row in zip(facts, rows)]
        out = {"low_level": float(np.mean([x["score"] for x in low])),
               "exec_rate": execution_rate([f if f is not None else {"n_figures": 0} for f in facts])}
        for k in ("text", "layout", "type", "color"):
            out[f"{k}_f1"] = float(np.mean([x[k] for x in low]))
        out["text_reward"] = float(np.mean([textual_reward(f, row["gold_facts"]) if f else 0.0
                                            for f, row in zip(facts, rows)]))
        out["visual"] = float(np.mean([image_similarity(r.image, row["target"]) if f else 0.0
                                       for r, f, row in zip(runs, facts, rows)]))
        return out


def facts_of(run) -> dict | None:
    """The facts of a run that drew a figure, else None."""
    from vision_rl.charts.rewards import executed

    return run.facts if executed(run) else None


def tokenizer_corpus() -> tuple[list[str], list[str]]:
    """(texts, phrases) for the embedded tokenizer: the prompt, programs of every kind, and the constant
    pieces of the canonical programs (one token each, so a program is ~40 positions)."""
    rng = random.Random(0)
    texts = [CHART_PROMPT] + [generator.spec_to_code(generator.random_chart(rng)) for _ in range(300)]
    texts += [" ".join(generator.CATEGORIES + generator.COLORS + generator.TITLES)]
    calls = [f"{ax}.{m}(" for ax in ("ax", "axs[0]", "axs[1]") for m in ("bar", "barh", "plot", "scatter", "pie",
                                                                          "set_title")]
    phrases = [CHART_PROMPT, "import matplotlib.pyplot as plt\n", "fig, ax = plt.subplots(figsize=(",
               "fig, axs = plt.subplots(", ", figsize=(", "))\n", *calls, '["', '", "', '"], [', '], [', ", ",
               '], color="', '")\n', '], labels=["', '"], colors=["', '"])\n']
    return texts, phrases
