"""Typed, strict run configuration.

A run is described by one YAML file validated against the pydantic models below. A file may name
a base with ``extends: <path relative to the file>``; mappings merge key by key, the child winning.
Command-line overrides ``key.sub=value`` (value parsed as YAML) apply last.

Every error is a :class:`ConfigError` whose message is one line naming the file, the dotted key
and, for a misspelt key, the closest valid one. The CLI prints it and exits with code 2.

Task sections differ per task, so ``task`` is validated against the schema its ``name`` registers
in :data:`TASK_SCHEMAS` (domain packages register theirs on import).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.config_files import (  # noqa: F401 (re-exported)
    ConfigError,
    _read_yaml,
    _suggest,
    apply_overrides,
    parse_override,
    yaml_load,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Sections shared by every domain
# --------------------------------------------------------------------------------------------


class LoraConfig(Strict):
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names (or 'all-linear') that receive adapters",
    )


class ModelConfig(Strict):
    name_or_path: str = Field(
        "embedded",
        description="local path or hub id of a checkpoint; 'embedded' builds the task's tiny model in-process",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weight dtype at load time")
    attention: Literal["sdpa", "eager", "flash_attention_2", "xformers"] = Field(
        "sdpa", description="attention implementation: transformers' sdpa / eager / flash_attention_2 (flash_attn "
        "package + CUDA) for LM/VLM; sdpa / eager / xformers (xformers package + CUDA) for diffusion UNets; "
        "checked when the model is built (shared/attention.py)"
    )
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter instead of all weights")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    logprob_chunk_size: int = Field(
        1024, gt=0, description="completion tokens (LM/VLM) or denoising transitions (diffusion) per chunk when "
        "computing log-probs"
    )
    logprob_backend: Literal["chunked", "triton", "auto"] = Field(
        "chunked", description="LM/VLM per-token log-probs (shared/logprobs.py): chunked PyTorch, the fused Triton "
        "kernel (CUDA; checked against the reference in Triton's CPU interpreter, not yet on a GPU by this project), "
        "or auto (triton on CUDA when it imports)")
    trust_remote_code: bool = False
    freeze_vision: bool | Literal["rl"] = Field(
        True, description="vision-language models: keep the vision tower frozen (LoRA, if any, goes on the language "
        "model only); 'rl': the SFT warm-up trains it, RL keeps it frozen")

    @field_validator("freeze_vision", mode="before")
    @classmethod
    def _freeze_vision_value(cls, v: object) -> object:
        if isinstance(v, bool) or v == "rl":
            return v
        raise ValueError("expected true, false or 'rl'")


class WarmupConfig(Strict):
    """Supervised warm-up (SFT) of the initial policy before RL, cached by content hash."""

    enabled: bool = Field(False, description="run the SFT warm-up before RL")
    max_steps: int = Field(2000, ge=0, description="upper bound on SFT optimizer steps")
    batch_size: int = Field(64, gt=0, description="demonstrations per SFT step")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["constant", "cosine"] = Field("cosine", description="LR decay over max_steps after warm-up")
    eval_every: int = Field(100, gt=0, description="steps between held-out evaluations")
    patience: int = Field(4, gt=0, description="stop after this many evaluations without improvement, counted once "
                          "validation has improved on the starting model's score")
    cache_dir: str = Field("runs/.cache/sft", description="where warm-started weights are cached")


class VLLMConfig(Strict):
    """Engine settings of rollout.backend 'vllm' (llm_rl/vllm_rollout.py); unused by the hf backend."""

    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="share of the GPU's memory the engine may take for its weights and KV cache "
        "(the trained model, its gradients and optimizer state share the same GPU)")
    max_model_len: int | None = Field(
        None, gt=0, description="longest prompt + completion the engine schedules; null: the model's context length")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="engine weight dtype; auto: train.mixed_precision's (bf16 / fp16) if set, else model.dtype")
    enforce_eager: bool = Field(False, description="no CUDA graphs (less memory and start-up time, slower decoding)")
    enable_prefix_caching: bool = Field(True, description="reuse a prompt's KV cache across its samples (dropped "
                                        "after every weight push)")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="further keyword arguments of vllm.LLM, passed as given")


class RolloutConfig(Strict):
    prompts_per_step: int = Field(16, gt=0, description="prompts per RL step, all processes together")
    samples_per_prompt: int = Field(8, gt=0, description="completions per prompt (the group size G)")
    max_new_tokens: int = Field(64, gt=0, description="completion length limit in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs use the same")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="generation backend: hf (transformers generate with counter-based sampling, everywhere) or "
        "vllm (a vLLM engine on the GPU, domain llm, one process: llm_rl/vllm_rollout.py; pip install vllm)")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="engine settings of backend 'vllm'")
    target_entropy: float | None = Field(
        None, gt=0, description="AceReason: before RL, set the temperature to the candidate whose mean token entropy "
        "on a probe batch of train prompts is closest to this (paper: 0.3); null keeps `temperature`")
    temperature_candidates: list[float] = Field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2, 1.4],
                                                description="AceReason: temperatures the probe tries")
    probe_prompts: int = Field(32, gt=0, description="AceReason: train prompts in the probe batch")
    source: Literal["online", "offline"] = Field(
        "online", description="online: sample completions; offline: train on the completions the train rows carry "
        "(preference pairs, demonstrations, scored outputs: formats in shared/offline.py)")
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop groups whose rewards are all equal and refill with new prompts")
    max_gen_batches: int = Field(
        10, gt=0, description="DAPO max_num_gen_batches: prompt batches drawn per step before giving up refilling")
    attempts: Literal[1, 2] = Field(
        1, description="2: every answer gets a second attempt from `revision_template` (SCoRe, shared/attempts.py)")
    revision_template: str = Field(
        "{prompt}{completion}\nThere might be an error in the solution above. Correct it.\n{prompt}",
        description="second-attempt prompt, with {prompt} and {completion} (the first answer) filled in")
    agents: Literal[1, 2] = Field(
        1, description="2: CORY, two copies of the model: the second attempt is the other copy's (the observer's) "
        "answer after the pioneer's, and every sample gets the collective reward r1 + r2 (llm_rl/cory.py); needs "
        "attempts 2")
    replay_buffer: int = Field(
        0, ge=0, description="DOTS rollout replay: groups kept for replay (newest copy of each prompt, FIFO); 0 disables")
    replay_fresh_frac: float = Field(
        0.5, gt=0, le=1, description="DOTS rollout replay: share of each step's prompts sampled fresh (sigma); the rest "
        "are groups replayed from the buffer, trained with the behaviour-corrected clipped loss")
    prefill: Literal["none", "flawed"] = Field(
        "none", description="flawed (Mixed-CoT-RL): a share `prefill_frac` of the train prompts start their response "
        "with the task's reasoning steps carrying one injected error (task.flawed_prefix); the model continues them "
        "and is rewarded on its final answer (shared/prefill.py)")
    prefill_frac: float = Field(0.5, ge=0, le=1, description="Mixed-CoT-RL: share of train prompts given a flawed prefix")
    prefill_errors: list[Literal["calculation", "reasoning"]] = Field(
        default_factory=lambda: ["calculation", "reasoning"], min_length=1,
        description="Mixed-CoT-RL: error kinds injected, drawn uniformly per prompt")


class AlgorithmConfig(Strict):
    """The policy-gradient family of METHODS.md part A; every default is stated here."""

    objective: str = Field("ppo_clip", description="objective name in shared.objectives.OBJECTIVES")
    advantage: Literal["grpo", "dr_grpo", "batch_std", "rloo", "per_prompt_tracker", "none", "remax", "alol",
                       "expert_iteration", "raft", "per_step", "mrt"] = Field(
        "grpo", description="advantage estimator (table in shared/advantages.py)"
    )
    adv_eps: float = Field(1e-6, ge=0, description="added to the std in std-normalised advantages")
    adv_clip: float | None = Field(None, gt=0, description="clamp advantages to [-adv_clip, adv_clip] (DDPO: 5)")
    tracker_buffer: int = Field(32, gt=0, description="per_prompt_tracker: rewards kept per prompt (DDPO: 16-32)")
    tracker_min_count: int = Field(16, gt=0, description="per_prompt_tracker: below this many rewards for a prompt, "
                                   "use the statistics of the whole batch")
    prdp_eps: float = Field(1e-4, gt=0, description="PRDP proximal clip: each step's log-ratio stays within "
                            "+-prdp_eps of the sampling policy's")
    beta: float = Field(0.0, ge=0, description="KL coefficient; 0 disables the reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator")
    kl_placement: Literal["loss", "reward"] = Field("loss", description="KL in the loss or subtracted from the reward")
    kl_clamp: float = Field(10.0, gt=0, description="clamp of the log-ratio inside the KL estimator")
    eps_low: float = Field(0.2, ge=0, description="PPO clip range below 1")
    eps_high: float = Field(0.2, ge=0, description="PPO clip range above 1 (DAPO clip-higher: 0.28)")
    dual_clip: float | None = Field(None, gt=1, description="dual-clip constant c for A<0 (3.0 in the paper)")
    ratio_level: Literal["token", "sequence"] = Field("token", description="'sequence' is GSPO")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="loss aggregation (table in shared/aggregation.py)"
    )
    loss_agg_norm_len: int | None = Field(
        None, gt=0, description="L_const of seq_mean_token_sum_norm; defaults to rollout.max_new_tokens"
    )
    epochs: int = Field(1, gt=0, description="passes over each rollout batch (PPO epochs, mu)")
    # objectives of the seed papers (llm_rl/objectives.py); each default is the authors'
    positive_threshold: float = Field(0.5, description="a sample is correct/verified when its reward exceeds this "
                                      "(nft, expert_iteration)")
    nft_clamp: float = Field(1.0, gt=0, description="NFT straight-through clamp eps of the negative likelihood ratio")
    nft_weighting: Literal["one_minus_rhat", "std"] = Field(
        "one_minus_rhat", description="NFT question weight: 1 - r̂ (normalize=1) or sqrt((1 - r̂) / r̂) (normalize=2)")
    pref_loss: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="dpo/modpo pair loss (sigmoid = DPO)")
    modpo_weight: float = Field(0.5, gt=0, le=1, description="MODPO: weight w of the preference objective; "
                                "the margin reward is weighted by 1 - w")
    alol_variant: Literal["seq", "token", "kl", "ref_free"] = Field("seq", description="A-LoL variant")
    alol_clip: float = Field(0.9, gt=0, lt=1, description="A-LoL importance-weight clip: ratio in [1 - c, 1 + c]")
    value_epochs: int = Field(10, gt=0, description="A-LoL value head: epochs on the reference's greedy outputs")
    value_lr: float = Field(1e-5, gt=0, description="A-LoL value head learning rate")
    ift_lambda: float = Field(0.2, ge=0, le=1, description="IFT temporal residual: weight of the predicted token")
    ift_gamma: float = Field(0.95, gt=0, le=1, description="IFT relation-propagation discount")
    score_stage1_steps: int = Field(0, ge=0, description="SCoRe (rollout.attempts 2): RL steps of stage I (reward on "
                                    "the second attempt, KL first_attempt_beta on the first); stage II after")
    first_attempt_beta: float = Field(0.1, ge=0, description="SCoRe stage I: KL coefficient on the first attempt")
    cory_role_exchange_steps: int = Field(
        10, gt=0, description="CORY (rollout.agents 2): RL steps between swaps of the pioneer and observer roles (T_REx; "
        "the paper's value was not retrieved, 10 is our choice)")
    correction_bonus: float = Field(10.0, ge=0, description="SCoRe stage II: alpha of the second attempt's bonus "
                                    "alpha * (r2 - r1)")
    step_rollouts: int = Field(4, gt=0, description="per_step: sampled continuations per step of an incorrect answer")
    step_delimiter: str = Field("\n", description="per_step: a step ends at a token containing this text "
                                "('' = every token is a step); mrt: the text that ends an episode")
    mrt_answers: int = Field(4, gt=0, description="mrt: answers the meta-prover samples after a prefix (its termination "
                             "value J is their mean reward)")
    mrt_termination: str = Field("", description="mrt: text appended to a prefix to force the final answer (reasoning "
                                 "models: e.g. '\\nTime is up. Final answer: ')")
    mrt_answer_suppress: list[str] = Field(default_factory=list, description="mrt: a forced answer never emits a token "
                                           "containing one of these texts (e.g. the step syntax)")
    mrt_answer_tokens: int = Field(16, gt=0, description="mrt: token limit of a forced answer")
    mrt_progress_coef: float = Field(1.0, ge=0, description="mrt: alpha of the progress bonus of a rollout's first "
                                     "episode (0: the termination-baseline advantage alone); not retrieved from the paper")


class SamplerConfig(Strict):
    """How RL prompts are drawn from the train split (shared/sampler.py)."""

    name: Literal["uniform", "sec", "mixture", "dots"] = Field(
        "uniform", description="uniform epochs, the SEC curriculum bandit, fixed dataset mixture weights (MoDoMoDo), "
        "or DOTS adaptive-difficulty selection")
    category_field: str = Field("category", description="SEC: the row field naming each prompt's arm")
    tau: float = Field(1.0, gt=0, description="SEC: Boltzmann temperature over arm values")
    alpha: float = Field(0.5, gt=0, le=1, description="SEC: TD(0) step size")
    source_field: str = Field("source", description="mixture: the row field naming each prompt's dataset")
    weights: dict[str, float] = Field(default_factory=dict, description="mixture: dataset -> weight (normalised by "
                                      "the sum; datasets not named get 0)")
    dots_every: int = Field(2, gt=0, description="DOTS: RL steps between difficulty re-estimations (mu)")
    dots_reference: int = Field(256, gt=0, description="DOTS: reference prompts rolled out at each re-estimation")
    dots_rollouts: int = Field(8, gt=0, description="DOTS: samples per reference prompt (its pass rate)")
    dots_target: float = Field(0.5, ge=0, le=1, description="DOTS: the pass rate selection aims at (alpha)")
    dots_select_tau: float = Field(1e-3, gt=0, description="DOTS: selection temperature of softmax(-|p - target| / tau)")
    dots_attention_tau: float = Field(0.01, gt=0, description="DOTS: temperature of the attention over reference "
                                      "prompts (cosine similarity of embeddings)")
    dots_pass_threshold: float = Field(0.5, description="DOTS: a sample passes when its reward exceeds this")
    dots_encoder: str = Field("policy", description="DOTS: prompt embeddings from the initial policy ('policy') or a "
                              "local path / hub id of an encoder")
    dots_pooling: Literal["last", "mean"] = Field(
        "last", description="DOTS: a prompt's embedding is the last hidden state of its last token (what a causal "
        "LM is about to answer from) or the mean over its tokens (the paper's encoder pooling)")


class HybridConfig(Strict):
    """SFT steps interleaved with RL on the questions no sample solved (shared/hybrids.py)."""

    name: Literal["none", "relift", "regft", "int"] = Field(
        "none", description="relift: SFT on the stored demonstrations of hard questions (ReLIFT); regft: on the "
        "policy's own solutions written from a partial reference solution (ReGFT); int: on its failed attempt "
        "re-written from the first wrong step (InT)")
    sft_batch: int = Field(128, gt=0, description="hard questions per SFT step (ReLIFT: 128); the step runs once the "
                           "buffer holds this many, on the newest")
    sft_lr: float = Field(1e-6, gt=0, description="learning rate of the SFT step's own AdamW (ReLIFT: 1e-6)")
    buffer_size: int = Field(1024, gt=0, description="hard questions kept (newest)")
    hint_frac: float = Field(0.5, gt=0, lt=1, description="regft: share of the reference solution given as the start "
                             "of the answer")
    hint_samples: int = Field(4, gt=0, description="regft / int: continuations sampled per hard question")
    questions: Literal["hard", "failed"] = Field(
        "hard", description="which questions enter the buffer: hard (no sample solved it: ReLIFT) or failed (at "
        "least one sample failed; InT repairs a failed attempt of any question)")


class OptimConfig(Strict):
    name: Literal["adamw", "lift"] = Field("adamw", description="adamw, or LIFT: AdamW on the principal weights only "
                                           "(shared/analysis/lift.py)")
    lift_filter_rank: int = Field(32, gt=0, description="LIFT: rank of the approximation whose largest entries are trained")
    lift_lora_rank: int = Field(128, gt=0, description="LIFT: (m + n) * lora_rank entries per matrix, LoRA's budget")
    lift_update_interval: int = Field(200, gt=0, description="LIFT: optimizer steps between mask recomputations")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear LR warm-up")
    max_grad_norm: float | None = Field(1.0, gt=0, description="global gradient-norm clip; null disables")


class TrainConfig(Strict):
    steps: int = Field(100, gt=0, description="RL steps (rollouts); each gives one or more optimizer steps")
    micro_batch_size: int = Field(8, gt=0, description="sequences per device per forward pass")
    grad_accum_steps: int = Field(1, gt=0, description="micro-batches per device per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    packed_sequences: bool = Field(
        False, description="text LMs: run the training forward on the real tokens of a micro-batch packed into one "
        "row, without padding (llm_rl/packing.py); domain 'llm' only")
    shared_prompt: bool = Field(
        False, description="text LMs: run each distinct prompt of a micro-batch once in the training forward and its "
        "G completions against its KV cache (llm_rl/shared_prompt.py); domain 'llm' only, not with packed_sequences")

    @model_validator(mode="after")
    def _one_forward_layout(self) -> "TrainConfig":
        if self.shared_prompt and self.packed_sequences:
            raise ValueError("train.shared_prompt and train.packed_sequences are exclusive; set one of them to false")
        return self


class RewardSpec(Strict):
    name: str = Field(description="reward name in the domain's reward registry")
    weight: float = 1.0
    failure_value: float = Field(0.0, description="score for outputs the reward cannot evaluate")
    start_step: int = Field(0, ge=0, description="RL step from which the reward counts in the total (a curriculum, "
                            "e.g. MSRL's stage 2); before it the reward is still scored and logged, with weight 0. "
                            "Held-out evaluation always uses the full weights")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="arguments of the reward factory")
    sources: list[str] | None = Field(None, description="score only rows of these datasets (the row field "
                                      "sampler.source_field); other rows get 0 from this reward")


class EvalConfig(Strict):
    every: int = Field(0, ge=0, description="RL steps between held-out evaluations; 0: only before and after")
    max_prompts: int = Field(256, gt=0, description="held-out prompts evaluated")
    batch_size: int = Field(64, gt=0)
    extra_splits: list[str] = Field(default_factory=list, description="also evaluate these task splits (metrics "
                                    "'<split>/<name>'), e.g. the arithmetic scratchpad's eval_flawed")


class CheckpointConfig(Strict):
    every: int = Field(0, ge=0, description="RL steps between checkpoints; 0: only the final one")
    keep_last: int = Field(2, gt=0)
    resume: bool = Field(False, description="continue from the newest checkpoint in the run directory")


class LoggingConfig(Strict):
    every: int = Field(1, gt=0, description="RL steps between metric lines (evaluation steps are always logged)")
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True


class RunConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[^/\\]+$", description="run name: outputs go to <output_dir>/<name>/")
    domain: Literal["llm", "vision", "diffusion"]
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: dict[str, Any] = Field(description="task section, validated by the task's own schema")
    rewards: list[RewardSpec] = Field(default_factory=list)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _objective_known(self) -> "RunConfig":
        from shared.objectives import OBJECTIVES

        if self.algorithm.objective not in OBJECTIVES:
            raise ValueError(
                f"algorithm.objective: unknown objective {self.algorithm.objective!r}"
                + _suggest(self.algorithm.objective, OBJECTIVES)
            )
        return self

    @model_validator(mode="after")
    def _agents_compatible(self) -> "RunConfig":
        r, a = self.rollout, self.algorithm
        if r.agents == 2:  # CORY (llm_rl/cory.py): the observer's answer is the second attempt
            if r.attempts != 2:
                raise ValueError("rollout.agents: CORY's two agents need rollout.attempts: 2 (the observer answers second)")
            if self.domain != "llm":
                raise ValueError(f"rollout.agents: CORY's two agents are implemented for domain 'llm', not {self.domain!r}")
            if r.source != "online" or r.dynamic_sampling or r.replay_buffer or self.hybrid.name != "none":
                raise ValueError("rollout.agents: CORY needs online sampling without dynamic_sampling, replay or hybrid SFT")
            if self.model.lora is not None or r.target_entropy is not None or self.sampler.name == "dots":
                raise ValueError("rollout.agents: CORY trains two full copies: model.lora, rollout.target_entropy and "
                                 "sampler 'dots' are not supported with it")
            if a.score_stage1_steps:
                raise ValueError("algorithm.score_stage1_steps: SCoRe's stage I does not apply to CORY (rollout.agents 2); "
                                 "set it to 0")
        return self

    @model_validator(mode="after")
    def _attempts_compatible(self) -> "RunConfig":
        r = self.rollout
        if r.attempts > 1:
            if self.algorithm.objective != "ppo_clip":
                raise ValueError("rollout.attempts: two attempts are trained with objective ppo_clip (per-sample "
                                 f"weights and KL coefficients), not {self.algorithm.objective!r}")
            if r.source != "online" or r.dynamic_sampling or r.replay_buffer:
                raise ValueError("rollout.attempts: two attempts need online sampling without dynamic_sampling or replay")
            if self.algorithm.advantage not in ("grpo", "dr_grpo", "rloo", "batch_std"):
                raise ValueError("rollout.attempts: two attempts use a group-relative advantage (grpo, dr_grpo, rloo, "
                                 f"batch_std), not {self.algorithm.advantage!r}")
            if self.algorithm.kl_placement != "loss":
                raise ValueError("algorithm.kl_placement: two attempts put their per-attempt KL in the loss")
            if "{prompt}" not in r.revision_template or "{completion}" not in r.revision_template:
                raise ValueError("rollout.revision_template: must contain {prompt} and {completion}")
        return self

    @model_validator(mode="after")
    def _prefills_compatible(self) -> "RunConfig":
        r, a = self.rollout, self.algorithm
        if (r.prefill != "none" or a.advantage == "mrt") and self.domain != "llm":
            raise ValueError("rollout.prefill / advantage mrt: response prefixes are text (domain llm), "
                             f"not {self.domain!r}")
        if a.advantage == "mrt" and (r.source != "online" or r.attempts > 1 or r.replay_buffer or r.prefill != "none"):
            raise ValueError("algorithm.advantage mrt: continues its own prefixes online; not with offline data, "
                             "two attempts, replay or rollout.prefill")
        if a.advantage == "mrt" and not a.step_delimiter:
            raise ValueError("algorithm.step_delimiter: mrt splits traces into episodes at this text; it cannot be empty")
        return self

    @model_validator(mode="after")
    def _hybrid_batch(self) -> "RunConfig":
        if self.hybrid.name != "none" and (self.rollout.source != "online" or self.rollout.attempts > 1):
            raise ValueError("hybrid.name: interleaved SFT on hard questions needs online sampling of one attempt")
        return self

    @model_validator(mode="after")
    def _shared_prompt_cache(self) -> "RunConfig":
        if self.train.shared_prompt and self.model.gradient_checkpointing:
            raise ValueError("train.shared_prompt: activation checkpointing (model.gradient_checkpointing) drops the "
                             "prompt's KV cache; set one of them to false")
        return self

    @model_validator(mode="after")
    def _replay_compatible(self) -> "RunConfig":
        r = self.rollout
        if r.replay_buffer:
            if self.algorithm.objective != "ppo_clip":
                raise ValueError("rollout.replay_buffer: replayed groups need the behaviour-corrected clipped loss of "
                                 f"objective ppo_clip, not {self.algorithm.objective!r}")
            if r.source != "online" or r.dynamic_sampling:
                raise ValueError("rollout.replay_buffer: replay works with online sampling without dynamic_sampling")
            if round(r.prompts_per_step * r.replay_fresh_frac) < 1:
                raise ValueError("rollout.replay_fresh_frac: fewer than one fresh prompt per step")
        return self

    @model_validator(mode="after")
    def _vllm_backend(self) -> "RunConfig":
        if self.rollout.backend == "vllm":
            if self.domain != "llm":
                raise ValueError(f"rollout.backend: 'vllm' generates text with a causal LM (domain llm); domain "
                                 f"{self.domain!r} uses rollout.backend=hf")
            if self.rollout.agents == 2:
                raise ValueError("rollout.backend: 'vllm' drives one model; CORY's two agents (rollout.agents 2) use "
                                 "rollout.backend=hf")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def norm_len(self) -> int:
        return self.algorithm.loss_agg_norm_len or self.rollout.max_new_tokens

    def task_config(self) -> BaseModel:
        """The task section as its registered schema (validated at load time)."""
        return TASK_SCHEMAS[self.task["name"]].model_validate(self.task)


# --------------------------------------------------------------------------------------------
# Batch geometry
# --------------------------------------------------------------------------------------------


def optimizer_steps_per_rollout(cfg: RunConfig, num_processes: int) -> int:
    """How many optimizer steps one rollout batch gives, or a ConfigError explaining the mismatch.

    A rollout holds prompts_per_step * samples_per_prompt sequences, split evenly over processes by
    prompt (groups never straddle processes). Each optimizer step consumes micro_batch_size *
    grad_accum_steps sequences per process.
    """
    r, t = cfg.rollout, cfg.train
    if r.prompts_per_step % num_processes:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} must be divisible by the number of processes "
            f"({num_processes}) so every process holds whole groups"
        )
    if cfg.hybrid.name != "none" and cfg.hybrid.sft_batch % num_processes:
        raise ConfigError(f"hybrid.sft_batch={cfg.hybrid.sft_batch} must be divisible by the number of processes "
                          f"({num_processes})")
    per_process = r.prompts_per_step // num_processes * r.samples_per_prompt * r.attempts
    per_step = t.micro_batch_size * t.grad_accum_steps
    if per_process % per_step:
        raise ConfigError(
            f"each process holds {per_process} sequences per rollout (prompts_per_step/processes * "
            f"samples_per_prompt * attempts) which is not a multiple of train.micro_batch_size * train.grad_accum_steps "
            f"= {per_step}; change one so the rollout splits into whole optimizer steps"
        )
    return per_process // per_step


# --------------------------------------------------------------------------------------------
# Task schemas (domain packages register theirs)
# --------------------------------------------------------------------------------------------

TASK_SCHEMAS: dict[str, type[BaseModel]] = {}


def register_task_schema(name: str):
    def deco(cls: type[BaseModel]) -> type[BaseModel]:
        TASK_SCHEMAS[name] = cls
        return cls

    return deco


def _load_domain_packages() -> None:
    # Importing a domain package registers its task schemas, rewards and objectives.
    import diffusion_rl  # noqa: F401
    import llm_rl  # noqa: F401
    import vision_rl  # noqa: F401


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _model_for_path(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for suggesting the closest key)."""
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into a list of sections: the element type is already resolved
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", (ann,))
        args = [x for a in args for x in (getattr(a, "__args__", None) or (a,))]  # list[Model] -> Model
        cands = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not cands:
            return None
        model = cands[0]
    return model


def _format_error(source: str, err: ValidationError, schema: type[BaseModel], prefix: str = "") -> ConfigError:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = prefix + ".".join(str(x) for x in loc)
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    if e["type"] == "extra_forbidden":
        owner = _model_for_path(schema, loc)
        hint = _suggest(loc[-1], owner.model_fields) if owner else ""
        return ConfigError(f"{source}: unknown key '{key}'{hint}{more}")
    if e["type"] == "missing":
        return ConfigError(f"{source}: missing required key '{key}'{more}")
    if e["type"] == "value_error" and not loc:  # a model-level check that names its own key
        return ConfigError(f"{source}: {e['msg'].removeprefix('Value error, ')}{more}")
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return ConfigError(f"{source}: '{key}': {msg}{got_s}{more}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, merge, override and validate a run config. Raises ConfigError (one line) on any problem."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path), overrides or [])  # file errors surface before heavy imports
    source = str(path) + (" (with overrides)" if overrides else "")
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    _load_domain_packages()
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise _format_error(source, err, RunConfig) from None
    name = cfg.task.get("name")
    if name is None:
        raise ConfigError(f"{source}: missing required key 'task.name'; known tasks: {', '.join(sorted(TASK_SCHEMAS))}")
    if name not in TASK_SCHEMAS:
        raise ConfigError(f"{source}: 'task.name': unknown task {name!r}{_suggest(name, TASK_SCHEMAS)}; "
                          f"known: {', '.join(sorted(TASK_SCHEMAS))}")
    try:
        task = TASK_SCHEMAS[name].model_validate(cfg.task)
    except ValidationError as err:
        raise _format_error(source, err, TASK_SCHEMAS[name], prefix="task.") from None
    cfg.task = task.model_dump()
    _check_consistency(cfg, source)
    return cfg


def _check_consistency(cfg: RunConfig, source: str) -> None:
    a, r = cfg.algorithm, cfg.rollout
    if a.advantage in ("grpo", "dr_grpo", "rloo") and r.samples_per_prompt < 2:
        raise ConfigError(
            f"{source}: algorithm.advantage={a.advantage!r} compares samples within a group, so "
            f"rollout.samples_per_prompt must be at least 2 (got {r.samples_per_prompt})"
        )
    from shared.objectives import OBJECTIVES

    objective = OBJECTIVES[a.objective]
    if getattr(objective, "needs_whole_groups", False) and cfg.train.micro_batch_size % r.samples_per_prompt:
        raise ConfigError(
            f"{source}: algorithm.objective={a.objective!r} pairs samples of one prompt inside a micro-batch, so "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) must be a multiple of rollout.samples_per_prompt "
            f"({r.samples_per_prompt})")
    if getattr(objective, "needs_reference", False) and (a.beta <= 0 or a.kl_placement != "loss"):
        raise ConfigError(f"{source}: algorithm.objective={a.objective!r} needs algorithm.beta > 0 (got {a.beta}) "
                          f"and kl_placement 'loss' (got {a.kl_placement!r}): beta is its KL weight")
    if r.source == "offline" and r.dynamic_sampling:
        raise ConfigError(f"{source}: rollout.dynamic_sampling needs sampled groups; it cannot be used with "
                          "rollout.source='offline'")
    if a.advantage == "per_step" and (r.source == "offline" or a.objective != "ppo_clip"):
        raise ConfigError(f"{source}: algorithm.advantage='per_step' gives per-token advantages for sampled answers: "
                          f"it needs rollout.source='online' and algorithm.objective='ppo_clip' "
                          f"(got {r.source!r}, {a.objective!r})")
    if a.advantage == "remax" and r.source == "offline":
        raise ConfigError(f"{source}: algorithm.advantage='remax' compares samples with the policy's greedy output, "
                          "so it needs rollout.source='online'")
    if a.kl_placement == "reward" and a.beta == 0:
        raise ConfigError(f"{source}: algorithm.kl_placement='reward' has no effect with algorithm.beta=0")
    if not math.isfinite(cfg.optim.lr):
        raise ConfigError(f"{source}: optim.lr must be finite")
    # Single-process geometry is checked here; the launcher re-checks with the real process count.
    try:
        optimizer_steps_per_rollout(cfg, 1)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
