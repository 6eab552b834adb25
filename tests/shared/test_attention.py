"""`model.attention` / `train.packed_sequences` checks (shared/attention.py): one-line errors naming the key,
raised when a recipe builds its model, before anything is loaded; xformers only for diffusion UNets."""

from __future__ import annotations

import pytest

from shared import attention
from shared.attention import attention_problem, check_attention, set_unet_attention
from shared.config import ConfigError, validate_config
from tests.helpers.tiny import tiny_config_dict

NOTHING = lambda package: False
EVERYTHING = lambda package: True


def _one_line(msg: str) -> str:
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("domain", ["llm", "vision", "diffusion"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_builtin_backends_are_always_available(domain, backend):
    assert attention_problem(backend, domain, NOTHING, cuda=False) is None


@pytest.mark.parametrize("domain", ["llm", "vision"])
def test_flash_attention_needs_the_package_and_cuda(domain):
    msg = _one_line(attention_problem("flash_attention_2", domain, NOTHING, cuda=False))
    assert msg.startswith("model.attention: 'flash_attention_2' is unavailable")
    assert "flash_attn package is not installed (pip install flash-attn)" in msg and "no CUDA GPU" in msg
    msg = attention_problem("flash_attention_2", domain, EVERYTHING, cuda=False)
    assert "no CUDA GPU" in msg and "not installed" not in msg
    msg = attention_problem("flash_attention_2", domain, NOTHING, cuda=True)
    assert "not installed" in msg and "CUDA" not in msg
    assert attention_problem("flash_attention_2", domain, EVERYTHING, cuda=True) is None


def test_xformers_needs_the_package_and_cuda():
    msg = _one_line(attention_problem("xformers", "diffusion", NOTHING, cuda=True))
    assert msg.startswith("model.attention: 'xformers' is unavailable") and "pip install xformers" in msg
    assert "no CUDA GPU" in attention_problem("xformers", "diffusion", EVERYTHING, cuda=False)
    assert attention_problem("xformers", "diffusion", EVERYTHING, cuda=True) is None


@pytest.mark.parametrize("domain", ["llm", "vision"])
def test_xformers_is_for_diffusion_unets_only(domain):
    msg = _one_line(attention_problem("xformers", domain, EVERYTHING, cuda=True))
    assert msg.startswith("model.attention: 'xformers' is for diffusers UNets") and repr(domain) in msg


def test_flash_attention_is_not_a_unet_backend():
    msg = _one_line(attention_problem("flash_attention_2", "diffusion", EVERYTHING, cuda=True))
    assert msg.startswith("model.attention: 'flash_attention_2' is for transformers models")
    assert "sdpa, eager, xformers" in msg


def test_config_accepts_xformers_and_rejects_unknown_backends(tmp_path):
    assert validate_config(tiny_config_dict(tmp_path, model={"attention": "xformers"})).model.attention == "xformers"
    with pytest.raises(ConfigError, match="model.attention"):
        validate_config(tiny_config_dict(tmp_path, model={"attention": "flash"}))


def _no_backends(monkeypatch):
    """This machine as one without flash_attn, xformers or CUDA, whatever it really has."""
    monkeypatch.setattr(attention, "_installed", NOTHING)
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: False)


def test_check_attention_on_a_config(tmp_path, monkeypatch):
    _no_backends(monkeypatch)
    check_attention(validate_config(tiny_config_dict(tmp_path)))  # sdpa: fine
    cfg = validate_config(tiny_config_dict(tmp_path, model={"attention": "flash_attention_2"}))
    with pytest.raises(ConfigError, match=r"^model\.attention: 'flash_attention_2' is unavailable"):
        check_attention(cfg)


def test_llm_recipe_checks_attention_before_loading(tmp_path, monkeypatch):
    from llm_rl import recipe

    _no_backends(monkeypatch)
    monkeypatch.setattr(recipe, "build_model", lambda *a: pytest.fail("model built before the check"))
    cfg = validate_config(tiny_config_dict(tmp_path, model={"attention": "flash_attention_2"}))
    with pytest.raises(ConfigError, match=r"^model\.attention: 'flash_attention_2' is unavailable"):
        recipe.load_model(cfg)


def test_packed_sequences_are_for_the_llm_domain_only(tmp_path):
    from tests.vision_rl.test_vision_loop import vision_config_dict
    from vision_rl import recipe

    cfg = validate_config(vision_config_dict(tmp_path, train={"packed_sequences": True}))
    with pytest.raises(ConfigError, match=r"^train\.packed_sequences: .*domain 'llm'.*not domain 'vision'"):
        recipe.load_model(cfg)
    check_attention(validate_config(tiny_config_dict(tmp_path, train={"packed_sequences": True})))  # llm: fine


def _diffusion_cfg(tmp_path, **over):
    from tests.diffusion_rl.test_diffusion_loop import config_dict

    return validate_config(config_dict(tmp_path, **over))


def test_diffusion_recipe_checks_attention_before_loading(tmp_path, monkeypatch):
    from diffusion_rl import recipe

    _no_backends(monkeypatch)
    monkeypatch.setattr(recipe, "load_pipeline", lambda *a: pytest.fail("pipeline loaded before the check"))
    for backend, msg in [("xformers", "is unavailable"), ("flash_attention_2", "is for transformers models")]:
        cfg = _diffusion_cfg(tmp_path, model={"attention": backend})
        with pytest.raises(ConfigError, match=rf"^model\.attention: '{backend}' {msg}"):
            recipe.build(cfg, accelerator=None)


@pytest.fixture(scope="module")
def unet():
    from diffusion_rl.embedded import build_unet

    return build_unet(4, cross_attention_dim=16, channels=(16, 32))


def test_set_unet_attention(unet, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    set_unet_attention(unet, "sdpa")  # diffusers' default stays
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    set_unet_attention(unet, "eager")
    assert unet.attn_processors and all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())

    _no_backends(monkeypatch)
    with pytest.raises(ConfigError, match=r"^model\.attention: 'xformers' is unavailable"):
        set_unet_attention(unet, "xformers")
    calls = []
    monkeypatch.setattr(attention, "_installed", EVERYTHING)
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", lambda: calls.append("xformers"))
    set_unet_attention(unet, "xformers")
    assert calls == ["xformers"]


def test_triton_logprob_backend_needs_cuda(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: False)
    cfg = validate_config(tiny_config_dict(tmp_path, model={"name_or_path": "embedded", "logprob_backend": "triton"}), "t")
    with pytest.raises(ConfigError, match=r"^model.logprob_backend: 'triton' is unavailable: no CUDA GPU is visible"):
        check_attention(cfg)
    check_attention(validate_config(tiny_config_dict(tmp_path, model={"logprob_backend": "auto"}), "t"))  # falls back


def test_logprob_backend_reaches_the_policy(tmp_path):
    from accelerate import Accelerator

    from shared.recipe import build_components

    cfg = validate_config(tiny_config_dict(tmp_path, model={"logprob_backend": "auto"}), "t")
    assert build_components(cfg, Accelerator(cpu=True)).policy.module.logprob_backend == "auto"
