"""JSON Lines input, read one way everywhere: every data file error names the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError "<path>:<n>: ..." for a line that is not
    a JSON object. The caller checks that the file exists (its message says what the file is for)."""
    path = Path(path)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):  # bad data, not a bad argument: ValueError like the other line errors
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
        yield n, obj
