"""A tiny fp32 Qwen2ForCausalLM and the forward/gradient probe shared by the tests that check an alternative
training-forward layout (packed sequences, shared prompts) against the plain padded forward."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ATOL = 1e-5
VOCAB = 97


def tiny_lm(attn: str = "sdpa", seed: int = 0, **over) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn, **over)
    return Qwen2ForCausalLM(cfg).float()


def forward_and_grads(module, ids, am, mask, **kw):
    """(log-probs, entropies, {parameter: gradient}) of an LMForward under a loss that weights every token
    differently (so a mistake at any position shows in the gradients)."""
    module.zero_grad(set_to_none=True)
    logp, ent = module(ids, am, mask, with_entropy=True, **kw)
    w = torch.linspace(-1, 1, mask.numel()).view_as(mask)
    ((logp * w).sum() + 0.1 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def assert_same_grads(g1: dict, g0: dict, n_params: int) -> None:
    assert g0.keys() == g1.keys() and len(g0) == n_params
    for name, want in g0.items():
        torch.testing.assert_close(g1[name], want, atol=ATOL, rtol=1e-4, msg=name)
