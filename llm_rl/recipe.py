"""Builds the text-RL components from a config: task, model + tokenizer, warm-up, LoRA, rewards."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_rl.policy import CausalLMPolicy
from llm_rl.tasks.arithmetic import ArithmeticTask, ArithmeticTaskConfig, build_model, build_tokenizer
from llm_rl.tasks.jsonl import JsonlTask, JsonlTaskConfig
from shared.attention import check_attention
from shared.config import ConfigError, RunConfig
from shared.recipe import DTYPES, Components, combined_reward, enable_activation_checkpointing, warm_start


def make_task(cfg: RunConfig):
    tcfg = cfg.task_config()
    if isinstance(tcfg, ArithmeticTaskConfig):
        return ArithmeticTask(tcfg)
    if isinstance(tcfg, JsonlTaskConfig):
        return JsonlTask(tcfg)
    raise ConfigError(f"task.name: {cfg.task['name']!r} is not a text task")


def load_model(cfg: RunConfig):
    """(model, tokenizer): the task's embedded tiny model, or a checkpoint by local path / hub id."""
    m = cfg.model
    check_attention(cfg)
    if m.name_or_path == "embedded":
        tcfg = cfg.task_config()
        if not isinstance(tcfg, ArithmeticTaskConfig):
            raise ConfigError("model.name_or_path: 'embedded' is only defined for task 'arithmetic'; give a path or hub id")
        tok = build_tokenizer()
        model = build_model(tcfg, tok)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=DTYPES[m.dtype], attn_implementation=m.attention,
                                                         trust_remote_code=m.trust_remote_code)
        except OSError as e:
            raise ConfigError(f"model.name_or_path: cannot load {m.name_or_path!r}: {str(e).splitlines()[0]}") from None
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    model.config.use_cache = True
    if m.attention != "sdpa" and m.name_or_path == "embedded":
        model.set_attn_implementation(m.attention)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model.to(DTYPES[m.dtype]), tok


def make_policy(model, tok, cfg: RunConfig) -> CausalLMPolicy:
    tcfg = cfg.task_config()
    return CausalLMPolicy(
        model, tok, temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens, chunk_size=cfg.model.logprob_chunk_size,
        use_chat_template=getattr(tcfg, "use_chat_template", False), system_prompt=getattr(tcfg, "system_prompt", None),
        packed_sequences=cfg.train.packed_sequences, logprob_backend=cfg.model.logprob_backend,
        shared_prompt=cfg.train.shared_prompt,
    )


def apply_lora(model, cfg: RunConfig):
    from peft import LoraConfig, get_peft_model

    lc = cfg.model.lora
    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=lc.target_modules, task_type="CAUSAL_LM"))


def build(cfg: RunConfig, accelerator) -> Components:
    if cfg.rollout.backend == "vllm":  # fail before loading anything when vllm or a GPU is missing
        from llm_rl.vllm_rollout import require_vllm

        require_vllm(accelerator.num_processes)
    task = make_task(cfg)
    model, tok = load_model(cfg)
    model.to(accelerator.device)
    info: dict = {}
    if cfg.warmup.enabled:
        info["warmup"] = warm_start(cfg, accelerator, model, lambda m: make_policy(m, tok, cfg), task)
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg)
    if cfg.rollout.agents == 2:  # CORY: the warm start and a copy of it as the two agents
        from llm_rl.cory import CoryPolicy

        policy = CoryPolicy.from_model(model, lambda m: make_policy(m, tok, cfg), cfg.algorithm.cory_role_exchange_steps)
        return Components(policy=policy, task=task, reward=combined_reward(cfg), info=info)
    policy = make_policy(model, tok, cfg)
    if cfg.rollout.backend == "vllm":  # rollouts from a vLLM engine that receives the policy's weights
        from llm_rl.vllm_rollout import VLLMGenerator

        policy.generator = VLLMGenerator.from_config(cfg, model, tok)
    return Components(policy=policy, task=task, reward=combined_reward(cfg), info=info)
