"""vision_rl/charts/{color,metrics}.py: CIEDE2000 against Sharma, Wu & Dalal (2005) Table 1, the
Hungarian assignment against brute force, ChartMimic F1s and MSRL R_text pieces on hand-built facts
with known answers, bounded cost on hostile facts, and SSIM against a plain-loop twin."""

from __future__ import annotations

import copy
import itertools
import math
import time

import numpy as np
import pytest

from vision_rl.charts.color import (
    color_f1,
    delta_e2000,
    hex_to_lab,
    max_weight_assignment,
)
from vision_rl.charts.metrics import (
    DEFAULT_TEXT_WEIGHTS,
    VISUAL_JUDGES,
    data_match,
    edit_similarity_matrix,
    execution_rate,
    image_similarity,
    layout_exact,
    layout_f1,
    levenshtein,
    low_level_score,
    ssim_gray,
    ssim_judge,
    text_f1,
    text_similarity,
    textual_components,
    textual_reward,
    type_exact,
    type_f1,
)

# Sharma, Wu & Dalal (2005), Table 1: (L1, a1, b1), (L2, a2, b2), ΔE00. Pairs 9-16 cross the hue
# wrap-around (h' near 0/360 and mean-hue discontinuity); 33-34 are near-black.
SHARMA = [
    ((50.0000, 2.6772, -79.7751), (50.0000, 0.0000, -82.7485), 2.0425),
    ((50.0000, 3.1571, -77.2803), (50.0000, 0.0000, -82.7485), 2.8615),
    ((50.0000, 2.8361, -74.0200), (50.0000, 0.0000, -82.7485), 3.4412),
    ((50.0000, -1.3802, -84.2814), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -1.1848, -84.8006), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -0.9009, -85.5211), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, 0.0000, 0.0000), (50.0000, -1.0000, 2.0000), 2.3669),
    ((50.0000, -1.0000, 2.0000), (50.0000, 0.0000, 0.0000), 2.3669),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0009), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0010), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0011), 7.2195),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0012), 7.2195),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0009, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0010, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0011, -2.4900), 4.7461),
    ((50.0000, 2.5000, 0.0000), (50.0000, 0.0000, -2.5000), 4.3065),
    ((50.0000, 2.5000, 0.0000), (73.0000, 25.0000, -18.0000), 27.1492),
    ((50.0000, 2.5000, 0.0000), (61.0000, -5.0000, 29.0000), 22.8977),
    ((50.0000, 2.5000, 0.0000), (56.0000, -27.0000, -3.0000), 31.9030),
    ((50.0000, 2.5000, 0.0000), (58.0000, 24.0000, 15.0000), 19.4535),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.1736, 0.5854), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2972, 0.0000), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 1.8634, 0.5757), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2592, 0.3350), 1.0000),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((63.0109, -31.0961, -5.8663), (62.8187, -29.7946, -4.0864), 1.2630),
    ((61.2901, 3.7196, -5.3901), (61.4292, 2.2480, -4.9620), 1.8731),
    ((35.0831, -44.1164, 3.7933), (35.0232, -40.0716, 1.5901), 1.8645),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((36.4612, 47.8580, 18.3852), (36.2715, 50.5065, 21.2231), 1.4146),
    ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
    ((6.7747, -0.2908, -2.4247), (5.8714, -0.0985, -2.2286), 0.6377),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]

RED, GREEN, BLUE, ORANGE, PURPLE = "#ff0000", "#008000", "#0000ff", "#ffa500", "#800080"


def _facts(**over):
    """A 1x2 figure: bars (4, red/green/blue/orange) and a line, titles, tick labels."""
    facts = {
        "n_figures": 1,
        "texts": ["sales", "cost", "a", "b", "c", "d", "1", "2", "3"],
        "layout": [[1, 2, 0, 1, 0, 1], [1, 2, 0, 1, 1, 2]],
        "calls": {"bar": 1, "plot": 1},
        "colors": {"bar": [RED, GREEN, BLUE, ORANGE], "line": [BLUE]},
        "data": [{"type": "bar", "label": "", "x": ["a", "b", "c", "d"], "y": [3, 5, 2, 4]},
                 {"type": "line", "label": "", "x": [1, 2, 3], "y": [4.0, 2.0, 5.0]}],
        "size": [500, 200],
    }
    facts.update(over)
    return facts


# ---- colour science and assignment ----

@pytest.mark.parametrize("lab1,lab2,expected", SHARMA)
def test_ciede2000_matches_sharma_table(lab1, lab2, expected):
    assert abs(delta_e2000(lab1, lab2) - expected) < 1e-4
    assert abs(delta_e2000(lab2, lab1) - expected) < 1e-4  # symmetric


def test_ciede2000_vectorised_and_zero():
    a = np.array([p[0] for p in SHARMA])
    b = np.array([p[1] for p in SHARMA])
    np.testing.assert_allclose(delta_e2000(a, b), [p[2] for p in SHARMA], atol=1e-4)
    assert delta_e2000((50, 10, -10), (50, 10, -10)) == 0.0


def test_hex_to_lab_reference_values():
    np.testing.assert_allclose(hex_to_lab("#ffffff"), [100.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(hex_to_lab("#000000"), [0.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(hex_to_lab("#FF0000"), [53.2408, 80.0925, 67.2032], atol=1e-3)  # sRGB red, D65
    np.testing.assert_allclose(hex_to_lab("#0000ff80"), [32.2970, 79.1875, -107.8602], atol=1e-3)  # alpha dropped
    for bad in ("red", "#12345", "#gggggg", 5):
        with pytest.raises(ValueError):
            hex_to_lab(bad)


def _brute_force(w):
    w = np.asarray(w)
    if w.shape[0] > w.shape[1]:
        w = w.T
    n, m = w.shape
    return max(sum(w[i, j] for i, j in enumerate(p)) for p in itertools.permutations(range(m), n))


def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n, m = (int(v) for v in rng.integers(1, 7, size=2))
        w = rng.random((n, m)) if trial % 2 else rng.integers(0, 3, (n, m)).astype(float)  # ties too
        rows, cols = max_weight_assignment(w)
        assert len(rows) == min(n, m) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert abs(w[rows, cols].sum() - _brute_force(w)) < 1e-9
    assert len(max_weight_assignment(np.zeros((0, 3)))[0]) == 0


# ---- ChartMimic low-level F1s ----

def test_identical_facts_score_100():
    f = _facts()
    assert low_level_score(f, copy.deepcopy(f)) == {"text": 1.0, "layout": 1.0, "type": 1.0, "color": 1.0,
                                                    "score": 100.0}
    assert textual_components(f, f) == {k: 1.0 for k in DEFAULT_TEXT_WEIGHTS}
    assert textual_reward(f, f) == pytest.approx(1.0)


def test_one_wrong_bar_colour():
    gen = _facts(colors={"bar": [RED, GREEN, BLUE, PURPLE], "line": [BLUE]})
    # ΔE00(purple #800080, orange #ffa500) = 72.9558 (from delta_e2000, checked above against Sharma),
    # so that pair's similarity is s = 1 - 72.9558/100 = 0.270442; the other 4 colours match exactly
    # (identity is the optimal assignment: brute force below). P = R = (4 + s) / 5 = 0.854088 = F1.
    de = delta_e2000(hex_to_lab(PURPLE), hex_to_lab(ORANGE))
    assert de == pytest.approx(72.9558, abs=1e-4)
    s = 1 - de / 100
    sims = np.array([[max(0.0, 1 - delta_e2000(hex_to_lab(a), hex_to_lab(b)) / 100) for b in [RED, GREEN, BLUE, ORANGE]]
                     for a in [RED, GREEN, BLUE, PURPLE]])
    assert _brute_force(sims) == pytest.approx(3 + s)
    assert color_f1(gen["colors"], _facts()["colors"]) == pytest.approx((4 + s) / 5)
    bars_gen, bars_gold = {"bar": [RED, GREEN, BLUE, PURPLE]}, {"bar": [RED, GREEN, BLUE, ORANGE]}
    assert color_f1(bars_gen, bars_gold) == pytest.approx((3 + s) / 4)  # bars only: 0.817611
    assert low_level_score(gen, _facts())["color"] == pytest.approx(0.854088, abs=1e-6)
    # colours of another element type never match: a blue line drawn as a blue bar scores 0 for it.
    assert color_f1({"bar": [BLUE]}, {"line": [BLUE]}) == 0.0
    assert color_f1({}, {}) == 1.0 and color_f1({"bar": [RED]}, {}) == 0.0


def test_text_f1_missing_title():
    gold = ["sales", "a", "b"]
    assert text_f1(["a", "b"], gold) == pytest.approx(0.8)  # P = 1, R = 2/3, F1 = 2·(2/3)/(5/3) = 0.8
    assert text_f1(["a", "a", "b"], ["a", "b"]) == pytest.approx(0.8)  # multiset: the 2nd "a" is unmatched
    assert text_f1([], []) == 1.0 and text_f1([], ["a"]) == 0.0 and text_f1(["a"], []) == 0.0
    assert low_level_score(_facts(texts=["cost", "a", "b", "c", "d", "1", "2", "3"]), _facts())["text"] == pytest.approx(
        2 * 1 * (8 / 9) / (1 + 8 / 9))


def test_layout_f1_wrong_grid_is_zero():
    gold = _facts()["layout"]
    gen = [[2, 1, 0, 1, 0, 1], [2, 1, 1, 2, 0, 1]]  # 2x1 instead of 1x2
    assert layout_f1(gen, gold) == 0.0 and layout_exact(gen, gold) == 0.0
    assert layout_f1(gold[:1], gold) == pytest.approx(2 / 3) and layout_exact(gold[::-1], gold) == 1.0


def test_type_f1_extra_call():
    gold = {"bar": 1, "plot": 1}
    assert type_f1({"bar": 1, "plot": 1, "scatter": 1}, gold) == pytest.approx(0.8)  # P = 2/3, R = 1
    assert type_f1({"bar": 2}, {"bar": 1}) == pytest.approx(2 / 3)  # Σ min = 1; P = 1/2, R = 1
    assert type_exact({"bar": 2}, {"bar": 1}) == 0.0 and type_exact({"bar": 1, "pie": 0}, {"bar": 1.0}) == 1.0


def test_failed_execution_is_zero():
    zeros = {"text": 0.0, "layout": 0.0, "type": 0.0, "color": 0.0, "score": 0.0}
    for bad in (None, {"n_figures": 0}, "not facts", 3):
        assert low_level_score(bad, _facts()) == zeros
        assert textual_reward(bad, _facts()) == 0.0
    assert execution_rate([_facts(), None, {"n_figures": 0}, _facts()]) == 0.5 and execution_rate([]) == 0.0


# ---- MSRL textual reward pieces ----

def test_data_match_relative_tolerance():
    gold = [{"type": "bar", "x": ["a", "b", "c"], "y": [100, 200, 50]}]
    assert data_match([{"type": "bar", "x": ["a", "b", "c"], "y": [104.9, 190.5, 50]}], gold) == 1.0
    assert data_match([{"type": "bar", "x": ["a", "b", "c"], "y": [105, 210, 47.5]}], gold) == 1.0  # exactly 5%
    # 6% off: 5 of 6 values match, P = R = 5/6
    assert data_match([{"type": "bar", "x": ["a", "b", "c"], "y": [106, 200, 50]}], gold) == pytest.approx(5 / 6)
    assert data_match([{"type": "line", "x": ["a", "b", "c"], "y": [100, 200, 50]}], gold) == 0.0  # wrong type
    nan = [{"type": "bar", "x": ["a", "b", "c"], "y": [float("nan"), float("inf"), 50]}]
    assert data_match(nan, gold) == pytest.approx(4 / 6)
    two = gold + [{"type": "line", "x": [1, 2], "y": [3, 4]}]
    # missing series: 6 of 10 gold values matched, P = 1, R = 0.6; extra series: mirror image
    assert data_match(gold, two) == pytest.approx(0.75) and data_match(two, gold) == pytest.approx(0.75)


def test_levenshtein_and_text_similarity():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abc"), size=int(rng.integers(0, 7)))) for _ in range(12)]
    sim = edit_similarity_matrix(words[:6], words[6:])
    for i, a in enumerate(words[:6]):
        for j, b in enumerate(words[6:]):
            assert sim[i, j] == pytest.approx(1 - levenshtein(a, b) / max(len(a), len(b), 1))
    # "sals" vs "sales": 1 edit over 5 chars = 0.8; "a" exact: total 1.8, P = R = 0.9
    assert text_similarity(["sals", "a"], ["sales", "a"]) == pytest.approx(0.9)
    assert text_similarity(["a", "b"], ["a", "b"]) == 1.0 and text_similarity([], []) == 1.0


def test_textual_reward_weights():
    gen = _facts(calls={"bar": 2, "plot": 1})  # type_exact = 0, all else exact
    assert textual_reward(gen, _facts()) == pytest.approx(1 - DEFAULT_TEXT_WEIGHTS["type"] / sum(DEFAULT_TEXT_WEIGHTS.values()))
    assert textual_reward(gen, _facts(), {"data": 1.0}) == 1.0
    assert textual_reward(gen, _facts(), {"type": 2.0, "data": 2.0}) == pytest.approx(0.5)
    for bad in ({"vision": 1.0}, {"data": -1.0}, {"data": 0.0}, {"data": float("nan")}):
        with pytest.raises(ValueError):
            textual_reward(gen, _facts(), bad)


HOSTILE = {
    "many_texts": _facts(texts=["x"] * 10**6),
    "huge_strings": _facts(texts=["a" * 10**6] * 1000),
    "distinct_long_texts": _facts(texts=[f"{i:03d}" * 33 for i in range(5000)]),
    "non_finite": _facts(data=[{"type": "bar", "x": [float("nan")] * 10**5, "y": [float("inf"), 10**400, 1e308] * 10**5}]),
    "many_series": _facts(data=[{"type": "bar", "x": list(range(10**4)), "y": list(range(10**4))}] * 1000),
    "many_colours": _facts(colors={f"t{k}": [f"#{i:06x}" for i in range(10**4)] for k in range(100)}),
    "same_colour": _facts(colors={"bar": [RED] * 10**5, "line": [RED] * 10**5}),
    "wrong_types": {"n_figures": 1, "texts": "abc", "layout": [[1, "x", None], 5, [1.5] * 6], "calls": ["bar"],
                    "colors": {"bar": "#ff0000", 3: [RED], "line": [None, 7, "#zzzzzz", "#ff000"]},
                    "data": [None, 5, {"type": 3}, {"type": "bar", "x": {"a": 1}, "y": [True, None, [1]]}]},
    "many_layouts_calls": _facts(layout=[[1, 1, 0, 1, 0, 1]] * 10**6, calls={f"c{i}": 10**30 for i in range(10**5)}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_facts_bounded_time_and_sane(name):
    hostile = HOSTILE[name]
    for gen, gold in ((hostile, _facts()), (_facts(), hostile), (hostile, hostile)):
        t0 = time.perf_counter()
        low = low_level_score(gen, gold)
        r = textual_reward(gen, gold)
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.0, (name, elapsed)
        assert all(0.0 <= v <= 1.0 for k, v in low.items() if k != "score") and 0.0 <= low["score"] <= 100.0
        assert 0.0 <= r <= 1.0 and not math.isnan(r)
    if name != "wrong_types":
        assert textual_reward(hostile, _facts()) < 1.0


def test_edit_similarity_worst_case_bounded():
    rng = np.random.default_rng(2)
    a = ["".join(rng.choice(list("abcdefgh"), size=100)) for _ in range(2000)]
    b = ["".join(rng.choice(list("abcdefgh"), size=100)) for _ in range(2000)]
    t0 = time.perf_counter()
    s = text_similarity(a, b)
    assert time.perf_counter() - t0 < 1.0 and 0.0 < s < 0.05


# ---- visual similarity ----

def _ssim_loops(a, b):
    """Plain-loop SSIM (Wang et al. 2004): 11x11 Gaussian window σ = 1.5, valid positions, mean of the map."""
    g = np.array([math.exp(-((k - 5) ** 2) / (2 * 1.5 ** 2)) for k in range(11)])
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for r in range(a.shape[0] - 10):
        for c in range(a.shape[1] - 10):
            pa, pb = a[r:r + 11, c:c + 11], b[r:r + 11, c:c + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_plain_loop_twin():
    rng = np.random.default_rng(0)
    for shape in ((16, 16), (20, 17)):
        a = rng.integers(0, 256, shape).astype(float)
        b = np.clip(a + rng.normal(0, 40, shape), 0, 255)
        assert ssim_gray(a, b) == pytest.approx(_ssim_loops(a, b), abs=1e-10)
        assert ssim_gray(a, a) == 1.0


def test_image_similarity_identical_noise_and_failures():
    rng = np.random.default_rng(0)
    img = np.full((200, 300, 3), 255, np.uint8)
    img[50:150, 40:80] = [255, 0, 0]
    img[80:150, 120:160] = [0, 0, 255]
    assert image_similarity(img, img.copy()) == 1.0
    scores = [image_similarity(np.clip(img + rng.normal(0, s, img.shape), 0, 255).astype(np.uint8), img)
              for s in (5, 20, 60, 120)]
    assert all(x > y for x, y in itertools.pairwise(scores)) and 0.0 <= scores[-1] < scores[0] < 1.0
    assert image_similarity(None, img) == 0.0 and image_similarity(np.zeros((0, 5, 3), np.uint8), img) == 0.0
    assert image_similarity(img.astype(np.float64) / 255.0, img) == 1.0  # float images in [0, 1] accepted
    assert VISUAL_JUDGES["ssim"] is ssim_judge
    assert ssim_judge([img, None], [img, img]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        ssim_judge([img], [img, img])
