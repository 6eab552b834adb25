"""vision_rl/datasets.py: COCO-format detection, ImageFolder and jsonl classification loaders on tiny
files written into tmp_path, and the few-shot sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vision_rl.datasets import few_shot, load_classification_folder, load_classification_jsonl, load_coco_detection
from vision_rl.metrics import coco_detection_map

SIZES = {1: (40, 30), 2: (50, 20), 3: (32, 32), 4: (24, 24)}
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 10, "name": "traffic light"}]
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5], "iscrowd": 0, "area": 50},
    {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 10, 15, 15], "iscrowd": 0, "area": 225},
    {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 8, 8], "iscrowd": 0, "area": 64},
    {"id": 4, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 10], "iscrowd": 0, "area": 200},
    {"id": 5, "image_id": 3, "category_id": 1, "bbox": [3, 3, 6, 6], "iscrowd": 0, "area": 36},
    {"id": 6, "image_id": 3, "category_id": 2, "bbox": [0, 0, 30, 30], "iscrowd": 1, "area": 900},
    {"id": 7, "image_id": 4, "category_id": 10, "bbox": [2, 2, 4, 9], "iscrowd": 0, "area": 36},
]


@pytest.fixture
def coco(tmp_path) -> Path:
    """tmp_path/images/{1..4}.png and tmp_path/instances.json (image 4 holds only a traffic light)."""
    (tmp_path / "images").mkdir()
    for i, size in SIZES.items():
        Image.new("RGB", size, (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    images = [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, (w, h) in SIZES.items()]
    (tmp_path / "instances.json").write_text(
        json.dumps({"images": images, "annotations": ANNOTATIONS, "categories": CATEGORIES}))
    return tmp_path


def _pairs(rows):
    return [(r["image_id"], r["category"]) for r in rows]


def test_coco_rows_boxes_and_categories(coco):
    rows, cats = load_coco_detection(coco / "images", coco / "instances.json")
    assert cats == {1: "cat", 2: "dog", 10: "traffic light"}
    # (3, dog) has only a crowd region: no row at all.
    assert _pairs(rows) == [(1, "cat"), (1, "dog"), (2, "dog"), (3, "cat"), (4, "traffic light")]
    r = rows[0]
    assert r["task"] == "detection" and r["category_id"] == 1
    assert r["gt_boxes"] == [[1, 2, 11, 7], [20, 10, 35, 25]]  # xywh -> xyxy
    assert (r["width"], r["height"]) == SIZES[1]
    assert r["image"] == str(coco / "images" / "1.png") and Path(r["image"]).is_file()
    assert rows[2]["gt_boxes"] == [[5, 5, 25, 15]]


def test_coco_category_filter_and_unknown_name(coco):
    rows, cats = load_coco_detection(coco / "images", coco / "instances.json", categories=["cat"])
    assert cats == {1: "cat"}
    assert _pairs(rows) == [(1, "cat"), (3, "cat")]
    with pytest.raises(ValueError, match=r"unknown category 'cta'.*close matches: cat"):
        load_coco_detection(coco / "images", coco / "instances.json", categories=["cta"])


def test_coco_shots_are_per_category_and_deterministic(coco):
    kw = {"categories": ["cat", "dog"], "shots": 1}
    rows, _ = load_coco_detection(coco / "images", coco / "instances.json", **kw, seed=3)
    assert sorted(r["category"] for r in rows) == ["cat", "dog"]
    again, _ = load_coco_detection(coco / "images", coco / "instances.json", **kw, seed=3)
    assert again == rows
    picks = {tuple(_pairs(load_coco_detection(coco / "images", coco / "instances.json", **kw, seed=s)[0]))
             for s in range(20)}
    assert len(picks) > 1  # the seed matters


def test_coco_absent_rows_teach_no_objects(coco):
    rows, _ = load_coco_detection(coco / "images", coco / "instances.json", include_absent=1.0, seed=0)
    absent = [r for r in rows if not r["gt_boxes"]]
    present = [r for r in rows if r["gt_boxes"]]
    assert len(present) == 5
    # Absent pairs available: img1 traffic light, img2 cat/traffic light, img3 traffic light,
    # img4 cat/dog ((3, dog) is crowd, so never "absent") -> 6, capped by round(1.0 * 5) = 5.
    assert len(absent) == 5
    assert (3, "dog") not in _pairs(absent)
    assert all((r["image_id"], r["category"]) not in _pairs(present) for r in absent)
    again, _ = load_coco_detection(coco / "images", coco / "instances.json", include_absent=1.0, seed=0)
    assert again == rows
    none, _ = load_coco_detection(coco / "images", coco / "instances.json")
    assert all(r["gt_boxes"] for r in none)


def test_coco_max_images_and_relative_paths(coco):
    rows, _ = load_coco_detection("images", "instances.json", max_images=2, base_dir=coco)
    assert len({r["image_id"] for r in rows}) == 2
    assert all(Path(r["image"]).is_file() for r in rows)


def test_coco_rows_feed_the_detection_metric(coco):
    rows, cats = load_coco_detection(coco / "images", coco / "instances.json", include_absent=0.5)
    preds = [[(b, 0.9) for b in r["gt_boxes"]] for r in rows]
    assert coco_detection_map(preds, rows, cats)["mAP"] == pytest.approx(1.0)


def test_coco_missing_files_and_bad_json(coco):
    with pytest.raises(FileNotFoundError, match="nope.json: COCO annotation file not found"):
        load_coco_detection(coco / "images", coco / "nope.json")
    with pytest.raises(FileNotFoundError, match="missing_dir: images directory not found"):
        load_coco_detection(coco / "missing_dir", coco / "instances.json")
    (coco / "bad.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        load_coco_detection(coco / "images", coco / "bad.json")
    (coco / "list.json").write_text("[]")
    with pytest.raises(ValueError, match=r"list.json: not a COCO instances file"):
        load_coco_detection(coco / "images", coco / "list.json")
    (coco / "images" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*2.png"):
        load_coco_detection(coco / "images", coco / "instances.json")


def test_few_shot_counts_determinism_and_class_independence():
    rows = [{"k": c, "i": i} for c in "abc" for i in range(5)] + [{"k": "d", "i": 0}]
    picked = few_shot(rows, "k", 2, seed=1)
    counts = {c: sum(r["k"] == c for r in picked) for c in "abcd"}
    assert counts == {"a": 2, "b": 2, "c": 2, "d": 1}  # "d" has fewer than 2: all of it
    assert few_shot(rows, "k", 2, seed=1) == picked
    assert [rows.index(r) for r in picked] == sorted(rows.index(r) for r in picked)  # input order kept
    # Removing class "c" does not change what "a" and "b" get.
    without_c = few_shot([r for r in rows if r["k"] != "c"], "k", 2, seed=1)
    assert without_c == [r for r in picked if r["k"] != "c"]
    assert len({tuple(r["i"] for r in few_shot(rows, "k", 2, seed=s)) for s in range(10)}) > 1
    with pytest.raises(ValueError, match="positive"):
        few_shot(rows, "k", 0)


def _image_folder(root: Path) -> None:
    for cls, n, ext in (("golden_retriever", 3, "png"), ("tabby_cat", 2, "jpg")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (10 + i, 20), (0, 100, 0)).save(root / cls / f"{i}.{ext}")
    (root / "tabby_cat" / "notes.txt").write_text("not an image")


def test_classification_folder(tmp_path):
    _image_folder(tmp_path / "data")
    rows = load_classification_folder(tmp_path / "data")
    assert [r["label"] for r in rows] == ["golden retriever"] * 3 + ["tabby cat"] * 2
    assert all(r["choices"] == ["golden retriever", "tabby cat"] for r in rows)
    assert [r["image_id"] for r in rows] == list(range(5))
    assert (rows[1]["width"], rows[1]["height"]) == (11, 20)
    assert rows[0]["task"] == "classification"
    few = load_classification_folder("data", shots=1, seed=4, base_dir=tmp_path)
    assert sorted(r["label"] for r in few) == ["golden retriever", "tabby cat"]
    assert few == load_classification_folder(tmp_path / "data", shots=1, seed=4)
    with pytest.raises(FileNotFoundError, match="nowhere: image folder not found"):
        load_classification_folder(tmp_path / "nowhere")


def test_classification_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    for name, size in (("a.png", (8, 6)), ("b.png", (5, 5))):
        Image.new("RGB", size).save(tmp_path / "img" / name)
    lines = [{"image": "img/a.png", "label": "owl"},
             {"image": str(tmp_path / "img" / "b.png"), "label": "cat", "choices": ["cat", "dog", "owl"]},
             {"image": "img/b.png", "label": "bat"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(o) for o in lines) + "\n\n")
    rows = load_classification_jsonl(tmp_path / "data.jsonl")
    assert [r["label"] for r in rows] == ["owl", "cat", "bat"]
    assert rows[0]["choices"] == ["bat", "cat", "owl"]  # default: sorted labels of the file
    assert rows[1]["choices"] == ["cat", "dog", "owl"]
    assert (rows[0]["width"], rows[0]["height"]) == (8, 6)
    assert rows[0]["image"] == str(tmp_path / "img" / "a.png")
    # image_root changes where relative image paths resolve.
    (tmp_path / "other.jsonl").write_text(json.dumps({"image": "a.png", "label": "owl"}))
    assert load_classification_jsonl("other.jsonl", image_root="img", base_dir=tmp_path)[0]["width"] == 8


def test_classification_jsonl_errors(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "label": "x"}\n{"image": "a.png", "label": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_classification_jsonl(bad)
    bad.write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key 'label'"):
        load_classification_jsonl(bad)
    bad.write_text('{"image": "a.png", "label": "x", "choices": ["y"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'choices' must be a list containing the label"):
        load_classification_jsonl(bad)
    bad.write_text('{"image": "gone.png", "label": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"bad.jsonl:1: image file not found"):
        load_classification_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: classification jsonl not found"):
        load_classification_jsonl(tmp_path / "missing.jsonl")
