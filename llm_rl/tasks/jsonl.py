"""Text task from jsonl files: one object per line with a prompt and a reference answer.

Typical use is GSM8K/MATH-style data prepared locally::

    {"prompt": "Natalia sold clips to ...", "answer": "72"}
    {"question": "...", "answer": "\\frac{1}{2}", "solution": "...worked solution..."}

`prompt_field` / `answer_field` name the keys; `completion_field` (optional) names a worked solution
used as the SFT demonstration. The held-out metric is math-verify equivalence of the final answer.

Lines may also carry offline completions (keys "completions"/"rewards"/"margins", "chosen"/"rejected",
"reward"; formats in `shared.offline`), which are kept on the row; such lines need no answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from shared.config import Strict, register_task_schema
from shared.jsonl import jsonl_objects


@register_task_schema("jsonl")
class JsonlTaskConfig(Strict):
    name: Literal["jsonl"] = "jsonl"
    train_path: str = Field(description="jsonl of RL prompts")
    eval_path: str = Field(description="jsonl of held-out problems")
    val_path: str | None = Field(None, description="jsonl for warm-up model selection (defaults to eval_path)")
    sft_path: str | None = Field(None, description="jsonl of demonstrations for the SFT warm-up")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    completion_field: str | None = Field(None, description="key of a worked solution for SFT demonstrations")
    prompt_template: str = Field("{prompt}", description="format string applied to the prompt field")
    system_prompt: str | None = None
    use_chat_template: bool = True


OFFLINE_KEYS = ("completions", "rewards", "margins", "chosen", "rejected", "completion", "reward")


def read_jsonl(path: str | Path, prompt_field: str, answer_field: str, completion_field: str | None = None,
               template: str = "{prompt}") -> list[dict]:
    """Rows {"prompt", "answer"[, "completion"], "_where": "<path>:<line>"} plus any offline keys
    (see shared.offline) copied unchanged; the answer is optional ("") on lines with offline keys,
    since preference data often has no reference answer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    rows = []
    for i, obj in jsonl_objects(path):
        offline = {k: obj[k] for k in OFFLINE_KEYS if k in obj}
        required = [prompt_field, *([] if offline else [answer_field])]
        for key in required + ([completion_field] if completion_field else []):
            if key not in obj:
                raise ValueError(f"{path}:{i}: missing key {key!r} (have: {', '.join(obj)})")
        row = {"prompt": template.format(prompt=obj[prompt_field]), "answer": str(obj.get(answer_field, ""))}
        if completion_field:
            row["completion"] = str(obj[completion_field])
        rows.append(row | offline | {"_where": f"{path}:{i}"})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


class JsonlTask:
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: JsonlTaskConfig):
        self.cfg = cfg
        read = lambda p, comp=None: read_jsonl(p, cfg.prompt_field, cfg.answer_field, comp, cfg.prompt_template)  # noqa: E731
        self._splits = {
            "train": read(cfg.train_path),
            "eval": read(cfg.eval_path),
            "val": read(cfg.val_path or cfg.eval_path),
            "sft": read(cfg.sft_path, cfg.completion_field) if cfg.sft_path else [],
        }
        from shared.rewards import REWARDS  # math-verify reward, registered by llm_rl.rewards

        self._verify = REWARDS["math_verify"]()

    def split(self, name: str) -> list[dict]:
        return self._splits[name]

    def score(self, completions: list[str], rows: list[dict]) -> list[float]:
        scores = self._verify(completions, answer=[r["answer"] for r in rows])
        return [float(s or 0.0) for s in scores]
