"""vision_rl/metrics.py: COCOeval detection mAP on synthetic sets with known answers, grounding and
classification metrics computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from vision_rl.metrics import classification_accuracy, coco_detection_map, grounding_metrics

CATS = {1: "cat", 2: "dog"}


def _row(image_id, category_id, gt_boxes, width=100, height=80):
    return {"task": "detection", "image": f"img{image_id}.png", "image_id": image_id, "width": width,
            "height": height, "category": CATS[category_id], "category_id": category_id, "gt_boxes": gt_boxes}


# Two images, two classes; one row per (image, category), "dog" absent from image 2.
ROWS = [
    _row(1, 1, [[10, 10, 40, 40], [50, 20, 90, 70]]),
    _row(1, 2, [[0, 0, 20, 30]]),
    _row(2, 1, [[5, 5, 60, 60]]),
    _row(2, 2, []),
]


def _perfect(rows, score=0.9):
    return [[(b, score) for b in r["gt_boxes"]] for r in rows]


def reference_ap(hits: list[bool], n_gt: int) -> float:
    """COCO's 101-point interpolated AP for detections already ranked by score (plain loop).

    precision_i = TP_i / i, recall_i = TP_i / n_gt; interpolated p(r) = max precision at recall >= r
    (0 when recall r is never reached); AP = mean of p(r) over r = 0, 0.01, ..., 1.
    """
    tp, prec, rec = 0, [], []
    for i, hit in enumerate(hits, 1):
        tp += hit
        prec.append(tp / i)
        rec.append(tp / n_gt)
    total = 0.0
    for r in np.linspace(0.0, 1.0, 101):
        reachable = [p for p, rc in zip(prec, rec) if rc >= r]
        total += max(reachable) if reachable else 0.0
    return total / 101


def test_perfect_predictions_give_map_one():
    m = coco_detection_map(_perfect(ROWS), ROWS, CATS)
    assert m["mAP"] == pytest.approx(1.0)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP/cat"] == pytest.approx(1.0) and m["AP/dog"] == pytest.approx(1.0)
    assert m["n_images"] == 2 and m["n_classes"] == 2


def test_predictions_for_one_class_only():
    preds = [p if r["category_id"] == 1 else [] for p, r in zip(_perfect(ROWS), ROWS)]
    m = coco_detection_map(preds, ROWS, CATS)
    assert m["AP/cat"] == pytest.approx(1.0)
    assert m["AP/dog"] == 0.0
    assert m["mAP"] == pytest.approx(0.5)
    assert m["AP50"] == pytest.approx(0.5)


def test_low_iou_prediction_scores_zero_at_every_threshold():
    # GT [0,0,10,10] (area 100); prediction [0,0,10,4] lies inside it: IoU = 40 / 100 = 0.4 < 0.5.
    rows = [{**_row(1, 1, [[0, 0, 10, 10]])}]
    m = coco_detection_map([[([0, 0, 10, 4], 0.99)]], rows, CATS)
    assert m["mAP"] == 0.0 and m["AP50"] == 0.0
    assert "AP/dog" not in m  # dog has no ground truth here: not part of the mean


def test_hand_derived_ap_hit_miss_hit():
    # 2 GT boxes, 3 detections ranked hit (0.9), miss (0.8), hit (0.7):
    #   precision = 1/1, 1/2, 2/3;  recall = 1/2, 1/2, 1
    #   interpolated precision (max to the right) = 1, 2/3, 2/3
    #   recall thresholds 0.00..0.50 (51 points) -> 1;  0.51..1.00 (50 points) -> 2/3
    #   AP = (51 * 1 + 50 * 2/3) / 101 = 84.333.../101 = 0.834983...
    # The hits are exact boxes and the miss does not overlap, so every IoU threshold gives this AP.
    gt = [[10, 10, 30, 30], [50, 50, 70, 70]]
    rows = [_row(1, 1, gt)]
    preds = [[(gt[0], 0.9), ([80, 0, 95, 10], 0.8), (gt[1], 0.7)]]
    m = coco_detection_map(preds, rows, CATS)
    expected = reference_ap([True, False, True], n_gt=2)
    assert expected == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert m["AP50"] == pytest.approx(expected, abs=1e-9)
    assert m["mAP"] == pytest.approx(expected, abs=1e-9)


def test_false_positive_on_absent_row_counts():
    # The highest-scoring cat box lies in image 2 where cat is absent (a "No Objects" row):
    # ranked miss, hit with 1 GT -> precision 0, 1/2; interpolated 1/2 at every recall -> AP = 0.5.
    rows = [_row(1, 1, [[10, 10, 40, 40]]), _row(2, 1, [])]
    preds = [[([10, 10, 40, 40], 0.9)], [([0, 0, 30, 30], 0.95)]]
    m = coco_detection_map(preds, rows, CATS)
    assert m["AP50"] == pytest.approx(reference_ap([False, True], 1)) == pytest.approx(0.5)
    assert m["mAP"] == pytest.approx(0.5)


def test_ap_across_images_matches_reference():
    # Detections from two images are pooled and ranked by score: 0.9 hit (img1), 0.8 miss (img2),
    # 0.6 hit (img2), 0.5 miss (img1), with 3 GT in all (2 + 1) -> one GT never found.
    rows = [_row(1, 1, [[0, 0, 10, 10], [20, 20, 40, 40]]), _row(2, 1, [[5, 5, 25, 25]])]
    preds = [[([0, 0, 10, 10], 0.9), ([60, 60, 70, 70], 0.5)], [([50, 50, 60, 60], 0.8), ([5, 5, 25, 25], 0.6)]]
    m = coco_detection_map(preds, rows, CATS)
    assert m["AP50"] == pytest.approx(reference_ap([True, False, True, False], 3), abs=1e-9)


def test_no_predictions_gives_zero():
    m = coco_detection_map([[] for _ in ROWS], ROWS, CATS)
    assert m["mAP"] == 0.0 and m["AP50"] == 0.0 and m["AP/cat"] == 0.0


def test_no_ground_truth_is_an_error():
    rows = [_row(1, 1, []), _row(1, 2, [])]
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        coco_detection_map([[([0, 0, 5, 5], 0.5)], []], rows, CATS)


def test_empty_and_zero_area_predictions_are_dropped():
    # A zero-area box at a higher score would be a false positive ranked first (AP 0.5) if kept.
    rows = [_row(1, 1, [[10, 10, 40, 40]])]
    preds = [[([5, 5, 5, 20], 0.99), ([], 0.98), ([10, 10, 40, 40], 0.9)]]
    assert coco_detection_map(preds, rows, CATS)["mAP"] == pytest.approx(1.0)


def test_repeated_image_category_row_is_used_once():
    # If the duplicated row's GT were added twice, half the GT would be unmatched (AP < 1).
    rows = ROWS + [ROWS[0]]
    m = coco_detection_map(_perfect(rows), rows, CATS)
    assert m["mAP"] == pytest.approx(1.0)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="2 predictions for 4 rows"):
        coco_detection_map([[], []], ROWS, CATS)
    with pytest.raises(ValueError, match="category_id 7"):
        coco_detection_map([[]], [{**ROWS[0], "category_id": 7}], CATS)
    with pytest.raises(ValueError, match="lacks width"):
        coco_detection_map([[]], [{k: v for k, v in ROWS[0].items() if k != "width"}], CATS)


def test_grounding_metrics_by_hand():
    gt = [[0, 0, 10, 10]] * 4
    # IoU: identical 1; half the box 50/100 = 0.5 (not > 0.5); None 0;
    # [5,5,15,15]: intersection 25, union 100 + 100 - 25 = 175 -> 1/7.
    preds = [[0, 0, 10, 10], [0, 0, 10, 5], None, [5, 5, 15, 15]]
    m = grounding_metrics(preds, gt)
    assert m["acc@0.5"] == pytest.approx(1 / 4)
    assert m["mIoU"] == pytest.approx((1 + 0.5 + 0 + 1 / 7) / 4)
    assert grounding_metrics(preds, gt, thresh=0.1)["acc@0.1"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="2 predictions for 4"):
        grounding_metrics(preds[:2], gt)


def test_classification_accuracy():
    assert classification_accuracy(["cat", None, "dog", "bird", ""], ["Cat", "dog", "cat", "bird", "owl"]) == 0.4
    with pytest.raises(ValueError):
        classification_accuracy(["a"], ["a", "b"])
