"""vision_rl/charts/generator.py: deterministic synthetic chart tasks whose canonical programs compile,
run under Agg and draw the expected axes and artists; disjoint splits; short programs."""

from __future__ import annotations

import ast
import random
import re
import statistics
from pathlib import Path

import matplotlib
import pytest

from vision_rl.charts import generator
from vision_rl.charts.generator import (
    COLORS,
    KINDS,
    ChartSpec,
    PanelSpec,
    chart_splits,
    make_split,
    random_chart,
    spec_to_code,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after selecting the backend


def _run_trusted(code: str):
    """Exec trusted generated code under Agg and return the figure's axes (test-only; the real
    renderer is vision_rl.charts.harness.render_trusted)."""
    plt.close("all")
    exec(compile(code, "<chart>", "exec"), {"__name__": "__chart__"})  # noqa: S102  (trusted generated code)
    assert len(plt.get_fignums()) == 1
    return plt.gcf().axes


def _tokens(code: str) -> list[str]:
    """Word-level tokens as the small policy sees them: words, single digits, punctuation."""
    return re.findall(r"[A-Za-z_]+|\d|[^\sA-Za-z_\d]", code)


def _specs_per_kind(n_each: int, seed: int = 7) -> list[ChartSpec]:
    rng, found = random.Random(seed), {k: [] for k in KINDS}
    while any(len(v) < n_each for v in found.values()):
        spec = random_chart(rng)
        found[spec.kind].append(spec)
    return [s for k in KINDS for s in found[k][:n_each]]


def test_example_code_shape():
    spec = ChartSpec((PanelSpec("bar", (3, 5, 2), ("red",), "sales", labels=("a", "b", "c")),))
    assert spec_to_code(spec) == ('import matplotlib.pyplot as plt\n'
                                  'fig, ax = plt.subplots(figsize=(3, 2))\n'
                                  'ax.bar(["a", "b", "c"], [3, 5, 2], color="red")\n'
                                  'ax.set_title("sales")\n')
    multi = ChartSpec((spec.panels[0], PanelSpec("line", (4, 2, 5), ("blue",), "cost", xs=(1, 2, 3))), grid=(1, 2))
    assert spec_to_code(multi).splitlines()[1:] == [
        "fig, axs = plt.subplots(1, 2, figsize=(5, 2))",
        'axs[0].bar(["a", "b", "c"], [3, 5, 2], color="red")', 'axs[0].set_title("sales")',
        'axs[1].plot([1, 2, 3], [4, 2, 5], color="blue")', 'axs[1].set_title("cost")']


def test_deterministic_and_all_kinds():
    assert make_split(60, 3) == make_split(60, 3)
    assert make_split(60, 3) != make_split(60, 4)
    rows = make_split(300, 0)
    assert {r["kind"] for r in rows} == set(KINDS)
    assert len({r["code"] for r in rows}) == 300 and len({r["id"] for r in rows}) == 300
    assert [random_chart(random.Random(5)) for _ in range(3)] == [random_chart(random.Random(5))] * 3


def test_vocabulary_is_small():
    for spec in _specs_per_kind(20):
        for p in spec.panels:
            assert all(1 <= v <= 9 for v in p.values + p.xs) and 3 <= len(p.values) <= 5
            assert set(p.colors) <= set(COLORS) and len(set(p.colors)) == len(p.colors)
        numbers = [t for t in _tokens(spec_to_code(spec)) if t.isdigit()]
        assert all(len(t) == 1 for t in numbers)


def test_code_runs_under_agg_with_expected_artists():
    for spec in _specs_per_kind(3):
        code = spec_to_code(spec)
        ast.parse(code)
        axes = _run_trusted(code)
        assert len(axes) == len(spec.panels)
        geometry = axes[0].get_subplotspec().get_geometry()[:2]
        assert geometry == spec.grid
        for ax, p in zip(axes, spec.panels):
            n = len(p.values)
            assert ax.get_title() == p.title
            if p.kind in ("bar", "barh", "pie"):
                assert len(ax.patches) == n
            if p.kind == "line":
                assert len(ax.lines) == 1 and list(ax.lines[0].get_ydata()) == list(p.values)
            if p.kind == "scatter":
                offsets = ax.collections[0].get_offsets()
                assert len(ax.collections) == 1 and [tuple(o) for o in offsets] == list(zip(p.xs, p.values))
            if p.kind == "bar":
                assert [r.get_height() for r in ax.patches] == list(p.values)
            if p.kind == "barh":
                assert [r.get_width() for r in ax.patches] == list(p.values)
        plt.close("all")


def test_splits_disjoint():
    train, held = chart_splits(400, 100, seed=11)
    assert len(train) == 400 and len(held) == 100
    assert not {r["code"] for r in train} & {r["code"] for r in held}
    assert chart_splits(400, 100, seed=11) == (train, held)
    assert {r["kind"] for r in held} == set(KINDS)


def test_code_is_short():
    rows = make_split(500, 1)
    chars = [len(r["code"]) for r in rows]
    tokens = [len(_tokens(r["code"])) for r in rows]
    # typical: ~175 characters / ~80 tokens; longest (two 5-point panels): < 400 characters / < 200 tokens
    assert 140 <= statistics.median(chars) <= 220 and max(chars) < 400
    assert statistics.median(tokens) <= 100 and max(tokens) < 200


def test_spec_validation():
    with pytest.raises(ValueError):
        PanelSpec("area", (1, 2, 3), ("red",), "sales", labels=("a", "b", "c"))
    with pytest.raises(ValueError):
        PanelSpec("bar", (1, 2), ("red",), "sales", labels=("a", "b"))  # fewer than 3 points
    with pytest.raises(ValueError):
        PanelSpec("pie", (1, 2, 3), ("red",), "sales", labels=("a", "b", "c"))  # one colour per wedge
    with pytest.raises(ValueError):
        ChartSpec((PanelSpec("line", (1, 2, 3), ("red",), "cost", xs=(1, 2, 3)),), grid=(1, 2))
    with pytest.raises(ValueError):
        make_split(-1, 0)


def test_generator_does_not_import_the_harness_or_matplotlib():
    tree = ast.parse(Path(generator.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("harness" in m or "matplotlib" in m for m in imported), imported
