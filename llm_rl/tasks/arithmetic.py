"""Embedded default text task: integer arithmetic, generated in-process.

Prompts look like ``"347+582="`` and the answer is the decimal result (``"929"``). Four disjoint
splits come from one seeded generator: `sft` (worked demonstrations for the warm-up), `train`
(prompts for RL; their answers are only seen by the verifier), `val` (warm-up model selection) and
`eval` (held-out report). The tokenizer is character level, built with the `tokenizers` library,
and the model is a tiny `Qwen2ForCausalLM`, so the real transformers code paths run offline.

With ``offline`` set, every `train` row also carries completions to train on without sampling (formats
in `shared.offline`), drawn from a generator of their own so the problems do not change:

- ``demos``: ``completions: [answer]``, ``rewards: [1.0]``;
- ``pairs``: ``chosen: answer``, ``rejected:`` a plausible mistake, and ``margins: [m(chosen), m(rejected)]``
  with m(y) = -len(y) / 10, a second objective ("shorter answers") for MODPO;
- ``scored``: one completion, correct with probability ``offline_correct_frac`` and otherwise a plausible
  mistake, with ``rewards: [1.0]`` or ``[0.0]``.

A plausible mistake (`plausible_mistake`) is the sum with its carries dropped, or a one-digit slip.
"""

from __future__ import annotations

import random
import re
from typing import ClassVar, Literal

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from shared.config import Strict, register_task_schema

SPECIAL = ["<pad>", "<eos>", "<bos>"]
CHARS = list("0123456789+-*=() ")


@register_task_schema("arithmetic")
class ArithmeticTaskConfig(Strict):
    WARMUP_NEUTRAL: ClassVar[tuple[str, ...]] = ("offline", "offline_correct_frac", "category_by")  # RL-stage only
    WARMUP_ADDED: ClassVar[dict[str, object]] = {"format": "answer", "revision_template": None}  # shared.sft.warmup_key

    name: Literal["arithmetic"] = "arithmetic"
    digits: int = Field(3, gt=0, le=9, description="operands are drawn from [0, 10**digits)")
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], description="operators drawn uniformly")
    format: Literal["answer", "scratchpad"] = Field(
        "answer", description="what a demonstration writes: the answer alone, or column-by-column steps from the "
        "right ('4+8=12 3+7+1=11 ...') then the answer (addition only; score the last number)")
    revision_template: str | None = Field(
        None, description="also warm up on second attempts (SCoRe): for each SFT problem, this template filled with "
        "{prompt} and a first answer ({completion}: a plausible mistake or the right answer, half each), answered "
        "with the right answer; use the recipe's rollout.revision_template")
    category_by: Literal["carries", "shorter_operand"] = Field(
        "carries", description="a sum's `category` (curriculum arm): its carry count, or the digit count of its shorter "
        "operand (the warmed-up model solves 82% of 4+4-digit sums but 27% of those with a 3-digit operand)")
    sft_size: int = Field(1000, ge=0, description="demonstrations for the SFT warm-up")
    train_size: int = Field(20000, gt=0, description="RL prompts")
    val_size: int = Field(200, ge=0, description="warm-up model-selection problems")
    eval_size: int = Field(500, gt=0, description="held-out problems")
    data_seed: int = Field(1234, description="seed of the problem generator (fixed across run seeds)")
    hidden_size: int = Field(128, gt=0, description="embedded model width")
    num_layers: int = Field(2, gt=0, description="embedded model depth")
    num_heads: int = Field(4, gt=0)
    offline: Literal["none", "demos", "pairs", "scored"] = Field(
        "none", description="give train rows offline completions: correct demos, (correct, mistake) pairs with "
                            "a length margin, or single completions scored 1/0 (see the module docstring)")
    offline_correct_frac: float = Field(0.5, ge=0, le=1,
                                        description="offline='scored': probability a completion is correct")


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


OP_SOURCE = {"+": "add", "-": "sub", "*": "mul"}  # each operator is a dataset (mixture sampling, per-dataset rewards)


def _category(by: str, a: int, op: str, b: int) -> str:
    if op != "+":
        return f"op={op}"
    return f"carries={_carries(a, b)}" if by == "carries" else f"shorter={min(len(str(a)), len(str(b)))}"


def scratchpad(a: int, b: int) -> str:
    """Column addition written out from the right, one space-separated step per column (a missing digit is
    0, the carry joins as a third term), then the sum: 34+5678 -> '4+8=12 3+7+1=11 0+6+1=7 0+5=5 5712'."""
    steps, carry, x, y = [], 0, a, b
    while x or y or not steps:
        d, e = x % 10, y % 10
        total = d + e + carry
        steps.append(f"{d}+{e}" + (f"+{carry}" if carry else "") + f"={total}")
        carry, x, y = total // 10, x // 10, y // 10
    return " ".join(steps + [str(a + b)])


def flawed_steps(a: int, b: int, kind: str, rng: random.Random) -> str:
    """The start of a+b's scratchpad with exactly one error, ending after the flawed step (Mixed-CoT-RL):
    the steps before a random column, then that column's step written wrong, then a space (the model goes on).

    - ``calculation``: the column's total is off by one ('4+8=13');
    - ``reasoning``: the carry rule misapplied: an incoming carry dropped ('3+7=10' for '3+7+1=11') or one
      added where there is none ('3+7+1=11' for '3+7=10').
    """
    steps = scratchpad(a, b).split(" ")[:-1]
    i = rng.randrange(len(steps))
    left, total = steps[i].split("=")
    terms = left.split("+")
    if kind == "calculation":
        wrong = int(total) + (1 if int(total) == 0 or rng.random() < 0.5 else -1)
        flawed = f"{left}={wrong}"
    elif kind == "reasoning":
        d, e = int(terms[0]), int(terms[1])
        flawed = f"{d}+{e}={d + e}" if len(terms) == 3 else f"{d}+{e}+1={d + e + 1}"
    else:
        raise ValueError(f"flawed_steps: kind must be 'calculation' or 'reasoning', got {kind!r}")
    return " ".join(steps[:i] + [flawed]) + " "


def revision_demos(rows: list[dict], template: str, rng: random.Random) -> list[dict]:
    """Second-attempt demonstrations: `template` with each problem and a first answer that is a plausible
    mistake or the right answer (half each), completed by the right answer (answer-only format)."""
    out = []
    for r in rows:
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", r["prompt"]).groups()
        first = plausible_mistake(int(a), op, int(b), rng) if rng.random() < 0.5 else r["answer"]
        out.append(dict(r, prompt=template.format(prompt=r["prompt"], completion=first)))
    return out


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def dropped_carry(a: int, b: int) -> str:
    """a + b with every carry dropped (digit-wise (x_i + y_i) mod 10): the classic column-addition slip."""
    digits = []
    while a or b:
        digits.append(str((a % 10 + b % 10) % 10))
        a, b = a // 10, b // 10
    return "".join(reversed(digits)).lstrip("0") or "0"


def _digit_slip(answer: str, rng: random.Random) -> str:
    """`answer` with one random digit moved by +-1 (mod 10); never a new leading zero on a number that has
    more than one digit or a sign, so the result still reads as a number. Always differs from `answer`."""
    sign, digits = ("-", answer[1:]) if answer.startswith("-") else ("", answer)
    while True:
        i = rng.randrange(len(digits))
        d = (int(digits[i]) + rng.choice((-1, 1))) % 10
        if i == 0 and d == 0 and (len(digits) > 1 or sign):
            continue
        return sign + digits[:i] + str(d) + digits[i + 1:]


def plausible_mistake(a: int, op: str, b: int, rng: random.Random) -> str:
    """A wrong answer a learner could give: for "+", half the time the carry-dropped sum (when that is
    wrong), otherwise the true answer with a one-digit slip. Never the correct answer."""
    answer = str(_solve(a, op, b))
    if op == "+" and rng.random() < 0.5 and (wrong := dropped_carry(a, b)) != answer:
        return wrong
    return _digit_slip(answer, rng)


def offline_fields(cfg: ArithmeticTaskConfig, a: int, op: str, b: int, rng: random.Random) -> dict:
    """The offline keys of the train row for a `op` b under `cfg.offline` (see the module docstring)."""
    answer = str(_solve(a, op, b))
    if cfg.offline == "demos":
        return {"completions": [answer], "rewards": [1.0]}
    if cfg.offline == "pairs":
        rejected = plausible_mistake(a, op, b, rng)
        return {"chosen": answer, "rejected": rejected, "margins": [-len(answer) / 10, -len(rejected) / 10]}
    correct = rng.random() < cfg.offline_correct_frac
    return {"completions": [answer if correct else plausible_mistake(a, op, b, rng)], "rewards": [float(correct)]}


class ArithmeticTask:
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: ArithmeticTaskConfig):
        self.cfg = cfg
        if cfg.format == "scratchpad" and cfg.ops != ["+"]:
            raise ValueError(f"task.format: the scratchpad writes column addition; ops must be ['+'], got {cfg.ops}")
        rng = random.Random(cfg.data_seed)
        sizes = {"eval": cfg.eval_size, "val": cfg.val_size, "sft": cfg.sft_size, "train": cfg.train_size}
        space = (10**cfg.digits) ** 2 * len(cfg.ops)
        if sum(sizes.values()) > space // 2:
            raise ValueError(f"task: {sum(sizes.values())} problems requested but at most {space // 2} (half of the {space} distinct ones) can be drawn "
                             f"with digits={cfg.digits}; lower the split sizes or raise digits")
        seen: set[tuple] = set()
        offline_rng = random.Random(cfg.data_seed + 1)  # own stream: offline data leaves the problems unchanged
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
                demo = scratchpad(a, b) if cfg.format == "scratchpad" else ans
                rows.append({"prompt": f"{a}{op}{b}=", "answer": ans, "completion": demo,
                             "category": _category(cfg.category_by, a, op, b),
                             "source": OP_SOURCE[op]})
                if name == "train" and cfg.offline != "none":
                    rows[-1] |= offline_fields(cfg, a, op, b, offline_rng)
            if name == "sft" and cfg.revision_template is not None:
                rows += revision_demos(rows, cfg.revision_template, random.Random(cfg.data_seed + 2))
            self._splits[name] = rows

    def split(self, name: str) -> list[dict]:
        """`sft`, `train`, `val`, `eval`; with a scratchpad also `eval_flawed`: the eval problems prefilled with
        one flawed step each (calculation and reasoning errors alternating; Mixed-CoT-RL's robustness test)."""
        if name == "eval_flawed" and self.cfg.format == "scratchpad":
            if name not in self._splits:
                rng = random.Random(self.cfg.data_seed + 3)
                kinds = ("calculation", "reasoning")
                self._splits[name] = [dict(r, prefill=self.flawed_prefix(r, kinds[i % 2], rng))
                                      for i, r in enumerate(self._splits["eval"])]
            return self._splits[name]
        if name not in self._splits:
            raise ValueError(f"task arithmetic: no split {name!r} (has {sorted(self._splits)}"
                           f"{' and eval_flawed' if self.cfg.format == 'scratchpad' else ''})")
        return self._splits[name]

    def flawed_prefix(self, row: dict, kind: str, rng: random.Random) -> str:
        """A response start with exactly one `kind` error for `row` (scratchpad only; see `flawed_steps`)."""
        if self.cfg.format != "scratchpad":
            raise ValueError("flawed prefixes need written-out steps: set task.format: scratchpad")
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", row["prompt"]).groups()
        return flawed_steps(int(a), int(b), kind, rng)

    def first_error(self, completion: str, row: dict) -> int:
        """Character offset where `completion` first goes wrong (InT): with a scratchpad, the start of the first
        step that differs from the reference's step, else of the final answer; answers alone: 0."""
        if self.cfg.format != "scratchpad":
            return 0
        pos = 0
        for got, want in zip(completion.split(" "), row["completion"].split(" ")):
            if got != want:
                return pos
            pos += len(got) + 1
        return min(pos, len(completion))

    def score(self, completions: list[str], rows: list[dict]) -> list[float]:
        """1.0 for the exact answer: the whole completion, or with a scratchpad its last space-separated part."""
        final = (lambda c: c.strip().split(" ")[-1]) if self.cfg.format == "scratchpad" else (lambda c: c.strip())
        return [float(final(c) == r["answer"]) for c, r in zip(completions, rows)]
