"""Chart-to-code rewards (MSRL, 2508.13587; METHODS.md C.5) from the EXECUTED program, never its text alone.

Every completion is a program; `extract_code` takes the first fenced ```python block if there is
one, else the whole text. It runs in the sandbox (`vision_rl.charts.harness.render_many`: a separate
process with time, memory, file-system and network limits) and is scored from what it drew:

- `chart_exec`:   R_exec = 1 when the program ran and left a figure, else 0;
- `chart_text`:   R_text, the rule-based textual reward (`metrics.textual_reward`: data values within
                  5%, chart type, subplot layout, drawn text by edit similarity, colours by CIEDE2000);
- `chart_visual`: R_vis, a deterministic image similarity of the rendering to the target image
                  (`metrics.VISUAL_JUDGES`, SSIM by default; a user's VLM judge plugs in there);
- `chart_low_level`: ChartMimic's low-level score / 100 (mean of the drawn text, layout, chart-type and
                  colour F1; `metrics.low_level_score`), the held-out headline metric as a reward (not an
                  MSRL reward: an option for runs that optimise that metric directly).

A program that fails, times out or is hostile scores 0 (the failure value) on all of them. MSRL's two
stages are the config's `rewards[].start_step` (stage 1: chart_exec + chart_text, stage 2 adds
chart_visual). The three rewards of one step share a `RenderCache`, so each completion runs once, at
the dpi its row's target was rendered with (the row field `dpi`).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from shared.rewards import register_reward, reward_field
from shared.sandbox import SandboxLimits
from vision_rl.charts.harness import ChartRun, render_many
from vision_rl.charts.metrics import VISUAL_JUDGES, low_level_score, textual_reward

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
MAX_CODE_CHARS = 20_000  # a longer "program" is not run (scores the failure value)


def extract_code(completion: object) -> str:
    """The program in a completion: the first ```python fenced block, else the whole text (stripped)."""
    text = completion if isinstance(completion, str) else ""
    m = FENCE.search(text)
    return (m.group(1) if m else text).strip()


class RenderCache:
    """Renders programs in the sandbox at most once each per dpi (LRU over the last `size` (program, dpi))."""

    def __init__(self, limits: SandboxLimits, workers: int, size: int = 4096):
        self.limits, self.workers, self.size = limits, workers, size
        self._runs: OrderedDict[tuple[str, float], ChartRun] = OrderedDict()
        self._lock = threading.Lock()

    def runs(self, completions: Sequence[object], dpis: Sequence[float]) -> list[ChartRun | None]:
        """One run per completion, rendered at its row's dpi (None: empty or oversized program, never run)."""
        keys = [(extract_code(c), float(d)) for c, d in zip(completions, dpis, strict=True)]
        with self._lock:
            found = {k: self._runs[k] for k in set(keys) if k in self._runs}
        todo = sorted({k for k in keys if k[0] and len(k[0]) <= MAX_CODE_CHARS and k not in found})
        for dpi in sorted({d for _, d in todo}):
            batch = [k for k in todo if k[1] == dpi]
            found.update(zip(batch, render_many([code for code, _ in batch], self.limits,
                                                max_workers=self.workers, dpi=dpi)))
        with self._lock:  # remember this call's runs, most recent last; forget the oldest beyond `size`
            for k in found:
                self._runs[k] = found[k]
                self._runs.move_to_end(k)
            while len(self._runs) > self.size:
                self._runs.popitem(last=False)
        return [found.get(k) for k in keys]


_CACHES: dict[tuple, RenderCache] = {}


def render_cache(wall_s: float = 10.0, memory_mb: int = 1024, workers: int = 2) -> RenderCache:
    """The cache shared by every chart reward (and the task's evaluation) with these sandbox settings."""
    key = (float(wall_s), int(memory_mb), int(workers))
    if key not in _CACHES:
        _CACHES[key] = RenderCache(SandboxLimits(wall_s=wall_s, cpu_s=max(1, int(wall_s)), memory_mb=memory_mb),
                                   workers)
    return _CACHES[key]


def as_rgb(image: object) -> np.ndarray | None:
    """A target image (PIL image, path or array) as an RGB uint8 array; None if it cannot be read."""
    from PIL import Image

    try:
        if isinstance(image, (str, Image.Image)):
            image = np.asarray((Image.open(image) if isinstance(image, str) else image).convert("RGB"))
        return image if isinstance(image, np.ndarray) else None
    except OSError:
        return None


def dpis(fields: dict, n: int, reward: str) -> list:
    """The rows' rendering dpi (the target's), so a program is drawn exactly as its target was."""
    return reward_field(fields, "dpi", n, reward)


def executed(run: ChartRun | None) -> bool:
    return run is not None and run.ok and bool(run.facts) and run.facts.get("n_figures", 0) > 0


def facts_reward(name: str, field: str, score, cache: RenderCache):
    """A reward scoring what each program drew against its row's target facts (row field `field`):
    score(facts, gold_facts) for a program that drew a figure, None (the failure value, counted) otherwise."""

    def reward(completions: list[str], **fields) -> list[float | None]:
        gold = reward_field(fields, field, len(completions), name)
        runs = cache.runs(completions, dpis(fields, len(completions), name))
        return [score(r.facts, g) if executed(r) else None for r, g in zip(runs, gold)]

    return reward


@register_reward("chart_exec")
def chart_exec(wall_s: float = 10.0, memory_mb: int = 1024, workers: int = 2):
    """R_exec: 1 when the program runs in the sandbox and draws a figure."""
    cache = render_cache(wall_s, memory_mb, workers)

    def reward(completions: list[str], **fields) -> list[float]:
        return [float(executed(r)) for r in cache.runs(completions, dpis(fields, len(completions), "chart_exec"))]

    return reward


@register_reward("chart_text")
def chart_text(field: str = "gold_facts", weights: dict[str, float] | None = None, wall_s: float = 10.0,
               memory_mb: int = 1024, workers: int = 2):
    """R_text: the rule-based textual reward of the drawn figure against the target's facts; None
    (the failure value, counted) when the program did not draw."""
    textual_reward({}, {}, weights)  # bad weights fail here, at config time, with the metric's message
    return facts_reward("chart_text", field, lambda facts, gold: textual_reward(facts, gold, weights),
                        render_cache(wall_s, memory_mb, workers))


@register_reward("chart_visual")
def chart_visual(field: str = "target", judge: str = "ssim", wall_s: float = 10.0, memory_mb: int = 1024,
                 workers: int = 2):
    """R_vis: the judge's similarity of the rendering to the target image (None when nothing was drawn)."""
    if judge not in VISUAL_JUDGES:
        raise ValueError(f"unknown visual judge {judge!r}; known: {', '.join(sorted(VISUAL_JUDGES))}")
    cache, score = render_cache(wall_s, memory_mb, workers), VISUAL_JUDGES[judge]

    def reward(completions: list[str], **fields) -> list[float | None]:
        targets = reward_field(fields, field, len(completions), "chart_visual")
        runs = cache.runs(completions, dpis(fields, len(completions), "chart_visual"))
        sims = score([r.image if executed(r) else None for r in runs], [as_rgb(t) for t in targets])
        return [s if executed(r) else None for s, r in zip(sims, runs)]

    return reward


@register_reward("chart_low_level")
def chart_low_level(field: str = "gold_facts", wall_s: float = 10.0, memory_mb: int = 1024, workers: int = 2):
    """ChartMimic's low-level score of the drawn figure against the target's facts, / 100 in [0, 1]; None (the
    failure value, counted) when the program did not draw."""
    return facts_reward("chart_low_level", field, lambda facts, gold: low_level_score(facts, gold)["score"] / 100,
                        render_cache(wall_s, memory_mb, workers))
