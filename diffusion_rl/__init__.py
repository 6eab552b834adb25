"""Diffusion alignment on the shared core: PRDP and DDPO fine-tuning of diffusers pipelines, RLG guidance.

Importing the package registers its task schemas (`shape_prompts`, `prompt_file`), the PRDP objective
and the image rewards; the heavy libraries (diffusers) load only when a pipeline is built.
"""

import diffusion_rl.objectives  # noqa: F401
import diffusion_rl.rewards  # noqa: F401
import diffusion_rl.tasks.common  # noqa: F401
import diffusion_rl.tasks.shapes  # noqa: F401
