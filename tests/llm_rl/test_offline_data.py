"""Offline data: shared.offline row forms and errors, jsonl reading of offline keys, arithmetic offline splits."""

import json
import math
import random
import re

import pytest

from llm_rl.tasks.arithmetic import (
    ArithmeticTask,
    ArithmeticTaskConfig,
    _solve,
    dropped_carry,
    offline_fields,
    plausible_mistake,
)
from llm_rl.tasks.jsonl import read_jsonl
from shared.config import ConfigError
from shared.offline import check_offline_rows, offline_group

WHERE = "data/train.jsonl:7"
SMALL = {"digits": 3, "ops": ["+", "-", "*"], "sft_size": 30, "train_size": 600, "val_size": 20, "eval_size": 50}
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)")
OFFLINE_KEYS = {"completions", "rewards", "margins", "chosen", "rejected", "reward"}


# ------------------------------------------------------------------ offline_group: the three forms


def test_scored_group():
    row = {"prompt": "p", "completions": ["a", "bb"], "rewards": [1, 0.5], "margins": [-0.1, -0.2]}
    assert offline_group(row, WHERE) == (["a", "bb"], [1.0, 0.5], [-0.1, -0.2])
    assert offline_group({"completions": ["a"]}, WHERE) == (["a"], None, None)


def test_preference_pair():
    assert offline_group({"chosen": "yes", "rejected": "no"}, WHERE) == (["yes", "no"], [1.0, 0.0], None)
    assert offline_group({"chosen": "y", "rejected": "n", "margins": [0, -2]}, WHERE) == (["y", "n"], [1.0, 0.0],
                                                                                          [0.0, -2.0])


def test_demonstration():
    assert offline_group({"completion": "42", "reward": 0.25}, WHERE) == (["42"], [0.25], None)
    assert offline_group({"completion": "42"}, WHERE) == (["42"], None, None)


def test_precedence():
    row = {"completions": ["c"], "chosen": "x", "rejected": "y", "completion": "d"}
    assert offline_group(row, WHERE)[0] == ["c"]
    assert offline_group({"chosen": "x", "rejected": "y", "completion": "d"}, WHERE)[0] == ["x", "y"]


@pytest.mark.parametrize(("row", "needle"), [
    ({"prompt": "p"}, "no completions"),
    ({"completions": []}, "non-empty list"),
    ({"completions": "ab"}, "non-empty list"),
    ({"completions": ["a", 3]}, "must be strings"),
    ({"chosen": "a", "rejected": None}, "must be strings"),
    ({"completions": ["a", "b"], "rewards": [1, 2, 3]}, "'rewards' has 3 values for 2 completions"),
    ({"completions": ["a", "b"], "margins": [1]}, "'margins' has 1 values for 2 completions"),
    ({"chosen": "a", "rejected": "b", "margins": [1, 2, 3]}, "'margins' has 3 values for 2 completions"),
    ({"completions": ["a"], "rewards": 1.0}, "'rewards' must be a list"),
    ({"completions": ["a"], "rewards": ["high\nlow"]}, "'rewards' must hold finite numbers"),
    ({"completions": ["a"], "rewards": [True]}, "'rewards' must hold finite numbers"),
    ({"completions": ["a"], "rewards": [math.nan]}, "'rewards' must hold finite numbers"),
    ({"completions": ["a"], "margins": [math.inf]}, "'margins' must hold finite numbers"),
    ({"completion": "a", "reward": "1"}, "'reward' must hold finite numbers"),
    ({"chosen": "a"}, "lacks 'rejected'"),
    ({"rejected": "a"}, "lacks 'chosen'"),
])
def test_errors_are_one_line_and_name_the_row(row, needle):
    with pytest.raises(ConfigError) as e:
        offline_group(row, WHERE)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{WHERE}: ")
    assert needle in msg


def test_rewards_mismatch_message_exactly():
    with pytest.raises(ConfigError, match=r"^data/train\.jsonl:7: 'rewards' has 3 values for 2 completions$"):
        offline_group({"completions": ["a", "b"], "rewards": [1, 2, 3]}, WHERE)


# ------------------------------------------------------------------ check_offline_rows


def test_check_offline_rows():
    rows = [{"chosen": "a", "rejected": "b"}, {"completions": ["c", "d"], "rewards": [0, 1]}]
    check_offline_rows(rows, group_size=2)
    with pytest.raises(ConfigError) as e:
        check_offline_rows(rows + [{"completion": "e"}], group_size=2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train row 2: 1 completions")
    assert "set rollout.samples_per_prompt to 1" in msg
    with pytest.raises(ConfigError, match="set rollout.samples_per_prompt to 2"):
        check_offline_rows([{"_where": "f.jsonl:3", "chosen": "a", "rejected": "b"}], group_size=4)
    with pytest.raises(ConfigError, match=r"^f\.jsonl:3: "):
        check_offline_rows([{"_where": "f.jsonl:3", "chosen": "a", "rejected": "b"}], group_size=4)


def test_check_offline_rows_empty_and_bad_row():
    with pytest.raises(ConfigError, match="^val: no offline rows$"):
        check_offline_rows([], group_size=2, split="val")
    with pytest.raises(ConfigError, match="^val row 0: no completions"):
        check_offline_rows([{"prompt": "p"}], group_size=2, split="val")


# ------------------------------------------------------------------ jsonl task reading


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_read_jsonl_pairs_without_answer(tmp_path):
    p = _write(tmp_path / "prefs.jsonl", [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5", "margins": [0.5, -1], "extra": "dropped"},
        "",
        {"prompt": "3+3=", "answer": 6, "completions": ["6", "7"], "rewards": [1, 0]},
    ])
    rows = read_jsonl(p, "prompt", "answer")
    assert rows == [
        {"prompt": "2+2=", "answer": "", "chosen": "4", "rejected": "5", "margins": [0.5, -1], "_where": f"{p}:1"},
        {"prompt": "3+3=", "answer": "6", "completions": ["6", "7"], "rewards": [1, 0], "_where": f"{p}:3"},
    ]
    check_offline_rows(rows, group_size=2)
    with pytest.raises(ConfigError, match=re.escape(f"{p}:1: 2 completions")):
        check_offline_rows(rows, group_size=4)


def test_read_jsonl_prompt_only_still_needs_answer(tmp_path):
    p = _write(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match=re.escape(f"{p}:2: missing key 'answer'")):
        read_jsonl(p, "prompt", "answer")


def test_read_jsonl_malformed_line(tmp_path):
    p = _write(tmp_path / "prefs.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"}, '{"prompt": "b", '])
    with pytest.raises(ValueError, match=re.escape(f"{p}:2: not valid JSON")):
        read_jsonl(p, "prompt", "answer")


# ------------------------------------------------------------------ arithmetic offline data


def test_dropped_carry_by_hand():
    assert dropped_carry(58, 67) == "15"  # 8+7=15 -> 5, 5+6=11 -> 1
    assert dropped_carry(500, 500) == "0"  # 1000 with the carry dropped, leading zeros stripped
    assert dropped_carry(123, 456) == "579"  # no carries: the true sum
    assert dropped_carry(0, 0) == "0"


def test_plausible_mistake_by_hand():
    for seed in range(20):
        rng = random.Random(seed)
        assert plausible_mistake(0, "-", 1, rng) == "-2"  # "-0" is no number: only +1 is left
        assert plausible_mistake(10, "+", 0, rng) in {"20", "11", "19"}  # no leading zero ("00")
        assert plausible_mistake(0, "+", 0, rng) in {"1", "9"}  # carry-dropped sum is correct: slip
    # 58+67=125: the carry-dropped "15", or a slip of one digit of 125 ("025" is no number)
    picks = {plausible_mistake(58, "+", 67, random.Random(s)) for s in range(50)}
    assert "15" in picks and len(picks) > 1
    assert picks <= {"15", "225", "115", "135", "124", "126"}


def test_plausible_mistake_never_correct():
    rng = random.Random(0)
    for _ in range(3000):
        a, b, op = rng.randrange(1000), rng.randrange(1000), rng.choice("+-*")
        wrong = plausible_mistake(a, op, b, rng)
        assert wrong != str(_solve(a, op, b)) and NUMBER.fullmatch(wrong), (a, op, b, wrong)


def test_pairs_rows():
    task = ArithmeticTask(ArithmeticTaskConfig(**SMALL, offline="pairs"))
    rows = task.split("train")
    assert len(rows) == SMALL["train_size"]
    for r in rows:
        assert r["chosen"] == r["answer"] and r["rejected"] != r["answer"]
        assert NUMBER.fullmatch(r["rejected"])
        assert r["margins"] == [-len(r["answer"]) / 10, -len(r["rejected"]) / 10]
        assert offline_group(r, "x")[:2] == ([r["answer"], r["rejected"]], [1.0, 0.0])
    check_offline_rows(rows, group_size=2)


def test_pairs_margins_by_hand():
    rng = random.Random(0)
    f = offline_fields(ArithmeticTaskConfig(offline="pairs"), 58, "+", 67, rng)
    assert f["chosen"] == "125" and f["margins"][0] == pytest.approx(-0.3)
    assert f["margins"][1] == pytest.approx(-len(f["rejected"]) / 10)


def test_demos_rows():
    rows = ArithmeticTask(ArithmeticTaskConfig(**SMALL, offline="demos")).split("train")
    assert all(offline_group(r, "x") == ([r["answer"]], [1.0], None) for r in rows)


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_scored_fraction(frac):
    cfg = ArithmeticTaskConfig(**{**SMALL, "train_size": 2000}, offline="scored", offline_correct_frac=frac)
    rows = ArithmeticTask(cfg).split("train")
    for r in rows:
        (y,), (reward,), margins = offline_group(r, "x")
        assert reward == float(y == r["answer"]) and margins is None and NUMBER.fullmatch(y)
    correct = sum(r["rewards"][0] for r in rows) / len(rows)
    assert abs(correct - frac) < 0.04  # binomial std at n=2000 is at most 0.011


@pytest.mark.parametrize("mode", ["demos", "pairs", "scored"])
def test_deterministic_and_other_splits_untouched(mode):
    plain = ArithmeticTask(ArithmeticTaskConfig(**SMALL))
    a = ArithmeticTask(ArithmeticTaskConfig(**SMALL, offline=mode))
    b = ArithmeticTask(ArithmeticTaskConfig(**SMALL, offline=mode))
    for split in ("train", "eval", "val", "sft"):
        assert a.split(split) == b.split(split)
    for split in ("eval", "val", "sft"):
        assert a.split(split) == plain.split(split)
        assert not any(OFFLINE_KEYS & r.keys() for r in a.split(split))
    # the problems themselves do not change: stripping the offline keys gives the plain rows back
    assert [{k: v for k, v in r.items() if k not in OFFLINE_KEYS} for r in a.split("train")] == plain.split("train")
    assert all(OFFLINE_KEYS & r.keys() for r in a.split("train"))


def test_offline_none_is_the_default():
    plain = ArithmeticTask(ArithmeticTaskConfig(**SMALL))
    none = ArithmeticTask(ArithmeticTaskConfig(**SMALL, offline="none"))
    for split in ("train", "eval", "val", "sft"):
        assert none.split(split) == plain.split(split)
    assert not any(OFFLINE_KEYS & r.keys() for r in none.split("train"))
    assert set(plain.split("train")[0]) == {"prompt", "answer", "completion", "category", "source"}
