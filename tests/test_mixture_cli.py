"""`rlft mixture` end to end on a tiny two-dataset task (addition and multiplication as datasets)."""

from __future__ import annotations

import json

import yaml

from shared.cli import main
from tests.helpers.tiny import tiny_config_dict


def test_mixture_search_runs_pilots_fits_and_trains_the_best(tmp_path, capsys):
    d = tiny_config_dict(tmp_path, train={"steps": 1}, checkpoint={"every": 0},
                         logging={"progress": False, "tensorboard": False, "plots": False})
    d["task"]["ops"] = ["+", "*"]
    d["sampler"] = {"name": "mixture", "weights": {"add": 1.0, "mul": 1.0}}
    # a per-dataset reward: exact match only counts on the addition rows
    d["rewards"] = [{"name": "exact_match", "kwargs": {"extract": "full"}, "sources": ["add"]},
                    {"name": "overlong", "weight": 0.5, "kwargs": {"max_len": 3, "cache_len": 2}}]
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump(d))
    out = tmp_path / "mix"
    assert main(["mixture", str(cfg), "pilots=3", f"out={out}"]) == 0
    record = json.loads((out / "mixture.json").read_text())
    assert record["datasets"] == ["add", "mul"] and len(record["pilots"]) == 3
    assert record["pilots"][0]["weights"] == [0.5, 0.5]  # the uniform mixture is the first pilot
    w = record["predicted_best"]["weights"]
    assert min(w) >= 0 and abs(sum(w) - 1) < 1e-9
    # every pilot really trained with its own weights
    for p in record["pilots"]:
        saved = yaml.safe_load(open(f"{p['run_dir']}/config.yaml"))
        assert saved["sampler"]["name"] == "mixture"
        assert [saved["sampler"]["weights"][k] for k in ("add", "mul")] == p["weights"]
    assert "predicted best" in capsys.readouterr().out


def test_mixture_needs_enough_pilots(tmp_path, capsys):
    d = tiny_config_dict(tmp_path)
    d["sampler"] = {"name": "mixture", "weights": {"add": 1.0, "mul": 1.0, "sub": 1.0}}
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["mixture", str(cfg), "pilots=2"]) == 2
    assert "at least 6 pilot runs" in capsys.readouterr().err


def test_per_dataset_reward_scores_only_its_rows():
    from shared.config import RewardSpec
    from shared.rewards import CombinedReward

    import llm_rl  # noqa: F401  (registers exact_match)

    reward = CombinedReward.from_specs([RewardSpec(name="exact_match", kwargs={"extract": "full"}, sources=["add"])])
    res = reward(["3", "3", "4"], {"answer": ["3", "3", "5"], "source": ["add", "mul", "add"]})
    assert res.total.tolist() == [1.0, 0.0, 0.0] and res.failures["exact_match"] == 0
