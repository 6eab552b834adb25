"""Embedded default vision task: synthetic images of coloured shapes, generated in-process.

Each image shows up to `max_objects` non-overlapping shapes (circle, square, triangle) in red, green
or blue on a pale colour ramp (red grows left to right, blue top to bottom). One generator serves three kinds of task:

- detection: "detect all objects of category '<shape>'" (sometimes absent: "No Objects"), boxes in
  original pixels, evaluated by COCO mAP;
- grounding: "the bounding box of the red circle" (colour+shape is unique in the image), acc@0.5;
- classification: one shape per image, label "<colour> <shape>" out of the 9 classes, accuracy.

Splits are disjoint by construction (each split has its own seed stream): `sft` holds the few-shot
demonstrations (`shots` per class, as in the Visual-RFT / CLS-RL few-shot settings; or `sft_size`
images), `train` the RL prompts (generated lazily, so 10^5 of them cost nothing until drawn), `val`
the warm-up model selection, `eval` the held-out report.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

from PIL import Image, ImageDraw
from pydantic import Field

from shared.config import register_task_schema
from vision_rl.coords import BoxCoder
from vision_rl.tasks.common import METRIC, EmbeddedVLMConfig, annotate, held_out_metrics, per_sample_score

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SPLIT_SEED = {"eval": 11, "val": 22, "sft": 33, "train": 44}


@register_task_schema("shapes")
class ShapesTaskConfig(EmbeddedVLMConfig):
    name: Literal["shapes"] = "shapes"
    kind: Literal["detection", "grounding", "classification"] = Field("detection", description="which task")
    image_size: tuple[int, int] = Field((112, 112), description="(width, height) of generated images in pixels")
    min_size: int = Field(20, gt=4, description="smallest shape side in pixels")
    max_size: int = Field(44, gt=4, description="largest shape side in pixels")
    max_objects: int = Field(3, gt=0, le=6, description="shapes per image (detection/grounding)")
    absent_frac: float = Field(0.15, ge=0, le=1, description="detection: fraction of prompts whose category is absent")
    shots: int | None = Field(None, gt=0, description="few-shot demonstrations per class (overrides sft_size)")
    sft_size: int = Field(200, ge=0, description="demonstrations when shots is not set")
    train_size: int = Field(100000, gt=0, description="RL prompts (generated lazily)")
    val_size: int = Field(100, ge=0)
    eval_size: int = Field(200, gt=0)
    data_seed: int = Field(1234, description="seed of the generator (fixed across run seeds)")

    def embedded_corpus(self) -> tuple[list[str], list[str]]:
        return tokenizer_corpus()


def background(width: int, height: int, shade: int) -> Image.Image:
    """A pale ramp: x raises the red channel, y the blue one. Every patch thus says where it is, which
    a tiny model trained from scratch needs (Qwen's rotary positions are relative only)."""
    import numpy as np

    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    r = 150 + 100 * x + 0 * y
    b = 150 + 100 * y + 0 * x
    g = np.full((height, width), 235.0)
    return Image.fromarray((np.stack([r, g, b], -1) - shade).clip(0, 255).astype("uint8"), "RGB")


def draw_scene(rng: random.Random, width: int, height: int, n: int, min_size: int, max_size: int,
               unique: bool = False) -> tuple[Image.Image, list[dict]]:
    """An image with n non-overlapping shapes; objects are {"shape", "colour", "box" [x1,y1,x2,y2] pixels}."""
    img = background(width, height, rng.randint(0, 20))
    draw = ImageDraw.Draw(img)
    objects: list[dict] = []
    used: set[tuple[str, str]] = set()
    for _ in range(50 * n):
        if len(objects) == n:
            break
        s = rng.randint(min_size, min(max_size, width - 2, height - 2))
        x, y = rng.randint(1, width - s - 1), rng.randint(1, height - s - 1)
        box = [x, y, x + s, y + s]
        if any(not (box[2] <= o["box"][0] or o["box"][2] <= box[0] or box[3] <= o["box"][1] or o["box"][3] <= box[1])
               for o in objects):
            continue
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if unique and (shape, colour) in used:
            continue
        used.add((shape, colour))
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
        elif shape == "square":
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
        else:
            draw.polygon([(x + s / 2, y), (x + s - 1, y + s - 1), (x, y + s - 1)], fill=fill)
        objects.append({"shape": shape, "colour": colour, "box": box})
    return img, objects


def make_row(cfg: ShapesTaskConfig, split: str, index: int) -> dict:
    """Row `index` of `split` (deterministic in (data_seed, split, index)), ground truth in pixels."""
    rng = random.Random(f"{cfg.data_seed}-{SPLIT_SEED[split]}-{index}")
    w, h = cfg.image_size
    base = {"image_id": index + 1, "width": w, "height": h, "task": cfg.kind}
    if cfg.kind == "classification":
        img, objs = draw_scene(rng, w, h, 1, max(cfg.min_size, min(w, h) // 4), min(cfg.max_size * 2, min(w, h) - 4))
        o = objs[0]
        return base | {"image": img, "label": f"{o['colour']} {o['shape']}", "choices": list(CLASSES),
                       "category": f"{o['colour']} {o['shape']}"}
    n = rng.randint(1, cfg.max_objects)
    img, objs = draw_scene(rng, w, h, n, cfg.min_size, cfg.max_size, unique=cfg.kind == "grounding")
    if cfg.kind == "grounding":
        o = rng.choice(objs)
        return base | {"image": img, "phrase": f"the {o['colour']} {o['shape']}", "gt_box": list(o["box"]),
                       "category": o["shape"]}
    present = sorted({o["shape"] for o in objs})
    absent = [s for s in SHAPES if s not in present]
    shape = rng.choice(absent) if absent and rng.random() < cfg.absent_frac else rng.choice(present)
    return base | {"image": img, "category": shape, "category_id": SHAPES.index(shape) + 1,
                   "gt_boxes": [list(o["box"]) for o in objs if o["shape"] == shape]}


class LazyRows(Sequence):
    """A split whose rows are generated on first access (and kept in a bounded cache)."""

    def __init__(self, n: int, make, cache: int = 4096):
        self.n = n
        self._get = lru_cache(maxsize=cache)(make)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self._get(i % self.n)


class ShapesTask:
    higher_is_better = True

    def __init__(self, cfg: ShapesTaskConfig, coder: BoxCoder):
        if cfg.max_size >= min(cfg.image_size) - 2:
            raise ValueError(f"task.max_size={cfg.max_size} must be smaller than the image side {min(cfg.image_size)} - 2")
        if cfg.min_size > cfg.max_size:
            raise ValueError(f"task.min_size={cfg.min_size} is larger than task.max_size={cfg.max_size}")
        self.cfg, self.coder = cfg, coder
        self.kind = cfg.kind
        self.metric = METRIC[cfg.kind]
        self.categories = ({i + 1: s for i, s in enumerate(SHAPES)} if cfg.kind == "detection" else None)

        def row(split: str, i: int) -> dict:
            return annotate(make_row(cfg, split, i), coder, cfg.think)

        self._splits: dict[str, Sequence] = {
            "eval": [row("eval", i) for i in range(cfg.eval_size)],
            "val": [row("val", i) for i in range(cfg.val_size)],
            "sft": self._few_shot(row) if cfg.shots else [row("sft", i) for i in range(cfg.sft_size)],
            "train": LazyRows(cfg.train_size, lambda i: row("train", i)),
        }

    def _few_shot(self, row) -> list[dict]:
        """`shots` demonstrations per class (shape; or colour+shape for classification), in generation order."""
        need = {c: self.cfg.shots for c in (CLASSES if self.kind == "classification" else SHAPES)}
        out, i = [], 0
        while any(need.values()):
            r = row("sft", i)
            i += 1
            if need.get(r["category"], 0) > 0:
                need[r["category"]] -= 1
                out.append(r)
            if i > 10_000 * len(need):
                raise ValueError("task.shots: could not draw enough demonstrations per class")
        return out

    def split(self, name: str) -> Sequence:
        return self._splits[name]

    def score(self, completions: list[str], rows: list[dict]) -> list[float]:
        return per_sample_score(self.kind, completions, rows, self.coder, self.cfg.think)

    def metrics(self, completions: list[str], rows: list[dict]) -> dict[str, float]:
        return held_out_metrics(self.kind, completions, rows, self.coder, self.cfg.think, self.categories)



def tokenizer_corpus() -> tuple[list[str], list[str]]:
    """(texts, phrases) for the embedded tokenizer: every prompt and answer form of the three kinds, and
    the constant pieces of those prompts and of the answer format (one token each)."""
    from vision_rl.tasks.common import classification_prompt, detection_prompt, grounding_prompt

    coders = [BoxCoder("relative_1000"), BoxCoder("absolute_resized")]
    texts = [detection_prompt(s, c) for s in SHAPES for c in coders]
    texts += [grounding_prompt(f"the {col} {s}", c) for col in COLOURS for s in SHAPES for c in coders]
    texts += [classification_prompt(CLASSES, think) for think in (True, False)]
    texts += [f"<think>{n} {s} found</think> <answer>No Objects [{{'Position': [1, 2], 'Confidence': 0.50}}]</answer>"
              for n in range(10) for s in SHAPES]
    texts += [f"<think>it is a {c}</think> <answer>{c}</answer> (1,2),(3,4)" for c in CLASSES]
    hole = "\x00"
    phrases = [p for c in coders for t in (detection_prompt(hole, c), grounding_prompt(hole, c)) for p in t.split(hole)]
    phrases += [classification_prompt(CLASSES, think) for think in (True, False)]
    phrases += ["{'Position': [", "], 'Confidence': ", "}, ", ", ", " found</think> <answer>", "</answer>",
                "<think>it is a ", "</think> <answer>", "No Objects"]
    return texts, phrases
