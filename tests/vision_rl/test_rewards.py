"""Vision rewards (vision_rl/rewards.py): hand-computed geometry and Visual-RFT scores, parsing,
classification without the substring loophole, adversarial inputs, and the registered factories
run through CombinedReward so failures are counted."""

import math
import random
import string
import time

import pytest

from shared.config import RewardSpec
from shared.rewards import REWARDS, CombinedReward
from vision_rl.rewards import (
    MAX_BOXES,
    answer_text,
    classification_reward,
    detection_confidence_reward,
    detection_iou_reward,
    giou,
    grounding_hit,
    iou,
    match_detections,
    normalise_label,
    parse_box,
    parse_detection,
)

GT = [0, 0, 10, 10]


def det(*boxes):
    """Visual-RFT answer text for (box, confidence) pairs."""
    items = ", ".join(f"{{'Position': {list(b)}, 'Confidence': {c}}}" for b, c in boxes)
    return f"<think>look</think> <answer>[{items}]</answer>"


def combined(*specs):
    return CombinedReward.from_specs([RewardSpec(**s) for s in specs])


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    assert time.perf_counter() - t < 1.0, "took over a second"
    return out


# ---- iou / giou


@pytest.mark.parametrize(
    "a,b,want_iou,want_giou",
    [
        # identical: I = U = C = 4
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0, 1.0),
        # disjoint: I = 0, U = 1 + 1 = 2, C = [0,0,3,3] = 9 -> GIoU = 0 - (9 - 2) / 9 = -7/9
        ([0, 0, 1, 1], [2, 2, 3, 3], 0.0, -7 / 9),
        # nested: I = 4, U = 16, C = 16 -> 4/16 - 0
        ([0, 0, 4, 4], [1, 1, 3, 3], 0.25, 0.25),
        # touching along an edge: I = 0, U = 2, C = [0,0,2,1] = 2 -> 0 - 0
        ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0),
        # partial: I = 1, U = 4 + 4 - 1 = 7, C = 9 -> 1/7 - 2/9 = -5/63
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, -5 / 63),
        # far apart: U = 2, C = 100 * 100 -> -(10000 - 2) / 10000
        ([0, 0, 1, 1], [99, 99, 100, 100], 0.0, -0.9998),
        # zero-area line inside a box: I = 0, U = 4, C = [0,0,2,3] = 6 -> -(6 - 4) / 6
        ([1, 1, 1, 3], [0, 0, 2, 2], 0.0, -1 / 3),
        # two identical points: no area anywhere -> IoU 0, GIoU -1 (nothing to reward)
        ([1, 1, 1, 1], [1, 1, 1, 1], 0.0, -1.0),
        # inverted corners have zero area: I = 0, U = 4, C = [0,0,2,2] = 4 -> 0
        ([2, 2, 0, 0], [0, 0, 2, 2], 0.0, 0.0),
    ],
)
def test_iou_giou_by_hand(a, b, want_iou, want_giou):
    assert iou(a, b) == pytest.approx(want_iou)
    assert iou(b, a) == pytest.approx(want_iou)
    assert giou(a, b) == pytest.approx(want_giou)
    assert giou(b, a) == pytest.approx(want_giou)


def test_giou_range_random_boxes():
    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.uniform(-5, 5) for _ in range(4)]
        b = [rng.uniform(-5, 5) for _ in range(4)]
        assert -1.0 <= giou(a, b) <= 1.0
        assert 0.0 <= iou(a, b) <= 1.0
        assert giou(a, b) <= iou(a, b) + 1e-12


def test_grounding_hit_threshold_is_strict():
    # [0,0,10,5] vs [0,0,10,10]: 50 / 100 = 0.5, not > 0.5; [0,0,10,6]: 0.6
    assert not grounding_hit([0, 0, 10, 5], GT)
    assert grounding_hit([0, 0, 10, 6], GT)
    assert grounding_hit([0, 0, 10, 5], GT, thresh=0.4)
    assert not grounding_hit(None, GT)


# ---- Detection: R_iou and R_conf (METHODS C.1)


def test_detection_perfect_partial_and_threshold():
    assert detection_iou_reward([(GT, 0.9)], [GT]) == 1.0
    # [0,0,10,8]: I = 80, U = 100 -> 0.8 recorded
    assert detection_iou_reward([([0, 0, 10, 8], 0.9)], [GT]) == pytest.approx(0.8)
    # [0,0,10,5]: IoU = 0.5 exactly, not > 0.5 -> recorded 0
    assert detection_iou_reward([([0, 0, 10, 5], 0.9)], [GT]) == 0.0


def test_detection_divides_by_max_of_gt_and_pred():
    far = [50, 50, 60, 60]
    # one perfect + one unmatched prediction: (1 + 0) / max(1, 2) = 0.5
    assert detection_iou_reward([(GT, 0.9), (far, 0.8)], [GT]) == pytest.approx(0.5)
    # one perfect prediction, two GT: 1 / max(2, 1) = 0.5
    assert detection_iou_reward([(GT, 0.9)], [GT, far]) == pytest.approx(0.5)
    # one perfect prediction, three GT: 1 / 3
    assert detection_iou_reward([(GT, 0.9)], [GT, far, [100, 100, 120, 120]]) == pytest.approx(1 / 3)


def test_detection_drops_exact_duplicates():
    # the duplicate is dropped before counting: 1 / max(1, 1) = 1 (not 1 / 2)
    assert detection_iou_reward([(GT, 0.9), (GT, 0.8)], [GT]) == 1.0
    # R_conf over the one kept prediction (the first, c = 0.9, matched): 0.9
    assert detection_confidence_reward([(GT, 0.9), (GT, 0.8)], [GT]) == pytest.approx(0.9)
    # near-duplicates are not exact: the second finds no free GT: (1 + 0) / 2
    assert detection_iou_reward([(GT, 0.9), ([0, 0, 10, 10.5], 0.8)], [GT]) == pytest.approx(0.5)


def test_detection_confidence_order_decides_the_match():
    bad = [0, 0, 10, 7]  # IoU 70 / 100 = 0.7 > 0.5: it can match
    # the high-confidence bad box goes first and takes the GT (0.7); the good box records 0:
    # R_iou = (0.7 + 0) / 2 = 0.35
    assert detection_iou_reward([(GT, 0.2), (bad, 0.9)], [GT]) == pytest.approx(0.35)
    # R_conf = mean(0.9 [matched], 1 - 0.2 [unmatched]) = (0.9 + 0.8) / 2 = 0.85
    assert detection_confidence_reward([(GT, 0.2), (bad, 0.9)], [GT]) == pytest.approx(0.85)
    # confidences swapped: the good box goes first: (1.0 + 0) / 2 = 0.5
    assert detection_iou_reward([(GT, 0.9), (bad, 0.2)], [GT]) == pytest.approx(0.5)
    assert match_detections([(GT, 0.2), (bad, 0.9)], [GT]) == [(0.9, pytest.approx(0.7)), (0.2, 0.0)]


def test_detection_greedy_takes_the_best_free_gt():
    g1, g2 = [0, 0, 10, 10], [0, 0, 10, 6]
    # p1 = [0,0,10,8] (c 0.9): IoU with g1 = 80/100 = 0.8, with g2 = 60/80 = 0.75 -> takes g1 (0.8)
    # p2 = [0,0,10,9] (c 0.5): g1 taken; with g2 = 60/90 = 0.667 > 0.5 -> matched
    # R_iou = (0.8 + 2/3) / 2 = 0.7333 (an optimal assignment would give (0.75 + 0.9) / 2 = 0.825)
    pred = [([0, 0, 10, 9], 0.5), ([0, 0, 10, 8], 0.9)]
    assert detection_iou_reward(pred, [g1, g2]) == pytest.approx((0.8 + 2 / 3) / 2)


def test_detection_empty_cases():
    assert detection_iou_reward([], []) == 1.0
    assert detection_iou_reward([], [GT]) == 0.0
    assert detection_iou_reward([(GT, 0.9)], []) == 0.0
    assert detection_confidence_reward([], []) == 1.0
    assert detection_confidence_reward([], [GT]) == 0.0
    # no GT: every prediction is wrong: mean(1 - 0.2, 1 - 0.4) = (0.8 + 0.6) / 2 = 0.7
    assert detection_confidence_reward([(GT, 0.2), ([1, 1, 5, 5], 0.4)], []) == pytest.approx(0.7)


def test_confidence_reward_cases_and_clipping():
    far = [50, 50, 60, 60]
    # matched 0.9 -> 0.9; unmatched 0.3 -> 0.7: mean 0.8
    assert detection_confidence_reward([(GT, 0.9), (far, 0.3)], [GT]) == pytest.approx(0.8)
    # IoU exactly 0.5 records 0, so it counts as wrong: 1 - 0.6 = 0.4
    assert detection_confidence_reward([([0, 0, 10, 5], 0.6)], [GT]) == pytest.approx(0.4)
    # confidences clip to [0, 1]: 1.5 -> 1 (matched: 1), -0.5 -> 0 (unmatched: 1 - 0 = 1)
    assert detection_confidence_reward([(GT, 1.5), (far, -0.5)], [GT]) == 1.0


# ---- Parsing


def test_answer_text():
    assert answer_text("<think>x</think><answer> a </answer>") == " a "
    assert answer_text("<answer>first</answer> <answer>last</answer>") == "last"
    assert answer_text("no tags") is None
    assert answer_text("<answer>unclosed") is None
    assert answer_text("</answer> <answer>") is None
    assert answer_text(None) is None


def test_parse_detection_formats():
    text = det(([10, 20, 30, 40], 0.9), ([1.5, 2, 3, 4.25], 0.35))
    assert parse_detection(text) == [([10, 20, 30, 40], 0.9), ([1.5, 2, 3, 4.25], 0.35)]
    dq = '<answer>[{"Position": [10,20,30,40], "Confidence": 0.5}]</answer>'
    assert parse_detection(dq) == [([10, 20, 30, 40], 0.5)]
    loose = "<answer>[ { position :[ 10 , 20,30 ,40 ] ,confidence: '0.7' } ]</answer>"
    assert parse_detection(loose) == [([10, 20, 30, 40], 0.7)]
    # missing Confidence defaults to 1.0; swapped corners are reordered
    assert parse_detection("<answer>[{'Position': [30, 40, 10, 20]}]</answer>") == [([10, 20, 30, 40], 1.0)]
    # only the last answer tag counts
    assert parse_detection("<answer>No Objects</answer>" + det((GT, 0.5))) == [(GT, 0.5)]


def test_parse_detection_empty_answers():
    assert parse_detection("<think>none</think><answer>No Objects</answer>") == []
    assert parse_detection("<answer> no objects. </answer>") == []
    assert parse_detection("<answer>[]</answer>") == []
    # contradictory: "No Objects" and a box
    assert parse_detection("<answer>No Objects [{'Position': [0, 0, 1, 1]}]</answer>") is None


@pytest.mark.parametrize(
    "text",
    [
        "[{'Position': [10, 20, 30, 40], 'Confidence': 0.9}]",  # no answer tag
        "<answer></answer>",
        "<answer>a cat</answer>",
        "<answer>[{'Position': [10, 20, 30], 'Confidence': 0.9}]</answer>",  # 3 numbers
        "<answer>[{'Position': [[10, 20], [30, 40]]}]</answer>",  # nested brackets
        "<answer>[{'Position': [10, nan, 30, 40]}]</answer>",
        "<answer>[{'Position': [10, 20, 30, 40], 'Confidence': NaN}]</answer>",
        "<answer>[{'Position': [10, 20, 30, 40], 'Confidence': inf}]</answer>",
        "<answer>[{'Position': [10, 20, 1e999, 40]}]</answer>",  # overflows to inf
        "<answer>[{'Position': [10, 20, 30, 40], 'Confidence': 1e999}]</answer>",
        "<answer>[{'Position': [١٠, ٢٠, ٣٠, ٤٠]}]</answer>",  # Arabic-Indic digits
        "<answer>[{'Position': [１０, 20, 30, 40]}]</answer>",  # fullwidth digits
        "<answer>[{'Confidence': 0.9, 'Position': [10, 20, 30, 40]}]</answer>",  # confidence first
        "<answer>[{'Position': [10, 20, 30, 40], 'Confidence': 0.9, 'Confidence': 0.1}]</answer>",
        "<answer>[{'Position': [1" + "0" * 40 + ", 20, 30, 40]}]</answer>",  # 41-digit number
    ],
)
def test_parse_detection_malformed_is_none(text):
    assert parse_detection(text) is None


def test_parse_detection_box_cap():
    boxes = [([i, i, i + 5, i + 5], 0.5) for i in range(MAX_BOXES + 1)]
    assert len(parse_detection(det(*boxes[:MAX_BOXES]))) == MAX_BOXES
    assert parse_detection(det(*boxes)) is None


def test_parse_box_formats():
    assert parse_box("<|box_start|>(10,20),(30,40)<|box_end|>") == [10, 20, 30, 40]
    assert parse_box("<answer>(10, 20), (30, 40)</answer>") == [10, 20, 30, 40]
    assert parse_box("<answer>(10,20)(30,40)</answer>") == [10, 20, 30, 40]
    assert parse_box("<answer>[10, 20.5, 30, 40]</answer>") == [10, 20.5, 30, 40]
    assert parse_box("<answer>[{'Position': [10, 20, 30, 40], 'Confidence': 0.9}]</answer>") == [10, 20, 30, 40]
    # first box wins; corners reordered
    assert parse_box("<answer>[30, 40, 10, 20] then [0, 0, 1, 1]</answer>") == [10, 20, 30, 40]
    # the whole text is read only when there is no answer tag
    assert parse_box("the box is [1, 2, 3, 4]") == [1, 2, 3, 4]
    assert parse_box("[1, 2, 3, 4] <answer>none</answer>") is None


@pytest.mark.parametrize(
    "text",
    ["", "<answer>(10, 20)</answer>", "<answer>[1, 2, 3]</answer>", "[1, 2, 1e999, 4]", "[١, ٢, ٣, ٤]", "(nan,1),(2,3)", None],
)
def test_parse_box_none(text):
    assert parse_box(text) is None


# ---- Classification (METHODS C.3): no substring loophole (Visual-RFT issue #176)


def test_normalise_label():
    assert normalise_label("  Golden   Retriever. ") == "golden retriever"
    assert normalise_label("CAT\n") == "cat"
    assert normalise_label("st. bernard") == "st. bernard"


@pytest.mark.parametrize("answer", ["cat", " Cat. ", "CAT", "cat\n"])
def test_classification_reward_right(answer):
    assert classification_reward(answer, "cat") == 1.0


# "" is the collapse of issue #176 (an empty answer is a substring of every label); then hedges,
# every class listed, a substring of the label and a word containing it
@pytest.mark.parametrize("answer", ["", "   ", ".", None, "cat or dog", "cat, dog", "cat dog bird fish", "ca", "wildcat"])
def test_classification_reward_wrong(answer):
    assert classification_reward(answer, "cat") == 0.0


# ---- Registered factories through CombinedReward (None -> failure_value, counted)


def test_factories_registered():
    for name in ("detection_iou", "detection_confidence", "grounding_iou", "cls_accuracy", "cls_equality"):
        assert name in REWARDS
    # `format` (the third Visual-RFT term) is llm_rl's; this module must not register it again
    assert getattr(REWARDS.get("format"), "__module__", "llm_rl.rewards") == "llm_rl.rewards"


def test_visual_rft_detection_reward_combined():
    comb = combined({"name": "detection_iou"}, {"name": "detection_confidence", "weight": 0.5})
    far = [50, 50, 60, 60]
    completions = [
        det((GT, 0.9), (far, 0.3)),  # R_iou (1 + 0) / 2 = 0.5; R_conf (0.9 + 0.7) / 2 = 0.8
        "<think>x</think> <answer>No Objects</answer>",  # GT empty: 1, 1
        "<think>x</think> <answer>No Objects</answer>",  # GT non-empty: 0, 0 (scored, not failures)
        "<think>x</think> <answer>[{'Position': [0, 0, nan, 1]}]</answer>",  # unparseable: failures
        "[{'Position': [0, 0, 10, 10], 'Confidence': 0.9}]",  # no answer tag: failures
    ]
    res = comb(completions, {"boxes": [[GT], [], [GT], [GT], [GT]], "image": list("abcde")})
    assert res.components["detection_iou"].tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0, 0.0])
    assert res.components["detection_confidence"].tolist() == pytest.approx([0.8, 1.0, 0.0, 0.0, 0.0])
    # total = R_iou + 0.5 R_conf: 0.5 + 0.4 = 0.9; 1 + 0.5 = 1.5
    assert res.total.tolist() == pytest.approx([0.9, 1.5, 0.0, 0.0, 0.0])
    assert res.failures == {"detection_iou": 2, "detection_confidence": 2}


def test_detection_failure_value_and_field_kwarg():
    comb = combined({"name": "detection_iou", "failure_value": -1.0, "kwargs": {"field": "gt"}})
    res = comb([det((GT, 0.9)), "garbage"], {"gt": [[GT], [GT]]})
    assert res.components["detection_iou"].tolist() == [1.0, -1.0]
    assert res.failures == {"detection_iou": 1}


def test_detection_bad_ground_truth_and_missing_field_are_clear_errors():
    reward = REWARDS["detection_iou"]()
    with pytest.raises(ValueError, match="ground-truth box"):
        reward([det((GT, 0.9))], boxes=[[[0, 0, 1]]])
    with pytest.raises(ValueError, match="needs the dataset field 'boxes'"):
        reward([det((GT, 0.9))], box=[GT])
    with pytest.raises(ValueError, match="bad kwargs"):
        combined({"name": "detection_iou", "kwargs": {"fields": "boxes"}})


def test_grounding_variants():
    comb = combined({"name": "grounding_iou"})
    completions = [
        "<answer>(0,0),(10,10)</answer>",  # GIoU 1 -> 2
        "<answer>[0, 0, 10, 5]</answer>",  # IoU 0.5, C = U -> GIoU 0.5 -> 1.5
        "<answer>[20, 0, 30, 10]</answer>",  # I = 0, U = 200, C = [0,0,30,10] = 300 -> -1/3 -> 2/3
        "<answer>no box</answer>",  # failure
    ]
    res = comb(completions, {"box": [GT] * 4})
    assert res.components["grounding_iou"].tolist() == pytest.approx([2.0, 1.5, 2 / 3, 0.0])
    assert res.failures == {"grounding_iou": 1}
    comb = combined({"name": "grounding_iou", "kwargs": {"variant": "iou"}})
    res = comb(completions, {"box": [GT] * 4})
    assert res.components["grounding_iou"].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert all(0.0 <= v <= 2.0 for v in REWARDS["grounding_iou"]()(completions[:3], box=[GT] * 3))
    with pytest.raises(ValueError, match="variant"):
        combined({"name": "grounding_iou", "kwargs": {"variant": "diou"}})


def test_cls_accuracy_and_equality():
    comb = combined({"name": "cls_accuracy"}, {"name": "cls_equality"})
    completions = [
        "<think>fur</think> <answer> Cat. </answer>",  # acc 1; equality 0 (extra words)
        "<think>fur</think> <answer></answer>",  # empty answer: 0, 0
        "<think>fur</think> <answer>cat or dog</answer>",  # 0, 0
        "The animal is a cat",  # no tag: acc 0.0, not a failure; equality 0
        "  CAT. ",  # no tag: acc 0; equality 1
    ]
    res = comb(completions, {"label": ["cat"] * 5, "choices": [["cat", "dog"]] * 5})
    assert res.components["cls_accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert res.components["cls_equality"].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert res.failures == {"cls_accuracy": 0, "cls_equality": 0}


# ---- Adversarial outputs: bounded time, nothing undeserved

_ALL = ("detection_iou", "detection_confidence", "grounding_iou", "cls_accuracy", "cls_equality")


def _score_all(text):
    comb = combined(*({"name": n} for n in _ALL))
    t = time.perf_counter()
    res = comb([text], {"boxes": [[GT]], "box": [GT], "label": ["cat"]})
    assert time.perf_counter() - t < 1.0, "took over a second"
    return {n: res.components[n].item() for n in _ALL}


def test_one_megabyte_of_garbage():
    rng = random.Random(0)
    garbage = "".join(rng.choices(string.printable, k=1_000_000))
    assert _score_all(garbage) == {n: 0.0 for n in _ALL}
    assert _score_all("<answer>" + garbage + "</answer>")["detection_iou"] == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "<answer>" * 5000,
        "</answer>" * 5000,
        "<answer></answer>" * 5000,
        "<answer>" + "[" * 500_000 + "</answer>",
        "<answer>" + "(1, " * 200_000 + "</answer>",
        "<answer>" + "[1, 2, " * 200_000 + "</answer>",
        "<answer>" + "'Position': " * 100_000 + "</answer>",
        "<answer>" + "no " * 300_000 + "</answer>",
        "<answer>(1,2)" + " " * 500_000 + "x</answer>",
        "<answer>" + "9" * 500_000 + "</answer>",
    ],
)
def test_pathological_texts_are_fast_and_earn_nothing(text):
    assert _score_all(text) == {n: 0.0 for n in _ALL}


def test_thousands_of_tags_use_the_last_one():
    text = ("<answer>No Objects</answer>" * 3000) + det((GT, 0.9))
    assert timed(parse_detection, text) == [(GT, 0.9)]


def test_ten_thousand_boxes_fail_fast():
    # a grid of boxes that would cover the GT: over MAX_BOXES, so the answer is a failure
    boxes = [([x, y, x + 10, y + 10], 0.5) for x in range(0, 1000, 10) for y in range(0, 1000, 10)]
    assert len(boxes) == 10_000
    text = det(*boxes)
    assert timed(parse_detection, text) is None
    assert _score_all(text)["detection_iou"] == 0.0
    assert _score_all(text)["detection_confidence"] == 0.0
    # grounding reads only the first box: [0,0,10,10] matches the GT here and is deserved
    assert timed(parse_box, text) == [0, 0, 10, 10]


def test_non_finite_numbers_never_score():
    for bad in ("nan", "NaN", "inf", "-inf", "1e999", "Infinity"):
        text = f"<answer>[{{'Position': [0, 0, {bad}, 10], 'Confidence': 0.9}}]</answer>"
        scores = _score_all(text)
        assert scores["detection_iou"] == 0.0 and scores["detection_confidence"] == 0.0
        assert scores["grounding_iou"] == 0.0
        assert not any(math.isnan(v) for v in scores.values())
