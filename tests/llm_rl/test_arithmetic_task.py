"""The embedded arithmetic task's variants: scratchpad demonstrations and curriculum categories."""

from __future__ import annotations

import pytest

from llm_rl.tasks.arithmetic import ArithmeticTask, ArithmeticTaskConfig, scratchpad


def test_scratchpad_by_hand():
    assert scratchpad(1234, 5678) == "4+8=12 3+7+1=11 2+6+1=9 1+5=6 6912"
    assert scratchpad(34, 5678) == "4+8=12 3+7+1=11 0+6+1=7 0+5=5 5712"
    assert scratchpad(999, 1) == "9+1=10 9+0+1=10 9+0+1=10 1000"
    assert scratchpad(0, 0) == "0+0=0 0"


def _task(**kw):
    return ArithmeticTask(ArithmeticTaskConfig(digits=3, sft_size=20, train_size=50, val_size=5, eval_size=10, **kw))


def test_scratchpad_rows_and_scoring():
    t = _task(format="scratchpad")
    for row in t.split("train"):
        a, b = map(int, row["prompt"][:-1].split("+"))
        assert row["completion"] == scratchpad(a, b) and row["completion"].endswith(" " + row["answer"])
    rows = t.split("eval")[:2]
    assert t.score([rows[0]["completion"], "1+1=2 " + rows[1]["answer"]], rows) == [1.0, 1.0]
    assert t.score([rows[0]["answer"] + " 7", rows[1]["completion"] + "0"], rows) == [0.0, 0.0]
    plain = _task()
    assert plain.split("train")[0]["completion"] == plain.split("train")[0]["answer"]
    with pytest.raises(ValueError, match="task.format"):
        _task(format="scratchpad", ops=["+", "-"])


def test_categories_by_shorter_operand():
    t = _task(category_by="shorter_operand")
    for row in t.split("train"):
        a, b = row["prompt"][:-1].split("+")
        assert row["category"] == f"shorter={min(len(a), len(b))}"
    # the problems themselves do not depend on how they are categorised
    assert [r["prompt"] for r in t.split("train")] == [r["prompt"] for r in _task().split("train")]


def test_first_error_offsets():
    t = _task(format="scratchpad")
    row = {"completion": scratchpad(1234, 5678)}
    right = row["completion"]
    assert right[: t.first_error(right, row)] == right
    wrong_step = "4+8=12 3+7+1=12 2+6+1=9 1+5=6 6912"
    assert wrong_step[: t.first_error(wrong_step, row)] == "4+8=12 "
    wrong_sum = "4+8=12 3+7+1=11 2+6+1=9 1+5=6 6913"
    assert wrong_sum[: t.first_error(wrong_sum, row)] == "4+8=12 3+7+1=11 2+6+1=9 1+5=6 "
    assert t.first_error("", row) == 0
    assert _task().first_error("123", {"completion": "124"}) == 0  # an answer alone is one step


def test_warmup_key_ignores_rl_only_fields_and_later_fields_at_their_default():
    from shared.config import load_config
    from shared.sft import warmup_key
    from tests.helpers.tiny import ROOT

    path = ROOT / "configs/llm/arithmetic_grpo.yaml"
    key = warmup_key(load_config(path))
    assert warmup_key(load_config(path, ["task.format=answer", "task.category_by=shorter_operand"])) == key
    assert warmup_key(load_config(path, ["task.format=scratchpad"])) != key
    assert warmup_key(load_config(path, ["task.digits=3"])) != key


def test_revision_demonstrations_for_the_warm_up():
    plain = _task()
    t = _task(revision_template="{prompt}{completion} {prompt}")
    first, extra = t.split("sft")[:20], t.split("sft")[20:]
    assert first == plain.split("sft") and len(extra) == 20
    mistakes = 0
    for r, e in zip(first, extra):
        head, _, tail = e["prompt"].partition(" ")
        assert tail == r["prompt"] and head.startswith(r["prompt"]) and e["completion"] == r["answer"]
        mistakes += head[len(r["prompt"]):] != r["answer"]
    assert 0 < mistakes < 20  # some first answers are wrong, some right
    assert t.split("train") == plain.split("train") and t.split("eval") == plain.split("eval")
