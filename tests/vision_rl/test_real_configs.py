"""The GPU recipes for real checkpoints run end-to-end with a tiny model and tiny local data substituted.

A tiny Qwen2-VL and its processor are saved with `save_pretrained` and loaded back by the recipe through
AutoModelForImageTextToText / AutoProcessor; the data are a COCO-format detection set (images folder +
instances json) and an ImageFolder classification tree written into tmp_path, so the real loaders,
COCOeval and the paper configs (G, beta, loss aggregation, rewards) all run.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from shared.config import load_config
from tests.helpers.tiny import ROOT
from vision_rl.embedded import build_model, build_processor, build_tokenizer
from vision_rl.tasks.shapes import SHAPES, draw_scene, tokenizer_corpus

SIZE = 56


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2vl")
    tok = build_tokenizer(*tokenizer_corpus())
    build_model(tok, "qwen2_vl", hidden_size=32, num_layers=1, num_heads=2, vision_depth=1,
                vision_dim=32).save_pretrained(path)
    build_processor(tok, "qwen2_vl", 3136, 3136).save_pretrained(path)
    return path


def _coco(root, n: int, seed: int) -> None:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        img, objs = draw_scene(rng, SIZE, SIZE, 2, 10, 20)
        img.save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": SIZE, "height": SIZE})
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": SHAPES.index(o["shape"]) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _common(tmp_path, ckpt) -> list[str]:
    return [f"model.name_or_path={ckpt}", "model.gradient_checkpointing=true", "task.min_pixels=3136",
            "task.max_pixels=3136", "rollout.prompts_per_step=2", "rollout.max_new_tokens=6", "train.steps=2",
            "train.mixed_precision=no", "eval.every=0", "eval.max_prompts=6", "eval.batch_size=6",
            "checkpoint.every=0", f"output_dir={tmp_path / 'runs'}", "logging.progress=false"]


def _steps(tmp_path, name) -> list[dict]:
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_visual_rft_coco_config_runs_with_tiny_model(tmp_path, tiny_checkpoint):
    _coco(tmp_path / "train", 6, 0)
    _coco(tmp_path / "eval", 6, 1)
    cfg = load_config(ROOT / "configs/vision/qwen2vl_2b_visual_rft_coco.yaml", _common(tmp_path, tiny_checkpoint) + [
        f"task.train_images={tmp_path / 'train/images'}", f"task.train_annotations={tmp_path / 'train/instances.json'}",
        f"task.eval_images={tmp_path / 'eval/images'}", f"task.eval_annotations={tmp_path / 'eval/instances.json'}",
        "task.shots=1", "train.micro_batch_size=8", "train.grad_accum_steps=2"])
    assert cfg.rollout.samples_per_prompt == 8 and cfg.algorithm.beta == 0.04 and cfg.optim.lr == 1e-6
    from shared.loop import train

    summary = train(cfg)
    assert summary["metric"] == "mAP" and 0.0 <= summary["before"] <= 1.0 and 0.0 <= summary["after"] <= 1.0
    steps = _steps(tmp_path, cfg.name)
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) and math.isfinite(s["kl_ref"]) for s in steps)
    for name in ("detection_iou", "detection_confidence", "format"):
        assert f"reward/{name}" in steps[0] and f"reward_failures/{name}" in steps[0]


def test_clsrl_config_runs_with_tiny_model(tmp_path, tiny_checkpoint):
    rng = random.Random(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("red circle", "blue square"):
            d = tmp_path / "cls" / split / cls.replace(" ", "_")
            d.mkdir(parents=True)
            for i in range(n):
                draw_scene(rng, SIZE, SIZE, 1, 10, 20)[0].save(d / f"{i}.png")
    cfg = load_config(ROOT / "configs/vision/qwen2vl_2b_clsrl.yaml", _common(tmp_path, tiny_checkpoint) + [
        f"task.train_path={tmp_path / 'cls/train'}", f"task.eval_path={tmp_path / 'cls/test'}", "task.shots=2",
        "train.micro_batch_size=8"])
    assert cfg.rollout.samples_per_prompt == 4 and cfg.algorithm.beta == 0.04
    from shared.loop import train

    summary = train(cfg)
    assert summary["metric"] == "accuracy" and summary["eval_examples"] == 4
    steps = _steps(tmp_path, cfg.name)
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert "reward/cls_accuracy" in steps[0]
