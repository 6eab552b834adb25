"""Run a matplotlib program and return only its figure: the rendering and the facts the metrics need.

    run = render_code(code, SandboxLimits(wall_s=5))   # untrusted code, in the sandbox (shared.sandbox)
    runs = render_many(codes, limits, max_workers=2)   # -> ChartRun(ok, status, error, facts, image)
    run = render_trusted(code)                          # our own code, in-process, same extraction

In the child, `run` (runner "vision_rl.charts.harness:run") seeds matplotlib's font cache (dumped once
by the parent), imports matplotlib (Agg, default rcParams, no open figure), instruments it, allows reads
of its data and font directories, runs the program under the guard and extracts the facts of the current
figure. In fork mode (the default) the imports, the instrumentation and a warm-up rendering happen once,
in the fork server (`prepare`); spawn mode (`mode="spawn"`) gives identical facts and pixels.

Facts (the contract with vision_rl/charts/metrics.py): n_figures; texts (strings Agg drew, in draw
order, via wrapped RendererAgg.draw_text/draw_tex); layout ([nrows, ncols, row_start, row_stop,
col_start, col_stop] per non-colorbar Axes); calls (plotting calls, counted by wrapped Axes methods with
a per-thread re-entrancy depth: hist -> bar counts once, colorbar/bar_label nothing); colors ('#rrggbb'
per group); data (bar/line/scatter/pie series, 6 significant digits, capped); size ([width, height]).
The image is RGB uint8 (H, W, 3) at DEFAULT_DPI (6.4 x 4.8 in -> 320 x 240), dpi lowered so that
W * H <= max_pixels; below MIN_DPI it fails ("figure too large") before allocating. Status "no_figure":
the program ran but left no figure (facts with n_figures 0, image None, ok False).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.sandbox import SandboxLimits, SandboxResult, run_many
from shared.sandbox_child import one_line

RUNNER = "vision_rl.charts.harness:run"
DEFAULT_DPI, MIN_DPI = 50.0, 1.0
MAX_SERIES, MAX_NUMBERS, MAX_TEXTS, MAX_COLORS = 1000, 10000, 10000, 10000
COUNTED_CALLS = ("plot", "bar", "barh", "scatter", "pie", "hist", "fill_between", "fill_betweenx", "fill",
                 "errorbar", "boxplot", "violinplot", "imshow", "stackplot", "step", "stem", "contour",
                 "contourf", "hexbin", "pcolormesh", "text", "annotate")
COLOR_GROUPS = ("line", "bar", "scatter", "pie", "fill")
FACT_KEYS = ("n_figures", "texts", "layout", "calls", "colors", "data", "size")

_state = threading.local()  # .calls (dict or None), .depth, .texts (list or None)
_lock = threading.RLock()  # instrumentation install, in-process rendering
_prepared = False  # `prepare` ran in this process (a fork server) or in the server this process was forked from
_WARM_UP = ("import matplotlib.pyplot as plt\nfig, (a, b) = plt.subplots(1, 2)\na.bar(['a', 'b'], [1, 2], label='x')\n"
            "a.plot([0, 1], [1, 0])\na.scatter([0, 1], [0, 1])\na.legend()\na.set_title('$x^2$')\n"
            "b.pie([1, 2], labels=['a', 'b'], autopct='%1.0f%%')\n")


class ChartError(Exception):
    """The figure cannot be rendered within the limits."""


@dataclass
class ChartRun:
    """Outcome of running one chart program: `facts` per the schema above, `image` its rendering."""
    ok: bool
    status: str
    error: str = ""
    facts: dict | None = None
    image: np.ndarray | None = None  # RGB uint8 (H, W, 3)
    stdout: str = ""
    seconds: float = 0.0


# ---------------------------------------------------------------- instrumentation

def _counting(name: str | None, method: Callable) -> Callable:
    """Wrap `method` to count its top-level calls as `name` (None: count nothing, only nest)."""
    @functools.wraps(method)
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls = getattr(_state, "calls", None)
        if calls is None:
            return method(*args, **kwargs)
        if _state.depth == 0 and name is not None:
            calls[name] = calls.get(name, 0) + 1
        _state.depth += 1
        try:
            return method(*args, **kwargs)
        finally:
            _state.depth -= 1
    return counted


def _capturing(method: Callable) -> Callable:
    @functools.wraps(method)
    def draw(self: Any, gc: Any, x: float, y: float, s: Any, *args: Any, **kwargs: Any) -> Any:
        texts = getattr(_state, "texts", None)
        if texts is not None and isinstance(s, str) and s.strip() and len(texts) < MAX_TEXTS:
            texts.append(s)
        return method(self, gc, x, y, s, *args, **kwargs)
    return draw


def install_instrumentation() -> None:
    """Wrap the counted Axes methods, the silent decorations and Agg's text drawing, once per process.
    The wrappers do nothing outside `_counting_calls` / `render_figure`: other plotting is unaffected."""
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.figure import FigureBase

    silent = [(Axes, "bar_label", None), (Axes, "clabel", None), (FigureBase, "colorbar", None)]  # decorations
    with _lock:
        if not getattr(Axes, "_rlft_instrumented", False):
            for cls, name, counted_as in [(Axes, n, n) for n in COUNTED_CALLS] + silent:
                setattr(cls, name, _counting(counted_as, getattr(cls, name)))
            for name in ("draw_text", "draw_tex"):
                setattr(RendererAgg, name, _capturing(getattr(RendererAgg, name)))
            Axes._rlft_instrumented = True


@contextmanager
def _counting_calls() -> Iterator[dict[str, int]]:
    _state.calls, _state.depth = {}, 0
    try:
        yield _state.calls
    finally:
        _state.calls = None


# ---------------------------------------------------------------- rendering and facts

def render_figure(fig: Any, *, dpi: float = DEFAULT_DPI, max_pixels: int = SandboxLimits.max_pixels
                  ) -> tuple[np.ndarray, list[str]]:
    """(RGB image, drawn texts) of `fig` rendered by Agg at `dpi`, lowered to fit `max_pixels`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    install_instrumentation()
    width, height = (float(v) for v in fig.get_size_inches())
    usable = width > 0 and height > 0 and math.isfinite(width * height)
    dpi = min(float(dpi), math.sqrt(max_pixels / (width * height))) if usable else 0.0
    if usable and dpi < MIN_DPI:
        raise ChartError(f"figure too large: {width:g} x {height:g} in does not fit {max_pixels} pixels")
    if int(width * dpi) < 1 or int(height * dpi) < 1:
        raise ChartError(f"figure has an unusable size {width:g} x {height:g} in")
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    old_dpi, texts = fig.dpi, []
    try:
        fig.dpi, _state.texts = dpi, texts
        canvas.draw()
        image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    finally:
        fig.dpi, _state.texts = old_dpi, None
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ChartError(f"figure too large: {image.shape[1]} x {image.shape[0]} pixels")
    return image, texts


def empty_facts(calls: dict[str, int] | None = None) -> dict:
    """The facts of a program that left no figure."""
    return {"n_figures": 0, "texts": [], "layout": [], "calls": dict(sorted((calls or {}).items())),
            "colors": {g: [] for g in COLOR_GROUPS}, "data": [], "size": [0, 0]}


def facts_of_figure(fig: Any, *, calls: dict[str, int] | None = None, n_figures: int = 1,
                    dpi: float = DEFAULT_DPI, max_pixels: int = SandboxLimits.max_pixels) -> tuple[dict, np.ndarray]:
    """(facts, image) of one figure; `calls` are the counted plotting calls (see module docstring)."""
    image, texts = render_figure(fig, dpi=dpi, max_pixels=max_pixels)  # first: drawing updates colour maps
    axes = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None and ax.get_label() != "<colorbar>"]
    facts = empty_facts(calls)
    facts["colors"], facts["data"] = _series(axes)
    facts.update(n_figures=int(n_figures), texts=texts, layout=[_layout_of(ax) for ax in axes],
                 size=[int(image.shape[1]), int(image.shape[0])])
    return facts, image


def _facts_after(nums: Sequence[int], calls: dict[str, int], dpi: float, max_pixels: int
                 ) -> tuple[dict, np.ndarray | None]:
    """Facts of the current figure among the pyplot figures `nums` the program left open."""
    import matplotlib.pyplot as plt
    from matplotlib._pylab_helpers import Gcf

    if not nums:
        return empty_facts(calls), None
    active = Gcf.get_active()
    fig = active.canvas.figure if active is not None and active.num in nums else plt.figure(max(nums))
    return facts_of_figure(fig, calls=calls, n_figures=len(nums), dpi=dpi, max_pixels=max_pixels)


def _layout_of(ax: Any) -> list[int]:
    spec = ax.get_subplotspec()
    if spec is None:
        return [1, 1, 0, 1, 0, 1]
    (nrows, ncols), rows, cols = spec.get_geometry()[:2], spec.rowspan, spec.colspan
    return [int(nrows), int(ncols), int(rows.start), int(rows.stop), int(cols.start), int(cols.stop)]


def _series(axes: Sequence[Any]) -> tuple[dict[str, list[str]], list[dict]]:
    """(colors by group, data series) of the visible data artists of `axes`, in the order Axes.draw draws
    them (stable sort by zorder)."""
    from matplotlib.collections import PathCollection, PolyCollection
    from matplotlib.colors import to_hex, to_rgba_array
    from matplotlib.container import BarContainer
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle, Wedge

    colors: dict[str, list[str]] = {g: [] for g in COLOR_GROUPS}
    data: list[dict] = []

    def add(group: str, color_specs: Any, series: dict | None = None, distinct: bool = False) -> None:
        hexes = [to_hex(c, keep_alpha=False) for c in to_rgba_array(color_specs)[:MAX_COLORS]]
        colors[group].extend((list(dict.fromkeys(hexes)) if distinct else hexes)[: MAX_COLORS - len(colors[group])])
        if series is not None and len(data) < MAX_SERIES:
            data.append(series)

    def xy(kind: str, artist: Any, x: Any, y: Any) -> dict:
        return {"type": kind, "label": _label(artist.get_label()), "x": _values(x), "y": _values(y)}

    for ax in axes:
        bar_of = {id(p): c for c in ax.containers if isinstance(c, BarContainer) for p in c.patches}
        members = {id(a) for a in (*ax.lines, *ax.patches, *ax.collections)}
        order = sorted((a for a in ax.get_children() if id(a) in members and a.get_visible()),
                       key=lambda a: a.get_zorder())
        done: set = set()
        for art in order:
            if isinstance(art, Line2D):
                add("line", [art.get_color()], xy("line", art, art.get_xdata(), art.get_ydata()))
            elif isinstance(art, Rectangle) and id(art) in bar_of and id(bar_of[id(art)]) not in done:
                done.add(id(bar_of[id(art)]))
                add("bar", [p.get_facecolor() for p in bar_of[id(art)].patches], _bar_series(ax, bar_of[id(art)]))
            elif isinstance(art, Wedge) and "pie" not in done:  # all wedges of an Axes form one pie series
                done.add("pie")
                wedges = [w for w in order if isinstance(w, Wedge)][:MAX_NUMBERS]
                pie = {"type": "pie", "label": "", "x": [str(w.get_label()) for w in wedges],
                       "y": [_value((w.theta2 - w.theta1) / 360) for w in wedges]}
                add("pie", [w.get_facecolor() for w in wedges], pie)
            elif isinstance(art, PathCollection):
                offsets = np.ma.asarray(art.get_offsets()).reshape(-1, 2)
                add("scatter", art.get_facecolor(), xy("scatter", art, offsets[:, 0], offsets[:, 1]), True)
            elif isinstance(art, PolyCollection):
                add("fill", art.get_facecolor(), distinct=True)
    return colors, data


def _bar_series(ax: Any, box: Any) -> dict:
    """Bar centres (category labels on a categorical axis) and heights (barh: widths) of a container."""
    from matplotlib.category import UnitData

    horizontal = getattr(box, "orientation", None) == "horizontal"
    units = (ax.yaxis if horizontal else ax.xaxis).get_units()
    mapping = getattr(units, "_mapping", None) if isinstance(units, UnitData) else None
    names = {int(v): str(k) for k, v in mapping.items()} if mapping else {}
    xs, ys = [], []
    for p in box.patches[:MAX_NUMBERS]:
        if horizontal:
            centre, value = p.get_y() + p.get_height() / 2, p.get_width()
        else:
            centre, value = p.get_x() + p.get_width() / 2, p.get_height()
        k = round(centre) if names and math.isfinite(centre) else None
        xs.append(names[k] if k in names and abs(centre - k) < 1e-9 else _value(centre))
        ys.append(_value(value))
    return {"type": "bar", "label": _label(box.get_label()), "x": xs, "y": ys}


def _label(label: object) -> str:
    return "" if label is None or str(label).startswith("_") else str(label)


def _value(v: Any) -> float | str | None:
    """A JSON-stable value: numbers to 6 significant digits (non-finite -> None), strings as they are."""
    if isinstance(v, numbers.Real):
        return float(f"{float(v):.6g}") if math.isfinite(float(v)) else None
    return v if v is None or isinstance(v, str) else str(v)


def _values(values: Any) -> list:
    try:
        return [_value(v) for v in np.ma.asarray(values).ravel()[:MAX_NUMBERS].astype(object).filled(None).tolist()]
    except (TypeError, ValueError):
        return []


# ---------------------------------------------------------------- the child runner

def _seed_font_cache(options: Any) -> None:
    """Copy the parent's font-list cache (option "font_cache") into MPLCONFIGDIR before matplotlib loads."""
    cache, target = options.get("font_cache"), os.environ.get("MPLCONFIGDIR")
    if isinstance(cache, str) and target and os.path.isfile(cache) and "matplotlib" not in sys.modules:
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(cache, os.path.join(target, os.path.basename(cache)))


def prepare(options: Any) -> None:
    """Fork-server warm-up (trusted, before any program; shared.sandbox_server): matplotlib (Agg), pyplot,
    numpy.random, the instrumentation, fonts, and the lazy imports and caches of one rendering. It leaves
    no figure and default rcParams, so the children forked afterwards need not reset them."""
    global _prepared
    _seed_font_cache(options)
    import matplotlib.pyplot as plt
    import numpy.random  # noqa: F401  (lazily imported by numpy; `run` reseeds it)
    from matplotlib import font_manager, mathtext

    render_trusted(_WARM_UP)
    for cache in (font_manager._get_font, getattr(mathtext.MathTextParser, "_parse_cached", None)):
        getattr(cache, "cache_clear", lambda: None)()  # they hold open font files: not to be shared
    plt.rcdefaults()
    _prepared = True


def run(program: str, ctx: Any) -> dict:
    """Runner executed INSIDE the sandbox child (ctx: shared.sandbox_child.SandboxContext), spawned or
    forked from a server that ran `prepare`: no figure is open, rcParams are the defaults, numpy reseeded."""
    _seed_font_cache(ctx.options)
    import matplotlib
    import matplotlib.pyplot as plt  # the backend is Agg: MPLBACKEND is set by the sandbox
    from matplotlib import font_manager

    matplotlib.use("Agg")
    install_instrumentation()
    if not _prepared:  # else this process is a fork of a prepared server, whose state is exactly that
        plt.close("all")
        plt.rcdefaults()
    np.random.seed()  # a forked child would otherwise share its server's (and siblings') global state
    fonts = {os.path.dirname(f.fname) for f in font_manager.fontManager.ttflist + font_manager.fontManager.afmlist}
    ctx.allow_read(matplotlib.get_data_path(), *sorted(fonts))
    with _counting_calls() as calls:
        if not ctx.exec_untrusted(program, {"__name__": "__main__"}):
            return {}
    facts, image = _facts_after(plt.get_fignums(), calls, float(ctx.options.get("dpi", DEFAULT_DPI)),
                                int(ctx.limits["max_pixels"]))
    return {"facts": facts} if image is None else {"facts": facts, "image": image.tobytes()}


# ---------------------------------------------------------------- in-process twin (trusted code)

def render_trusted(code: str, *, dpi: float = DEFAULT_DPI, max_pixels: int = SandboxLimits.max_pixels) -> ChartRun:
    """TRUSTED code in-process, same extraction as the sandbox (default rcParams; its figures are closed)."""
    import matplotlib
    import matplotlib.pyplot as plt

    started = time.monotonic()
    install_instrumentation()
    with _lock, matplotlib.rc_context():
        plt.rcdefaults()
        before = set(plt.get_fignums())
        try:
            with _counting_calls() as calls:
                try:
                    exec(compile(code, "<program>", "exec"), {"__name__": "__main__"})
                except SystemExit as exc:
                    if exc.code not in (None, 0):
                        raise
            facts, image = _facts_after([n for n in plt.get_fignums() if n not in before], calls, dpi, max_pixels)
        except BaseException as exc:
            status = "memory" if isinstance(exc, MemoryError) else "error"
            return ChartRun(False, status, one_line(exc), seconds=time.monotonic() - started)
        finally:
            for n in set(plt.get_fignums()) - before:
                plt.close(n)
    return _finished(facts, image, "", time.monotonic() - started)


def _finished(facts: dict, image: np.ndarray | None, stdout: str, seconds: float) -> ChartRun:
    if facts["n_figures"] == 0:
        return ChartRun(False, "no_figure", "the program left no figure", facts, None, stdout, seconds)
    return ChartRun(True, "ok", "", facts, image, stdout, seconds)


# ---------------------------------------------------------------- parent side (untrusted code)

def render_code(code: str, limits: SandboxLimits | None = None, *, dpi: float = DEFAULT_DPI,
                mode: str = "fork") -> ChartRun:
    """Run untrusted `code` in the sandbox; never raises for a bad program."""
    return render_many([code], limits, max_workers=1, dpi=dpi, mode=mode)[0]


def render_many(codes: Sequence[str], limits: SandboxLimits | None = None, max_workers: int = 2, *,
                dpi: float = DEFAULT_DPI, mode: str = "fork") -> list[ChartRun]:
    """`render_code` over many programs, `max_workers` sandboxes at a time; results in input order. Mode
    "fork" (default): children forked from one prepared server; "spawn": a fresh interpreter each."""
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 0 < dpi < math.inf:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    limits, options = limits or SandboxLimits(), {"dpi": float(dpi), "font_cache": _font_cache_file()}
    return [_chart_run(r, limits) for r in run_many(list(codes), RUNNER, limits, max_workers=max_workers,
                                                    options=options, mode=mode)]


@functools.lru_cache(maxsize=1)
def _font_cache_file() -> str | None:
    """matplotlib's own font-list cache (written when it first loads); each child copies it into its own
    MPLCONFIGDIR so that no run rebuilds the font cache. None if matplotlib could not write one."""
    import matplotlib
    from matplotlib import font_manager

    path = os.path.join(matplotlib.get_cachedir(), f"fontlist-v{font_manager.FontManager.__version__}.json")
    return path if os.path.isfile(path) else None


def _chart_run(res: SandboxResult, limits: SandboxLimits) -> ChartRun:
    """A validated ChartRun from the child's result (the child is untrusted too)."""
    facts, blob = (res.result or {}).get("facts"), res.blobs.get("image")
    status, error = (res.status, res.error) if not res.ok else ("no_output", "malformed chart facts")
    if not res.ok or not valid_facts(facts):
        return ChartRun(False, status, error, stdout=res.stdout, seconds=res.seconds)
    width, height = facts["size"]
    if facts["n_figures"] == 0:
        return _finished(facts, None, res.stdout, res.seconds)
    if blob is None or not 0 < width * height <= limits.max_pixels or len(blob) != width * height * 3:
        return ChartRun(False, "no_output", "malformed chart image", stdout=res.stdout, seconds=res.seconds)
    image = np.frombuffer(blob, dtype=np.uint8).reshape(height, width, 3).copy()
    return _finished(facts, image, res.stdout, res.seconds)


def valid_facts(facts: object) -> bool:
    """True when `facts` follows the schema (types and shapes, not values)."""
    def ints(v: object, n: int | None = None) -> bool:
        return isinstance(v, list) and len(v) == (len(v) if n is None else n) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)

    def strs(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def series(s: object) -> bool:
        return isinstance(s, dict) and set(s) == {"type", "label", "x", "y"} and isinstance(s["label"], str) \
            and s["type"] in ("bar", "line", "scatter", "pie") and all(isinstance(s[k], list) and all(
                isinstance(v, (str, float, int, type(None))) for v in s[k]) for k in ("x", "y"))

    f = facts
    return (isinstance(f, dict) and set(f) == set(FACT_KEYS) and ints([f["n_figures"]]) and strs(f["texts"])
            and isinstance(f["layout"], list) and all(ints(r, 6) for r in f["layout"])
            and isinstance(f["calls"], dict) and all(isinstance(k, str) and ints([v]) for k, v in f["calls"].items())
            and isinstance(f["colors"], dict) and set(f["colors"]) == set(COLOR_GROUPS)
            and all(map(strs, f["colors"].values())) and isinstance(f["data"], list) and all(map(series, f["data"]))
            and ints(f["size"], 2))
