"""Image rewards for diffusion_rl, registered in `shared.rewards.REWARDS`.

A completion is a `PIL.Image.Image` (converted to RGB before scoring); anything else scores None
(a counted failure). Each entry is a factory `factory(**kwargs) -> reward`, the kwargs coming from
the config's `rewards[i].kwargs`; a reward maps `(images, **fields) -> list[float | None]`.

| name | kwargs | score |
|---|---|---|
| `jpeg_compressibility` | `quality=95` | DDPO: -(JPEG size in kB), kB = bytes / 1000 |
| `jpeg_incompressibility` | `quality=95` | DDPO: +(JPEG size in kB) |
| `color_area` | `field="rgb"`, `threshold=0.15` | fraction of pixels within `threshold` of the target colour, in [0, 1] |
| `aesthetic` | `clip_path`, `head_path` | LAION improved aesthetic predictor (MLP on normalised CLIP image embeddings) |
| `clip_score` | `model_path`, `scale=1.0` | PickScore-style: scale * exp(logit_scale) * cos(text, image) for `fields["prompt"]` |
| `python_reward` | `target="pkg.module:factory"`, factory kwargs | whatever `factory(**kwargs)` returns |

Model rewards load their weights from local paths lazily, once, on the first call (a load failure
is a one-line ValueError naming the path, kept and re-raised on later calls), run in eval mode
without gradients and score all images of a batch at once.
"""

from __future__ import annotations

import importlib
import io
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from shared.rewards import RewardFn, register_reward, reward_field

# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------


def jpeg_kb(image: Image.Image, quality: int = 95) -> float:
    """Size of `image` encoded as JPEG at `quality`, in kB (bytes / 1000, as kvablack/ddpo-pytorch)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


def color_distance(pixels: np.ndarray, rgb: Sequence[float]) -> np.ndarray:
    """Per-pixel ||p/255 - rgb/255||_2 / sqrt(3): 0 for the target colour, 1 for its RGB-cube opposite."""
    diff = pixels.astype(np.float64) / 255.0 - np.asarray(rgb, dtype=np.float64) / 255.0
    return np.sqrt((diff**2).sum(axis=-1)) / math.sqrt(3.0)


def color_fraction(pixels: np.ndarray, rgb: Sequence[float], threshold: float) -> float:
    """Fraction of the pixels of an HxWx3 uint8 array whose `color_distance` to `rgb` is <= `threshold`."""
    d = color_distance(pixels, rgb)
    if d.size == 0:
        raise ValueError("color_fraction: empty image")
    return float((d <= threshold).mean())


def target_rgb(value: Any, reward: str, field: str) -> list[float]:
    """A target colour as 3 numbers in 0..255, or a one-line ValueError naming the reward and field."""
    ok = (
        isinstance(value, (list, tuple, np.ndarray))
        and len(value) == 3
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    )
    if not ok:
        raise ValueError(f"{reward}: field {field!r} must be 3 numbers in 0..255, got {value!r:.80}")
    return [float(v) for v in value]


def _why(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _normalise(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _embeds(out: Any) -> Tensor:
    """Projected embeddings from `get_*_features` (a tensor, or an output whose pooler_output holds them)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _per_image(completions: Sequence[Any], score: Callable[[list[Image.Image], list[int]], Sequence[float]]):
    """Score the PIL images among `completions` in one batch (`score(images, indices)`); others get None."""
    idx = [i for i, c in enumerate(completions) if isinstance(c, Image.Image)]
    out: list[float | None] = [None] * len(completions)
    if idx:
        for i, s in zip(idx, score([completions[i].convert("RGB") for i in idx], idx)):
            out[i] = float(s)
    return out


def _once(load: Callable[[], Any]) -> Callable[[], Any]:
    """`load()` on the first call, its result (or its ValueError) kept for every later call."""
    box: dict[str, Any] = {}

    def get():
        if not box:
            try:
                box["value"] = load()
            except ValueError as e:
                box["error"] = str(e)
        if "error" in box:
            raise ValueError(box["error"])
        return box["value"]

    return get


# ------------------------------------------------------------------------------------------------
# JPEG compressibility (DDPO) and the synthetic colour task
# ------------------------------------------------------------------------------------------------


def _check_quality(quality: int, name: str) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"{name}: quality must be an int in 1..100, got {quality!r}")


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> RewardFn:
    """DDPO compressibility: -jpeg_kb(image, quality)."""
    _check_quality(quality, "jpeg_compressibility")
    return lambda completions, **fields: [
        -jpeg_kb(im, quality) if isinstance(im, Image.Image) else None for im in completions
    ]


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> RewardFn:
    """DDPO incompressibility: +jpeg_kb(image, quality)."""
    _check_quality(quality, "jpeg_incompressibility")
    return lambda completions, **fields: [
        jpeg_kb(im, quality) if isinstance(im, Image.Image) else None for im in completions
    ]


@register_reward("color_area")
def color_area(field: str = "rgb", threshold: float = 0.15) -> RewardFn:
    """Synthetic task: color_fraction(image, fields[field], threshold), deterministic, in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise ValueError(f"color_area: threshold must be a number >= 0, got {threshold!r}")

    def reward(completions: list, **fields: list) -> list[float | None]:
        column = reward_field(fields, field, len(completions), "color_area")
        targets = [target_rgb(t, "color_area", field) for t in column]
        return [
            color_fraction(np.asarray(im.convert("RGB")), rgb, threshold) if isinstance(im, Image.Image) else None
            for im, rgb in zip(completions, targets)
        ]

    return reward


# ------------------------------------------------------------------------------------------------
# Learned rewards: LAION aesthetic predictor, PickScore-style CLIP score
# ------------------------------------------------------------------------------------------------


class AestheticMLP(nn.Module):
    """LAION "improved aesthetic predictor" head (linear layers and dropout, no activations)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


def _device(device: str) -> torch.device:
    """'auto': the GPU when there is one (reward models are large: ViT-L/H), else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def _load_clip(path: str, name: str, processor: str, device: str = "auto"):
    """(CLIPModel, processor) from a local path in eval mode, or a one-line ValueError naming the path."""
    import transformers

    try:
        model = transformers.CLIPModel.from_pretrained(path).eval().to(_device(device))
        proc = getattr(transformers, processor).from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any load failure becomes a config error
        raise ValueError(f"{name}: cannot load CLIP from {path!r}: {_why(e)}") from None
    return model, proc


def load_aesthetic_head(path: str, dim: int) -> AestheticMLP:
    """The LAION MLP head for `dim`-d embeddings from a `.safetensors` file or a torch state dict."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        head = AestheticMLP(dim)
        head.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"aesthetic: cannot load the MLP head from {path!r}: {_why(e)}") from None
    return head.eval()


@register_reward("aesthetic")
def aesthetic(clip_path: str, head_path: str, device: str = "auto") -> RewardFn:
    """LAION aesthetic score: head(e / ||e||), e = CLIP get_image_features(image), as in DDPO."""

    def load():
        clip, proc = _load_clip(clip_path, "aesthetic", "CLIPImageProcessor", device)
        return clip, proc, load_aesthetic_head(head_path, clip.config.projection_dim).to(clip.device)

    models = _once(load)

    @torch.no_grad()
    def score(images: list[Image.Image], idx: list[int]) -> list[float]:
        clip, proc, head = models()
        pixels = proc(images=images, return_tensors="pt")["pixel_values"].to(clip.device)
        return head(_normalise(_embeds(clip.get_image_features(pixel_values=pixels)))).squeeze(-1).tolist()

    return lambda completions, **fields: _per_image(completions, score)


@register_reward("clip_score")
def clip_score(model_path: str, scale: float = 1.0, device: str = "auto") -> RewardFn:
    """PickScore-style: scale * exp(logit_scale) * cos(text_embeds(prompt), image_embeds) per (image, prompt)."""
    models = _once(lambda: _load_clip(model_path, "clip_score", "AutoProcessor", device))

    def reward(completions: list, **fields: list) -> list[float | None]:
        prompts = reward_field(fields, "prompt", len(completions), "clip_score")

        @torch.no_grad()
        def score(images: list[Image.Image], idx: list[int]) -> list[float]:
            model, proc = models()
            max_len = model.config.text_config.max_position_embeddings
            texts = [str(prompts[i]) for i in idx]
            text = proc(text=texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            pixels = proc(images=images, return_tensors="pt")["pixel_values"].to(model.device)
            t = model.get_text_features(input_ids=text["input_ids"].to(model.device),
                                        attention_mask=text["attention_mask"].to(model.device))
            t = _normalise(_embeds(t))
            v = _normalise(_embeds(model.get_image_features(pixel_values=pixels)))
            return (scale * model.logit_scale.exp() * (t * v).sum(-1)).tolist()

        return _per_image(completions, score)

    return reward


# ------------------------------------------------------------------------------------------------
# Pluggable: any factory importable as "package.module:factory"
# ------------------------------------------------------------------------------------------------


@register_reward("python_reward")
def python_reward(target: str, **kwargs: Any) -> RewardFn:
    """Import `target` ("package.module:factory"; a dotted attribute is allowed) and return factory(**kwargs)."""
    try:
        module, sep, attr = str(target).partition(":")
        if not sep or not module or not attr:
            raise ValueError("expected 'package.module:factory'")
        factory: Any = importlib.import_module(module)
        for part in attr.split("."):
            factory = getattr(factory, part)
        if not callable(factory):
            raise TypeError(f"{type(factory).__name__} is not callable")
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, errors raised by the module itself
        raise ValueError(f"python_reward: cannot import {target!r}: {_why(e)}") from None
    fn = factory(**kwargs)
    if not callable(fn):
        raise ValueError(f"python_reward: {target!r} returned {type(fn).__name__}, not a reward function")  # noqa: TRY004
    return fn
