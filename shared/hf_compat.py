"""Names that differ between the transformers releases rlft supports (pyproject: transformers >= 4.56).

transformers 5.25 renamed the KV-cache argument and output field `past_key_values` to `cache` (the old
argument warns on every call and goes away in 5.40 for model and layer forwards, 6.0 for `generate`).
Code that hands a cache to a model, a decoder layer, a mask builder or `generate`, or reads the one a
call returned, goes through these two names so it runs on both sides of the rename.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward or `generate(return_dict_in_generate=True)` call returned (None if it returned none)."""
    return getattr(output, CACHE_KWARG, None)
