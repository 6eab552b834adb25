"""Box coordinates: the one place that converts between image pixels and model coordinates.

METHODS.md C.4. Qwen vision-language models name boxes in one of two conventions:

| convention | models | a model coordinate means |
|---|---|---|
| `relative_1000` | Qwen2-VL, Qwen3-VL | integer in [0, 1000): x / W * 1000 of the original image |
| `absolute_resized` | Qwen2.5-VL | pixel of the image after the processor's `smart_resize` |

`smart_resize` (qwen_vl_utils) scales an image of W x H so both sides are multiples of `factor`
(28 = patch 14 x spatial merge 2) and W*H lies within [min_pixels, max_pixels]; Qwen2.5-VL sees
that (rw, rh) image, so its boxes are in [0, rw] x [0, rh]. Ground truth is converted into model
coordinates with `BoxCoder.to_model` and predictions back to original-image pixels (for COCO
evaluation) with `BoxCoder.to_pixels`; a round trip loses at most one model unit (W/1000 or W/rw
pixels along x).

    coder = BoxCoder(convention_for("qwen2_5_vl"), min_pixels=3136, max_pixels=401408)
    gt_model = coder.to_model([10, 20, 300, 400], width=640, height=480)
    pred_px = coder.to_pixels(parsed_box, width=640, height=480)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONVENTIONS = ("relative_1000", "absolute_resized")

_MODEL_CONVENTIONS = {
    "qwen2_vl": "relative_1000",
    "qwen3_vl": "relative_1000",
    "qwen2_5_vl": "absolute_resized",
}


def convention_for(model_type: str) -> str:
    """Box convention of a Hugging Face `config.model_type`; ValueError for models not listed."""
    try:
        return _MODEL_CONVENTIONS[model_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"no known box convention for model_type {model_type!r} (known: {', '.join(sorted(_MODEL_CONVENTIONS))}); "
            f"set the convention explicitly with the config key task.box_convention (one of {', '.join(CONVENTIONS)})"
        ) from None


def _check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"image {name} must be a positive integer, got {v!r}")


def resized_size(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(resized_width, resized_height) of a W x H image after qwen_vl_utils' `smart_resize`.

    Note `smart_resize` takes and returns (height, width); this function uses (width, height).
    """
    _check_size(width, height)
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    from qwen_vl_utils import smart_resize  # imports torchvision; only needed here

    try:
        rh, rw = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:  # aspect ratio beyond what the processor accepts
        raise ValueError(f"cannot resize a {width}x{height} image for the model: {e}") from None
    return int(rw), int(rh)


def _check_box(box: Sequence[float]) -> list[float]:
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"a box must be 4 numbers [x1, y1, x2, y2], got {box!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"a box must be 4 finite numbers [x1, y1, x2, y2], got {box!r}")
    return vals


def _clip(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


@dataclass(frozen=True)
class BoxCoder:
    """Converts [x1, y1, x2, y2] boxes between original-image pixels and model coordinates.

    `min_pixels`, `max_pixels` and `factor` must be those the processor uses (they matter only for
    `absolute_resized`); the defaults are Visual-RFT's (4 and 512 tokens of 28x28 pixels).
    """

    convention: str
    min_pixels: int = 3136
    max_pixels: int = 401408
    factor: int = 28

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"box convention must be one of {', '.join(CONVENTIONS)}, got {self.convention!r}")

    def max_value(self, width: int, height: int) -> tuple[int, int]:
        """Largest valid model coordinate along (x, y) for a W x H image (the range starts at 0)."""
        _check_size(width, height)
        if self.convention == "relative_1000":
            return 999, 999
        return resized_size(width, height, self.min_pixels, self.max_pixels, self.factor)

    def _scale(self, width: int, height: int) -> tuple[float, float]:
        """Model units per original pixel along (x, y)."""
        if self.convention == "relative_1000":
            return 1000 / width, 1000 / height
        rw, rh = resized_size(width, height, self.min_pixels, self.max_pixels, self.factor)
        return rw / width, rh / height

    def to_model(self, box: Sequence[float], width: int, height: int) -> list[int]:
        """Original-image pixel box -> integer model coordinates, clipped to `max_value`."""
        _check_size(width, height)
        x1, y1, x2, y2 = _check_box(box)
        sx, sy = self._scale(width, height)
        mx, my = self.max_value(width, height)
        return [
            int(_clip(round(x1 * sx), 0, mx)),
            int(_clip(round(y1 * sy), 0, my)),
            int(_clip(round(x2 * sx), 0, mx)),
            int(_clip(round(y2 * sy), 0, my)),
        ]

    def to_pixels(self, box: Sequence[float], width: int, height: int) -> list[float]:
        """Model-coordinate box -> original-image pixels, clipped to [0, W] x [0, H], x1 <= x2, y1 <= y2."""
        _check_size(width, height)
        x1, y1, x2, y2 = _check_box(box)
        sx, sy = self._scale(width, height)
        xa, xb = sorted((_clip(x1 / sx, 0.0, width), _clip(x2 / sx, 0.0, width)))
        ya, yb = sorted((_clip(y1 / sy, 0.0, height), _clip(y2 / sy, 0.0, height)))
        return [xa, ya, xb, yb]
