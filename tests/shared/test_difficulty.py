"""DeReason-style split by measured difficulty (shared/difficulty.py, `rlft split`)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from shared.cli import main
from shared.difficulty import split_by_difficulty, write_split
from tests.helpers.tiny import tiny_config_dict


def test_split_by_hand():
    rates = torch.tensor([0.0, 0.125, 0.5, 1.0, 0.25])
    assert split_by_difficulty([{}] * 5, rates, 0.125) == ([0, 1], [2, 3, 4])
    assert split_by_difficulty([{}] * 5, rates, 0.125, drop_solved=True) == ([0, 1], [2, 4])
    assert split_by_difficulty([{}] * 5, rates, -1.0) == ([], [0, 1, 2, 3, 4])


def test_write_split_files(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "completion": str(i + 1), "_where": "x", "category": "c"}
            for i in range(3)]
    rec = write_split(rows, torch.tensor([0.0, 0.5, 1.0]), [0], [1, 2], tmp_path, {"rollouts": 4})
    sft = [json.loads(l) for l in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert sft == [{"prompt": "0+1=", "answer": "1", "completion": "1", "pass_rate": 0.0}]
    assert [json.loads(l)["pass_rate"] for l in (tmp_path / "rl.jsonl").read_text().splitlines()] == [0.5, 1.0]
    assert rec["sft"] == 1 and rec["rl"] == 2 and rec["dropped"] == 0 and rec["rollouts"] == 4
    assert sum(rec["pass_rate_histogram"].values()) == 3
    assert json.loads((tmp_path / "split.json").read_text()) == rec


def test_rlft_split_on_a_tiny_policy_and_training_on_its_files(tmp_path):
    d = tiny_config_dict(tmp_path, sampler={"dots_pass_threshold": -0.25})  # not truncated counts as a pass
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "split"
    assert main(["split", str(cfg_path), "rollouts=4", "prompts=16", "sft_below=0.5", f"out={out}"]) == 0
    rec = json.loads((out / "split.json").read_text())
    assert rec["prompts"] == 16 and rec["sft"] + rec["rl"] == 16
    rates = [json.loads(l)["pass_rate"] for f in ("sft", "rl") for l in (out / f"{f}.jsonl").read_text().splitlines()]
    assert all(r in (0.0, 0.25, 0.5, 0.75, 1.0) for r in rates)
    assert main(["split", str(cfg_path), "rollouts=four"]) == 2
    assert main(["split", str(cfg_path), "drop_solved=maybe"]) == 2


def test_split_needs_demonstrations():
    from shared.difficulty import check_demonstrations

    check_demonstrations([{"prompt": "1+1=", "completion": "2"}])
    with pytest.raises(ValueError, match=r"^rlft split: train row data.jsonl:3 has no demonstration"):
        check_demonstrations([{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "_where": "data.jsonl:3"}])
