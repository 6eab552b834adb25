"""DOTS: difficulty-targeted online data selection (Sun et al. 2025, arXiv 2506.05316; METHODS.md B.8).

Every `every` RL steps the sampler re-estimates how hard each training prompt is for the current
policy and picks the next prompts near the target pass rate (0.5: where a group's rewards vary most):

  1. roll out `reference` random train prompts `rollouts` times each; p_j = their measured pass rates;
  2. predict every train prompt's pass rate by attention over the reference set,
         w = softmax_j(cos(e_q, e_j) / tau_att),   p_hat_q = sum_j w_j p_j,
     with e the prompts' embeddings, centred over the train split: last hidden states of the initial
     policy (frozen) at the prompt's last token or mean-pooled (`dots_pooling`), or those of a
     configured encoder;
  3. sample `every * batch` prompts without replacement with probability proportional to
         softmax(-|p_hat - target| / tau_select)
     (Gumbel top-k, so a near-greedy tau_select = 1e-3 stays well defined).

[APPROX] The authors train projections P_q, P_r and a calibration MLP offline (BCE on measured
pass rates of another model); without such data we use the embeddings as they are (identity
projections, cosine similarity of centred embeddings, no calibration). On the embedded arithmetic
task the warmed-up policy's last-token states predict held-out prompts' pass rates with correlation
~0.3 (mean pooling ~0.1). Each re-estimation logs how well the previous
reference set predicts the new one (`sampler/dots_pred_corr`, `sampler/dots_pred_mae`), so the
predictor's quality is visible in every run.

Selection state (embeddings, the reference set, the queue, the prompts already used) is in
`state_dict()`, so a resumed run continues exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


# ---------------------------------------------------------------------------------------------------
# Pure functions


def attention_pass_rates(query: Tensor, reference: Tensor, ref_pass: Tensor, tau: float) -> Tensor:
    """p_hat [Q]: softmax over reference prompts of cos(e_q, e_j) / tau, applied to their pass rates [R]."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    r = torch.nn.functional.normalize(reference.float(), dim=-1)
    w = torch.softmax(q @ r.T / tau, dim=-1)
    return w @ ref_pass.float()


def selection_logits(pred: Tensor, target: float, tau: float) -> Tensor:
    """log of the (unnormalised) selection probability softmax(-|p - target| / tau)."""
    return -(pred - target).abs() / tau


def sample_without_replacement(logits: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k distinct indices drawn in sequence with probability softmax(logits) over those left (Gumbel top-k)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp(1e-300, 1.0)
    keys = logits.double() - torch.log(-torch.log(u))
    return torch.topk(keys, min(k, logits.numel())).indices


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else 0.0


# ---------------------------------------------------------------------------------------------------
# Measurements the sampler asks of the loop


class PolicyProbe:
    """Embeds prompts and measures pass rates with the policy being trained (all processes together)."""

    def __init__(self, policy, reward_fn, cfg, acc):
        self.policy, self.reward_fn, self.cfg, self.acc = policy, reward_fn, cfg, acc

    @torch.no_grad()
    def embed(self, rows: list[dict]) -> Tensor:
        s = self.cfg.sampler
        if s.dots_encoder == "policy":
            return self.policy.embed_prompts(rows, s.dots_pooling)
        return encoder_embeddings(s.dots_encoder, [r["prompt"] for r in rows], s.dots_pooling)

    @torch.no_grad()
    def pass_rates(self, rows: list[dict], n: int, step: int, draw: int) -> Tensor:
        """Fraction of `n` samples per row whose reward exceeds `sampler.dots_pass_threshold` [len(rows)];
        rows are split over processes and the rates gathered, so every process gets the same tensor."""
        from accelerate.utils import gather_object

        acc, r = self.acc, self.cfg.rollout
        per = math.ceil(len(rows) / acc.num_processes)
        lo = acc.process_index * per
        mine = rows[lo : lo + per]
        rates: list[float] = []
        for s in range(0, len(mine), r.prompts_per_step):
            chunk = mine[s : s + r.prompts_per_step]
            first = (draw * len(rows) + lo + s) * n  # sample ids of this measurement, disjoint from other draws
            with acc.autocast():
                part = self.policy.sample(chunk, n, seed=self.cfg.seed + 0x0D075, first_sample_id=first,
                                          first_group_id=0)
            total = self.reward_fn(part.completions, part.fields(), step=step).total
            passed = (total.float() > self.cfg.sampler.dots_pass_threshold).float().view(len(chunk), n)
            rates += passed.mean(-1).tolist()
        if acc.num_processes > 1:
            rates = gather_object(rates)
        return torch.tensor(rates[: len(rows)], dtype=torch.float32)


def encoder_embeddings(name_or_path: str, texts: list[str], pooling: str = "mean", batch_size: int = 64) -> Tensor:
    """Last hidden states of a transformers model (local path or hub id) at each text's last token or
    averaged over its tokens [N, H] (texts are right-padded)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModel.from_pretrained(name_or_path).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s : s + batch_size], return_tensors="pt", padding=True, padding_side="right")
            h = model(**enc).last_hidden_state.float()
            m = enc["attention_mask"]
            if pooling == "last":
                out.append(h[torch.arange(len(h)), m.sum(1) - 1])
            else:
                out.append((h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------
# The sampler


class DOTSSampler:
    """Follows the sampler contract of shared/sampler.py, plus `prepare(step, probe)`, which the loop
    calls before each step's draw (the re-estimation happens there, every `every` steps)."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int, every: int = 2, reference: int = 256,
                 rollouts: int = 8, target: float = 0.5, select_tau: float = 1e-3, attention_tau: float = 0.1):
        if not rows:
            raise ValueError("sampler: the train split is empty")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.every, self.reference, self.rollouts = every, min(reference, len(rows)), rollouts
        self.target, self.select_tau, self.attention_tau = target, select_tau, attention_tau
        self.cursor = 0
        self.used = torch.zeros(len(rows), dtype=torch.bool)  # handed out already (no prompt twice per epoch)
        self.queue: list[int] = []  # selected at the last re-estimation, not handed out yet
        self.emb: Tensor | None = None  # [N, H] prompt embeddings, computed once
        self.ref_idx: Tensor | None = None
        self.ref_pass: Tensor | None = None
        self.draws = 0  # re-estimations so far
        self.last: dict[str, float] = {}

    def _generator(self, tag: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws * 7919 + tag)

    def prepare(self, step: int, probe) -> None:
        if (step - 1) % self.every and len(self.queue) >= self.batch_size:
            return
        if self.emb is None:
            emb = probe.embed(self.rows).float().cpu()
            self.emb = (emb - emb.mean(0)).half().float()  # centred; fp16 as stored in checkpoints
        ref_idx = torch.randperm(len(self.rows), generator=self._generator(1))[: self.reference]
        ref_pass = probe.pass_rates([self.rows[i] for i in ref_idx.tolist()], self.rollouts, step, self.draws)
        self.last = {"sampler/dots_ref_pass_mean": float(ref_pass.mean())}
        if self.ref_idx is not None:  # how well the previous reference set predicts the new measurements
            pred = attention_pass_rates(self.emb[ref_idx], self.emb[self.ref_idx], self.ref_pass, self.attention_tau)
            self.last["sampler/dots_pred_corr"] = pearson(pred, ref_pass)
            self.last["sampler/dots_pred_mae"] = float((pred - ref_pass).abs().mean())
        self.ref_idx, self.ref_pass = ref_idx, ref_pass
        if bool(self.used.all()):  # an epoch is over: every prompt may be chosen again
            self.used.zero_()
        cand = (~self.used).nonzero().squeeze(-1)
        pred = attention_pass_rates(self.emb[cand], self.emb[ref_idx], ref_pass, self.attention_tau)
        pick = sample_without_replacement(selection_logits(pred, self.target, self.select_tau),
                                          self.every * self.batch_size, self._generator(2))
        self.queue = cand[pick].tolist()
        self.last["sampler/dots_selected_pred"] = float(pred[pick].mean())
        self.draws += 1

    def next_batch(self, n: int | None = None) -> list[int]:
        n = self.batch_size if n is None else n
        out = self.queue[:n]
        self.queue = self.queue[n:]
        if len(out) < n:  # before the first re-estimation, or the queue ran dry: uniform over unused prompts
            free = (~self.used).nonzero().squeeze(-1)
            free = free[~torch.isin(free, torch.tensor(out, dtype=torch.long))]
            if len(free) < n - len(out):
                self.used.zero_()
                free = torch.arange(len(self.rows))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 104729 + self.cursor)
            out += free[torch.randperm(len(free), generator=g)[: n - len(out)]].tolist()
        self.used[out] = True
        self.cursor += n
        return out

    def update(self, group_ids: Tensor, stats: dict[str, Tensor]) -> None:
        """Difficulty is re-measured on the reference set; the training batch's feedback is not used."""

    def metrics(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "used": self.used.clone(), "queue": list(self.queue),
                "emb": None if self.emb is None else self.emb.half(), "ref_idx": self.ref_idx,
                "ref_pass": self.ref_pass, "draws": self.draws, "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.draws = int(state["cursor"]), int(state["draws"])
        self.used, self.queue = state["used"].clone(), list(state["queue"])
        self.emb = None if state["emb"] is None else state["emb"].float()
        self.ref_idx, self.ref_pass, self.last = state["ref_idx"], state["ref_pass"], dict(state["last"])
