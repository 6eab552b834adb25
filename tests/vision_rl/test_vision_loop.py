"""End-to-end vision RL through `shared.loop.train` on the embedded shapes task with tiny Qwen2-VL /
Qwen2.5-VL models (CPU, seconds each): a few GRPO steps per task kind, resume exactness, and the CLI
on the shipped vision configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shared.config import validate_config
from tests.helpers.tiny import ROOT, crash_on_sample, merge

TIMING_KEYS = ("step_seconds", "tokens_per_s/sample", "tokens_per_s/train")
# A random model never earns the task rewards, so every group would have zero advantage; a character-length
# shaping term (DAPO overlong, in chars) gives each group a signal and the update something to do.
SHAPING = {"name": "overlong", "weight": 0.5, "kwargs": {"max_len": 300, "cache_len": 290, "unit": "chars"}}
FORMAT = {"name": "format"}


def vision_config_dict(tmp_path, **over) -> dict:
    d = {
        "name": "vision",
        "domain": "vision",
        "seed": 5,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "embedded", "freeze_vision": False},
        "task": {"name": "shapes", "kind": "detection", "image_size": [56, 56], "min_pixels": 3136,
                 "max_pixels": 3136, "min_size": 8, "max_size": 20, "max_objects": 2, "sft_size": 8, "val_size": 4,
                 "eval_size": 8, "train_size": 64, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                 "vision_depth": 1, "vision_dim": 32},
        "rewards": [{"name": "detection_iou"}, {"name": "detection_confidence"}, FORMAT, SHAPING],
        "warmup": {"enabled": False, "cache_dir": str(tmp_path / "cache")},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 10, "temperature": 1.0},
        "algorithm": {"advantage": "grpo", "beta": 0.0, "loss_agg": "token_mean"},
        "optim": {"lr": 1e-2, "schedule": "linear", "max_grad_norm": 1.0},
        "train": {"steps": 3, "micro_batch_size": 4, "grad_accum_steps": 2},
        "eval": {"every": 0, "max_prompts": 8, "batch_size": 8},
        "checkpoint": {"every": 0, "keep_last": 2},
        "logging": {"progress": False, "tensorboard": False, "plots": False},
    }
    return merge(d, over)


def _train(d: dict) -> dict:
    from shared.loop import train

    return train(validate_config(d, "test"))


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _model_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:06d}" / "model"


def _initial_weights(d: dict) -> dict[str, torch.Tensor]:
    """The model `train` starts from: same seed, same builder (nothing draws random numbers before it)."""
    from accelerate.utils import set_seed

    from vision_rl.embedded import build_model, build_tokenizer
    from vision_rl.tasks.shapes import tokenizer_corpus

    t = validate_config(d).task
    set_seed(d["seed"])
    model = build_model(build_tokenizer(*tokenizer_corpus()), t["family"], t["hidden_size"], t["num_layers"],
                        t["num_heads"], t["vision_depth"], t["vision_dim"])
    return model.state_dict()


def _saved_weights(model_dir) -> dict[str, torch.Tensor]:
    """Weights written by `save_pretrained`, read back by transformers: the file holds the checkpoint's original
    key names (`visual.*`, `model.*`), which `from_pretrained` maps to the module names (`model.visual.*`, ...)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()


def _changed(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _assert_finite_metrics(run_dir, steps: int, extra_keys=()) -> list[dict]:
    rows = _metrics(run_dir)
    for r in rows:
        bad = {k: v for k, v in r.items() if v is None or not math.isfinite(v)}
        assert not bad, (r["step"], bad)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    for r in train_rows:
        for k in ("loss", "reward/total", "entropy", "grad_norm", "completion_len_mean", *extra_keys):
            assert k in r, (k, r)
    assert any(r["reward/std"] > 0 for r in train_rows)  # the update had a signal
    return rows


# ---------------------------------------------------------------- a few GRPO steps per task kind

RUNS = {
    # full weights, KL to a frozen copy of the initial model
    "detection": dict(algorithm={"beta": 0.04}),
    # Qwen2.5-VL (absolute_resized boxes) with a LoRA adapter; the reference is the adapter disabled
    "grounding": dict(
        task={"kind": "grounding", "family": "qwen2_5_vl"},
        rewards=[{"name": "grounding_iou", "kwargs": {"variant": "giou"}}, FORMAT, SHAPING],
        model={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}},
        algorithm={"beta": 0.04}, optim={"lr": 5e-2}),
    "classification": dict(task={"kind": "classification"}, rewards=[{"name": "cls_accuracy"}, FORMAT, SHAPING]),
    # No-Thinking-CLS-RL: the answer directly, exact-equality reward
    "classification_no_think": dict(task={"kind": "classification", "think": False, "family": "qwen2_5_vl"},
                                    rewards=[{"name": "cls_equality"}, SHAPING]),
}
METRIC = {"detection": "mAP", "grounding": "acc@0.5", "classification": "accuracy", "classification_no_think": "accuracy"}


@pytest.mark.parametrize("name", list(RUNS))
def test_grpo_steps_change_parameters_and_log_finite_metrics(tmp_path, name):
    d = vision_config_dict(tmp_path, name=name, **RUNS[name])
    summary = _train(d)
    run_dir = tmp_path / "runs" / name
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["metric"] == summary["metric"] == METRIC[name]
    assert saved["steps"] == 3 and saved["eval_examples"] == 8
    assert math.isfinite(saved["before"]) and math.isfinite(saved["after"])
    extra = ("kl_ref",) if d["algorithm"]["beta"] > 0 else ()
    _assert_finite_metrics(run_dir, 3, extra)

    model_dir = _model_dir(run_dir, 3)
    if "lora" in d["model"]:
        adapter = load_file(model_dir / "adapter_model.safetensors")
        assert not (model_dir / "model.safetensors").exists()
        # freeze_vision: false, so the vision tower's modules of the same names (Qwen2.5-VL's up_proj) adapt too
        assert any(".language_model." in k for k in adapter) and any(".visual." in k for k in adapter)
        assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
        return
    final, init = _saved_weights(model_dir), _initial_weights(d)
    changed = _changed(final, init)
    assert len(changed) > len(final) // 2
    assert any(k.startswith("model.visual.") for k in changed)  # freeze_vision: false trains the vision tower
    assert any(k.startswith("model.language_model.") for k in changed)


def test_warmup_then_grpo(tmp_path):
    """SFT warm-up (cached, best validation weights kept) before RL: RL starts from the cached weights."""
    d = vision_config_dict(tmp_path, name="warm", task={"kind": "classification", "think": False},
                           rewards=[{"name": "cls_equality"}, SHAPING],
                           warmup={"enabled": True, "max_steps": 4, "eval_every": 2, "patience": 2, "batch_size": 8,
                                   "lr": 1e-2, "warmup_steps": 0},
                           train={"steps": 2})
    summary = _train(d)
    assert summary["metric"] == "accuracy" and summary["warmup"]["steps_run"] == 4
    caches = [p for p in (tmp_path / "cache").iterdir() if (p / "warmup.json").exists()]
    assert len(caches) == 1 and summary["warmup"]["cache"] == str(caches[0])
    record = json.loads((caches[0] / "warmup.json").read_text())
    assert [s for s, _ in record["history"]] == [0, 2, 4]  # validation before and every 2 steps
    warm, init = _saved_weights(caches[0]), _initial_weights(d)
    # the best validation score wins; a tie with the start (4 steps rarely help a random model) keeps it
    assert (record["best_step"] == 0) == (not _changed(warm, init))
    final = _saved_weights(_model_dir(tmp_path / "runs" / "warm", 2))
    assert len(_changed(final, warm)) > len(final) // 2  # RL moved on from the warm start
    _assert_finite_metrics(tmp_path / "runs" / "warm", 2)

    # freeze_vision 'rl': the same warm-up (the cached one: it trains the vision tower too), then RL leaves the
    # vision tower as it is; freeze_vision true: a warm-up that does not train it, cached apart
    rl_only = merge(d, {"name": "warm_rl", "model": {"freeze_vision": "rl"}})
    assert _train(rl_only)["warmup"]["cache"] == str(caches[0])
    final = _saved_weights(_model_dir(tmp_path / "runs" / "warm_rl", 2))
    changed = _changed(final, warm)
    assert changed and all(not k.startswith("model.visual.") for k in changed)
    assert any(k.startswith("model.language_model.") for k in changed)
    frozen = merge(d, {"name": "warm_frozen", "model": {"freeze_vision": True}})
    assert _train(frozen)["warmup"]["cache"] != str(caches[0])


# ---------------------------------------------------------------- resume


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch):
    over = dict(train={"steps": 4}, checkpoint={"every": 2, "keep_last": 3}, algorithm={"beta": 0.04})
    _train(vision_config_dict(tmp_path, name="full", **over))

    crash_on_sample(monkeypatch, at=3)
    with pytest.raises(KeyboardInterrupt):
        _train(vision_config_dict(tmp_path, name="crash", **over))
    monkeypatch.undo()
    crash_dir = tmp_path / "runs" / "crash"
    assert [p.name for p in (crash_dir / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_000002"]
    _train(vision_config_dict(tmp_path, name="crash", **merge(over, {"checkpoint": {"resume": True}})))

    a = load_file(_model_dir(tmp_path / "runs" / "full", 4) / "model.safetensors")
    b = load_file(_model_dir(crash_dir, 4) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _changed(_saved_weights(_model_dir(crash_dir, 4)), _saved_weights(_model_dir(crash_dir, 2)))  # 3-4 trained
    assert _metrics(tmp_path / "runs" / "full") == _metrics(crash_dir)


# ---------------------------------------------------------------- CLI on the shipped vision configs

VISION_CONFIGS = sorted((ROOT / "configs" / "vision").glob("*.yaml"))
NO_CONFIGS = pytest.mark.skipif(not VISION_CONFIGS, reason="no configs/vision/*.yaml yet")


def _python(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("RLFT_LOG_LEVEL", None)
    return subprocess.run([sys.executable, *map(str, args)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


# One fresh interpreter validates every shipped config through `shared.cli.main` (the vision task schema
# must register itself on import); a second runs the real `python -m shared.cli` on a misspelt key. Each
# start-up imports torch and transformers (several CPU seconds), hence two processes, side by side.
VALIDATE_ALL = """
import contextlib, io, json, sys
from shared.cli import main
out = {}
for p in sys.argv[1:]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["validate", p])
    out[p] = {"code": code, "stdout": buf.getvalue()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cli_runs() -> dict[str, subprocess.CompletedProcess]:
    cases = {"all": ("-c", VALIDATE_ALL, *VISION_CONFIGS),
             "bad_key": ("-m", "shared.cli", "validate", VISION_CONFIGS[0], "task.max_pixls=100")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_python, *args) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


@NO_CONFIGS
@pytest.mark.parametrize("path", VISION_CONFIGS, ids=lambda p: p.stem)
def test_cli_validate_vision_config(cli_runs, path):
    from shared.config import load_config

    proc = cli_runs["all"]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])[str(path)]
    assert result["code"] == 0, proc.stderr
    printed = yaml.safe_load(result["stdout"])
    assert printed["domain"] == "vision" and printed["name"] == path.stem
    assert validate_config(printed) == load_config(path)  # what is printed is the whole resolved config


@NO_CONFIGS
def test_cli_validate_bad_key_in_vision_config_is_one_line(cli_runs):
    proc = cli_runs["bad_key"]
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlft: error: "), proc.stderr
    assert "'task.max_pixls'" in lines[0] and "did you mean 'max_pixels'" in lines[0]


def test_rlft_eval_of_vision_checkpoint_reproduces_summary(tmp_path):
    """`rlft eval checkpoint=...` reloads the saved Qwen2-VL weights and recomputes COCO mAP exactly."""
    import yaml

    from shared.cli import main

    d = vision_config_dict(tmp_path, name="evaldet", **RUNS["detection"])
    summary = _train(d)
    cfg_path = tmp_path / "evaldet.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    ckpt = _model_dir(tmp_path / "runs" / "evaldet", 3).parent
    assert main(["eval", str(cfg_path), f"checkpoint={ckpt}"]) == 0
    result = json.loads((ckpt / "eval.json").read_text())
    assert result["metric"] == "mAP" and result["n"] == 8
    assert result["value"] == summary["after"]
    assert {"mAP", "AP50", "AP/circle", "AP/square", "AP/triangle"} <= set(result["metrics"])
