"""Text RL on the shared core: causal-LM policy, text tasks, rewards and objectives."""

from llm_rl import objectives as _objectives, value as _value  # noqa: F401  (register objectives, the value baseline)
from llm_rl import rewards as _rewards  # noqa: F401  (registers the text rewards)
from llm_rl.tasks import arithmetic as _arithmetic, jsonl as _jsonl  # noqa: F401  (register task schemas)
