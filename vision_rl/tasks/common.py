"""What every vision task shares: config fields, the papers' prompts, demonstrations, held-out metrics.

Prompts follow the authors' code (METHODS.md C.1-C.3):

- detection (Visual-RFT): "Detect all objects belonging to the category '{category}' ..." with the
  answer `<think>...</think> <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': c}, ...]</answer>`
  or `No Objects`;
- grounding: "... output the bounding box of {phrase} ..." answered `(x1,y1),(x2,y2)`;
- classification (CLS-RL / No-Thinking-CLS-RL): "What type of object is in the photo?\\n Please choose
  one from list [ a, b, ... ]." plus the think/answer suffix or "Please directly output the answer.".

Rows carry ground truth in ORIGINAL image pixels (`gt_boxes`, `gt_box`); `annotate` adds the same
boxes in the model's coordinate convention (`boxes`, `box`) through `vision_rl.coords.BoxCoder`, the
one place coordinates are converted. Rewards compare in model coordinates; evaluation converts the
predictions back to original pixels and scores them with pycocotools (detection mAP), accuracy@0.5 /
mIoU (grounding) or accuracy (classification).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

from pydantic import Field

from shared.config import Strict
from vision_rl.coords import BoxCoder
from vision_rl.metrics import classification_accuracy, coco_detection_map, grounding_metrics
from vision_rl.rewards import (answer_text, detection_iou_reward, grounding_hit, normalise_label, parse_box,
                              parse_detection)

TaskKind = Literal["detection", "grounding", "classification"]
METRIC = {"detection": "mAP", "grounding": "acc@0.5", "classification": "accuracy"}


class VisionTaskConfig(Strict):
    """Fields every vision task has (image preprocessing, coordinates, prompt style)."""

    min_pixels: int = Field(3136, gt=0, description="smallest image area after smart_resize (pixels)")
    max_pixels: int = Field(401408, gt=0, description="largest image area after smart_resize (Visual-RFT: 512*28*28)")
    box_convention: Literal["auto", "relative_1000", "absolute_resized"] = Field(
        "auto", description="box coordinates the model reads and writes; auto: from the model type")
    think: bool = Field(True, description="prompt for <think>/<answer> (False: No-Thinking, answer directly)")
    max_prompt_length: int = Field(
        2048, gt=0, description="prompt tokens (image tokens included) above which a row is an error, never truncated")


class EmbeddedVLMConfig(VisionTaskConfig):
    """A task with a synthetic generator the embedded tiny VLM is built for (`model.name_or_path: embedded`):
    its architecture, and the texts its in-process tokenizer must cover (`embedded_corpus`)."""

    family: Literal["qwen2_vl", "qwen2_5_vl"] = Field("qwen2_vl", description="architecture of the embedded model")
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    vision_depth: int = Field(2, gt=0)
    vision_dim: int = Field(64, gt=0)

    @abstractmethod
    def embedded_corpus(self) -> tuple[list[str], list[str]]:
        """(texts, phrases) for `vision_rl.embedded.build_tokenizer`."""


def coord_hint(coder: BoxCoder) -> str:
    return "between 0 and 1000, integer" if coder.convention == "relative_1000" else "in pixels of the image, integer"


THINK_SUFFIX = "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
CLS_THINK_SUFFIX = "Please output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
CLS_DIRECT_SUFFIX = "Please directly output the answer."


def detection_prompt(category: str, coder: BoxCoder) -> str:
    return (f"Detect all objects belonging to the category '{category}' in the image, and provide the bounding boxes "
            f"({coord_hint(coder)}) and confidence (between 0 and 1, with two decimal places). If no object belonging "
            f"to the category '{category}' in the image, return 'No Objects'. {THINK_SUFFIX}")


def grounding_prompt(phrase: str, coder: BoxCoder) -> str:
    return (f"Output the bounding box of {phrase} in the image, as (x1,y1),(x2,y2) ({coord_hint(coder)}). "
            f"{THINK_SUFFIX}")


def classification_prompt(choices: list[str], think: bool) -> str:
    return (f"What type of object is in the photo?\n Please choose one from list [ {', '.join(choices)} ]. "
            f"{CLS_THINK_SUFFIX if think else CLS_DIRECT_SUFFIX}")


def detection_answer(boxes: list[list[int]], confidence: float = 1.0) -> str:
    if not boxes:
        return "No Objects"
    items = ", ".join(f"{{'Position': [{', '.join(str(int(v)) for v in b)}], 'Confidence': {confidence:.2f}}}"
                      for b in boxes)
    return f"[{items}]"


def demonstration(row: dict, think: bool = True) -> str:
    """The SFT target for an annotated row (short, truthful reasoning and the exact answer format)."""
    kind = row["task"]
    if kind == "classification":
        return f"<think>it is a {row['label']}</think> <answer>{row['label']}</answer>" if think else row["label"]
    if kind == "grounding":
        x1, y1, x2, y2 = row["box"]
        return f"<think>{row['phrase']}</think> <answer>({x1},{y1}),({x2},{y2})</answer>"
    n = len(row["boxes"])
    return f"<think>{n} {row['category']} found</think> <answer>{detection_answer(row['boxes'])}</answer>"


def annotate(row: dict, coder: BoxCoder, think: bool = True) -> dict:
    """Add the prompt, model-coordinate boxes and the demonstration to a row with pixel ground truth."""
    kind = row["task"]
    w, h = row["width"], row["height"]
    if kind == "detection":
        row["boxes"] = [coder.to_model(b, w, h) for b in row["gt_boxes"]]
        row["prompt"] = detection_prompt(row["category"], coder)
    elif kind == "grounding":
        row["box"] = coder.to_model(row["gt_box"], w, h)
        row["prompt"] = grounding_prompt(row["phrase"], coder)
    else:
        row["prompt"] = classification_prompt(row["choices"], think)
    row["completion"] = demonstration(row, think)
    return row


def predictions_in_pixels(completions: list[str], rows: list[dict], coder: BoxCoder) -> list:
    """Detection/grounding predictions converted back to original-image pixels (None: unparseable)."""
    out = []
    for c, r in zip(completions, rows):
        if r["task"] == "detection":
            pred = parse_detection(c) or []
            out.append([(coder.to_pixels(b, r["width"], r["height"]), s) for b, s in pred])
        else:
            box = parse_box(c)
            out.append(None if box is None else coder.to_pixels(box, r["width"], r["height"]))
    return out


def held_out_metrics(kind: str, completions: list[str], rows: list[dict], coder: BoxCoder, think: bool,
                     categories: dict[int, str] | None = None) -> dict[str, float]:
    """Corpus-level metrics of one split, the task's headline metric first."""
    if kind == "detection":
        preds = predictions_in_pixels(completions, rows, coder)
        cats = categories or {r["category_id"]: r["category"] for r in rows}
        m = coco_detection_map(preds, rows, cats)
        return {"mAP": m["mAP"], "AP50": m["AP50"]} | {k: v for k, v in m.items() if k.startswith("AP/")}
    if kind == "grounding":
        preds = predictions_in_pixels(completions, rows, coder)
        return grounding_metrics(preds, [r["gt_box"] for r in rows])
    answers = [answer_text(c) if think else c for c in completions]
    answers = [None if a is None else normalise_label(a) for a in answers]
    return {"accuracy": classification_accuracy(answers, [normalise_label(r["label"]) for r in rows])}


def per_sample_score(kind: str, completions: list[str], rows: list[dict], coder: BoxCoder, think: bool) -> list[float]:
    """Per-sample proxy of the headline metric (accuracy; IoU > 0.5 hit; detection: IoU reward)."""
    if kind == "classification":
        answers = [answer_text(c) if think else c for c in completions]
        return [float(a is not None and normalise_label(a) == normalise_label(r["label"])) for a, r in zip(answers, rows)]
    if kind == "grounding":
        return [float(b is not None and grounding_hit(b, r["box"])) for b, r in zip(map(parse_box, completions), rows)]
    return [0.0 if p is None else detection_iou_reward(p, r["boxes"]) for p, r in zip(map(parse_detection, completions), rows)]
