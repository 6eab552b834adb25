"""Chart-to-code (MSRL): the render rewards, the charts task (synthetic and jsonl), and a few RL steps.

Programs really run in the sandbox (shared/sandbox.py); targets are rendered by the same harness."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shared.config import ConfigError, validate_config
from shared.rewards import REWARDS
from tests.helpers.tiny import merge
from vision_rl.charts.rewards import RenderCache, extract_code
from vision_rl.tasks.charts import ChartsTask, ChartsTaskConfig

BAR = 'import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(3, 2))\nax.bar(["a", "b", "c"], [3, 5, 2], color="red")\nax.set_title("cost")\n'  # noqa: E501


@pytest.fixture(scope="module")
def task():
    return ChartsTask(ChartsTaskConfig(sft_size=4, train_size=4, val_size=2, eval_size=6, wall_s=3.0))


def fields(rows):
    return {k: [r[k] for r in rows] for k in ("gold_facts", "target", "dpi")}


def score(name, completions, rows, **kw):
    return REWARDS[name](wall_s=3.0, **kw)(completions, **fields(rows))


def test_extract_code_takes_the_first_python_fence_or_the_whole_text():
    assert extract_code("Here:\n```python\nx = 1\n```\nand ```python\ny\n```") == "x = 1"
    assert extract_code("```\nplt.plot()\n```") == "plt.plot()"
    assert extract_code("  x = 1\n") == "x = 1" and extract_code(None) == ""


def test_gold_programs_score_one_everywhere(task):
    rows = task.split("eval")
    gold = [r["completion"] for r in rows]
    assert score("chart_exec", gold, rows) == [1.0] * len(rows)
    assert score("chart_text", gold, rows) == [1.0] * len(rows)
    assert all(v == pytest.approx(1.0) for v in score("chart_visual", gold, rows))
    m = task.metrics(gold, rows)
    assert m["low_level"] == 100.0 and m["exec_rate"] == 1.0 and m["visual"] == pytest.approx(1.0)


def test_a_wrong_colour_lowers_only_what_it_should(task):
    rows = [r for r in task.split("sft") + task.split("eval") if 'color="' in r["completion"]][:1]
    code = rows[0]["completion"]
    colour = code.split('color="')[1].split('"')[0]
    wrong = code.replace(f'color="{colour}"', 'color="black"' if colour != "black" else 'color="red"')
    text, = score("chart_text", [wrong], rows)
    assert score("chart_exec", [wrong], rows) == [1.0] and 0.5 < text < 1.0
    low = task.metrics([wrong], rows)
    assert low["color_f1"] < 1.0 and low["type_f1"] == low["layout_f1"] == low["text_f1"] == 1.0


def test_low_level_reward_is_the_held_out_score_of_each_program(task):
    rows = [r for r in task.split("sft") + task.split("eval") if 'color="' in r["completion"]][:2]
    gold = [r["completion"] for r in rows]
    first_colour = [c.split('color="')[1].split('"')[0] for c in gold]
    wrong = [c.replace(f'color="{k}"', 'color="#123456"', 1) for c, k in zip(gold, first_colour)]
    assert score("chart_low_level", gold, rows) == [1.0, 1.0]
    got = score("chart_low_level", wrong + ["garbage("], rows + rows[:1])
    for g, w, row in zip(got, wrong, rows):  # one reward per program: the task's per-sample held-out score
        assert g == pytest.approx(task.score([w], [row])[0]) and 0.5 < g < 1.0
    assert got[2] is None  # did not run: the failure value (counted by CombinedReward)


def test_failed_and_hostile_programs_score_the_failure_value_within_the_limit(task):
    rows = task.split("eval")[:4]
    bad = ["garbage(", "while True:\n    pass\n", "import os\nos.kill(os.getppid(), 9)\n", ""]
    t0 = time.perf_counter()
    assert score("chart_exec", bad, rows) == [0.0] * 4
    assert time.perf_counter() - t0 < 3.0 + 5.0
    assert score("chart_text", bad, rows) == [None] * 4  # CombinedReward turns None into failure_value, counted
    assert score("chart_visual", bad, rows) == [None] * 4
    m = task.metrics(bad, rows)
    assert m["low_level"] == 0.0 and m["exec_rate"] == 0.0


def test_render_cache_runs_each_program_once_per_dpi(monkeypatch):
    import vision_rl.charts.rewards as rewards

    calls = []
    real = rewards.render_many

    def counting(codes, *a, **k):
        calls.append((list(codes), k["dpi"]))
        return real(codes, *a, **k)

    monkeypatch.setattr(rewards, "render_many", counting)
    from shared.sandbox import SandboxLimits

    cache = RenderCache(SandboxLimits(wall_s=3.0, cpu_s=3), workers=2)
    runs = cache.runs([BAR, f"```python\n{BAR}```", BAR], [50, 50, 40])
    again = cache.runs([BAR], [50])
    assert calls == [([BAR.strip()], 40.0), ([BAR.strip()], 50.0)]
    assert runs[0] is runs[1] is again[0] and runs[2] is not runs[0]
    assert runs[0].image.shape == (100, 150, 3) and runs[2].image.shape == (80, 120, 3)


def test_splits_are_disjoint_and_rows_carry_what_the_rewards_need(task):
    sft, train, ev = task.split("sft"), task.split("train"), task.split("eval")
    codes = [r["completion"] for r in [*sft, *train, *ev, *task.split("val")]]
    assert len(set(codes)) == len(codes)
    r = ev[0]
    assert r["image"].size == (150, 100) and r["target"].shape == (100, 150, 3) and r["dpi"] == 50
    assert r["gold_facts"]["n_figures"] == 1 and r["prompt"].startswith("Write the matplotlib code")


def test_jsonl_data_runs_gold_code_in_the_sandbox(tmp_path):
    from PIL import Image

    Image.new("RGB", (150, 100), "white").save(tmp_path / "t.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"code": BAR, "image": str(tmp_path / "t.png")}) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"code": BAR}) + "\n")
    t = ChartsTask(ChartsTaskConfig(train_file=str(tmp_path / "train.jsonl"), eval_file=str(tmp_path / "eval.jsonl"),
                                    val_size=0, wall_s=3.0))
    assert t.split("sft")[0]["target"].mean() == 255  # the file's image is the target
    assert t.split("eval")[0]["gold_facts"]["calls"] == {"bar": 1}
    (tmp_path / "bad.jsonl").write_text('{"code": "x"}\n{"cod": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a row needs a 'code' string"):
        ChartsTask(ChartsTaskConfig(train_file=str(tmp_path / "bad.jsonl"), eval_file=str(tmp_path / "eval.jsonl")))
    (tmp_path / "nodraw.jsonl").write_text(json.dumps({"code": "x = 1"}) + "\n")
    with pytest.raises(ValueError, match="gold program does not draw"):
        ChartsTask(ChartsTaskConfig(train_file=str(tmp_path / "nodraw.jsonl"), eval_file=str(tmp_path / "eval.jsonl")))


SHAPING = {"name": "overlong", "weight": 0.5, "kwargs": {"max_len": 300, "cache_len": 290, "unit": "chars"}}


def charts_config(tmp_path, **over) -> dict:
    d = {
        "name": "charts", "domain": "vision", "seed": 3, "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "embedded", "freeze_vision": False},
        "task": {"name": "charts", "min_pixels": 3136, "max_pixels": 6272, "sft_size": 4, "train_size": 8,
                 "val_size": 2, "eval_size": 4, "wall_s": 3.0, "hidden_size": 32, "num_layers": 1,
                 "num_heads": 2, "vision_depth": 1, "vision_dim": 32},
        # a random model's programs never run, so every chart reward is 0; the length shaping term gives
        # each group a signal and the update something to do
        "rewards": [{"name": "chart_exec", "kwargs": {"wall_s": 3.0}}, {"name": "chart_text", "kwargs": {"wall_s": 3.0}},
                    {"name": "chart_visual", "start_step": 2, "kwargs": {"wall_s": 3.0}}, SHAPING],
        "warmup": {"enabled": False, "cache_dir": str(tmp_path / "cache")},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 12, "temperature": 1.0},
        "algorithm": {"advantage": "grpo", "beta": 0.0, "loss_agg": "token_mean"},
        "optim": {"lr": 1e-2},
        "train": {"steps": 2, "micro_batch_size": 8, "grad_accum_steps": 1},
        "eval": {"every": 0, "max_prompts": 4, "batch_size": 4},
        "checkpoint": {"every": 1, "keep_last": 2},
        "logging": {"progress": False, "tensorboard": False, "plots": False},
    }
    return merge(d, over)


def test_a_few_rl_steps_run_score_in_the_sandbox_and_change_the_model(tmp_path):
    from shared.loop import train

    summary = train(validate_config(charts_config(tmp_path), "test"))
    run = tmp_path / "runs" / "charts"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert {"reward/chart_exec", "reward/chart_text", "reward/chart_visual", "reward_failures/chart_text"} <= set(steps[0])
    assert {"eval/low_level", "eval/exec_rate", "eval/text_f1", "eval/visual"} <= set(lines[0])
    assert summary["metric"] == "low_level" and np.isfinite(summary["after"])
    a = load_file(run / "checkpoints" / "step_000001" / "model" / "model.safetensors")
    b = load_file(run / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_charts_config_errors_are_one_line(tmp_path):
    from shared.recipe import build_components
    from shared.loop import make_accelerator

    cfg = validate_config(charts_config(tmp_path, task={"train_file": str(tmp_path / "none.jsonl")}), "test")
    with pytest.raises(ConfigError, match=r"task: eval_file: required with train_file"):
        build_components(cfg, make_accelerator(cfg))
