"""Colour science and optimal assignment for the chart metrics (METHODS.md C.5).

- ``hex_to_lab``: sRGB (IEC 61966-2-1, D65) -> CIE XYZ -> CIELAB with the D65 reference white.
- ``delta_e2000``: the CIEDE2000 colour difference, written out after G. Sharma, W. Wu and
  E. N. Dalal, "The CIEDE2000 color-difference formula: implementation notes, supplementary test
  data, and mathematical observations", Color Res. Appl. 30(1), 2005 (equations 1-15 there), with
  k_L = k_C = k_H = 1. Vectorised over leading axes.
- ``max_weight_assignment``: a maximum-weight assignment on a rectangular matrix (the Hungarian
  method in its shortest-augmenting-path form, O(n^2 m)); scipy is not a dependency of rlft.
- ``color_f1``: ChartMimic's colour score (Shi et al. 2024, "ChartMimic", color_evaluator): colours
  grouped by element type, an optimal one-to-one assignment inside each group with similarity
  max(0, 1 - ΔE2000/100), precision = total similarity / #generated colours, recall = total
  similarity / #gold colours, F1. Deviations, on purpose: ChartMimic searches all permutations
  (factorial time) and scores 0 when both sides have no colours; here the assignment is the
  polynomial Hungarian method (same optimum) and two colourless figures score 1.0.

Hostile inputs cost bounded time: at most MAX_COLOR_TYPES element types, MAX_COLORS_PER_TYPE
colours per type and MAX_COLORS_TOTAL colours per side are inspected; colours past the caps count
as unmatched (they stay in the denominators), malformed entries (not a '#rrggbb' / '#rrggbbaa'
string) are dropped. Real charts have far fewer colours (ChartMimic keeps at most 10).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence

import numpy as np

MAX_COLOR_TYPES = 32
MAX_COLORS_PER_TYPE = 100
MAX_COLORS_TOTAL = 256  # per side, over all types: bounds the assignment work of a hostile facts dict
_HEX = re.compile(r"#([0-9a-fA-F]{6})([0-9a-fA-F]{2})?")
# sRGB (linear) -> XYZ for the D65 white point (IEC 61966-2-1), and the D65 reference white (Y = 1).
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def _parse_hex(color: object) -> tuple[int, int, int] | None:
    """'#rrggbb' or '#rrggbbaa' (alpha dropped) -> (r, g, b) in 0..255; anything else -> None."""
    if not isinstance(color, str) or len(color) > 9:
        return None
    m = _HEX.fullmatch(color)
    if m is None:
        return None
    h = m.group(1)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def rgb255_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB values in 0..255 -> (..., 3) CIELAB (L*, a*, b*), D65."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    # sRGB companding inverted: linear = c / 12.92 below 0.04045, ((c + 0.055) / 1.055)^2.4 above.
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE_D65
    # CIELAB f(t): cube root above (6/29)^3, the linear segment t / (3 (6/29)^2) + 4/29 below.
    eps = (6.0 / 29.0) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    L = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def hex_to_lab(color: str) -> np.ndarray:
    """'#rrggbb' -> CIELAB array [L*, a*, b*] (sRGB, D65). Raises ValueError on a malformed string."""
    rgb = _parse_hex(color)
    if rgb is None:
        raise ValueError(f"not a '#rrggbb' colour: {color!r}")
    return rgb255_to_lab(np.array(rgb, dtype=np.float64))


def delta_e2000(lab1, lab2) -> np.ndarray | float:
    """CIEDE2000 ΔE_00 between CIELAB colours (arrays broadcast over leading axes, last axis = 3).

    Symbols follow Sharma, Wu & Dalal (2005); k_L = k_C = k_H = 1. Returns a float for two single
    colours, else an array of the broadcast leading shape.
    """
    x1 = np.asarray(lab1, dtype=np.float64)
    x2 = np.asarray(lab2, dtype=np.float64)
    L1, a1, b1 = x1[..., 0], x1[..., 1], x1[..., 2]
    L2, a2, b2 = x2[..., 0], x2[..., 1], x2[..., 2]
    # (2) C*_i = sqrt(a*_i^2 + b*_i^2); (3) C̄*_ab = arithmetic mean.
    C1 = np.hypot(a1, b1)
    C2 = np.hypot(a2, b2)
    Cbar = (C1 + C2) / 2.0
    # (4) G = 0.5 (1 - sqrt(C̄*^7 / (C̄*^7 + 25^7))); (5) a'_i = (1 + G) a*_i.
    Cbar7 = Cbar ** 7
    G = 0.5 * (1.0 - np.sqrt(Cbar7 / (Cbar7 + 25.0 ** 7)))
    a1p = (1.0 + G) * a1
    a2p = (1.0 + G) * a2
    # (6) C'_i = sqrt(a'_i^2 + b*_i^2); (7) h'_i = atan2(b*_i, a'_i) in [0, 360), 0 when a' = b* = 0.
    C1p = np.hypot(a1p, b1)
    C2p = np.hypot(a2p, b2)
    h1p = np.where((a1p == 0) & (b1 == 0), 0.0, np.degrees(np.arctan2(b1, a1p)) % 360.0)
    h2p = np.where((a2p == 0) & (b2 == 0), 0.0, np.degrees(np.arctan2(b2, a2p)) % 360.0)
    # (8) ΔL' = L2 - L1; (9) ΔC' = C'2 - C'1.
    dLp = L2 - L1
    dCp = C2p - C1p
    # (10) Δh': 0 if C'1 C'2 = 0; h'2 - h'1 wrapped into [-180, 180] (hue wrap-around).
    prod = C1p * C2p
    dh = h2p - h1p
    dhp = np.where(dh > 180.0, dh - 360.0, np.where(dh < -180.0, dh + 360.0, dh))
    dhp = np.where(prod == 0, 0.0, dhp)
    # (11) ΔH' = 2 sqrt(C'1 C'2) sin(Δh'/2).
    dHp = 2.0 * np.sqrt(prod) * np.sin(np.radians(dhp) / 2.0)
    # (12) L̄', (13) C̄' arithmetic means.
    Lbp = (L1 + L2) / 2.0
    Cbp = (C1p + C2p) / 2.0
    # (14) h̄': h'1 + h'2 if C'1 C'2 = 0; the mean if |h'1 - h'2| <= 180; else the mean shifted
    # by 180 degrees (+360/2 when h'1 + h'2 < 360, -360/2 otherwise).
    hsum = h1p + h2p
    hbp = np.where(np.abs(h1p - h2p) <= 180.0, hsum / 2.0,
                   np.where(hsum < 360.0, (hsum + 360.0) / 2.0, (hsum - 360.0) / 2.0))
    hbp = np.where(prod == 0, hsum, hbp)
    # (15) T = 1 - 0.17 cos(h̄' - 30) + 0.24 cos(2h̄') + 0.32 cos(3h̄' + 6) - 0.20 cos(4h̄' - 63).
    T = (1.0 - 0.17 * np.cos(np.radians(hbp - 30.0)) + 0.24 * np.cos(np.radians(2.0 * hbp))
         + 0.32 * np.cos(np.radians(3.0 * hbp + 6.0)) - 0.20 * np.cos(np.radians(4.0 * hbp - 63.0)))
    # (16) Δθ = 30 exp(-((h̄' - 275) / 25)^2); (17) R_C = 2 sqrt(C̄'^7 / (C̄'^7 + 25^7)).
    dtheta = 30.0 * np.exp(-(((hbp - 275.0) / 25.0) ** 2))
    Cbp7 = Cbp ** 7
    RC = 2.0 * np.sqrt(Cbp7 / (Cbp7 + 25.0 ** 7))
    # (18) S_L = 1 + 0.015 (L̄' - 50)^2 / sqrt(20 + (L̄' - 50)^2); (19) S_C = 1 + 0.045 C̄';
    # (20) S_H = 1 + 0.015 C̄' T; (21) R_T = -sin(2 Δθ) R_C.
    l50 = (Lbp - 50.0) ** 2
    SL = 1.0 + 0.015 * l50 / np.sqrt(20.0 + l50)
    SC = 1.0 + 0.045 * Cbp
    SH = 1.0 + 0.015 * Cbp * T
    RT = -np.sin(np.radians(2.0 * dtheta)) * RC
    # (22) ΔE00 = sqrt((ΔL'/S_L)^2 + (ΔC'/S_C)^2 + (ΔH'/S_H)^2 + R_T (ΔC'/S_C)(ΔH'/S_H)).
    tL, tC, tH = dLp / SL, dCp / SC, dHp / SH
    de = np.sqrt(np.maximum(tL * tL + tC * tC + tH * tH + RT * tC * tH, 0.0))
    return float(de) if de.ndim == 0 else de


def color_similarity(lab1, lab2) -> np.ndarray | float:
    """ChartMimic's colour similarity max(0, 1 - ΔE2000 / 100), broadcasting like delta_e2000."""
    de = delta_e2000(lab1, lab2)
    if isinstance(de, np.ndarray):
        return np.maximum(0.0, 1.0 - de / 100.0)
    return max(0.0, 1.0 - de / 100.0)


def _hungarian_min(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of every row of an n x m cost matrix (n <= m) to a distinct column.

    Shortest augmenting paths with row/column potentials (Kuhn-Munkres, Jonker-Volgenant form):
    one augmentation per row, each O(n m) with the inner scan vectorised. Returns col index per row.
    """
    n, m = cost.shape
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)  # p[j]: row (1-based) assigned to column j; column 0 is virtual
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            ties_free = (cand == delta) & (p[1:] == 0)  # among equal minima prefer an unassigned column:
            if ties_free.any():  # same optimum, but ties (e.g. repeated colours) no longer cost O(n) steps
                j1 = int(np.argmax(ties_free)) + 1
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0 != 0:  # augment along the alternating path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col_of_row = np.empty(n, dtype=np.int64)
    for j in range(1, m + 1):
        if p[j] != 0:
            col_of_row[p[j] - 1] = j - 1
    return col_of_row


def max_weight_assignment(weights) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a one-to-one assignment maximising the total weight of a finite 2-D matrix.

    min(n, m) pairs are returned (rows ascending), like scipy.optimize.linear_sum_assignment(w, maximize=True).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or not np.all(np.isfinite(w)):
        raise ValueError("weights must be a finite 2-D matrix")
    n, m = w.shape
    if n == 0 or m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n <= m:
        return np.arange(n), _hungarian_min(-w)
    cols_for_col = _hungarian_min(-w.T)  # assign each column to a row
    order = np.argsort(cols_for_col)
    return cols_for_col[order], np.arange(m)[order]


def _color_groups(colors: object) -> dict[str, tuple[list[tuple[int, int, int]], int]]:
    """{type: (parsed rgb list of the first MAX_COLORS_PER_TYPE valid entries, overflow count)}."""
    if not isinstance(colors, Mapping):
        return {}
    groups: dict[str, tuple[list[tuple[int, int, int]], int]] = {}
    budget = MAX_COLORS_TOTAL
    for key, values in itertools.islice(colors.items(), MAX_COLOR_TYPES):
        if not isinstance(key, str) or not isinstance(values, (list, tuple)):
            continue
        head = values[:min(MAX_COLORS_PER_TYPE, budget)]
        budget -= len(head)
        parsed = [rgb for rgb in (_parse_hex(c) for c in head) if rgb is not None]
        groups[key] = (parsed, len(values) - len(head))
    return groups


def _group_similarity(gen: Sequence[tuple[int, int, int]], gold: Sequence[tuple[int, int, int]]) -> float:
    """Maximum total similarity of a one-to-one matching between two colour lists of one element type."""
    if not gen or not gold:
        return 0.0
    lab_gen = rgb255_to_lab(np.array(gen, dtype=np.float64))
    lab_gold = rgb255_to_lab(np.array(gold, dtype=np.float64))
    sim = color_similarity(lab_gen[:, None, :], lab_gold[None, :, :])  # (n_gen, n_gold) array
    rows, cols = max_weight_assignment(sim)
    return float(sim[rows, cols].sum())


def color_f1(gen_colors: object, gold_colors: object) -> float:
    """ChartMimic colour F1 between two facts["colors"] dicts {element type: ['#rrggbb', ...]}."""
    gen, gold = _color_groups(gen_colors), _color_groups(gold_colors)
    n_gen = sum(len(c) + extra for c, extra in gen.values())
    n_gold = sum(len(c) + extra for c, extra in gold.values())
    if n_gen == 0 and n_gold == 0:
        return 1.0
    if n_gen == 0 or n_gold == 0:
        return 0.0
    total = sum(_group_similarity(gen[k][0], gold[k][0]) for k in sorted(gen.keys() & gold.keys()))
    precision, recall = total / n_gen, total / n_gold
    return 0.0 if total <= 0 else 2 * precision * recall / (precision + recall)


__all__ = ["MAX_COLORS_PER_TYPE", "MAX_COLORS_TOTAL", "MAX_COLOR_TYPES", "color_f1", "color_similarity",
           "delta_e2000", "hex_to_lab", "max_weight_assignment", "rgb255_to_lab"]
