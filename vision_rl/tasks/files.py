"""Vision tasks from local files: COCO-format detection (Visual-RFT few-shot subsets) and classification.

`coco_detection`: a few-shot train set (images folder + instances json, e.g. the Visual-RFT COCO/LVIS
k-shot subsets saved locally) whose rows are both the SFT demonstrations and the RL prompts, and a
held-out set evaluated by COCO mAP over the selected categories.

`image_classification`: ImageFolder trees (root/<class>/<image>) or jsonl files
(`{"image": path, "label": ..., "choices": [...]?}`), k shots per class for training. Choices follow
CLS-RL: all classes when fewer than 30, otherwise 40% of them (at most 100), always with the label.

Relative paths resolve against the working directory.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from shared.config import register_task_schema
from vision_rl.coords import BoxCoder
from vision_rl.datasets import few_shot, load_classification_folder, load_classification_jsonl, load_coco_detection
from vision_rl.tasks.common import METRIC, VisionTaskConfig, annotate, held_out_metrics, per_sample_score


@register_task_schema("coco_detection")
class CocoDetectionConfig(VisionTaskConfig):
    name: Literal["coco_detection"] = "coco_detection"
    train_images: str = Field(description="folder of the training images")
    train_annotations: str = Field(description="COCO instances json of the training images")
    eval_images: str = Field(description="folder of the held-out images")
    eval_annotations: str = Field(description="COCO instances json of the held-out images")
    categories: list[str] | None = Field(None, description="category names to use (default: all)")
    shots: int | None = Field(None, gt=0, description="training images per category (few-shot)")
    include_absent: float = Field(0.0, ge=0, description="extra 'No Objects' rows per present row in training")
    eval_max_images: int | None = Field(None, gt=0, description="cap on held-out images")
    val_size: int = Field(64, ge=0, description="held-out rows used for warm-up model selection")
    data_seed: int = 1234


@register_task_schema("image_classification")
class ImageClassificationConfig(VisionTaskConfig):
    name: Literal["image_classification"] = "image_classification"
    format: Literal["folder", "jsonl"] = Field("folder", description="ImageFolder tree or jsonl file")
    train_path: str = Field(description="training root folder or jsonl file")
    eval_path: str = Field(description="held-out root folder or jsonl file")
    shots: int | None = Field(None, gt=0, description="training images per class (few-shot)")
    val_size: int = Field(64, ge=0, description="held-out rows used for warm-up model selection")
    data_seed: int = 1234


FILE_TASKS = (CocoDetectionConfig, ImageClassificationConfig)


def cls_choices(label: str, classes: list[str], rng: random.Random) -> list[str]:
    """CLS-RL's choice list: every class if fewer than 30, else 40% of them (at most 100), label included."""
    if len(classes) < 30:
        return list(classes)
    k = min(100, round(0.4 * len(classes)))
    others = rng.sample([c for c in classes if c != label], k - 1)
    return sorted(others + [label])


class FileTask:
    higher_is_better = True

    def __init__(self, kind: str, think: bool, coder: BoxCoder, splits: dict[str, list[dict]],
                 categories: dict[int, str] | None = None):
        self.kind, self.think, self.coder, self.categories = kind, think, coder, categories
        self.metric = METRIC[kind]
        self._splits = {name: [annotate(dict(r, task=kind), coder, think) for r in rows] for name, rows in splits.items()}

    def split(self, name: str) -> list[dict]:
        return self._splits[name]

    def score(self, completions: list[str], rows: list[dict]) -> list[float]:
        return per_sample_score(self.kind, completions, rows, self.coder, self.think)

    def metrics(self, completions: list[str], rows: list[dict]) -> dict[str, float]:
        return held_out_metrics(self.kind, completions, rows, self.coder, self.think, self.categories)


def make_file_task(cfg, coder: BoxCoder) -> FileTask:
    if isinstance(cfg, CocoDetectionConfig):
        train, cats = load_coco_detection(cfg.train_images, cfg.train_annotations, cfg.categories, cfg.shots,
                                          cfg.data_seed, include_absent=cfg.include_absent)
        held, _ = load_coco_detection(cfg.eval_images, cfg.eval_annotations, cfg.categories, None, cfg.data_seed,
                                      max_images=cfg.eval_max_images, include_absent=0.0)
        splits = {"train": train, "sft": train, "val": held[: cfg.val_size], "eval": held}
        return FileTask("detection", cfg.think, coder, splits, cats)
    load = load_classification_folder if cfg.format == "folder" else load_classification_jsonl
    train = load(cfg.train_path)
    held = load(cfg.eval_path)
    if cfg.shots:
        train = few_shot(train, "label", cfg.shots, cfg.data_seed)
    classes = sorted({r["label"] for r in train} | {r["label"] for r in held})
    rng = random.Random(cfg.data_seed)
    for r in train + held:
        r["choices"] = cls_choices(r["label"], classes, rng)
    held_sorted = list(held)
    random.Random(cfg.data_seed + 1).shuffle(held_sorted)
    splits = {"train": train, "sft": train, "val": held_sorted[: cfg.val_size], "eval": held}
    return FileTask("classification", cfg.think, coder, splits)
