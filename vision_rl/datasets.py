"""Real vision data from local files, as plain row dicts (offline; nothing downloads).

Loaders:

- `load_coco_detection`: a COCO-format ``instances`` json (COCO, LVIS, or Visual-RFT's few-shot
  subsets saved locally) -> one detection row per (image, category), Visual-RFT style (METHODS.md C.1:
  one prompt asks for one category), optionally with "No Objects" rows for absent categories.
- `load_classification_folder`: ImageFolder layout ``root/<class_name>/*.png`` (CLS-RL's few-shot
  splits, METHODS.md C.3).
- `load_classification_jsonl`: ``{"image": ..., "label": ..., "choices": [...]}`` per line.
- `few_shot`: deterministic k-per-class sampling shared by the loaders and the synthetic task.

Row schema (the contract with the rest of vision_rl): ``image`` (path str), ``image_id`` (int, unique
within the split), ``width``/``height`` (original pixels), ``task``; detection rows add ``category``,
``category_id`` and ``gt_boxes`` (``[x1, y1, x2, y2]`` original pixels, possibly empty);
classification rows add ``label`` and ``choices``.

Example::

    rows, cats = load_coco_detection("coco/val2017", "coco/annotations/instances_val2017.json",
                                     categories=["bus", "train"], shots=4, include_absent=0.25)
"""

from __future__ import annotations

import difflib
import json
import random
from collections import defaultdict
from collections.abc import Hashable
from pathlib import Path

from shared.jsonl import jsonl_objects

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _resolve(path: str | Path, base_dir: str | Path | None) -> Path:
    """`path` as given when absolute, else relative to `base_dir` (default: the current directory)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir if base_dir is not None else Path.cwd()) / p


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the image header (PIL reads no pixels here)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read image {path} ({e})") from None


def few_shot(rows: list[dict], key: str, shots: int, seed: int = 0) -> list[dict]:
    """`shots` rows per value of ``row[key]`` (all of them when a class has fewer), seeded.

    Each class draws from its own generator seeded by (seed, class), so adding or removing a class
    does not change what another class gets. The kept rows stay in their input order.
    """
    if shots is None or int(shots) < 1:
        raise ValueError(f"few_shot: shots must be a positive integer, got {shots!r}")
    by_class: dict[Hashable, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"few_shot: row {i} has no key {key!r}")
        by_class[row[key]].append(i)
    keep: set[int] = set()
    for cls, idx in by_class.items():
        rng = random.Random(f"{seed}:{cls!r}")
        keep.update(idx if len(idx) <= shots else rng.sample(idx, int(shots)))
    return [rows[i] for i in sorted(keep)]


def _read_coco_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise ValueError(f"{path}: not a COCO instances file (need lists 'images', 'annotations', 'categories')")
    return data


def _select_categories(data: dict, names: list[str] | None, path: Path) -> dict[int, str]:
    all_cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    if names is None:
        return dict(sorted(all_cats.items()))
    by_name = {v: k for k, v in all_cats.items()}
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else f"; {len(by_name)} categories in the file"
            raise ValueError(f"{path}: unknown category {name!r}{hint}")
    return dict(sorted((by_name[n], n) for n in set(names)))


def load_coco_detection(images_dir: str | Path, annotations: str | Path, categories: list[str] | None = None,
                        shots: int | None = None, seed: int = 0, max_images: int | None = None,
                        include_absent: float = 0.0, base_dir: str | Path | None = None
                        ) -> tuple[list[dict], dict[int, str]]:
    """Detection rows from a COCO-format instances json, and the selected {category_id: name}.

    - one row per (image, selected category present in it); ``gt_boxes`` converted from COCO xywh to
      xyxy, boxes with non-positive width/height skipped. A (image, category) whose only boxes are
      crowd regions (``iscrowd=1``) gets no row at all: its boxes cannot be scored as single objects.
    - ``categories``: names to keep (default all); an unknown name is a ValueError with close matches.
    - ``max_images``: first restrict to this many images (seeded sample of the images holding a
      selected category) — for quick evaluation.
    - ``shots=k``: then k images per category (Visual-RFT few-shot), via `few_shot` on category_id.
    - ``include_absent=f``: then add round(f × number of rows) "No Objects" rows (``gt_boxes=[]``)
      for selected categories absent from the chosen images, seeded; 0 adds none.
    Relative paths resolve against ``base_dir`` (default: the current directory). Rows are sorted by
    (image_id, category_id).
    """
    ann_path, img_dir = _resolve(annotations, base_dir), _resolve(images_dir, base_dir)
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: images directory not found")
    if include_absent < 0:
        raise ValueError(f"load_coco_detection: include_absent must be >= 0, got {include_absent}")
    data = _read_coco_json(ann_path)
    cats = _select_categories(data, categories, ann_path)
    images = {int(im["id"]): im for im in data["images"]}

    boxes: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    crowd: set[tuple[int, int]] = set()
    for n, a in enumerate(data["annotations"]):
        try:
            img, cat, (x, y, w, h) = int(a["image_id"]), int(a["category_id"]), (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{ann_path}: annotation {n} needs image_id, category_id and bbox [x, y, w, h]") from None
        if cat not in cats:
            continue
        if img not in images:
            raise ValueError(f"{ann_path}: annotation {n} refers to image_id {img}, not in 'images'")
        if a.get("iscrowd", 0):
            crowd.add((img, cat))
        elif w > 0 and h > 0:
            boxes[(img, cat)].append([x, y, x + w, y + h])
    present = sorted(boxes)
    crowd -= set(present)

    pool = sorted({img for img, _ in present})
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"load_coco_detection: max_images must be >= 1, got {max_images}")
        if len(pool) > max_images:
            pool = sorted(random.Random(seed).sample(pool, max_images))
    pool_set = set(pool)
    rows = [{"img": img, "category_id": cat} for img, cat in present if img in pool_set]
    if shots is not None:
        rows = few_shot(rows, "category_id", shots, seed)
    pairs = [(r["img"], r["category_id"]) for r in rows]

    if include_absent > 0:
        chosen = sorted({img for img, _ in pairs})
        taken = set(present) | crowd
        absent = [(img, cat) for img in chosen for cat in cats if (img, cat) not in taken]
        n_absent = min(len(absent), round(include_absent * len(pairs)))
        pairs += random.Random(f"{seed}:absent").sample(absent, n_absent)

    out = []
    for img, cat in sorted(pairs):
        info = images[img]
        if "file_name" not in info:
            raise ValueError(f"{ann_path}: image {img} has no 'file_name'")
        path = img_dir / str(info["file_name"])
        if "width" in info and "height" in info:
            size = (int(info["width"]), int(info["height"]))
        else:
            size = _image_size(path, str(ann_path))
        if not path.is_file():
            raise FileNotFoundError(f"{ann_path}: image file not found: {path}")
        out.append({"task": "detection", "image": str(path), "image_id": img, "width": size[0],
                    "height": size[1], "category": cats[cat], "category_id": cat,
                    "gt_boxes": [list(b) for b in boxes.get((img, cat), [])]})
    if not out:
        raise ValueError(f"{ann_path}: no images contain the selected categories {sorted(cats.values())}")
    return out, cats


def load_classification_folder(root: str | Path, shots: int | None = None, seed: int = 0,
                               base_dir: str | Path | None = None) -> list[dict]:
    """Classification rows from ``root/<class_name>/<image>``; labels are folder names, "_" -> " ".

    ``choices`` is the sorted list of all labels; ``shots=k`` keeps k images per class (`few_shot`);
    image sizes come from the image headers; ``image_id`` numbers the kept rows from 0.
    """
    root = _resolve(root, base_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = class_dir.name.replace("_", " ")
        for f in sorted(class_dir.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append({"image": str(f), "label": label})
    if not rows:
        raise ValueError(f"{root}: no images found (expected root/<class_name>/*{'|*'.join(IMAGE_EXTENSIONS)})")
    choices = sorted({r["label"] for r in rows})
    if shots is not None:
        rows = few_shot(rows, "label", shots, seed)
    out = []
    for i, r in enumerate(rows):
        w, h = _image_size(Path(r["image"]), str(root))
        out.append({"task": "classification", "image": r["image"], "image_id": i, "width": w, "height": h,
                    "label": r["label"], "choices": list(choices)})
    return out


def load_classification_jsonl(path: str | Path, image_root: str | Path | None = None,
                              base_dir: str | Path | None = None) -> list[dict]:
    """Classification rows from a jsonl file: ``{"image": path, "label": str, "choices": [..]?}``.

    Relative image paths resolve against ``image_root`` (default: the jsonl file's folder).
    ``choices`` defaults to the sorted set of all labels in the file and must contain the label.
    A bad line is a ValueError naming the file and line number.
    """
    path = _resolve(path, base_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classification jsonl not found")
    root = _resolve(image_root, base_dir) if image_root is not None else path.parent
    items = []
    for n, obj in jsonl_objects(path):
        missing = [k for k in ("image", "label") if k not in obj]
        if missing:
            raise ValueError(f"{path}:{n}: missing key {missing[0]!r} (have: {', '.join(obj) or 'none'})")
        choices = obj.get("choices")
        if choices is not None and (not isinstance(choices, list) or str(obj["label"]) not in map(str, choices)):
            raise ValueError(f"{path}:{n}: 'choices' must be a list containing the label {obj['label']!r}")
        items.append((n, obj))
    if not items:
        raise ValueError(f"{path}: no rows")
    all_labels = sorted({str(o["label"]) for _, o in items})
    out = []
    for i, (n, obj) in enumerate(items):
        image = _resolve(obj["image"], root)
        w, h = _image_size(image, f"{path}:{n}")
        choices = [str(c) for c in obj["choices"]] if obj.get("choices") is not None else list(all_labels)
        out.append({"task": "classification", "image": str(image), "image_id": i, "width": w, "height": h,
                    "label": str(obj["label"]), "choices": choices})
    return out
