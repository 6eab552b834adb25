"""Vision-language RL on the shared core (Qwen2-VL / Qwen2.5-VL): Visual-RFT detection and grounding,
CLS-RL and No-Thinking-CLS-RL classification, MSRL chart-to-code with sandboxed render rewards.
Importing the package registers its rewards and task schemas."""

from vision_rl import rewards as _rewards  # noqa: F401  (registers the vision rewards)
from vision_rl.charts import rewards as _chart_rewards  # noqa: F401  (registers chart_exec / chart_text / chart_visual)
from vision_rl.tasks import charts as _charts, files as _files, shapes as _shapes  # noqa: F401  (task schemas)
