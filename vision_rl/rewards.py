"""Vision rewards: Visual-RFT detection and grounding, CLS-RL classification (METHODS.md C.1-C.3).

Pure functions (`iou`, `giou`, `parse_detection`, `detection_iou_reward`, ...) hold the formulas;
the factories registered in `shared.rewards.REWARDS` wrap them into the reward contract
`reward(completions, **fields) -> list[float | None]` (None: cannot evaluate, a counted failure).

| name | kwargs | score |
|---|---|---|
| `detection_iou` | `field="boxes"` | Visual-RFT R_iou in [0, 1]; None if the answer does not parse |
| `detection_confidence` | `field="boxes"` | Visual-RFT R_conf in [0, 1]; None if the answer does not parse |
| `grounding_iou` | `field="box"`, `variant="giou"` or `"iou"` | GIoU + 1 in [0, 2] (Visual-RFT) or IoU (VLM-R1) of the first box; None if no box |
| `cls_accuracy` | `field="label"` | CLS-RL: 1 iff the `<answer>` content equals the label; 0 without a tag |
| `cls_equality` | `field="label"` | No-Thinking-CLS-RL: 1 iff the whole completion equals the label |

The format reward is llm_rl's `format` (`<think>...</think> <answer>...</answer>`). Boxes are
[x1, y1, x2, y2] in model coordinates (see vision_rl/coords.py); ground truth must be converted
to them before it reaches a reward. Deviations from the reference code, on purpose:
- classification never uses Visual-RFT's two-way substring check (`gt in ans or ans in gt`): an
  empty answer would score 1 and training collapses to `<answer></answer>` (Visual-RFT issue #176);
- answers are scanned with bounded regexes, never `eval`, so a 1 MB completion, thousands of
  tags or 10,000 boxes cost linear time; more than MAX_BOXES predictions is a failure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from shared.rewards import register_reward, reward_field

Box = list[float]
MAX_BOXES = 100  # a detection answer with more predictions than this is a failure (None)
DEFAULT_CONFIDENCE = 1.0  # a prediction without 'Confidence' claims full confidence
MATCH_IOU = 0.5  # Visual-RFT: a prediction matches a ground-truth box when IoU > 0.5

# ------------------------------------------------------------------------------------------------
# Box geometry
# ------------------------------------------------------------------------------------------------


def _area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _inter_union(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter, _area(a) + _area(b) - inter


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes; 0.0 when the union has zero area."""
    inter, union = _inter_union(a, b)
    return inter / union if union > 0 else 0.0


def giou(a: Sequence[float], b: Sequence[float]) -> float:
    """Generalised IoU (Rezatofighi et al. 2019): IoU - |C \\ (A u B)| / |C|, C the enclosing box.

    In [-1, 1]. When the enclosing box has zero area (both boxes are points or lie on one line)
    there is nothing to reward and the result is -1.0.
    """
    inter, union = _inter_union(a, b)
    cw = max(0.0, max(a[2], b[2]) - min(a[0], b[0]))
    ch = max(0.0, max(a[3], b[3]) - min(a[1], b[1]))
    c = cw * ch
    if c <= 0:
        return -1.0
    i = inter / union if union > 0 else 0.0
    return i - (c - union) / c


def grounding_hit(pred_box: Sequence[float] | None, gt_box: Sequence[float], thresh: float = 0.5) -> bool:
    """Grounding accuracy (C.2): the predicted box overlaps the ground truth with IoU > `thresh`."""
    return pred_box is not None and iou(pred_box, gt_box) > thresh


# ------------------------------------------------------------------------------------------------
# Parsing model answers (bounded regexes, ASCII digits only)
# ------------------------------------------------------------------------------------------------

# A number of at most 15 integer and 20 fractional digits with an optional 3-digit exponent: every
# attempt to match it costs constant time, so scanning is linear in the text. No pattern has two
# adjacent runs that can take the same characters, so failing matches do not backtrack quadratically.
_NUM = r"[-+]?(?:[0-9]{1,15}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][-+]?[0-9]{1,3})?"
_C = r"\s*,\s*"
_BRACKET_BOX = rf"\[\s*({_NUM}){_C}({_NUM}){_C}({_NUM}){_C}({_NUM})\s*\]"
_PAIR_BOX = rf"\(\s*({_NUM}){_C}({_NUM})\s*\)\s*(?:,\s*)?\(\s*({_NUM}){_C}({_NUM})\s*\)"
_BOX_ANY = re.compile(rf"{_BRACKET_BOX}|{_PAIR_BOX}")
_BRACKET_AT = re.compile(r"\s*" + _BRACKET_BOX)
_NUM_AT = re.compile(rf"\s*['\"]?({_NUM})['\"]?")
# Keys of a Visual-RFT answer, quoted with ' or " or not at all, any letter case.
_KEY = re.compile(r"""['"]?\b(position|confidence)\b['"]?\s*:""", re.IGNORECASE)
_NO_OBJECTS = re.compile(r"no\s+objects?", re.IGNORECASE)


def answer_text(text: Any) -> str | None:
    """Content of the last `<answer>...</answer>` (found with rfind: linear cost), or None."""
    if not isinstance(text, str):
        return None
    close = text.rfind("</answer>")
    if close < 0:
        return None
    start = text.rfind("<answer>", 0, close)
    return None if start < 0 else text[start + len("<answer>") : close]


def _to_box(groups: Sequence[str]) -> Box | None:
    """Four numeric strings -> [x1, y1, x2, y2] with corners ordered; None if any is not finite."""
    x1, y1, x2, y2 = (float(g) for g in groups)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def parse_detection(text: Any) -> list[tuple[Box, float]] | None:
    """Visual-RFT detection answer -> [(box, confidence), ...], or None when it cannot be read.

    Reads the last `<answer>` (required) holding `[{'Position': [x1, y1, x2, y2], 'Confidence': c}, ...]`
    with ' or " or unquoted keys, any spacing, ints or floats. Rules:
    - "No Objects" (any case) and no Position -> []; "[]" -> []; both "No Objects" and boxes -> None;
    - every Position must be a flat list of 4 finite numbers, else None (nested brackets, nan, inf,
      non-ASCII digits); corners are reordered so x1 <= x2 and y1 <= y2;
    - 'Confidence' belongs to the Position before it; missing -> DEFAULT_CONFIDENCE (1.0); a second
      Confidence for one box, one before any Position, or a non-finite one -> None; it is not clipped
      here (the rewards clip to [0, 1]);
    - more than MAX_BOXES predictions -> None (scanning stops there, so cost stays bounded);
    - no Position and no "No Objects" -> None.
    """
    ans = answer_text(text)
    if ans is None:
        return None
    preds: list[tuple[Box, float]] = []
    has_conf = False
    for key in _KEY.finditer(ans):
        if key.group(1).lower() == "position":
            if len(preds) == MAX_BOXES:
                return None
            m = _BRACKET_AT.match(ans, key.end())
            box = _to_box(m.groups()) if m else None
            if box is None:
                return None
            preds.append((box, DEFAULT_CONFIDENCE))
            has_conf = False
        else:
            m = _NUM_AT.match(ans, key.end())
            if not preds or has_conf or m is None:
                return None
            c = float(m.group(1))
            if not math.isfinite(c):
                return None
            preds[-1] = (preds[-1][0], c)
            has_conf = True
    if _NO_OBJECTS.search(ans):
        return None if preds else []
    if preds:
        return preds
    return [] if ans.strip() == "[]" else None


def parse_box(text: Any) -> Box | None:
    """First box of a grounding answer: in the last `<answer>` or, without one, the whole text.

    Accepts `(x1,y1),(x2,y2)`, `[x1, y1, x2, y2]` and so `{'Position': [x1, y1, x2, y2]}`; corners
    are reordered. None when there is no box or the first box holds a non-finite number.
    """
    if not isinstance(text, str):
        return None
    region = answer_text(text)
    m = _BOX_ANY.search(text if region is None else region)
    if m is None:
        return None
    groups = m.groups()
    return _to_box(groups[:4] if groups[0] is not None else groups[4:])


# ------------------------------------------------------------------------------------------------
# Detection rewards (Visual-RFT, METHODS.md C.1)
# ------------------------------------------------------------------------------------------------


def match_detections(pred: Sequence[tuple[Box, float]], gt: Sequence[Box]) -> list[tuple[float, float]]:
    """Visual-RFT greedy matching, shared by both detection rewards.

    Drops exact-duplicate boxes (the first one is kept), clips confidences to [0, 1], sorts by
    confidence descending (stable), then matches each prediction to the unmatched ground-truth box
    of largest IoU; IoU_i is recorded when it exceeds MATCH_IOU, else 0. Returns [(c_i, IoU_i)].
    """
    seen: set[tuple[float, ...]] = set()
    unique: list[tuple[Box, float]] = []
    for box, c in pred:
        key = tuple(box)
        if key not in seen:
            seen.add(key)
            unique.append((list(box), min(max(float(c), 0.0), 1.0)))
    unique.sort(key=lambda p: -p[1])
    free = list(range(len(gt)))
    out: list[tuple[float, float]] = []
    for box, c in unique:
        best, best_j = 0.0, -1
        for j in free:
            v = iou(box, gt[j])
            if v > best:
                best, best_j = v, j
        if best > MATCH_IOU:
            free.remove(best_j)
            out.append((c, best))
        else:
            out.append((c, 0.0))
    return out


def detection_iou_reward(pred: Sequence[tuple[Box, float]], gt: Sequence[Box]) -> float:
    """R_iou = sum_i IoU_i / max(|GT|, |pred|) (pred after dropping duplicates); 1 if both are empty."""
    if not pred and not gt:
        return 1.0
    matched = match_detections(pred, gt)
    return sum(v for _, v in matched) / max(len(gt), len(matched))


def detection_confidence_reward(pred: Sequence[tuple[Box, float]], gt: Sequence[Box]) -> float:
    """R_conf = mean_i (c_i if IoU_i > 0 else 1 - c_i); 1 if both are empty, 0 if only pred is empty."""
    if not pred:
        return 0.0 if gt else 1.0
    matched = match_detections(pred, gt)
    return sum(c if v > 0 else 1.0 - c for c, v in matched) / len(matched)


# ------------------------------------------------------------------------------------------------
# Classification (CLS-RL / No-Thinking-CLS-RL, METHODS.md C.3)
# ------------------------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def normalise_label(s: str) -> str:
    """Lowercase, strip whitespace and one trailing period, collapse inner whitespace."""
    s = s.strip().lower().removesuffix(".")
    return _SPACES.sub(" ", s.strip())


def classification_reward(answer: str | None, label: str) -> float:
    """1.0 iff the normalised answer is non-empty and equals the normalised label (no substring test)."""
    if not isinstance(answer, str):
        return 0.0
    a = normalise_label(answer)
    return 1.0 if a and a == normalise_label(str(label)) else 0.0


# ------------------------------------------------------------------------------------------------
# Registered factories
# ------------------------------------------------------------------------------------------------


def _gt_box(value: Any, reward: str) -> Box:
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"{reward}: a ground-truth box must be 4 finite numbers [x1, y1, x2, y2], got {value!r}")
    return box


def _gt_boxes(value: Any, reward: str) -> list[Box]:
    boxes = list(value) if isinstance(value, (list, tuple)) else None
    if boxes is None:
        raise ValueError(f"{reward}: ground-truth boxes must be a list of [x1, y1, x2, y2], got {value!r}")
    return [_gt_box(b, reward) for b in boxes]


def _detection(name: str, score, field: str):
    def reward(completions: list[str], **fields: list) -> list[float | None]:
        gts = reward_field(fields, field, len(completions), name)
        out: list[float | None] = []
        for text, gt in zip(completions, gts):
            pred = parse_detection(text)
            out.append(None if pred is None or gt is None else score(pred, _gt_boxes(gt, name)))
        return out

    return reward


@register_reward("detection_iou")
def detection_iou(field: str = "boxes"):
    """Visual-RFT R_iou of the `<answer>` against `fields[field]` (boxes in model coordinates)."""
    return _detection("detection_iou", detection_iou_reward, field)


@register_reward("detection_confidence")
def detection_confidence(field: str = "boxes"):
    """Visual-RFT R_conf of the `<answer>` against `fields[field]` (boxes in model coordinates)."""
    return _detection("detection_confidence", detection_confidence_reward, field)


GROUNDING_VARIANTS = ("giou", "iou")


@register_reward("grounding_iou")
def grounding_iou(field: str = "box", variant: str = "giou"):
    """First predicted box vs `fields[field]`: GIoU + 1 in [0, 2] ("giou", Visual-RFT) or IoU ("iou", VLM-R1)."""
    if variant not in GROUNDING_VARIANTS:
        raise ValueError(f"grounding_iou: variant must be one of {GROUNDING_VARIANTS}, got {variant!r}")

    def reward(completions: list[str], **fields: list) -> list[float | None]:
        gts = reward_field(fields, field, len(completions), "grounding_iou")
        out: list[float | None] = []
        for text, gt in zip(completions, gts):
            box = parse_box(text)
            if box is None or gt is None:
                out.append(None)
                continue
            g = _gt_box(gt, "grounding_iou")
            out.append(giou(box, g) + 1.0 if variant == "giou" else iou(box, g))
        return out

    return reward


@register_reward("cls_accuracy")
def cls_accuracy(field: str = "label"):
    """CLS-RL accuracy: 1.0 iff the last `<answer>` content equals `fields[field]`; no tag gives 0.0."""

    def reward(completions: list[str], **fields: list) -> list[float | None]:
        labels = reward_field(fields, field, len(completions), "cls_accuracy")
        return [
            None if not isinstance(t, str) or y is None else classification_reward(answer_text(t), y)
            for t, y in zip(completions, labels)
        ]

    return reward


@register_reward("cls_equality")
def cls_equality(field: str = "label"):
    """No-Thinking-CLS-RL: 1.0 iff the whole completion normalises to `fields[field]`."""

    def reward(completions: list[str], **fields: list) -> list[float | None]:
        labels = reward_field(fields, field, len(completions), "cls_equality")
        return [
            None if not isinstance(t, str) or y is None else classification_reward(t, y)
            for t, y in zip(completions, labels)
        ]

    return reward
