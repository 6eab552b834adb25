"""`rlft` command line (shared/cli.py): user errors are one line on stderr and exit code 2.

The main cases run the real CLI in a subprocess (`python -m shared.cli`): exit code, stderr, no
traceback. Each start-up imports torch and transformers (the domain packages register their task
schemas on import), several CPU seconds, so further error kinds call `shared.cli.main` in-process.
No test trains or builds a model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "llm" / "arithmetic_grpo.yaml"
BASE_RL = ROOT / "configs" / "base" / "rl.yaml"


def _cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "shared.cli", *map(str, args)]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("RLFT_LOG_LEVEL", None)
    return env


def rlft(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)


def main_inproc(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    """shared.cli.main in this process, shaped like a subprocess result."""
    from shared.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["rlft", *map(str, args)], code, out, err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("rlft: error: "), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def _write_jsonl_config(d: Path) -> tuple[Path, Path, Path]:
    """A jsonl-task config whose train file has a malformed second line and whose model dir does not exist."""
    bad = d / "train_bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    good = d / "eval.jsonl"
    good.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+3=", "answer": "5"}\n')
    cfg = d / "jsonl.yaml"
    cfg.write_text(yaml.safe_dump({
        "extends": str(BASE_RL),
        "name": "jsonl_cli_test",
        "domain": "llm",
        "output_dir": str(d / "runs"),
        "model": {"name_or_path": str(d / "no_such_model")},
        "task": {"name": "jsonl", "train_path": str(bad), "eval_path": str(good)},
        "rewards": [{"name": "exact_match"}],
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4},
        "train": {"steps": 1, "micro_batch_size": 2},
    }, sort_keys=False))
    return cfg, bad, good


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    _write_jsonl_config(d)
    (d / "typo.yaml").write_text(f"extends: {QUICKSTART}\ntask:\n  digts: 2\n")
    # known geometry (the shipped recipe is retuned): 8 prompts * 4 samples; 8 * 2 per optimizer step
    (d / "fixed.yaml").write_text(yaml.safe_dump({
        "extends": str(BASE_RL), "name": "fixed", "domain": "llm", "output_dir": str(d / "fixed_runs"),
        "task": {"name": "arithmetic", "digits": 2}, "rewards": [{"name": "exact_match"}],
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 4},
        "train": {"steps": 1, "micro_batch_size": 8, "grad_accum_steps": 2},
    }, sort_keys=False))
    return d


@pytest.fixture(scope="module")
def runs(work) -> dict[str, subprocess.CompletedProcess]:
    """The real-subprocess CLI runs, started side by side. Each start-up imports torch and transformers
    (about 6 CPU seconds), so only these go through a subprocess; the other error kinds call
    shared.cli.main in-process, which is the same code minus the `sys.exit(main())` wrapper."""
    cases = {
        "validate_ok": ("validate", QUICKSTART),
        "unknown_key": ("validate", QUICKSTART, "algorithm.betta=0.1"),
        "validate_missing": ("validate", work / "nope.yaml"),
        "eval_no_ckpt": ("eval", QUICKSTART, "checkpoint=/nonexistent", f"output_dir={work / 'eval_runs'}"),
        "jsonl_train_bad_row": ("train", work / "jsonl.yaml"),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(rlft, *args) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------


def test_validate_quickstart_prints_resolved_yaml(runs):
    from shared.config import load_config, validate_config

    proc = runs["validate_ok"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["name"] == "arithmetic_grpo"
    assert "extends" not in printed  # resolved: the base is merged in
    assert printed["algorithm"]["kl_estimator"] == "k3"  # from configs/base/rl.yaml
    assert printed["task"]["data_seed"] == 1234  # task defaults filled in
    # what is printed is a complete config equal to the loaded one
    assert validate_config(printed) == load_config(QUICKSTART)


def test_validate_applies_overrides(capsys):
    proc = main_inproc(capsys, "validate", QUICKSTART, "optim.lr=1e-3", "algorithm.eps_high=0.28", "train.steps=7")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["optim"]["lr"] == pytest.approx(1e-3) and isinstance(printed["optim"]["lr"], float)
    assert printed["algorithm"]["eps_high"] == pytest.approx(0.28)
    assert printed["train"]["steps"] == 7


def test_validate_unknown_key(runs):
    proc = runs["unknown_key"]
    assert_one_line_error(proc, "'algorithm.betta'", "did you mean 'beta'", str(QUICKSTART))
    assert proc.stdout == ""


def test_validate_unknown_key_in_file(capsys, work):
    assert_one_line_error(main_inproc(capsys, "validate", work / "typo.yaml"), str(work / "typo.yaml"), "'task.digts'",
                          "did you mean 'digits'")


def test_validate_wrong_type(capsys):
    assert_one_line_error(main_inproc(capsys, "validate", QUICKSTART, "train.steps=abc"), "'train.steps'", "'abc'")


def test_validate_bad_override_syntax(capsys):
    assert_one_line_error(main_inproc(capsys, "validate", QUICKSTART, "noequals"), "'noequals'")


def test_validate_missing_config_file(runs, work):
    assert_one_line_error(runs["validate_missing"], str(work / "nope.yaml"), "not found")


# --------------------------------------------------------------------------------------------
# train / eval refuse bad input before doing any work
# --------------------------------------------------------------------------------------------


def test_train_missing_config_file(capsys, work):
    # load_config fails before shared.loop is imported or an Accelerator is made
    assert_one_line_error(main_inproc(capsys, "train", work / "nope.yaml", "resume=true"), str(work / "nope.yaml"), "not found")


def test_eval_missing_checkpoint(runs, work):
    # cmd_eval loads the config, then checks the checkpoint before building anything
    assert_one_line_error(runs["eval_no_ckpt"], "checkpoint=/nonexistent", "no such checkpoint")
    assert not (work / "eval_runs").exists()


# --------------------------------------------------------------------------------------------
# jsonl task: validation does not read the data; training reports a bad row in one line
# --------------------------------------------------------------------------------------------


def test_validate_jsonl_config_does_not_read_data(capsys, work):
    proc = main_inproc(capsys, "validate", work / "jsonl.yaml")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["task"]["name"] == "jsonl"
    assert printed["task"]["train_path"] == str(work / "train_bad.jsonl")
    assert printed["task"]["prompt_field"] == "prompt"  # task-schema default filled in


def test_train_jsonl_malformed_row_is_one_line(runs, work):
    assert_one_line_error(runs["jsonl_train_bad_row"], f"{work / 'train_bad.jsonl'}:2:", "not valid JSON")
    assert not (work / "runs").exists()  # failed before writing anything


def test_train_jsonl_unloadable_model_is_one_line(tmp_path):
    # valid data, so the run gets past the task to the model, whose local directory does not exist
    cfg, _, good = _write_jsonl_config(tmp_path)
    proc = rlft("train", cfg, f"task.train_path={good}")
    assert_one_line_error(proc, "model.name_or_path", str(tmp_path / "no_such_model"))
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# More error kinds, in-process (cheap once the packages are imported)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, needles", [
    (["task.name=arithmetc"], ["did you mean 'arithmetic'"]),
    (["algorithm.objective=ppo_clp"], ["did you mean 'ppo_clip'"]),
    (["algorithm.loss_agg=sum"], ["'algorithm.loss_agg'", "'token_mean'"]),
    (["rollout.prompts_per_step=3"], ["train.micro_batch_size"]),
    (["rollout.samples_per_prompt=1", "train.micro_batch_size=8", "train.grad_accum_steps=1"], ["at least 2"]),
    (["algorithm.kl_placement=reward"], ["algorithm.beta=0"]),
    (["a..b=1"], ["'a..b'"]),
    (["train.steps.x=1"], ["not a section"]),
], ids=["task", "objective", "loss_agg", "geometry", "group-size", "kl-reward", "dotted-key", "value-not-section"])
def test_main_validate_errors_in_process(capsys, work, overrides, needles):
    assert main_inproc(capsys, "validate", work / "fixed.yaml").returncode == 0  # the base itself is fine
    proc = main_inproc(capsys, "validate", work / "fixed.yaml", *overrides)
    assert_one_line_error(proc, *needles)
    assert proc.stdout == ""


def test_main_invalid_yaml_in_process(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ndomain: llm\n task: 1\n")
    assert_one_line_error(main_inproc(capsys, "validate", cfg), str(cfg), "line 3", "not valid YAML")
