"""`model.attention` (and `train.packed_sequences`, which changes how attention is masked, and
`model.logprob_backend`): checked when a
recipe builds its model, so an unusable choice fails at once with one line naming the key, instead of
deep inside transformers or diffusers at the first forward pass.

Backends per domain:

| domain      | sdpa                        | eager                    | flash_attention_2         | xformers                |
|-------------|-----------------------------|--------------------------|---------------------------|-------------------------|
| llm, vision | transformers' default       | plain matmul + softmax   | flash_attn package + CUDA | no (diffusers only)     |
| diffusion   | diffusers' AttnProcessor2_0 | diffusers' AttnProcessor | no (transformers only)    | xformers package + CUDA |

Packed sequences (llm_rl/packing.py) exist for the text-only LM forward: domain 'llm'.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from shared.config import ConfigError

# backend -> (python package it needs, pip name), for the ones that need more than torch
_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"), "xformers": ("xformers", "xformers")}
_DOMAIN_BACKENDS = {
    "llm": ("sdpa", "eager", "flash_attention_2"),
    "vision": ("sdpa", "eager", "flash_attention_2"),
    "diffusion": ("sdpa", "eager", "xformers"),
}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def attention_problem(attention: str, domain: str, installed: Callable[[str], bool] | None = None,
                      cuda: bool | None = None) -> str | None:
    """Why backend `attention` cannot run for `domain` here (one line, naming model.attention), or None.

    `installed(package)` and `cuda` describe the machine; they default to the real one."""
    allowed = _DOMAIN_BACKENDS[domain]
    if attention not in allowed:
        where = "diffusers UNets (domain 'diffusion')" if attention == "xformers" else "transformers models (llm, vision)"
        return (f"model.attention: {attention!r} is for {where}, not domain {domain!r}; "
                f"choose one of {', '.join(allowed)}")
    if attention not in _PACKAGES:
        return None
    package, pip_name = _PACKAGES[attention]
    installed = _installed if installed is None else installed
    cuda = torch.cuda.is_available() if cuda is None else cuda
    missing = ([f"the {package} package is not installed (pip install {pip_name})"] if not installed(package) else []) \
        + ([] if cuda else ["no CUDA GPU is visible"])
    if missing:
        return f"model.attention: {attention!r} is unavailable: {' and '.join(missing)}; use 'sdpa'"
    return None


def check_attention(cfg) -> None:
    """ConfigError (one line) when `cfg`'s model.attention cannot run for its domain on this machine, or
    train.packed_sequences / train.shared_prompt is set outside domain 'llm'. Recipes call it before loading
    the model."""
    problem = attention_problem(cfg.model.attention, cfg.domain)
    if problem:
        raise ConfigError(problem)
    if cfg.domain != "diffusion" and cfg.model.logprob_backend == "triton":
        from shared.logprobs import triton_unavailable

        if (why := triton_unavailable(torch.cuda.is_available())) is not None:
            raise ConfigError(f"model.logprob_backend: 'triton' is unavailable: {why}; use 'chunked' or 'auto'")
    if cfg.train.packed_sequences and cfg.domain != "llm":
        raise ConfigError(f"train.packed_sequences: packing applies to text-only language models (domain 'llm'), "
                          f"not domain {cfg.domain!r}; set it to false")
    if cfg.train.shared_prompt and cfg.domain != "llm":
        raise ConfigError(f"train.shared_prompt: the shared-prompt forward applies to text-only language models "
                          f"(domain 'llm'), not domain {cfg.domain!r}; set it to false")


def set_unet_attention(unet, attention: str) -> None:
    """Apply model.attention to a diffusers UNet: sdpa keeps diffusers' default processor (AttnProcessor2_0),
    eager installs the plain AttnProcessor, xformers enables the memory-efficient kernel."""
    problem = attention_problem(attention, "diffusion")
    if problem:
        raise ConfigError(problem)
    if attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    elif attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
