"""CORY: two copies of the LLM fine-tuned as cooperating agents (Ma et al., "Coevolving with the Other You",
NeurIPS 2024, OpenReview OoOCoZFVK3; METHODS.md B.21).

    pioneer   y1 ~ pi_1(. | x)
    observer  y2 ~ pi_2(. | x, y1)             x2 = rollout.revision_template with {prompt}=x, {completion}=y1
    reward    r = R(x, y1) + R(x, y2)          the collective reward, for both agents' samples
    update    each agent: the same policy-gradient objective (ppo_clip with GRPO advantages here) on its own
              samples, with its own KL to the reference (coefficient algorithm.beta)
    roles     every T_REx RL steps the agents swap roles (`role_at_step`), so both learn to answer without a hint

The loop is the two-attempt loop of SCoRe (shared/attempts.py): the pioneer's answers are the first attempts
(`CoryPolicy.sample`), the observer's the second (`CoryPolicy.observer.sample`, its own groups), and
`collective_reward` replaces SCoRe's stages. Every sample carries `extras["agent"]` (0 or 1, the copy that
produced it), and `AgentPair`, the one nn.Module that `accelerate.prepare` wraps and one optimizer trains,
routes each sample's log-probs to that copy, so a sample's gradient reaches only its own agent.

Deviations from the paper, and why:
- GRPO group baselines instead of PPO with a value head (the paper says CORY is algorithm-agnostic). Both
  agents' groups hold the same collective rewards, so sample i of the pioneer and of the observer get the
  same advantage.
- One optimizer over both agents (one `accelerate.prepare`d module): Adam's update is per parameter, so this
  equals two optimizers, except that gradient-norm clipping (`optim.max_grad_norm`) and the token-mean loss
  normalisation are over both agents' tokens together.
- One frozen reference serves both agents: both start from the same warm start (`build_reference`).
- T_REx (`algorithm.cory_role_exchange_steps`) was not retrieved from the paper; 10 RL steps is our default.

Held-out evaluation reports the pioneer alone (the task metric), the observer alone (metric@observer) and
the pair (metric@t2, the observer's answer after the pioneer's). Checkpoints hold `agent_0/`, `agent_1/`
(`save_pretrained` folders) and `roles.json` (which copy is the pioneer), written and restored together.

    rlft train configs/llm/arithmetic_cory.yaml
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from llm_rl.policy import CausalLMPolicy, LMForward
from shared.rollout import Rollout


def role_at_step(step: int, exchange_every: int) -> int:
    """The copy (0 or 1) that is the pioneer at RL step `step` (1-based; step 0, before RL, counts as step 1):
    copy 0 for steps 1..T, copy 1 for T+1..2T, copy 0 again from 2T+1, ... (T = `exchange_every`, T_REx)."""
    return ((max(step, 1) - 1) // exchange_every) % 2


class AgentPair(nn.Module):
    """The two agents' LMForward modules in one module: forward(**inputs, mask, agent) -> (logp, entropy), each
    sample's row computed by the copy `agent[i]` named. Holds the role state (`pioneer`) and saves / loads both
    copies and the roles as one checkpoint folder."""

    def __init__(self, agents: list[LMForward]):
        super().__init__()
        self.agents = nn.ModuleList(agents)
        self.pioneer = 0  # the copy that answers first at the current RL step

    @property
    def model(self) -> AgentPair:
        """The loop and `rlft eval` load checkpoints into `module.model` (shared/checkpoint.load_hf_weights):
        the pair is its own model and loads itself (`load_pretrained`)."""
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, agent: Tensor,
                with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        agent = agent.to(mask.device)
        logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        entropy = torch.zeros_like(logp) if with_entropy else None
        for k, lm in enumerate(self.agents):
            idx = (agent == k).nonzero().squeeze(-1)
            if idx.numel() == 0:
                if torch.is_grad_enabled():  # every parameter in the graph with gradient 0 (DDP expects one each)
                    logp = logp + 0.0 * sum(p.sum() for p in lm.parameters() if p.requires_grad)
                continue
            lp, ent = lm(input_ids[idx], attention_mask[idx], mask[idx], with_entropy=with_entropy)
            logp = logp.index_copy(0, idx, lp)
            if with_entropy:
                entropy = entropy.index_copy(0, idx, ent)
        return logp, entropy

    def save_pretrained(self, path) -> None:
        """agent_0/ and agent_1/ in transformers' format, and roles.json."""
        path = Path(path)
        for k, lm in enumerate(self.agents):
            lm.model.save_pretrained(path / f"agent_{k}", safe_serialization=True)
        (path / "roles.json").write_text(json.dumps({"pioneer": self.pioneer}))

    def load_pretrained(self, path) -> None:
        from shared.checkpoint import load_hf_weights

        path = Path(path)
        if not (path / "roles.json").exists():
            raise FileNotFoundError(f"{path}: not a CORY checkpoint (no roles.json beside agent_0/ and agent_1/)")
        for k, lm in enumerate(self.agents):
            load_hf_weights(lm.model, path / f"agent_{k}")
        self.pioneer = int(json.loads((path / "roles.json").read_text())["pioneer"])


class Agent:
    """One copy in its current role, as shared/attempts.py and shared/evaluate.py call it (`policy.observer`)."""

    def __init__(self, cory: CoryPolicy, index: int):
        self.cory, self.index = cory, index

    def sample(self, rows: list[dict], n: int, seed: int, first_sample_id: int, first_group_id: int) -> Rollout:
        return self.cory.sample_by(self.index, rows, n, seed, first_sample_id, first_group_id)

    def complete(self, rows: list[dict]) -> list[str]:
        return self.cory.agents[self.index].complete(rows)


class CoryPolicy:
    """The Policy contract (shared/policy.py) over two CausalLMPolicy copies: sampling and `complete` use the
    current pioneer, `observer` the other copy, `log_probs` each sample's own copy (`extras["agent"]`)."""

    def __init__(self, agents: list[CausalLMPolicy], exchange_every: int):
        if len(agents) != 2:
            raise ValueError(f"CORY has two agents, got {len(agents)}")
        self.agents = agents
        self.module: nn.Module = AgentPair([p.module for p in agents])
        self.unwrap = lambda m: m  # replaced by accelerator.unwrap_model once prepared
        self.tokenizer = agents[0].tokenizer
        self.exchange_every = exchange_every

    @classmethod
    def from_model(cls, model: nn.Module, make_policy, exchange_every: int) -> CoryPolicy:
        """Two agents from one (warm-started) model: the model itself and a copy of it."""
        return cls([make_policy(model), make_policy(copy.deepcopy(model))], exchange_every)

    # ------------------------------------------------------------------ roles
    @property
    def pair(self) -> AgentPair:
        return self.unwrap(self.module)

    @property
    def pioneer(self) -> int:
        return self.pair.pioneer

    @property
    def observer(self) -> Agent:
        return Agent(self, 1 - self.pioneer)

    def begin_step(self, step: int) -> None:
        """Called by the loop at the start of RL step `step`: set the roles of that step."""
        self.pair.pioneer = role_at_step(step, self.exchange_every)

    # ------------------------------------------------------------------ rollout and evaluation
    def sample_by(self, agent: int, rows: list[dict], n: int, seed: int, first_sample_id: int,
                  first_group_id: int) -> Rollout:
        part = self.agents[agent].sample(rows, n, seed, first_sample_id, first_group_id)
        part.extras = {**part.extras, "agent": torch.full((len(part),), float(agent))}
        return part

    def sample(self, rows: list[dict], n: int, seed: int, first_sample_id: int, first_group_id: int) -> Rollout:
        """The pioneer's answers (first attempts)."""
        return self.sample_by(self.pioneer, rows, n, seed, first_sample_id, first_group_id)

    def complete(self, rows: list[dict]) -> list[str]:
        """The pioneer's greedy answers."""
        return self.agents[self.pioneer].complete(rows)

    def rollout_from(self, rows: list[dict], completions: list[list[str]], first_group_id: int) -> Rollout:
        """Teacher-forcing rollout of given completions, trained on the pioneer."""
        part = self.agents[self.pioneer].rollout_from(rows, completions, first_group_id)
        part.extras = {**part.extras, "agent": torch.full((len(part),), float(self.pioneer))}
        return part

    def demo_batch(self, rows: list[dict]) -> Rollout:
        return self.rollout_from(rows, [[r["completion"]] for r in rows], 0)

    # ------------------------------------------------------------------ log-probs
    def log_probs(self, batch: Rollout, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (and entropies) of each sample under the copy that produced it."""
        if "agent" not in batch.extras:
            raise ValueError("CORY log-probs need extras['agent'] (which copy produced each sample)")
        return self.module(**batch.inputs, mask=batch.mask, agent=batch.extras["agent"], with_entropy=with_entropy)

    def build_reference(self) -> None:
        """Freeze copy 0 as the reference of both agents (they start from the same warm start)."""
        self.agents[0].build_reference()

    @torch.no_grad()
    def reference_log_probs(self, batch: Rollout) -> Tensor:
        return self.agents[0].reference_log_probs(batch)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def save_pretrained(self, path) -> None:
        """agent_0/, agent_1/ (each a complete `from_pretrained` folder with the tokenizer) and roles.json."""
        self.pair.save_pretrained(path)
        for k in range(2):
            self.tokenizer.save_pretrained(Path(path) / f"agent_{k}")
