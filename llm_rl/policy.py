"""Causal-LM policy over any `AutoModelForCausalLM`: rollout with `generate`, per-token log-probs.

Sequences are laid out as [left-padded prompt | right-padded completion]; `mask` marks completion
tokens up to and including the first EOS. Position ids are recomputed from the attention mask in
every forward, exactly as `generate` does, so stored and recomputed log-probs agree.

Log-probs are computed from the decoder's hidden states and the LM head chunk by chunk
(`shared.logprobs.selective_log_probs`), only at completion positions, with logits divided by the
sampling temperature (as the sampling distribution was).
"""

from __future__ import annotations

import copy
import functools
import time

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessorList

from llm_rl.packing import pack, pack_values, packed_attention_mask, unpack
from llm_rl.shared_prompt import shared_prompt_hidden_states
from shared.logprobs import selective_log_probs
from shared.rollout import Rollout
from shared.sampling import CounterSamplingProcessor


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LMForward(nn.Module):
    """The trained module: forward(**inputs, mask) -> (logp [B,T], entropy [B,T]|None).

    Subclasses for other input kinds (images) override `hidden_states`.

    `packed` (config train.packed_sequences) runs the decoder on the real tokens only, packed into one
    row (llm_rl/packing.py), and puts the hidden states back on the padded grid: same results, no
    compute spent on padding. Text-only: a subclass that overrides `hidden_states` cannot pack.

    `shared_prompt` (config train.shared_prompt) runs each distinct prompt of a micro-batch once and its
    completions against the prompt's KV cache (llm_rl/shared_prompt.py): same results, the G-fold repeated
    prompt computed once. Text-only, and not together with packing.

    This module, not the bare HF model, is what `accelerate.prepare` wraps, so DDP/FSDP see the
    real forward pass.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, chunk_size: int = 1024, packed: bool = False,
                 logprob_backend: str = "chunked", shared_prompt: bool = False):
        super().__init__()
        if packed and type(self).hidden_states is not LMForward.hidden_states:
            raise ValueError(f"train.packed_sequences: packing applies to the text-only LMForward; "
                             f"{type(self).__name__} has its own inputs (images, M-RoPE positions) and does not pack")
        if shared_prompt and type(self).hidden_states is not LMForward.hidden_states:
            raise ValueError(f"train.shared_prompt: the shared-prompt forward applies to the text-only LMForward; "
                             f"{type(self).__name__} has its own inputs (images, M-RoPE positions); set it to false")
        if shared_prompt and packed:
            raise ValueError("train.shared_prompt and train.packed_sequences are exclusive; set one of them to false")
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.logprob_backend = logprob_backend  # shared.logprobs backend: chunked | triton | auto
        self.packed = packed
        self.shared_prompt = shared_prompt
        self.suppress_ids: list[int] = []  # tokens generation never emits: their probability is 0 here too

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, inputs_embeds: Tensor | None = None,
                      completion_len: int | None = None) -> Tensor:
        """Last decoder hidden states [B, L, H]; position ids from the attention mask, as `generate` does.
        Packed: zeros at padding positions (the padded forward leaves unused values there).
        Shared prompt: needs `completion_len` (T: the last T columns are completions); without it, or when the
        rows have no prompt columns, the padded forward runs."""
        if self.shared_prompt and completion_len is not None and 0 < completion_len < input_ids.shape[1]:
            return shared_prompt_hidden_states(hf_model(self.model).base_model, input_ids, attention_mask,
                                               completion_len, inputs_embeds)
        if self.packed:
            packed = pack(input_ids, attention_mask)
            if packed.num_tokens:  # an all-padding batch has nothing to pack: the padded forward handles it
                return self._packed_hidden_states(packed, inputs_embeds)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        ids = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
        out = hf_model(self.model).base_model(**ids, attention_mask=attention_mask, position_ids=position_ids,
                                              use_cache=False)
        return out.last_hidden_state

    def _packed_hidden_states(self, packed, inputs_embeds: Tensor | None) -> Tensor:
        """The decoder on the packed row [1, N], its hidden states scattered back to [B, L, H]."""
        model = hf_model(self.model)
        if inputs_embeds is not None:
            ids = {"inputs_embeds": pack_values(packed, inputs_embeds)}
            dtype = inputs_embeds.dtype
        else:
            ids = {"input_ids": packed.input_ids}
            dtype = model.get_input_embeddings().weight.dtype
        mask = packed_attention_mask(packed, model.config, dtype)
        out = model.base_model(**ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False)
        return unpack(packed, out.last_hidden_state)

    def head(self) -> tuple[Tensor, Tensor | None]:
        """LM-head weight and bias of the sampling distribution (suppressed tokens get -1e9, as in `generate`)."""
        head = hf_model(self.model).get_output_embeddings()
        bias = getattr(head, "bias", None)
        if self.suppress_ids:
            ban = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
            ban[self.suppress_ids] = -1e9
            bias = ban if bias is None else bias + ban
        return head.weight, bias

    def forward(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, with_entropy: bool = False,
                residual_lambda: float = 0.0, kl_reference: nn.Module | None = None, **extra):
        """(logp, entropy); with `kl_reference` also {"vocab_kl": KL(reference || self) per token} (ASFT).
        `residual_lambda` > 0 runs IFT's temporal-residual forward (`residual_embeddings`)."""
        embeds = self.residual_embeddings(input_ids, attention_mask, mask, residual_lambda) if residual_lambda else None
        if self.shared_prompt:  # where the prompt ends (subclasses with their own inputs never set it)
            extra = {**extra, "completion_len": mask.shape[1]}
        hidden = self.hidden_states(input_ids, attention_mask, **extra, **({"inputs_embeds": embeds} if embeds is not None else {}))
        weight, bias = self.head()
        logp, entropy = completion_log_probs(hidden, input_ids, mask, weight, bias, self.temperature, self.chunk_size,
                                             with_entropy, self.logprob_backend)
        if kl_reference is None:
            return logp, entropy
        with torch.no_grad():
            ref_hidden = kl_reference.hidden_states(input_ids, attention_mask, **extra)
        ref_weight, ref_bias = kl_reference.head()
        kl = completion_vocab_kl(hidden, ref_hidden, mask, (weight, bias), (ref_weight, ref_bias), self.temperature,
                                 self.chunk_size)
        return logp, entropy, {"vocab_kl": kl}

    def residual_embeddings(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, lam: float) -> Tensor:
        """IFT (Hua et al. 2024) inputs: at completion position t, (1 - lam) E(y_t) + lam sg(E(ŷ_t)), where ŷ_t is
        the model's greedy prediction for t given y_<t (a no-grad pass); elsewhere E(y_t).

        [APPROX] The authors mix in the embedding of ŷ from a frozen embedding copy; we take the current
        embedding without gradient, which is the same at the first step and keeps training inputs on the
        embeddings that evaluation uses (with tied input/output embeddings a stale copy drifts away)."""
        T = mask.shape[1]
        embed = hf_model(self.model).get_input_embeddings()
        with torch.no_grad():
            weight, bias = self.head()
            split = {"completion_len": T} if self.shared_prompt else {}
            h = self.hidden_states(input_ids, attention_mask, **split)[:, -T - 1 : -1]
            logits = h @ weight.T + (bias if bias is not None else 0.0)
            pred = torch.where(mask.bool(), logits.argmax(-1), input_ids[:, -T:])
            predicted = embed(pred)
        embeds = embed(input_ids)
        mixed = (1 - lam) * embeds[:, -T:] + lam * predicted
        return torch.cat([embeds[:, :-T], mixed], 1)


def completion_log_probs(hidden: Tensor, input_ids: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None,
                         temperature: float, chunk_size: int, with_entropy: bool = False,
                         backend: str = "chunked") -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) [B, T] of the last T tokens of `input_ids`, where T = mask.shape[1].

    The hidden state at position p predicts token p+1; only positions with mask = 1 are computed.
    """
    T = mask.shape[1]
    h = hidden[:, -T - 1 : -1]
    targets = input_ids[:, -T:]
    sel = mask.bool()
    lp, ent = selective_log_probs(h[sel], weight, targets[sel], temperature, bias, chunk_size, with_entropy, backend)
    logp = hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(sel, lp)
    if not sel.any() and torch.is_grad_enabled():
        # a fully masked micro-batch (dynamic-sampling filler) still needs a graph, so backward and
        # the DDP gradient all-reduce run on every process; its gradient is exactly zero
        logp = logp + 0.0 * (hidden.float().sum() + weight.float().sum())
    entropy = None if ent is None else hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(sel, ent)
    return logp, entropy


def completion_vocab_kl(hidden: Tensor, ref_hidden: Tensor, mask: Tensor, head: tuple, ref_head: tuple,
                        temperature: float, chunk_size: int) -> Tensor:
    """KL(p_ref || p_theta) over the full vocabulary at each completion position [B, T] (grad through p_theta),
    computed chunk by chunk over positions (full-vocabulary logits of one chunk at a time)."""
    T = mask.shape[1]
    sel = mask.bool()
    h, hr = hidden[:, -T - 1 : -1][sel], ref_hidden[:, -T - 1 : -1][sel]
    parts = []
    for s in range(0, h.shape[0], chunk_size):
        logits = torch.nn.functional.linear(h[s : s + chunk_size], *head).float() / temperature
        ref_logits = torch.nn.functional.linear(hr[s : s + chunk_size], *ref_head).float() / temperature
        ref_lp = ref_logits.log_softmax(-1)
        parts.append((ref_lp.exp() * (ref_lp - logits.log_softmax(-1))).sum(-1))
    flat = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(sel, flat)


def rollout_generation_config(max_new_tokens: int, eos_ids: list[int], pad_id: int,
                              suppress_ids: list[int]) -> GenerationConfig:
    """Greedy `generate` over our own logits processors (sampling is CounterSamplingProcessor's), with every
    option that would change the logits set to its neutral value: `generate` fills the fields we leave
    unset from the checkpoint's generation_config.json (Qwen2.5-Instruct ships repetition_penalty 1.05),
    and the rollout must sample from exactly the softmax(z / T) that `log_probs` scores."""
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                            use_cache=True, suppress_tokens=suppress_ids or None, repetition_penalty=1.0,
                            encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
                            min_new_tokens=0, temperature=1.0, top_p=1.0, renormalize_logits=False)


def completion_mask(completion_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """1 for tokens up to and including the first EOS (or all tokens when none), else 0."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long()


class CausalLMPolicy:
    """Implements the Policy contract (shared/policy.py) for text."""

    def __init__(self, model: nn.Module, tokenizer, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 max_new_tokens: int = 64, chunk_size: int = 1024, use_chat_template: bool = False,
                 system_prompt: str | None = None, packed_sequences: bool = False, logprob_backend: str = "chunked",
                 shared_prompt: bool = False):
        self.tokenizer = tokenizer
        self.module: nn.Module = LMForward(model, temperature, chunk_size, packed=packed_sequences,
                                           logprob_backend=logprob_backend, shared_prompt=shared_prompt)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = use_chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.system_prompt = system_prompt
        self.unwrap = lambda m: m  # replaced by accelerator.unwrap_model once prepared
        self._reference: nn.Module | None = None
        eos = tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.suppress_ids: list[int] = []  # tokens never generated (a VLM's image placeholders)
        self.generator = None  # rollout.backend vllm: a VLLMGenerator that `_generate` hands generation to

    # ------------------------------------------------------------------ text <-> tokens
    def format_prompt(self, prompt: str) -> str:
        if not self.use_chat_template:
            return prompt
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        msgs.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode_prompts(self, prompts: list[str], device, prefills: list[str] | None = None) -> dict[str, Tensor]:
        texts = [self.format_prompt(p) + (prefills[i] if prefills else "") for i, p in enumerate(prompts)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def encode_rows(self, rows: list[dict], device) -> dict[str, Tensor]:
        """Left-padded prompt inputs, one per row (a multimodal policy adds its image tensors). A row's
        `prefill` (the start of the response, written for the model: MRT's prefixes, Mixed-CoT-RL's flawed
        steps; shared/prefill.py) follows the formatted prompt; the model continues it."""
        return self.encode_prompts([r["prompt"] for r in rows], device, [r.get("prefill", "") for r in rows])

    def append_completion(self, prompt: dict[str, Tensor], completion: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Rollout inputs [prompt | completion]: the token-aligned tensors grow by the completion."""
        return {**prompt, "input_ids": torch.cat([prompt["input_ids"], completion], 1),
                "attention_mask": torch.cat([prompt["attention_mask"], mask], 1)}

    def generation_inputs(self, prompt: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keyword arguments of the model's `generate` for per-sample prompt inputs."""
        return prompt

    def encode_completions(self, completions: list[str], device) -> tuple[Tensor, Tensor]:
        """Right-padded completion ids with EOS appended, and their mask."""
        eos = self.eos_ids[0]
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
        T = max(len(x) for x in ids)
        c = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
        cm = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):
            c[i, : len(x)] = torch.tensor(x)
            cm[i, : len(x)] = 1
        return c.to(device), cm.to(device)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def generate(self, rows: list[dict], n: int = 1, seed: int | None = None, first_sample_id: int = 0,
                 max_new_tokens: int | None = None, suppress: list[int] = ()) -> tuple[dict[str, Tensor], Tensor, list[str], dict]:
        """n completions per row. seed=None decodes greedily; otherwise counter-based sampling
        with global sample ids first_sample_id, first_sample_id+1, ... (prompt-major). `suppress`: token ids
        this call never emits (MRT's forced answers). A row's `prefill` starts its texts (the tokens are not
        part of the completion: they are prompt inputs, never trained)."""
        device = next(self.module.parameters()).device
        p = {k: v.repeat_interleave(n, 0) for k, v in self.encode_rows(rows, device).items()}
        saved = self.suppress_ids
        self.suppress_ids = saved + [i for i in suppress if i not in saved]
        try:
            comp, mask, texts, stats = self._generate(p, seed, first_sample_id, max_new_tokens or self.max_new_tokens)
        finally:
            self.suppress_ids = saved
        texts = [rows[i // n].get("prefill", "") + t for i, t in enumerate(texts)]
        return self.append_completion(p, comp, mask), mask, texts, stats

    @torch.no_grad()
    def continue_completions(self, batch: Rollout, index: list[int], cut: int, n: int, seed: int,
                             first_sample_id: int) -> tuple[list[str], list[int]]:
        """n sampled continuations of the samples `index` of `batch` after their first `cut` completion tokens
        (left-padded prompt + kept prefix, the remaining token budget): whole completions and their lengths.
        Per-step Monte Carlo values (shared/step_values.py) score them."""
        T = batch.mask.shape[1]
        keep = batch.inputs["input_ids"].shape[1] - T + cut
        p = {k: batch.inputs[k][index, :keep].repeat_interleave(n, 0) for k in ("input_ids", "attention_mask")}
        budget = max(self.max_new_tokens - cut, 1)
        comp, mask, _, _ = self._generate(p, seed, first_sample_id, budget)
        texts = self.tokenizer.batch_decode(torch.cat([p["input_ids"][:, keep - cut:], comp], 1), skip_special_tokens=True)
        return texts, (mask.sum(-1) + cut).tolist()

    def _generate(self, p: dict[str, Tensor], seed: int | None, first_sample_id: int, max_new_tokens: int,
                  run=None):
        """(completion ids padded after EOS, mask, texts, stats) of `generate` from left-padded inputs `p`.
        `run(model, generation_config, logits_processor) -> sequences` replaces the plain `model.generate`
        call (the VLM policy shares each prompt's prefill across its samples); so does `self.generator`, when set
        (rollout.backend vllm), which returns the same sequences and goes through the same masking below."""
        model = hf_model(self.unwrap(self.module).model)
        device = p["input_ids"].device
        B, Lp = p["input_ids"].shape
        procs = LogitsProcessorList()
        if seed is not None:
            ids = torch.arange(first_sample_id, first_sample_id + B, device=device)
            procs.append(CounterSamplingProcessor(seed, ids, Lp, self.temperature, self.top_k, self.top_p))
        gen_cfg = rollout_generation_config(max_new_tokens, self.eos_ids, self.pad_id, self.suppress_ids)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        if run is None and self.generator is not None:  # rollout.backend vllm (llm_rl/vllm_rollout.py)
            run = functools.partial(self.generator.generate, p=p, seed=seed, first_sample_id=first_sample_id,
                                    sampling=(self.temperature, self.top_k, self.top_p))
        if run is None:
            out = model.generate(**self.generation_inputs(p), generation_config=gen_cfg, logits_processor=procs)
        else:
            out = run(model, gen_cfg, procs)
        dt = time.perf_counter() - t0
        model.train(was_training)
        comp = out[:, Lp:]
        if comp.shape[1] == 0:
            comp = torch.full((B, 1), self.pad_id, dtype=torch.long, device=device)
        mask = completion_mask(comp, self.eos_ids)
        comp = comp.masked_fill(mask == 0, self.pad_id)
        texts = self.tokenizer.batch_decode(comp, skip_special_tokens=True)
        lengths = mask.sum(-1)
        ends_eos = torch.isin(comp, torch.tensor(self.eos_ids, device=device)).any(-1)
        stats = {
            "completion_len_mean": float(lengths.float().mean()),
            "completion_len_max": float(lengths.max()),
            "truncated_frac": float((~ends_eos).float().mean()),
            "sample_tokens": float(lengths.sum()),
            "sample_seconds": dt,
        }
        return comp, mask, texts, stats

    def sample(self, rows: list[dict], n: int, seed: int, first_sample_id: int, first_group_id: int) -> Rollout:
        inputs, mask, texts, stats = self.generate(rows, n, seed, first_sample_id)
        group_ids = torch.arange(first_group_id, first_group_id + len(rows)).repeat_interleave(n)
        rows_rep = [r for r in rows for _ in range(n)]
        rows_rep = [dict(r, completion_length=int(l)) for r, l in zip(rows_rep, mask.sum(-1).tolist())]
        return Rollout(inputs=inputs, mask=mask, group_ids=group_ids, completions=texts, rows=rows_rep, stats=stats,
                       pad_values={"input_ids": self.pad_id})

    def complete(self, rows: list[dict]) -> list[str]:
        """Greedy completions, for evaluation."""
        return self.generate(rows, n=1, seed=None)[2]

    def demo_batch(self, rows: list[dict]) -> Rollout:
        """Teacher-forcing batch of (prompt, completion) demonstrations for SFT."""
        return self.rollout_from(rows, [[r["completion"]] for r in rows], 0)

    def rollout_from(self, rows: list[dict], completions: list[list[str]], first_group_id: int) -> Rollout:
        """Teacher-forcing rollout of given completions (offline data): completions[i] are row i's group."""
        device = next(self.module.parameters()).device
        flat_rows = [r for r, cs in zip(rows, completions) for _ in cs]
        texts = [c for cs in completions for c in cs]
        comp, mask = self.encode_completions(texts, device)
        prompts = {k: v.repeat_interleave(torch.tensor([len(cs) for cs in completions], device=v.device), 0)
                   for k, v in self.encode_rows(rows, device).items()}
        group_ids = torch.arange(first_group_id, first_group_id + len(rows)).repeat_interleave(
            torch.tensor([len(cs) for cs in completions]))
        lengths = mask.sum(-1)
        flat_rows = [dict(r, completion_length=int(n)) for r, n in zip(flat_rows, lengths.tolist())]
        stats = {"completion_len_mean": float(lengths.float().mean()), "completion_len_max": float(lengths.max()),
                 "truncated_frac": 0.0, "sample_tokens": float(lengths.sum()), "sample_seconds": 0.0}
        return Rollout(inputs=self.append_completion(prompts, comp, mask), mask=mask, group_ids=group_ids,
                       completions=texts, rows=flat_rows, stats=stats, pad_values={"input_ids": self.pad_id})

    @torch.no_grad()
    def embed_prompts(self, rows: list[dict], pooling: str = "last", batch_size: int = 256) -> Tensor:
        """Last-layer hidden states of each row's prompt inputs at its last token ('last'; prompts are
        left-padded) or averaged over its tokens ('mean') [N, H] fp32 on CPU (DOTS embeddings)."""
        inner = self.unwrap(self.module)
        device = next(inner.parameters()).device
        out = []
        for s in range(0, len(rows), batch_size):
            enc = self.encode_rows(rows[s : s + batch_size], device)
            h = inner.hidden_states(**enc).float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append((h[:, -1] if pooling == "last" else (h * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ log-probs
    def log_probs(self, batch: Rollout, with_entropy: bool = False, vocab_kl: bool = False,
                  residual_lambda: float = 0.0) -> tuple:
        """Per-token log-probs (and entropies) under the trained module (gradients flow when enabled).

        Objectives' forward options: `vocab_kl` adds a third item {"vocab_kl": [B, T]}, the full-vocabulary
        KL from the frozen reference (ASFT); `residual_lambda` selects IFT's residual forward."""
        ref = self._reference_module() if vocab_kl else None
        return self.module(**batch.inputs, mask=batch.mask, with_entropy=with_entropy, residual_lambda=residual_lambda,
                           kl_reference=ref)

    def _reference_module(self) -> nn.Module:
        if self._reference is None:
            raise RuntimeError("the full-vocabulary KL needs a frozen reference copy: build_reference() first "
                               "(under LoRA there is none; train without LoRA)")
        return self._reference

    @torch.no_grad()
    def reference_log_probs(self, batch: Rollout) -> Tensor:
        """Log-probs under the frozen reference: the base with the LoRA adapter disabled, or a copy."""
        inner = self.unwrap(self.module)
        if hasattr(inner.model, "disable_adapter"):
            ctx = inner.model.disable_adapter()
            with ctx:
                return inner(**batch.inputs, mask=batch.mask)[0]
        if self._reference is None:
            raise RuntimeError("reference requested but not built: call build_reference() before training")
        return self._reference(**batch.inputs, mask=batch.mask)[0]

    def build_reference(self) -> None:
        """Freeze a copy of the current weights as the reference (not needed with LoRA)."""
        inner = self.unwrap(self.module)
        if hasattr(inner.model, "disable_adapter"):
            return
        ref = copy.deepcopy(inner)
        ref.requires_grad_(False).eval()
        self._reference = ref

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def save_pretrained(self, path) -> None:
        model = self.unwrap(self.module).model
        model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

