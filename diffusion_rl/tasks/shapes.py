"""Embedded default diffusion task: "a <colour> <shape>" prompts and synthetic images of them.

The pre-training set (the supervised warm-up of the tiny pipeline) renders each prompt as one shape of
that colour, of random size and position, on a pale random background. RL prompts are every
(colour, shape) pair except the held-out ones; the held-out report samples `eval_images` images per
held-out prompt from fixed seeds. Rows carry `prompt`, `color`, `shape` and `rgb` (the target colour,
read by the `color_area` reward).
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from diffusion_rl.tasks.common import DiffusionTaskConfig, PromptTask
from shared.config import register_task_schema

# Pairwise RGB distances (in [0,1] units / sqrt(3)) are all >= 0.29, so the color_area reward with its
# default threshold 0.15 credits only the prompt's colour: a blob of a neighbouring colour earns nothing.
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40),
           "magenta": (210, 50, 200), "cyan": (40, 200, 210)}
SHAPES = ("circle", "square", "triangle")


def prompt_of(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


@register_task_schema("shape_prompts")
class ShapePromptsConfig(DiffusionTaskConfig):
    name: Literal["shape_prompts"] = "shape_prompts"
    held_out: list[str] = Field(default_factory=lambda: ["green triangle", "magenta circle", "cyan square",
                                                         "blue circle"],
                                description="'<colour> <shape>' pairs kept out of RL, used for the held-out report")
    image_size: int = Field(32, gt=7, description="side of the images in pixels")
    min_size: float = Field(0.3, gt=0, le=1, description="smallest shape side as a fraction of the image")
    max_size: float = Field(0.6, gt=0, le=1, description="largest shape side as a fraction of the image")
    # the embedded pipeline (model.name_or_path: embedded)
    unet_channels: tuple[int, int] = Field((32, 64), description="UNet block widths")
    text_dim: int = Field(32, gt=0, description="width of the text encoder and of the cross-attention")
    vae_steps: int = Field(400, ge=0, description="autoencoder training steps before the UNet warm-up")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="warm-up: empty-prompt rate (for guidance)")

    def pairs(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(train pairs, held-out pairs); unknown held-out names are a ValueError."""
        allp = [(c, s) for c in COLOURS for s in SHAPES]
        held = []
        for text in self.held_out:
            parts = text.split()
            if len(parts) != 2 or (parts[0], parts[1]) not in allp:
                raise ValueError(f"task.held_out: {text!r} is not '<colour> <shape>' with colour in "
                                 f"{list(COLOURS)} and shape in {list(SHAPES)}")
            held.append((parts[0], parts[1]))
        return [p for p in allp if p not in held], held


def row_of(colour: str, shape: str, **extra) -> dict:
    return {"prompt": prompt_of(colour, shape), "color": colour, "shape": shape, "rgb": list(COLOURS[colour]), **extra}


def render(row: dict, size: int, rng: random.Random, min_size: float, max_size: float) -> Image.Image:
    """One training image of the row's prompt: the shape in its colour on a pale random background."""
    bg = tuple(rng.randint(170, 245) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    side = rng.uniform(min_size, max_size) * size
    x0, y0 = rng.uniform(0, size - side), rng.uniform(0, size - side)
    box = [x0, y0, x0 + side, y0 + side]
    draw = ImageDraw.Draw(img)
    fill = tuple(row["rgb"])
    if row["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif row["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return img


class ShapePromptsTask(PromptTask):
    def __init__(self, cfg: ShapePromptsConfig):
        self.cfg = cfg
        train, held = cfg.pairs()
        super().__init__([row_of(c, s) for c, s in train], [row_of(c, s) for c, s in held], cfg.eval_images,
                         cfg.eval_train_images)

    def pretrain_batch(self, n: int, rng: random.Random) -> tuple[list[str], np.ndarray]:
        """n (prompt, image) pairs over ALL pairs (held-out prompts too: they are held out from RL only)."""
        rows = [row_of(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(n)]
        images = [np.asarray(render(r, self.cfg.image_size, rng, self.cfg.min_size, self.cfg.max_size)) for r in rows]
        return [r["prompt"] for r in rows], np.stack(images)

    def words(self) -> list[str]:
        return ["a", *COLOURS, *SHAPES]
