"""Synthetic chart-to-code tasks (METHODS.md C.5), deterministic from a seed.

A task is a small matplotlib chart — bar, barh, line, scatter, pie, or a 1x2 / 2x1 grid of two of
them ("multi") — and its canonical program, which is the training target and, once rendered (by the
harness, for trusted code), the target image and facts. The vocabulary is deliberately tiny so that a
small policy with a word-level tokenizer (words, single digits and punctuation are one token each)
can learn to write the code: values and x positions are single digits 1..9, 3-5 categories from
CATEGORIES, colours from COLORS (distinct named matplotlib colours), titles from TITLES, fixed
figure sizes. MSRL trains on real charts (ChartMimic-style); this generator is rlft's deterministic
small-scale stand-in, not a reproduction of their data.

A canonical program (`spec_to_code`) for a bar chart::

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(["a", "b", "c"], [3, 5, 2], color="red")
    ax.set_title("sales")
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SINGLE_KINDS = ("bar", "barh", "line", "scatter", "pie")
KINDS = SINGLE_KINDS + ("multi",)
CATEGORIES = ("a", "b", "c", "d", "e")
COLORS = ("red", "green", "blue", "orange", "purple", "black")
TITLES = ("sales", "cost", "score", "rate", "count", "time")
FIGSIZE = {(1, 1): (3, 2), (1, 2): (5, 2), (2, 1): (3, 4)}
MIN_POINTS, MAX_POINTS = 3, 5


@dataclass(frozen=True)
class PanelSpec:
    """One Axes. `labels`: categories (bar, barh, pie); `xs`: x positions (line, scatter), else ();
    `values`: heights / widths / y values / wedge sizes; `colors`: one colour, or one per wedge (pie)."""

    kind: str
    values: tuple[int, ...]
    colors: tuple[str, ...]
    title: str
    labels: tuple[str, ...] = ()
    xs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SINGLE_KINDS:
            raise ValueError(f"unknown panel kind {self.kind!r}")
        n = len(self.values)
        keyed = self.labels if self.kind in ("bar", "barh", "pie") else self.xs
        if not MIN_POINTS <= n <= MAX_POINTS or len(keyed) != n:
            raise ValueError(f"{self.kind}: need {MIN_POINTS}..{MAX_POINTS} values matching labels/xs")
        if len(self.colors) != (n if self.kind == "pie" else 1):
            raise ValueError(f"{self.kind}: wrong number of colours {self.colors}")


@dataclass(frozen=True)
class ChartSpec:
    """A figure: `grid` (nrows, ncols) in {(1, 1), (1, 2), (2, 1)} and one PanelSpec per cell."""

    panels: tuple[PanelSpec, ...]
    grid: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.grid not in FIGSIZE or len(self.panels) != self.grid[0] * self.grid[1]:
            raise ValueError(f"grid {self.grid} does not fit {len(self.panels)} panels")

    @property
    def kind(self) -> str:
        """'multi' for a two-panel grid, else the panel's kind."""
        return "multi" if len(self.panels) > 1 else self.panels[0].kind

    @property
    def figsize(self) -> tuple[int, int]:
        return FIGSIZE[self.grid]


def random_panel(rng: random.Random, kind: str) -> PanelSpec:
    """One panel of the given kind with 3-5 points; all choices drawn from `rng`."""
    n = rng.randint(MIN_POINTS, MAX_POINTS)
    values = tuple(rng.randint(1, 9) for _ in range(n))
    title = rng.choice(TITLES)
    if kind == "pie":
        labels = tuple(sorted(rng.sample(CATEGORIES, n)))
        return PanelSpec(kind, values, tuple(rng.sample(COLORS, n)), title, labels=labels)
    color = (rng.choice(COLORS),)
    if kind in ("bar", "barh"):
        return PanelSpec(kind, values, color, title, labels=tuple(sorted(rng.sample(CATEGORIES, n))))
    xs = tuple(range(1, n + 1)) if kind == "line" else tuple(sorted(rng.sample(range(1, 10), n)))
    return PanelSpec(kind, values, color, title, xs=xs)


def random_chart(rng: random.Random) -> ChartSpec:
    """A chart whose kind is uniform over KINDS; 'multi' is a 1x2 or 2x1 grid of two single kinds."""
    kind = rng.choice(KINDS)
    if kind != "multi":
        return ChartSpec((random_panel(rng, kind),))
    grid = rng.choice([(1, 2), (2, 1)])
    return ChartSpec(tuple(random_panel(rng, rng.choice(SINGLE_KINDS)) for _ in range(2)), grid)


def _strs(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


def _ints(items: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(v) for v in items) + "]"


def _panel_lines(ax: str, p: PanelSpec) -> list[str]:
    if p.kind == "pie":
        call = f"{ax}.pie({_ints(p.values)}, labels={_strs(p.labels)}, colors={_strs(p.colors)})"
    elif p.kind in ("bar", "barh"):
        call = f'{ax}.{p.kind}({_strs(p.labels)}, {_ints(p.values)}, color="{p.colors[0]}")'
    else:
        method = "plot" if p.kind == "line" else "scatter"
        call = f'{ax}.{method}({_ints(p.xs)}, {_ints(p.values)}, color="{p.colors[0]}")'
    return [call, f'{ax}.set_title("{p.title}")']


def spec_to_code(spec: ChartSpec) -> str:
    """The canonical, minimal program drawing `spec` (no savefig/show: the harness renders the figure)."""
    w, h = spec.figsize
    lines = ["import matplotlib.pyplot as plt"]
    if len(spec.panels) == 1:
        lines.append(f"fig, ax = plt.subplots(figsize=({w}, {h}))")
        lines += _panel_lines("ax", spec.panels[0])
    else:
        rows, cols = spec.grid
        lines.append(f"fig, axs = plt.subplots({rows}, {cols}, figsize=({w}, {h}))")
        for i, panel in enumerate(spec.panels):
            lines += _panel_lines(f"axs[{i}]", panel)
    return "\n".join(lines) + "\n"


def _unique_rows(n: int, seed: int, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """n distinct (code, kind) pairs drawn from random.Random(seed), skipping codes in `exclude`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct charts (got {len(out)})")
        spec = random_chart(rng)
        code = spec_to_code(spec)
        if code not in seen:
            seen.add(code)
            out.append((code, spec.kind))
    return out


def make_split(n: int, seed: int) -> list[dict]:
    """n rows {"id", "code", "kind"} with distinct codes, deterministic for `seed`."""
    return [{"id": f"chart-{seed}-{i:05d}", "code": code, "kind": kind}
            for i, (code, kind) in enumerate(_unique_rows(n, seed))]


def chart_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows: one stream of distinct programs cut in two, so no code is in both."""
    rows = _unique_rows(n_train + n_eval, seed)
    train = [{"id": f"train-{i:05d}", "code": c, "kind": k} for i, (c, k) in enumerate(rows[:n_train])]
    held = [{"id": f"eval-{i:05d}", "code": c, "kind": k} for i, (c, k) in enumerate(rows[n_train:])]
    return train, held
