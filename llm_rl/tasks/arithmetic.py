"""Embedded default text task: integer arithmetic, generated in-process.

Prompts look like ``"347+582="`` and the answer is the decimal result (``"929"``). Four disjoint
splits come from one seeded generator: `sft` (worked demonstrations for the warm-up), `train`
(prompts for RL; their answers are only seen by the verifier), `val` (warm-up model selection) and
`eval` (held-out report). The tokenizer is character level, built with the `tokenizers` library,
and the model is a tiny `Qwen2ForCausalLM`, so the real transformers code paths run offline.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from shared.config import Strict, register_task_schema

SPECIAL = ["<pad>", "<eos>", "<bos>"]
CHARS = list("0123456789+-*=() ")


@register_task_schema("arithmetic")
class ArithmeticTaskConfig(Strict):
    name: Literal["arithmetic"] = "arithmetic"
    digits: int = Field(3, gt=0, le=9, description="operands are drawn from [0, 10**digits)")
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], description="operators drawn uniformly")
    sft_size: int = Field(1000, ge=0, description="demonstrations for the SFT warm-up")
    train_size: int = Field(20000, gt=0, description="RL prompts")
    val_size: int = Field(200, ge=0, description="warm-up model-selection problems")
    eval_size: int = Field(500, gt=0, description="held-out problems")
    data_seed: int = Field(1234, description="seed of the problem generator (fixed across run seeds)")
    hidden_size: int = Field(128, gt=0, description="embedded model width")
    num_layers: int = Field(2, gt=0, description="embedded model depth")
    num_heads: int = Field(4, gt=0)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   padding_side="left")


def build_model(cfg: ArithmeticTaskConfig, tokenizer) -> Qwen2ForCausalLM:
    mcfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, rope_theta=10000.0,
    )
    return Qwen2ForCausalLM(mcfg)


def _carries(a: int, b: int) -> int:
    """Number of carries in the column addition a + b (a natural difficulty category)."""
    n, c = 0, 0
    while a or b:
        c = (a % 10 + b % 10 + c) // 10
        n += c
        a, b = a // 10, b // 10
    return n


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class ArithmeticTask:
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: ArithmeticTaskConfig):
        self.cfg = cfg
        rng = random.Random(cfg.data_seed)
        sizes = {"eval": cfg.eval_size, "val": cfg.val_size, "sft": cfg.sft_size, "train": cfg.train_size}
        space = (10**cfg.digits) ** 2 * len(cfg.ops)
        if sum(sizes.values()) > space // 2:
            raise ValueError(f"task: {sum(sizes.values())} problems requested but at most {space // 2} (half of the {space} distinct ones) can be drawn "
                             f"with digits={cfg.digits}; lower the split sizes or raise digits")
        seen: set[tuple] = set()
        self._splits: dict[str, list[dict]] = {}
        for name, n in sizes.items():  # eval first: held-out problems never appear elsewhere
            rows = []
            while len(rows) < n:
                a, b = rng.randrange(10**cfg.digits), rng.randrange(10**cfg.digits)
                op = rng.choice(cfg.ops)
                if (a, op, b) in seen:
                    continue
                seen.add((a, op, b))
                ans = str(_solve(a, op, b))
                rows.append({"prompt": f"{a}{op}{b}=", "answer": ans, "completion": ans,
                             "category": f"carries={_carries(a, b)}" if op == "+" else f"op={op}"})
            self._splits[name] = rows

    def split(self, name: str) -> list[dict]:
        return self._splits[name]

    def score(self, completions: list[str], rows: list[dict]) -> list[float]:
        return [float(c.strip() == r["answer"]) for c, r in zip(completions, rows)]
