"""Held-out metrics for the vision tasks, computed with the field's own tools (METHODS.md C.1–C.3).

- Detection (Visual-RFT, Liu et al. 2503.01785): pycocotools ``COCOeval(gt, dt, "bbox")``, AP averaged
  over IoU thresholds .50:.05:.95 with COCO's 101-point interpolated precision, area "all",
  maxDets 100. The reported ``mAP`` follows the Visual-RFT protocol: the mean of the per-class APs
  over the classes that have at least one ground-truth box (not COCO's summary line, which is the
  same number computed through ``summarize()`` and printed).
- Grounding (LISA / REC): accuracy at IoU > 0.5 and mean IoU of one box per phrase.
- Classification (CLS-RL, 2503.20752): exact match of the normalised answer with the label.

All boxes here are ``[x1, y1, x2, y2]`` in pixels of the ORIGINAL image; converting model coordinates
(Qwen2-VL's [0, 1000) or Qwen2.5-VL's resized pixels) happens before these functions are called.

Example::

    m = coco_detection_map(predictions, rows, {1: "person", 3: "car"})
    m["mAP"], m["AP50"], m["AP/person"]
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import numpy as np

from vision_rl.rewards import iou

Box = Sequence[float]


def _valid_box(box) -> bool:
    """Four finite numbers with positive width and height (empty / zero-area boxes are dropped)."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1


def _xywh(box: Box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _quiet_coco(dataset: dict):
    """A pycocotools COCO object built in memory from a dataset dict, with its prints suppressed."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def build_coco_datasets(predictions: Sequence, rows: Sequence[dict], categories: dict[int, str]
                        ) -> tuple[dict, dict]:
    """The COCO-format ground-truth and detection dicts for `coco_detection_map` (pure, no pycocotools).

    One row per (image, category); a repeated (image_id, category_id) pair is used once (its first
    row, for both ground truth and predictions). Detections carry ``score`` and ``area`` as
    ``COCO.loadRes`` would set them.
    """
    if len(predictions) != len(rows):
        raise ValueError(f"coco_detection_map: {len(predictions)} predictions for {len(rows)} rows; "
                         "pass one list of (box, score) per row")
    images: dict[int, dict] = {}
    gt_anns: list[dict] = []
    dt_anns: list[dict] = []
    seen: set[tuple[int, int]] = set()
    for i, (row, preds) in enumerate(zip(rows, predictions)):
        missing = [k for k in ("image_id", "width", "height", "category_id", "gt_boxes") if k not in row]
        if missing:
            raise ValueError(f"coco_detection_map: row {i} lacks {', '.join(missing)} (need a detection row)")
        img, cat = int(row["image_id"]), int(row["category_id"])
        if cat not in categories:
            raise ValueError(f"coco_detection_map: row {i} has category_id {cat}, not in categories "
                             f"{sorted(categories)}")
        size = {"width": int(row["width"]), "height": int(row["height"])}
        if img in images and {k: images[img][k] for k in size} != size:
            raise ValueError(f"coco_detection_map: image_id {img} has two sizes "
                             f"({images[img]['width']}x{images[img]['height']} and {size['width']}x{size['height']})")
        images.setdefault(img, {"id": img, **size})
        if (img, cat) in seen:
            continue
        seen.add((img, cat))
        for box in row["gt_boxes"]:
            if not _valid_box(box):
                raise ValueError(f"coco_detection_map: row {i} has an invalid gt box {box!r} (want x1<x2, y1<y2)")
            xywh = _xywh(box)
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": img, "category_id": cat, "bbox": xywh,
                            "area": xywh[2] * xywh[3], "iscrowd": 0})
        for box, score in preds or ():
            if not _valid_box(box):
                continue
            xywh = _xywh(box)
            dt_anns.append({"id": len(dt_anns) + 1, "image_id": img, "category_id": cat, "bbox": xywh,
                            "area": xywh[2] * xywh[3], "iscrowd": 0, "score": float(score)})
    cats = [{"id": int(k), "name": str(v)} for k, v in sorted(categories.items())]
    imgs = [images[k] for k in sorted(images)]
    gt = {"images": imgs, "categories": cats, "annotations": gt_anns}
    dt = {"images": imgs, "categories": cats, "annotations": dt_anns}
    return gt, dt


def coco_detection_map(predictions: Sequence[Sequence[tuple[Box, float]]], rows: Sequence[dict],
                       categories: dict[int, str]) -> dict[str, float]:
    """COCO bbox AP of predictions aligned with detection rows, as Visual-RFT reports it.

    predictions[i]: list of ``(box_xyxy_original_pixels, score)`` for rows[i] (its image and category).
    rows[i]: a detection row (``image_id``, ``width``, ``height``, ``category_id``, ``gt_boxes``).
    categories: category_id -> name.

    Returns ``{"mAP", "AP50", "AP/<name>" for each class with ground truth, "n_images", "n_classes"}``,
    values in [0, 1]. mAP = mean over classes with >= 1 GT box of AP@[.50:.95]; AP50 likewise at
    IoU .50. Per class, AP = mean of ``eval["precision"][t, :, k, area=all, maxDets=100]`` over entries
    > -1 (COCO marks recall thresholds it cannot reach with 0, absent classes with -1). No predictions
    give 0.0; no ground truth at all is a ValueError.
    """
    from pycocotools.cocoeval import COCOeval

    gt_dict, dt_dict = build_coco_datasets(predictions, rows, categories)
    if not gt_dict["annotations"]:
        raise ValueError("coco_detection_map: no ground-truth boxes in these rows; mAP is undefined")
    gt, dt = _quiet_coco(gt_dict), _quiet_coco(dt_dict)
    ev = COCOeval(gt, dt, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    p = ev.params
    assert abs(p.iouThrs[0] - 0.5) < 1e-9 and p.maxDets[-1] == 100 and list(p.areaRng[0]) == [0, 1e10]
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
    gt_cats = {a["category_id"] for a in gt_dict["annotations"]}
    out: dict[str, float] = {}
    ap, ap50 = [], []
    for k, cat in enumerate(p.catIds):
        if cat not in gt_cats:
            continue
        pr = precision[:, :, k, 0, -1]
        ap.append(float(np.mean(pr[pr > -1])) if (pr > -1).any() else 0.0)
        pr50 = precision[0, :, k, 0, -1]
        ap50.append(float(np.mean(pr50[pr50 > -1])) if (pr50 > -1).any() else 0.0)
        out[f"AP/{categories[cat]}"] = ap[-1]
    out["mAP"] = float(np.mean(ap))
    out["AP50"] = float(np.mean(ap50))
    out["n_images"] = float(len(gt_dict["images"]))
    out["n_classes"] = float(len(ap))
    return out


def grounding_metrics(pred_boxes: Sequence[Box | None], gt_boxes: Sequence[Box], thresh: float = 0.5
                      ) -> dict[str, float]:
    """Referring-expression grounding: ``{"acc@<thresh>": share with IoU > thresh, "mIoU", "n"}``.

    One predicted box (or None when the output could not be parsed: a miss with IoU 0) per GT box.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"grounding_metrics: {len(pred_boxes)} predictions for {len(gt_boxes)} ground-truth boxes")
    if not gt_boxes:
        raise ValueError("grounding_metrics: no boxes to evaluate")
    ious = [0.0 if p is None or not _valid_box(p) else iou([float(v) for v in p], [float(v) for v in g])
            for p, g in zip(pred_boxes, gt_boxes)]
    return {f"acc@{thresh:g}": sum(v > thresh for v in ious) / len(ious),
            "mIoU": sum(ious) / len(ious), "n": float(len(ious))}


def classification_accuracy(answers: Sequence[str | None], labels: Sequence[str]) -> float:
    """Share of answers equal to their label after ``strip().lower()`` on both (None counts as wrong).

    Answers come already normalised by the reward's parser (CLS-RL: the ``<answer>`` content, lowercase,
    stripped); an empty or multi-label answer such as "a or b" simply differs from the label (C.3: no
    substring matching).
    """
    if len(answers) != len(labels):
        raise ValueError(f"classification_accuracy: {len(answers)} answers for {len(labels)} labels")
    if not labels:
        raise ValueError("classification_accuracy: no labels to evaluate")
    hits = sum(a is not None and a.strip().lower() == str(lab).strip().lower() for a, lab in zip(answers, labels))
    return hits / len(labels)
