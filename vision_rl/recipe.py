"""Builds the vision-RL components from a config: task, VLM + processor, coordinates, warm-up, LoRA, rewards.

`model.name_or_path: embedded` builds the tiny Qwen2-VL (or Qwen2.5-VL) of vision_rl.embedded; any
other value is a local path or hub id loaded with `AutoModelForImageTextToText` and `AutoProcessor`.
The box convention comes from the model type (`vision_rl.coords.convention_for`) unless
`task.box_convention` names one.
"""

from __future__ import annotations

from transformers import AutoModelForImageTextToText, AutoProcessor

import llm_rl.rewards  # noqa: F401  (registers the text rewards used by vision recipes: format, ...)
import vision_rl.charts.rewards  # noqa: F401  (registers chart_exec / chart_text / chart_visual)
import vision_rl.rewards  # noqa: F401  (registers detection / grounding / classification rewards)
from shared.attention import check_attention
from shared.config import ConfigError, RunConfig
from shared.recipe import DTYPES, Components, combined_reward, enable_activation_checkpointing, warm_start
from vision_rl.coords import BoxCoder, convention_for
from vision_rl.embedded import build_model, build_processor, build_tokenizer
from vision_rl.policy import VLMPolicy
from vision_rl.tasks.files import FILE_TASKS, make_file_task
from vision_rl.tasks.charts import ChartsTask, ChartsTaskConfig
from vision_rl.tasks.common import EmbeddedVLMConfig
from vision_rl.tasks.shapes import ShapesTask, ShapesTaskConfig


def load_model(cfg: RunConfig):
    """(model, processor): the embedded tiny VLM, or a checkpoint by local path / hub id."""
    m, t = cfg.model, cfg.task_config()
    check_attention(cfg)
    if m.name_or_path == "embedded":
        if not isinstance(t, EmbeddedVLMConfig):
            raise ConfigError(f"model.name_or_path: 'embedded' is only defined for the synthetic tasks (shapes, charts), "
                              f"not {t.name!r}; give a path or hub id")
        tok = build_tokenizer(*t.embedded_corpus())
        processor = build_processor(tok, t.family, t.min_pixels, t.max_pixels)
        model = build_model(tok, t.family, t.hidden_size, t.num_layers, t.num_heads, t.vision_depth, t.vision_dim)
        if m.attention != "sdpa":
            model.set_attn_implementation(m.attention)
    else:
        try:
            processor = AutoProcessor.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                m.name_or_path, dtype=DTYPES[m.dtype], attn_implementation=m.attention,
                trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.name_or_path: cannot load {m.name_or_path!r}: {str(e).splitlines()[0]}") from None
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if m.freeze_vision is True:  # 'rl': trained by the warm-up, frozen once RL starts (build)
        freeze_vision_tower(model)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model.to(DTYPES[m.dtype]), processor


def freeze_vision_tower(model) -> None:
    hf = model.model if hasattr(model, "model") else model
    hf.visual.requires_grad_(False)


def box_coder(cfg: RunConfig, model) -> BoxCoder:
    t = cfg.task_config()
    try:
        convention = t.box_convention if t.box_convention != "auto" else convention_for(model.config.model_type)
    except ValueError as e:
        raise ConfigError(f"task.box_convention: {e}") from None
    return BoxCoder(convention, t.min_pixels, t.max_pixels)


def make_task(cfg: RunConfig, coder: BoxCoder):
    t = cfg.task_config()
    try:
        if isinstance(t, ShapesTaskConfig):
            return ShapesTask(t, coder)
        if isinstance(t, ChartsTaskConfig):
            return ChartsTask(t)
        if isinstance(t, FILE_TASKS):
            return make_file_task(t, coder)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"task: {e}") from None
    raise ConfigError(f"task.name: {cfg.task['name']!r} is not a vision task")


def make_policy(model, processor, cfg: RunConfig) -> VLMPolicy:
    t, r = cfg.task_config(), cfg.rollout
    return VLMPolicy(model, processor, min_pixels=t.min_pixels, max_pixels=t.max_pixels,
                     max_prompt_length=t.max_prompt_length, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                     max_new_tokens=r.max_new_tokens, chunk_size=cfg.model.logprob_chunk_size,
                     logprob_backend=cfg.model.logprob_backend)


def apply_lora(model, cfg: RunConfig):
    """LoRA on the language model's linear layers (and the vision tower's only when it is trained)."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.model.lora
    # vision blocks reuse names like up_proj, and "all-linear" would reach them too
    exclude = r".*\bvisual\b.*" if cfg.model.freeze_vision else None  # True or 'rl': not trained in RL
    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=lc.target_modules, exclude_modules=exclude,
                                            task_type="CAUSAL_LM"))


def build(cfg: RunConfig, accelerator) -> Components:
    model, processor = load_model(cfg)
    coder = box_coder(cfg, model)
    task = make_task(cfg, coder)
    model.to(accelerator.device)
    info: dict = {"box_convention": coder.convention}
    if cfg.warmup.enabled:
        info["warmup"] = warm_start(cfg, accelerator, model, lambda m: make_policy(m, processor, cfg), task)
    if cfg.model.freeze_vision == "rl":
        freeze_vision_tower(model)
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg)
    return Components(policy=make_policy(model, processor, cfg), task=task, reward=combined_reward(cfg), info=info)
