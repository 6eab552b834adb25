"""Chart-to-code metrics and rewards on the facts of EXECUTED figures (METHODS.md C.5).

The facts dict is the sandbox harness's contract (texts, layout, calls, colors, data, n_figures; see
vision_rl/charts/harness.py). Everything here is a pure function of facts dicts or images.

ChartMimic low-level metrics (Shi et al. 2024, "ChartMimic", chart2code/utils/evaluator):
- ``text_f1``: multiset F1 of the drawn strings (exact match), as ChartMimic's TextEvaluator;
- ``layout_f1``: multiset F1 over per-Axes gridspec tuples. The tuple is the schema's
  (nrows, ncols, row_start, row_stop, col_start, col_stop): ChartMimic's LayoutEvaluator records
  (nrows, ncols, row_start, row_end, col_start, col_end) with inclusive ends, a bijection of it
  (stop = end + 1), so equality and the F1 are identical; (nrows, ncols, row_span, col_span)
  would lose the position of each Axes and is not what ChartMimic compares;
- ``type_f1``: F1 with matched = Σ_call min(count_gen, count_gold);
- ``color_f1`` (vision_rl/charts/color.py): ΔE2000 similarity, optimal assignment per element type;
- ``low_level_score``: the four F1s and ``score`` = their mean × 100; failed execution -> zeros.
Deviation: ChartMimic scores 0 whenever either side is empty; here two empty sides score 1.0 (a
figure with no texts reproduced by one with no texts is exact), one empty side scores 0.0.

MSRL textual reward R_text (multimodal structured RL for chart-to-code, arXiv 2508.13587, the
rule-based part): ``data_match`` (numbers within ±5% relative tolerance),
``type_exact``, ``layout_exact``, ``text_similarity`` (normalised Levenshtein), ``color_f1``, and
``textual_reward`` = their weighted mean (DEFAULT_TEXT_WEIGHTS). R_vis: MSRL asks a large VLM judge;
rlft's default judge is deterministic grayscale SSIM (Wang et al. 2004: 11x11 Gaussian window,
σ = 1.5, K1 = 0.01, K2 = 0.03, L = 255, 'valid' filtering, mean of the SSIM map) after bilinear
resizing of both renderings to 128x128; other judges plug into VISUAL_JUDGES.

Hostile facts cost bounded time: lists are read up to caps (MAX_*), entries past a cap count as
unmatched (they stay in the denominators), malformed entries are dropped, non-finite numbers and
strings longer than MAX_TEXT_CHARS are kept but never match.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from vision_rl.charts.color import color_f1, max_weight_assignment

MAX_TEXTS = 1000  # strings read per side
MAX_TEXT_CHARS = 100  # longer strings are counted but never match
MAX_EDIT_TEXTS = 32  # strings per side left after exact matching that enter the edit-distance assignment
MAX_LAYOUT = 1000  # Axes entries read per side
MAX_CALL_KINDS = 100  # distinct plotting-call names read per side
MAX_SERIES = 1000  # data series read per side (the harness's own cap); later series are ignored
MAX_NUMBERS = 10000  # data values (x and y together) read per side
DEFAULT_TEXT_WEIGHTS: dict[str, float] = {"data": 0.3, "type": 0.2, "layout": 0.15, "text": 0.2, "color": 0.15}
SSIM_SIZE = 128

def _head(seq: object, cap: int) -> tuple[list, int]:
    """(the first `cap` items, how many more there are) of a list/tuple; anything else is empty."""
    if not isinstance(seq, (list, tuple)):
        return [], 0
    return list(seq[:cap]), max(0, len(seq) - cap)


def _f1(matched: float, n_gen: float, n_gold: float) -> float:
    """F1 of precision matched/n_gen and recall matched/n_gold; both sides empty -> 1, one empty -> 0."""
    if n_gen == 0 and n_gold == 0:
        return 1.0
    if n_gen == 0 or n_gold == 0 or matched <= 0:
        return 0.0
    p, r = matched / n_gen, matched / n_gold
    return 2 * p * r / (p + r)


def _executed(facts: object) -> bool:
    """A facts dict from a run that drew a figure (n_figures >= 1, or absent)."""
    if not isinstance(facts, Mapping):
        return False
    n = facts.get("n_figures", 1)
    return isinstance(n, numbers.Real) and not isinstance(n, bool) and n >= 1


def _texts(texts: object) -> tuple[list[str], int]:
    """Valid strings among the first MAX_TEXTS (non-strings dropped) and the overflow count."""
    head, extra = _head(texts, MAX_TEXTS)
    return [t for t in head if isinstance(t, str)], extra


def _short(strings: list[str]) -> Counter:
    """Multiset of the strings short enough to match (<= MAX_TEXT_CHARS)."""
    return Counter(t for t in strings if len(t) <= MAX_TEXT_CHARS)


def _as_int(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def text_f1(gen_texts: object, gold_texts: object) -> float:
    """Multiset F1 of drawn strings: precision = matched / len(gen), recall = matched / len(gold)."""
    gen, gen_extra = _texts(gen_texts)
    gold, gold_extra = _texts(gold_texts)
    common = _short(gen) & _short(gold)
    return _f1(sum(common.values()), len(gen) + gen_extra, len(gold) + gold_extra)


def _layouts(layout: object) -> tuple[list[tuple[int, ...]], int]:
    head, extra = _head(layout, MAX_LAYOUT)
    out = []
    for entry in head:
        if isinstance(entry, (list, tuple)) and len(entry) == 6:
            vals = tuple(_as_int(v) for v in entry)
            if all(v is not None for v in vals):
                out.append(vals)
    return out, extra


def layout_f1(gen_layout: object, gold_layout: object) -> float:
    """Multiset F1 over (nrows, ncols, row_start, row_stop, col_start, col_stop), one per Axes."""
    gen, gen_extra = _layouts(gen_layout)
    gold, gold_extra = _layouts(gold_layout)
    matched = sum((Counter(gen) & Counter(gold)).values())
    return _f1(matched, len(gen) + gen_extra, len(gold) + gold_extra)


def layout_exact(gen_layout: object, gold_layout: object) -> float:
    """1.0 iff both figures have the same multiset of Axes grid positions (MSRL 'layout exact')."""
    gen, gen_extra = _layouts(gen_layout)
    gold, gold_extra = _layouts(gold_layout)
    return float(gen_extra == gold_extra == 0 and Counter(gen) == Counter(gold))


def _calls(calls: object) -> Counter:
    """{call name: count >= 1} from the first MAX_CALL_KINDS entries; counts capped at 10^9."""
    out: Counter = Counter()
    if isinstance(calls, Mapping):
        for name, count in itertools.islice(calls.items(), MAX_CALL_KINDS):
            n = _as_int(count)
            if isinstance(name, str) and n is not None and n > 0:
                out[name] = min(n, 10**9)
    return out


def type_f1(gen_calls: object, gold_calls: object) -> float:
    """ChartMimic chart-type F1: matched = Σ_call min(count_gen, count_gold) over plotting-call counts."""
    gen, gold = _calls(gen_calls), _calls(gold_calls)
    return _f1(sum((gen & gold).values()), sum(gen.values()), sum(gold.values()))


def type_exact(gen_calls: object, gold_calls: object) -> float:
    """1.0 iff the plotting calls (names and counts) are identical (MSRL 'chart type exact')."""
    return float(_calls(gen_calls) == _calls(gold_calls))


def low_level_score(gen_facts: object, gold_facts: object) -> dict[str, float]:
    """ChartMimic low-level metrics: text/layout/type/color F1 in [0, 1] and score = mean × 100."""
    if not (_executed(gen_facts) and _executed(gold_facts)):
        return {"text": 0.0, "layout": 0.0, "type": 0.0, "color": 0.0, "score": 0.0}
    out = {"text": text_f1(gen_facts.get("texts"), gold_facts.get("texts")),
           "layout": layout_f1(gen_facts.get("layout"), gold_facts.get("layout")),
           "type": type_f1(gen_facts.get("calls"), gold_facts.get("calls")),
           "color": color_f1(gen_facts.get("colors"), gold_facts.get("colors"))}
    out["score"] = 100.0 * sum(out.values()) / 4.0
    return out


def execution_rate(facts_list: Sequence[object]) -> float:
    """Fraction of programs that produced a figure (ChartMimic 'exec rate'); 0.0 for an empty list."""
    return sum(_executed(f) for f in facts_list) / len(facts_list) if len(facts_list) else 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit insert / delete / substitute), O(len(a) len(b)) two-row dynamic programme.

    Callers bound the cost: text_similarity never passes strings longer than MAX_TEXT_CHARS.
    """
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _codes(strings: Sequence[str], width: int, pad: int) -> np.ndarray:
    out = np.full((len(strings), width), pad, dtype=np.int32)
    for k, s in enumerate(strings):
        out[k, :len(s)] = [ord(c) for c in s]
    return out


def edit_similarity_matrix(gen: Sequence[str], gold: Sequence[str]) -> np.ndarray:
    """S[i, j] = 1 - levenshtein(gen[i], gold[j]) / max(len); 1 for two empty strings.

    The same dynamic programme as `levenshtein`, run for all pairs at once: row i of every pair's
    table in one numpy step; the insertion recurrence D[i, j] = min(T[j], D[i, j-1] + 1) is a running
    minimum, D[i, j] - j = cummin_k<=j (T[k] - k). Pair (p, q) is read at row len(gen[p]), column len(gold[q]).
    """
    ng, nd = len(gen), len(gold)
    if ng == 0 or nd == 0:
        return np.zeros((ng, nd))
    la = np.repeat([len(s) for s in gen], nd)
    lb = np.tile([len(s) for s in gold], ng)
    wa, wb = max(int(la.max()), 1), max(int(lb.max()), 1)
    A = np.repeat(_codes(gen, wa, -1), nd, axis=0)
    B = np.tile(_codes(gold, wb, -2), (ng, 1))
    cols = np.arange(wb + 1, dtype=np.int32)
    prev = np.tile(cols, (ng * nd, 1)).astype(np.int32)
    dist = np.where(la == 0, lb, 0)
    rows = np.arange(ng * nd)
    for i in range(1, int(la.max()) + 1):
        tmp = np.empty_like(prev)
        tmp[:, 0] = i
        tmp[:, 1:] = np.minimum(prev[:, :-1] + (A[:, i - 1:i] != B), prev[:, 1:] + 1)
        prev = np.minimum.accumulate(tmp - cols, axis=1) + cols
        done = la == i
        dist[done] = prev[rows[done], lb[done]]
    longest = np.maximum(np.maximum(la, lb), 1)
    return (1.0 - dist / longest).reshape(ng, nd)


def text_similarity(gen_texts: object, gold_texts: object) -> float:
    """F1 of soft string matching: exact multiset matches count 1 each (as in text_f1); the strings
    left over (at most MAX_EDIT_TEXTS per side) are paired by an optimal assignment of normalised
    Levenshtein similarity. precision = total / len(gen), recall = total / len(gold)."""
    gen, gen_extra = _texts(gen_texts)
    gold, gold_extra = _texts(gold_texts)
    cg, cd = _short(gen), _short(gold)
    common = cg & cd
    total = float(sum(common.values()))
    rest_gen = list(itertools.islice((cg - common).elements(), MAX_EDIT_TEXTS))
    rest_gold = list(itertools.islice((cd - common).elements(), MAX_EDIT_TEXTS))
    if rest_gen and rest_gold:
        sim = edit_similarity_matrix(rest_gen, rest_gold)
        r, c = max_weight_assignment(sim)
        total += float(sim[r, c].sum())
    return _f1(total, len(gen) + gen_extra, len(gold) + gold_extra)


_NEVER = float("nan")  # a counted value that matches nothing


def _value(v: object) -> float | str | None:
    """A data value: finite float, str (NaN if too long), NaN for non-finite numbers, None if malformed."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        return v if len(v) <= MAX_TEXT_CHARS else _NEVER
    if isinstance(v, numbers.Real):
        try:
            f = float(v)
        except OverflowError:
            return _NEVER
        return f if math.isfinite(f) else _NEVER
    return None


def _series(data: object) -> tuple[dict[str, list[tuple[list, list]]], int]:
    """{type: [(xs, ys), ...] in draw order}, and how many values past the caps were not read."""
    head, _ = _head(data, MAX_SERIES)
    budget, extra = MAX_NUMBERS, 0
    by_type: dict[str, list[tuple[list, list]]] = {}
    for s in head:
        if not isinstance(s, Mapping) or not isinstance(s.get("type"), str):
            continue
        axes = []
        for key in ("x", "y"):
            vals, more = _head(s.get(key), budget)
            budget -= len(vals)
            extra += more
            axes.append([v for v in map(_value, vals) if v is not None])
        by_type.setdefault(s["type"], []).append((axes[0], axes[1]))
    return by_type, extra


def _same(g: float | str, t: float | str, rtol: float) -> bool:
    if isinstance(g, str) or isinstance(t, str):
        return isinstance(g, str) and isinstance(t, str) and g == t
    return abs(g - t) <= rtol * abs(t)  # False whenever either side is NaN


def data_match(gen_data: object, gold_data: object, rtol: float = 0.05) -> float:
    """F1 of drawn data values: series are paired by type in draw order, values by position (x with
    x, y with y); a number matches if |gen - gold| <= rtol·|gold|, a string if equal. Missing series
    lower recall, extra series lower precision."""
    gen, gen_extra = _series(gen_data)
    gold, gold_extra = _series(gold_data)
    n_gen = gen_extra + sum(len(x) + len(y) for ss in gen.values() for x, y in ss)
    n_gold = gold_extra + sum(len(x) + len(y) for ss in gold.values() for x, y in ss)
    matched = 0
    for kind in gen.keys() & gold.keys():
        for (gx, gy), (tx, ty) in zip(gen[kind], gold[kind]):
            matched += sum(_same(g, t, rtol) for g, t in zip(gx, tx))
            matched += sum(_same(g, t, rtol) for g, t in zip(gy, ty))
    return _f1(matched, n_gen, n_gold)


def textual_components(gen_facts: object, gold_facts: object) -> dict[str, float]:
    """The R_text pieces in [0, 1]: data, type, layout, text, color (all 0.0 for a failed execution)."""
    if not (_executed(gen_facts) and _executed(gold_facts)):
        return {k: 0.0 for k in DEFAULT_TEXT_WEIGHTS}
    return {"data": data_match(gen_facts.get("data"), gold_facts.get("data")),
            "type": type_exact(gen_facts.get("calls"), gold_facts.get("calls")),
            "layout": layout_exact(gen_facts.get("layout"), gold_facts.get("layout")),
            "text": text_similarity(gen_facts.get("texts"), gold_facts.get("texts")),
            "color": color_f1(gen_facts.get("colors"), gold_facts.get("colors"))}


def textual_reward(gen_facts: object, gold_facts: object, weights: Mapping[str, float] | None = None) -> float:
    """R_text = Σ_k w_k r_k / Σ_k w_k over textual_components (default DEFAULT_TEXT_WEIGHTS), in [0, 1].

    Weights may name a subset of {data, type, layout, text, color}; unknown names, negative or
    non-finite weights, or an all-zero weighting raise ValueError.
    """
    w = dict(DEFAULT_TEXT_WEIGHTS if weights is None else weights)
    unknown = set(w) - set(DEFAULT_TEXT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown textual reward components: {sorted(unknown)}")
    if any(not math.isfinite(v) or v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w}")
    parts = textual_components(gen_facts, gold_facts)
    return sum(v * parts[k] for k, v in w.items()) / sum(w.values())


def _filter_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with window outer(w, w), 'valid' region only."""
    k = len(w)
    h, wd = img.shape
    rows = sum(w[i] * img[i:h - k + 1 + i, :] for i in range(k))
    return sum(w[j] * rows[:, j:wd - k + 1 + j] for j in range(k))


def ssim_gray(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two equal-shape 2-D grayscale arrays (each side >= 11), Wang et al. 2004 constants."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or min(a.shape) < 11:
        raise ValueError(f"need two equal 2-D arrays of side >= 11, got {a.shape} and {b.shape}")
    w = np.exp(-((np.arange(11) - 5.0) ** 2) / (2.0 * 1.5 ** 2))  # 11-tap Gaussian, σ = 1.5
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a * mu_a
    var_b = _filter_valid(b * b, w) - mu_b * mu_b
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def _gray(img: object, size: int) -> np.ndarray | None:
    """An (H, W), (H, W, 3) or (H, W, 4) image -> (size, size) float luma (PIL 'L', bilinear); None if invalid."""
    from PIL import Image

    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or min(img.shape[:2]) < 1:
        return None
    if img.ndim == 3:
        if img.shape[2] not in (3, 4):
            return None
        img = img[:, :, :3]
    if img.dtype.kind not in "biuf":
        return None
    if img.dtype != np.uint8:
        f = np.nan_to_num(img.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        img = np.clip(f * 255.0 if f.max(initial=0.0) <= 1.0 else f, 0, 255).round().astype(np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(img)).convert("L").resize((size, size), Image.BILINEAR)
    return np.asarray(pil, dtype=np.float64)


def image_similarity(img_a: object, img_b: object, size: int = SSIM_SIZE) -> float:
    """Deterministic visual similarity in [0, 1]: SSIM of the two renderings resized to size x size,
    clipped at 0; 0.0 when either image is missing or malformed; identical images -> 1.0."""
    a, b = _gray(img_a, size), _gray(img_b, size)
    if a is None or b is None:
        return 0.0
    return min(1.0, max(0.0, ssim_gray(a, b)))


VisualJudge = Callable[[Sequence[np.ndarray | None], Sequence[np.ndarray | None]], list[float]]


def ssim_judge(gen_images: Sequence[np.ndarray | None], gold_images: Sequence[np.ndarray | None]) -> list[float]:
    """The default R_vis judge: image_similarity per (generated, gold) pair; a failed render (None) -> 0."""
    if len(gen_images) != len(gold_images):
        raise ValueError(f"{len(gen_images)} generated images for {len(gold_images)} targets")
    return [image_similarity(g, t) for g, t in zip(gen_images, gold_images)]


# Pluggable R_vis judges: judge(gen_images, gold_images) -> one score in [0, 1] per pair, where
# gen_images[i] is the RGB uint8 (H, W, 3) rendering of completion i (None if it failed) and
# gold_images[i] its target. A VLM judge (MSRL) registers here under its own name.
VISUAL_JUDGES: dict[str, VisualJudge] = {"ssim": ssim_judge}
DEFAULT_VISUAL_JUDGE = "ssim"
