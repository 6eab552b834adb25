"""Strict run configuration (shared/config.py): loading, extends, overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import shared.config
from shared.config import (
    AlgorithmConfig,
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    apply_overrides,
    dump_config,
    load_config,
    optimizer_steps_per_rollout,
    parse_override,
    validate_config,
)

# the configs' own YAML reader when there is one (YAML 1.2 scalars), else PyYAML's safe loader
_load_yaml = getattr(shared.config, "yaml_load", yaml.safe_load)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
QUICKSTART = CONFIGS / "llm" / "arithmetic_grpo.yaml"


def _shipped_run_configs() -> list[Path]:
    """Every YAML under configs/ that is a run config (has a top-level `domain:`), not a base."""
    out = []
    for p in sorted(CONFIGS.rglob("*.yaml")):
        data = _load_yaml(p.read_text())
        if isinstance(data, dict) and "domain" in data:
            out.append(p)
    return out


def _minimal(**over) -> dict:
    d = {"name": "t", "domain": "llm", "task": {"name": "arithmetic"}}
    d.update(over)
    return d


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> Path:
    """A run config with known geometry (the shipped recipes change as they are tuned).

    prompts 8 * samples 4 = 32 sequences per rollout; micro 8 * accum 2 = 16 per optimizer step.
    """
    return _write(tmp_path_factory.mktemp("cfg") / "fixed.yaml", {
        "extends": str(CONFIGS / "base" / "rl.yaml"),
        "name": "fixed", "domain": "llm",
        "task": {"name": "arithmetic", "digits": 2},
        "rewards": [{"name": "exact_match"}],
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 4},
        "optim": {"lr": 1.0e-3},
        "train": {"steps": 10, "micro_batch_size": 8, "grad_accum_steps": 2},
    })


def _write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _error(fn, *args, **kwargs) -> str:
    """Run fn expecting a ConfigError; return its message, checked to be one line."""
    with pytest.raises(ConfigError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg, f"error message spans lines: {msg!r}"
    assert msg.strip(), "empty error message"
    return msg


# --------------------------------------------------------------------------------------------
# Shipped configs and defaults
# --------------------------------------------------------------------------------------------


def test_there_are_shipped_run_configs():
    assert QUICKSTART in _shipped_run_configs()


@pytest.mark.parametrize("path", _shipped_run_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.name
    # the single-process geometry check ran inside load_config; it must give whole optimizer steps
    assert optimizer_steps_per_rollout(cfg, 1) >= 1


def test_quickstart_resolves_extends_and_own_values():
    cfg = load_config(QUICKSTART)
    raw = _load_yaml(QUICKSTART.read_text())
    base = _load_yaml((CONFIGS / "base" / "rl.yaml").read_text())
    assert cfg.name == raw["name"] and cfg.domain == "llm"
    assert cfg.task["name"] == "arithmetic"
    for key, value in raw["task"].items():
        assert cfg.task[key] == value, f"task.{key}"
    # every scalar of the recipe wins over the base; the base fills in the rest
    for section in ("rollout", "algorithm", "optim", "train", "checkpoint", "logging", "warmup", "eval"):
        own, inherited = raw.get(section) or {}, base.get(section) or {}
        for key in set(own) | set(inherited):
            expected = own.get(key, inherited.get(key))
            got = getattr(getattr(cfg, section), key)
            assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, f"{section}.{key}"
    # the task section is normalised by its schema: defaults filled in
    assert "data_seed" in cfg.task


def test_algorithm_defaults_are_the_documented_ones():
    a = AlgorithmConfig()
    assert a.beta == 0.0
    assert a.eps_low == 0.2 and a.eps_high == 0.2
    assert a.loss_agg == "token_mean"
    assert a.advantage == "grpo"
    assert a.kl_estimator == "k3"
    assert a.kl_placement == "loss"
    assert a.objective == "ppo_clip"
    assert a.dual_clip is None and a.ratio_level == "token" and a.epochs == 1


def test_base_rl_yaml_spells_out_the_library_defaults():
    # rl.yaml promises that "every algorithm default is spelled out here": it must not drift
    data = _load_yaml((CONFIGS / "base" / "rl.yaml").read_text())
    sections = {"rollout": RolloutConfig, "algorithm": AlgorithmConfig, "optim": OptimConfig,
                "checkpoint": CheckpointConfig, "logging": LoggingConfig}
    for name, values in data.items():
        if name in sections:
            default = sections[name]()
            for key, value in values.items():
                assert getattr(default, key) == value, f"{name}.{key}: rl.yaml {value!r} vs default {getattr(default, key)!r}"
        else:
            assert RunConfig.model_fields[name].default == values, name
    assert set(AlgorithmConfig.model_fields) - set(data["algorithm"]) <= {"loss_agg_norm_len"}


# --------------------------------------------------------------------------------------------
# extends
# --------------------------------------------------------------------------------------------


def test_extends_child_wins_and_nested_sections_merge(tmp_path):
    _write(tmp_path / "base" / "b.yaml", {
        "domain": "llm", "seed": 1,
        "task": {"name": "arithmetic", "digits": 2, "ops": ["+", "-"]},
        "algorithm": {"beta": 0.04, "eps_high": 0.28},
        "rewards": [{"name": "exact_match"}, {"name": "format"}],
    })
    child = _write(tmp_path / "c.yaml", {
        "extends": "base/b.yaml",  # relative to the child file, not the cwd
        "name": "child", "seed": 7,
        "task": {"digits": 4},
        "algorithm": {"beta": 0.0},
        "rewards": [{"name": "exact_match", "weight": 2.0}],
    })
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.seed == 7
    assert cfg.task["digits"] == 4 and cfg.task["ops"] == ["+", "-"]  # nested merge keeps the sibling
    assert cfg.algorithm.beta == 0.0 and cfg.algorithm.eps_high == 0.28
    # lists are replaced, not merged
    assert [(r.name, r.weight) for r in cfg.rewards] == [("exact_match", 2.0)]


def test_extends_list_of_bases_later_wins_child_wins_last(tmp_path):
    _write(tmp_path / "a.yaml", {"domain": "llm", "seed": 1, "task": {"name": "arithmetic", "digits": 2},
                                 "optim": {"lr": 0.1, "weight_decay": 0.5}})
    _write(tmp_path / "b.yaml", {"seed": 2, "task": {"digits": 5}, "optim": {"lr": 0.2}})
    child = _write(tmp_path / "c.yaml", {"extends": ["a.yaml", "b.yaml"], "name": "c", "optim": {"lr": 0.3}})
    cfg = load_config(child)
    assert cfg.seed == 2  # b over a
    assert cfg.task["digits"] == 5
    assert cfg.optim.lr == pytest.approx(0.3)  # child over both
    assert cfg.optim.weight_decay == pytest.approx(0.5)  # kept from a


def test_extends_chain(tmp_path):
    _write(tmp_path / "a.yaml", {"domain": "llm", "task": {"name": "arithmetic"}, "seed": 1})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml", "seed": 2, "output_dir": "out"})
    child = _write(tmp_path / "c.yaml", {"extends": "b.yaml", "name": "c"})
    cfg = load_config(child)
    assert (cfg.seed, cfg.output_dir) == (2, "out")


def test_extends_cycle_is_a_config_error(tmp_path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml", "domain": "llm"})
    msg = _error(load_config, tmp_path / "a.yaml")
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg


def test_extends_self_cycle(tmp_path):
    p = _write(tmp_path / "self.yaml", {"extends": "self.yaml", "name": "x"})
    assert "cycle" in _error(load_config, p)


def test_missing_extends_base_names_the_path(tmp_path):
    child = _write(tmp_path / "c.yaml", {"extends": "nope/base.yaml", **_minimal()})
    msg = _error(load_config, child)
    assert str(tmp_path / "nope" / "base.yaml") in msg
    assert "not found" in msg and "c.yaml" in msg  # says who extended it


@pytest.mark.parametrize("extends", [3, [None]], ids=["int", "list-of-null"])
def test_malformed_extends_value_is_a_config_error(tmp_path, extends):
    p = _write(tmp_path / "c.yaml", {"extends": extends, **_minimal()})
    assert "'extends'" in _error(load_config, p)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key, value", [
    ("train.steps=5", ["train", "steps"], 5),
    ("optim.lr=5.0e-4", ["optim", "lr"], 5.0e-4),
    ("algorithm.beta=0.04", ["algorithm", "beta"], 0.04),
    ("logging.plots=false", ["logging", "plots"], False),
    ("task.ops=['+', '-']", ["task", "ops"], ["+", "-"]),
    ("algorithm.dual_clip=null", ["algorithm", "dual_clip"], None),
    ("name=my-run", ["name"], "my-run"),
    ("name=a=b", ["name"], "a=b"),  # only the first '=' splits
    ("name=", ["name"], ""),
    ("model.name_or_path=[unclosed", ["model", "name_or_path"], "[unclosed"),  # not YAML: kept raw
])
def test_parse_override_reads_values_as_yaml(text, key, value):
    assert parse_override(text) == (key, value)


def test_exponent_without_dot_override_validates_to_float(fixed):
    # PyYAML's YAML 1.1 resolver reads '1e-3' (no dot) as a string; the config's own loader may read
    # it as a float. Either way the float field must end up a float, never a string or an error.
    key, value = parse_override("optim.lr=1e-3")
    assert key == ["optim", "lr"] and value in ("1e-3", 1e-3)
    cfg = load_config(fixed, ["optim.lr=1e-3"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-3)
    cfg = load_config(fixed, ["optim.lr=2E-5"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(2e-5)


def test_exponent_without_dot_in_a_file_validates_to_float(tmp_path):
    p = _write(tmp_path / "c.yaml", "name: t\ndomain: llm\ntask: {name: arithmetic}\noptim:\n  lr: 1e-3\n"
                                    "algorithm:\n  adv_eps: 1e-6\n")
    cfg = load_config(p)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.algorithm.adv_eps == pytest.approx(1e-6)


def test_yaml_no_is_a_string_not_false(fixed):
    # train.mixed_precision takes the string 'no'; a YAML 1.1 loader would turn it into False
    cfg = load_config(fixed, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    assert load_config(fixed, ["logging.plots=false"]).logging.plots is False


def test_dotted_float_exponent_override_works(fixed):
    cfg = load_config(fixed, ["optim.lr=5.0e-4", "train.steps=3"])
    assert cfg.optim.lr == pytest.approx(5.0e-4) and cfg.train.steps == 3
    assert isinstance(cfg.train.steps, int)


def test_overrides_apply_after_extends_and_in_order(fixed):
    cfg = load_config(fixed, ["algorithm.eps_high=0.28", "seed=1", "seed=2"])
    assert cfg.algorithm.eps_high == pytest.approx(0.28)
    assert cfg.algorithm.eps_low == pytest.approx(0.2)  # sibling untouched
    assert cfg.seed == 2


def test_override_creates_nested_sections(fixed):
    data = apply_overrides({"name": "x"}, ["model.lora.r=4", "model.lora.alpha=8"])
    assert data == {"name": "x", "model": {"lora": {"r": 4, "alpha": 8}}}
    cfg = load_config(fixed, ["model.lora.r=4"])  # lora absent in the file (None by default)
    assert cfg.model.lora is not None and cfg.model.lora.r == 4 and cfg.model.lora.alpha == 32.0


def test_apply_overrides_does_not_mutate_its_input():
    data = {"train": {"steps": 1}}
    apply_overrides(data, ["train.steps=2"])
    assert data == {"train": {"steps": 1}}


@pytest.mark.parametrize("text", ["noequals", "a..b=1", ".a=1", "a.=1", "=5", "a.b-c=1", "rewards.0.weight=2"])
def test_bad_override_syntax_is_a_config_error(fixed, text):
    msg = _error(parse_override, text)
    assert repr(text) in msg
    msg = _error(load_config, fixed, [text])
    assert repr(text) in msg


def test_override_through_a_value_is_a_config_error(fixed):
    msg = _error(load_config, fixed, ["train.steps.x=4"])
    assert "'steps'" in msg and "not a section" in msg


# --------------------------------------------------------------------------------------------
# One-line error messages
# --------------------------------------------------------------------------------------------


def test_unknown_top_level_key_in_file(tmp_path):
    p = _write(tmp_path / "c.yaml", _minimal(trian={"steps": 3}))
    msg = _error(load_config, p)
    assert str(p) in msg and "unknown key 'trian'" in msg and "did you mean 'train'" in msg


def test_unknown_nested_key_names_file_dotted_key_and_suggestion(tmp_path):
    p = _write(tmp_path / "c.yaml", _minimal(algorithm={"betta": 0.1}))
    msg = _error(load_config, p)
    assert str(p) in msg
    assert "'algorithm.betta'" in msg
    assert "did you mean 'beta'" in msg


def test_unknown_nested_key_from_override(fixed):
    msg = _error(load_config, fixed, ["algorithm.betta=0.1"])
    assert str(fixed) in msg and "(with overrides)" in msg
    assert "'algorithm.betta'" in msg and "'beta'" in msg


def test_unknown_key_in_optional_nested_section(fixed):
    msg = _error(load_config, fixed, ["model.lora.rr=4"])
    assert "'model.lora.rr'" in msg and "did you mean 'r'" in msg


def test_unknown_key_in_task_section_suggests_from_the_task_schema(tmp_path):
    p = _write(tmp_path / "c.yaml", _minimal(task={"name": "arithmetic", "digts": 3}))
    msg = _error(load_config, p)
    assert str(p) in msg and "'task.digts'" in msg and "did you mean 'digits'" in msg


def test_unknown_key_in_jsonl_task_section():
    msg = _error(validate_config, _minimal(task={"name": "jsonl", "train_path": "a", "eval_path": "b",
                                                 "promt_field": "q"}))
    assert "'task.promt_field'" in msg and "did you mean 'prompt_field'" in msg


def test_unknown_key_in_a_reward_entry_suggests_the_closest():
    msg = _error(validate_config, _minimal(rewards=[{"name": "exact_match", "wieght": 1.0}]))
    assert "'rewards.0.wieght'" in msg and "did you mean 'weight'" in msg


def test_wrong_type_names_key_and_bad_value(fixed):
    msg = _error(load_config, fixed, ["train.steps=abc"])
    assert "'train.steps'" in msg and "'abc'" in msg and "integer" in msg


@pytest.mark.parametrize("value, ok", [("true", True), ("false", False), ("rl", "rl"), ("maybe", None), ("1", None)])
def test_freeze_vision_is_a_bool_or_rl(fixed, value, ok):
    if ok is None:
        msg = _error(load_config, fixed, [f"model.freeze_vision={value}"])
        assert "'model.freeze_vision'" in msg and "expected true, false or 'rl'" in msg and value in msg
    else:
        assert load_config(fixed, [f"model.freeze_vision={value}"]).model.freeze_vision == ok


def test_fractional_int_is_rejected(fixed):
    msg = _error(load_config, fixed, ["train.steps=1.5"])
    assert "'train.steps'" in msg and "1.5" in msg


def test_wrong_type_in_task_section(fixed):
    msg = _error(load_config, fixed, ["task.digits=many"])
    assert "'task.digits'" in msg and "'many'" in msg


def test_out_of_range_value_names_key(fixed):
    msg = _error(load_config, fixed, ["algorithm.beta=-1"])
    assert "'algorithm.beta'" in msg and "-1" in msg


def test_missing_required_name(tmp_path):
    data = _minimal()
    del data["name"]
    p = _write(tmp_path / "c.yaml", data)
    msg = _error(load_config, p)
    assert str(p) in msg and "missing required key 'name'" in msg


def test_missing_required_task_field():
    msg = _error(validate_config, _minimal(task={"name": "jsonl", "train_path": "a.jsonl"}))
    assert "missing required key 'task.eval_path'" in msg


def test_several_problems_are_counted_on_one_line(tmp_path):
    p = _write(tmp_path / "empty.yaml", "")
    msg = _error(load_config, p)
    assert "missing required key" in msg and "more problem" in msg


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _error(load_config, missing)
    assert str(missing) in msg and "not found" in msg


def test_directory_is_not_a_config_file(tmp_path):
    assert "not found" in _error(load_config, tmp_path)


def test_invalid_yaml_names_the_line(tmp_path):
    p = _write(tmp_path / "bad.yaml", "name: x\ndomain: llm\n task: 1\n")
    msg = _error(load_config, p)
    assert str(p) in msg and "line 3" in msg and "not valid YAML" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    p = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    msg = _error(load_config, p)
    assert "mapping" in msg and "list" in msg


def test_unknown_task_name_suggests_closest(fixed):
    msg = _error(load_config, fixed, ["task.name=arithmetc"])
    assert "'task.name'" in msg and "did you mean 'arithmetic'" in msg
    assert "known:" in msg and "jsonl" in msg


def test_task_without_name_is_rejected():
    msg = _error(validate_config, _minimal(task={"digits": 3}))
    assert "task.name" in msg


def test_unknown_objective_suggests_closest(fixed):
    msg = _error(load_config, fixed, ["algorithm.objective=ppo_clp"])
    assert "algorithm.objective" in msg and "did you mean 'ppo_clip'" in msg


@pytest.mark.parametrize("key, bad", [("algorithm.loss_agg", "token_sum"), ("algorithm.advantage", "gae"),
                                      ("algorithm.kl_estimator", "k4")])
def test_literal_choice_lists_the_choices(fixed, key, bad):
    msg = _error(load_config, fixed, [f"{key}={bad}"])
    assert f"'{key}'" in msg and repr(bad) in msg
    if key == "algorithm.loss_agg":
        for choice in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"):
            assert f"'{choice}'" in msg


def test_non_finite_lr_rejected(fixed):
    assert "optim.lr" in _error(load_config, fixed, ["optim.lr=.inf"])


def test_empty_run_name_is_rejected(fixed):
    _error(load_config, fixed, ["name="])


# --------------------------------------------------------------------------------------------
# Consistency checks
# --------------------------------------------------------------------------------------------


def test_geometry_mismatch_explained(fixed):
    # fixed: micro_batch_size 8 * grad_accum 2 = 16 sequences per optimizer step; 3 prompts * 4 = 12
    msg = _error(load_config, fixed, ["rollout.prompts_per_step=3"])
    assert "12 sequences" in msg and "= 16" in msg
    assert "train.micro_batch_size" in msg and "train.grad_accum_steps" in msg


def test_geometry_counts_optimizer_steps():
    cfg = validate_config(_minimal(rollout={"prompts_per_step": 6, "samples_per_prompt": 4},
                                   train={"micro_batch_size": 4, "grad_accum_steps": 2}))
    assert optimizer_steps_per_rollout(cfg, 1) == 3  # 24 / 8
    with pytest.raises(ConfigError):  # 3 prompts * 4 = 12 per process, not a multiple of 8
        optimizer_steps_per_rollout(cfg, 2)
    assert optimizer_steps_per_rollout(cfg, 3) == 1  # 2 prompts * 4 = 8 per process


def test_geometry_odd_prompts_over_two_processes():
    cfg = validate_config(_minimal(rollout={"prompts_per_step": 3, "samples_per_prompt": 8},
                                   train={"micro_batch_size": 8, "grad_accum_steps": 1}))
    assert optimizer_steps_per_rollout(cfg, 1) == 3
    with pytest.raises(ConfigError) as ei:
        optimizer_steps_per_rollout(cfg, 2)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "rollout.prompts_per_step=3" in msg and "(2)" in msg


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo"])
def test_group_advantage_needs_two_samples(fixed, advantage):
    msg = _error(load_config, fixed, [f"algorithm.advantage={advantage}", "rollout.samples_per_prompt=1",
                                           "train.micro_batch_size=8", "train.grad_accum_steps=1"])
    assert "rollout.samples_per_prompt" in msg and "at least 2" in msg


@pytest.mark.parametrize("advantage", ["batch_std", "none"])
def test_non_group_advantage_allows_one_sample(fixed, advantage):
    cfg = load_config(fixed, [f"algorithm.advantage={advantage}", "rollout.samples_per_prompt=1",
                                   "train.micro_batch_size=8", "train.grad_accum_steps=1"])
    assert cfg.rollout.samples_per_prompt == 1


def test_kl_in_reward_with_zero_beta_rejected(fixed):
    msg = _error(load_config, fixed, ["algorithm.kl_placement=reward", "algorithm.beta=0"])
    assert "kl_placement" in msg and "beta" in msg
    cfg = load_config(fixed, ["algorithm.kl_placement=reward", "algorithm.beta=0.04"])
    assert cfg.algorithm.kl_placement == "reward"


def test_every_error_is_one_line_including_validation_errors_with_many_problems(tmp_path):
    p = _write(tmp_path / "c.yaml", {"name": 1, "domain": "text", "task": "arithmetic", "bogus": 1,
                                     "train": {"steps": "x", "micro_batch_size": -1}})
    _error(load_config, p)  # asserts one line


# --------------------------------------------------------------------------------------------
# Dump and reload
# --------------------------------------------------------------------------------------------


def test_dump_config_round_trips(fixed, tmp_path):
    cfg = load_config(fixed, ["model.lora.r=4", "algorithm.dual_clip=3.0", "optim.betas=[0.9, 0.95]"])
    out = tmp_path / "deep" / "config.yaml"
    dump_config(cfg, out)
    assert out.is_file()
    reloaded = validate_config(yaml.safe_load(out.read_text()), str(out))
    assert reloaded == cfg
    assert reloaded.model_dump() == cfg.model_dump()
    # the dumped file is itself a complete config
    assert load_config(out) == cfg
