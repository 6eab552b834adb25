"""Built-in text rewards for llm_rl, registered in `shared.rewards.REWARDS`.

Each entry is a factory `factory(**kwargs) -> reward`, the kwargs coming from the config's
`rewards[i].kwargs`; a reward maps `(completions, **fields) -> list[float | None]`, None meaning
"cannot evaluate" (`CombinedReward` turns it into the component's failure value and counts it).

| name | kwargs | score |
|---|---|---|
| `exact_match` | `extract` (last_number, answer_tag, boxed, full), `field` | 1/0; None if nothing extracted |
| `math_verify` | `field`, `timeout_s` | 1/0 by math-verify; None if unparseable |
| `format` | `tags` or `pattern` | 1/0, never None |
| `overlong` (alias `length_penalty`) | `max_len`, `cache_len`, `factor`, `unit` | DAPO shaping, in [-factor, 0] |

All of them take adversarial text: extraction uses `str.rfind` and bounded scans or regexes
without nested quantifiers, so a 1 MB completion or one with thousands of tags costs linear time.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from shared.rewards import register_reward, reward_field

# math-verify warns that its own (signal-based) timeouts are disabled; this module enforces a
# per-sample time budget itself, so those warnings would only clutter the one-line CLI errors.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# --------------------------------------------------------------------------------------------
# Answer extraction and normalisation (exact_match)
# --------------------------------------------------------------------------------------------

EXTRACTORS = ("last_number", "answer_tag", "boxed", "full")
# ASCII digits only: `\d` would accept e.g. Arabic-Indic digits, which Decimal() also parses.
_NUMBER = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3}(?![0-9]))+|[0-9]+)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_NUMBER_FULL = re.compile(
    r"[-+]?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
)
_NON_FINITE = re.compile(r"[-+]?(?:nan|inf|infinity)", re.IGNORECASE)
_LAST_NUMBER_WINDOW = 4096  # a number is read from at most its last 4096 characters
_BOXED_MAX = 10_000  # a \boxed{...} not closed within this many characters counts as absent
_WHITESPACE = re.compile(r"\s+")
_NO_MATCH = object()  # a numeric-looking answer that must never match (nan, inf, beyond float range)


def _last_number(text: str) -> str | None:
    """The last number in `text` ("1,000.5", "-3", "2e5"), or None."""
    end = max(text.rfind(d) for d in "0123456789")
    if end < 0:
        return None
    window = text[max(0, end - _LAST_NUMBER_WINDOW) : end + 1]
    last = None
    for last in _NUMBER.finditer(window):
        pass
    return last.group(0) if last else None


def _answer_tag(text: str) -> str | None:
    """Content of the last `<answer>...</answer>`, or None."""
    close = text.rfind("</answer>")
    if close < 0:
        return None
    start = text.rfind("<answer>", 0, close)
    return None if start < 0 else text[start + len("<answer>") : close]


def _boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` with balanced braces (`\boxed{\frac{1}{2}}` -> `\frac{1}{2}`).

    Only the last `\boxed` is tried, and only for `_BOXED_MAX` characters, so the cost is bounded.
    """
    at = text.rfind("\\boxed")
    if at < 0:
        return None
    i = at + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, stop = 0, min(len(text), i + _BOXED_MAX)
    for j in range(i, stop):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _normalise(answer: str) -> Any:
    """Canonical form: a Decimal for numbers, `_NO_MATCH` for nan/inf/huge, else a collapsed string.

    Strips whitespace, a trailing '.', surrounding '$'; removes thousands commas ("1,000" -> 1000);
    numbers compare exactly ("42" == "42.0"). Text compares case-sensitively, whitespace collapsed.
    """
    s = answer.strip().rstrip(".").strip()
    if len(s) >= 2 and s[0] == s[-1] == "$":
        s = s[1:-1].strip()
    if _NON_FINITE.fullmatch(s):
        return _NO_MATCH
    if _NUMBER_FULL.fullmatch(s):
        try:
            d = Decimal(s.replace(",", ""))
        except InvalidOperation:  # exponent beyond Decimal's range
            return _NO_MATCH
        if not d.is_finite() or (d != 0 and d.adjusted() > 308):  # outside float range: treat as inf
            return _NO_MATCH
        return d
    return _WHITESPACE.sub(" ", s)


def _answers_equal(pred: str, ref: str) -> bool:
    a, b = _normalise(pred), _normalise(ref)
    if a is _NO_MATCH or b is _NO_MATCH or type(a) is not type(b):
        return False
    return a == b


@register_reward("exact_match")
def exact_match(extract: str = "last_number", field: str = "answer"):
    """1.0 if the extracted final answer equals the reference in `fields[field]`, else 0.0.

    `extract`: "last_number" (last number in the text), "answer_tag" (last <answer>...</answer>),
    "boxed" (last \\boxed{...}, nested braces allowed) or "full" (the whole completion).
    None when nothing can be extracted or the reference is None. nan/inf never match.
    """
    if extract not in EXTRACTORS:
        raise ValueError(f"exact_match: extract must be one of {EXTRACTORS}, got {extract!r}")
    pick = {"last_number": _last_number, "answer_tag": _answer_tag, "boxed": _boxed, "full": lambda t: t}[extract]

    def reward(completions: list[str], **fields: list) -> list[float | None]:
        refs = reward_field(fields, field, len(completions), "exact_match")
        out: list[float | None] = []
        for text, ref in zip(completions, refs):
            got = pick(text) if isinstance(text, str) else None
            if got is None or ref is None:
                out.append(None)
            else:
                out.append(1.0 if _answers_equal(got, str(ref)) else 0.0)
        return out

    return reward


# --------------------------------------------------------------------------------------------
# math_verify
# --------------------------------------------------------------------------------------------

MATH_VERIFY_MAX_CHARS = 2000  # only the last 2000 characters of a completion are parsed
_MAX_DIGITS = 1e6  # numbers with more digits than this are not evaluated
_MAX_TERMS = 1000  # symbolic expansions with more terms than this are not evaluated


def _log10_size(e) -> float:
    """Upper bound on log10 of the largest number evaluating sympy expression `e` can produce."""
    import sympy

    if isinstance(e, sympy.MatrixBase):
        return sum(_log10_size(x) for x in e)
    if not isinstance(e, sympy.Basic):
        return 0.0
    if e.is_Rational:
        return max(math.log10(abs(e.p) or 1), math.log10(e.q))
    if e.is_Float:
        f = abs(float(e))
        return math.log10(f) if f > 1 else 0.0
    if e.is_Pow:
        base, exp = e.args
        le = _log10_size(exp)
        return math.inf if le > 15 else 10.0**le * _log10_size(base)
    if isinstance(e, (sympy.factorial, sympy.binomial, sympy.factorial2, sympy.subfactorial)):
        la = max((_log10_size(a) for a in e.args), default=0.0)
        return math.inf if la > 15 else 10.0**la * max(la, 1.0)
    return sum(_log10_size(a) for a in e.args)


def _expansion_terms(e) -> float:
    """Rough count of the terms a full symbolic expansion of `e` would have."""
    import sympy

    if not isinstance(e, sympy.Basic) or not e.args:
        return 1.0
    if e.is_Add:
        return sum(_expansion_terms(a) for a in e.args)
    if e.is_Mul:
        return math.prod(_expansion_terms(a) for a in e.args)
    if e.is_Pow and e.args[0].free_symbols:
        k = _expansion_terms(e.args[0])
        if k <= 1:
            return 1.0
        ln = _log10_size(e.args[1])
        n = math.inf if ln > 6 else round(10.0**ln)
        return math.inf if n > 10**6 else float(math.comb(n + int(min(k, 50)) - 1, int(min(k, 50)) - 1))
    return max(_expansion_terms(a) for a in e.args)


def _too_expensive(parsed: list) -> bool:
    """True if verifying `parsed` could take unbounded time (power towers, (10^10)!, (x+y)^1000)."""
    try:
        return any(_log10_size(p) > _MAX_DIGITS or _expansion_terms(p) > _MAX_TERMS for p in parsed)
    except (RecursionError, OverflowError, ValueError, TypeError):
        return True


def _has_nan(parsed: list) -> bool:
    """True if a parsed answer holds NaN, or a symbol spelt nan/inf (e.g. from `\\text{NaN}`)."""
    import sympy

    for p in parsed:
        if isinstance(p, sympy.Basic):
            if p.has(sympy.nan) or any(_NON_FINITE.fullmatch(s.name) for s in p.atoms(sympy.Symbol)):
                return True
    return False


class _Deadline:
    """Context manager: raise math-verify's TimeoutException in this thread after `seconds`.

    math-verify's own timeout uses signal.alarm, which works only in the main thread (and would
    clobber a SIGALRM the caller uses), so both its timeouts are disabled (None) and this one is
    used instead: a `sys.settrace` hook that checks the clock at every Python function call. It
    works in any thread and bounds the whole sample (parse gold, parse completion, verify), not
    each step. A single long C call (a huge integer power) is not interrupted; `_too_expensive`
    refuses those beforehand. The exception is suppressed on exit; `expired` tells it happened.

    CPython removes a trace hook that raises, and math-verify catches the exception inside parse
    and each comparison, so callers run `check()` between steps: it raises again once expired and
    otherwise puts the hook back.
    """

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False

    def _trace(self, frame, event, arg):
        if time.monotonic() > self.end:
            self.expired = True
            raise _timeout_exception()("math_verify reward: time limit reached")
        return None  # no per-line tracing

    def check(self) -> None:
        if self.expired or time.monotonic() > self.end:
            self.expired = True
            raise _timeout_exception()("math_verify reward: time limit reached")
        sys.settrace(self._trace)

    def __enter__(self) -> "_Deadline":
        self._prev = sys.gettrace()
        sys.settrace(self._trace)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        sys.settrace(self._prev)
        self.expired = self.expired or time.monotonic() > self.end
        return exc_type is not None and issubclass(exc_type, _timeout_exception())


def _timeout_exception() -> type[BaseException]:
    from math_verify.errors import TimeoutException

    return TimeoutException


def _parse_gold(gold: str) -> list:
    from math_verify import parse

    if "$" in gold or "\\boxed" in gold:
        return parse(gold, parsing_timeout=None)
    # A bare gold like "2\pi" or "x^2" is only read as LaTeX when wrapped.
    return parse("\\boxed{" + gold + "}", parsing_timeout=None) or parse(gold, parsing_timeout=None)


def _math_verify_score(text: str, gold: str, deadline: _Deadline | None = None) -> float | None:
    """Parse gold and completion and compare every pair (as math_verify.verify does on lists),
    checking `deadline` between steps."""
    from math_verify import parse, verify

    check = deadline.check if deadline is not None else (lambda: None)
    gold_parsed = _parse_gold(gold[-MATH_VERIFY_MAX_CHARS:])
    check()
    pred_parsed = parse(text[-MATH_VERIFY_MAX_CHARS:], parsing_timeout=None)
    check()
    if not gold_parsed or not pred_parsed or _too_expensive(gold_parsed) or _too_expensive(pred_parsed):
        return None
    if _has_nan(gold_parsed) or _has_nan(pred_parsed):
        return 0.0
    for g in gold_parsed:
        for p in pred_parsed:
            check()
            if verify(g, p, timeout_seconds=None):
                return 1.0
    check()
    return 0.0


_warmed_up = False


def _warm_up() -> None:
    """Pay math-verify's and sympy's one-off lazy imports and parser builds (~2 s) once, at build
    time, so they do not eat into the first samples' time limits."""
    global _warmed_up
    if not _warmed_up:
        warm = [("\\boxed{\\frac{1}{2}}", "0.5"), ("$x^2+2x+1$", "(x+1)^2"), ("\\boxed{\\{1,2\\}}", "\\{1,2\\}")]
        for text, gold in warm:
            _math_verify_score(text, gold)
        _warmed_up = True


@register_reward("math_verify")
def math_verify(field: str = "answer", timeout_s: float = 5.0):
    """1.0 if math-verify finds the completion equivalent to the gold answer, else 0.0.

    Only the last `MATH_VERIFY_MAX_CHARS` (2000) characters of a completion are parsed, so huge
    outputs cost bounded time. Each sample gets `timeout_s` seconds in all, enforced by `_Deadline`
    in whatever thread calls it (math-verify's signal-based timeouts are off); a sample that runs
    out of time scores None. Expressions that could take unbounded time inside one C call (numbers
    beyond 10^6 digits) or expand hugely (beyond 1000 terms) are refused up front (None). None also
    when the completion or the gold parses to nothing; an answer that is NaN never matches.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"math_verify: timeout_s must be a positive number, got {timeout_s!r}")
    if not math.isfinite(timeout_s):
        raise ValueError(f"math_verify: timeout_s must be finite, got {timeout_s!r}")
    _warm_up()  # also fails here, not per sample, if math-verify is missing

    def one(text: Any, gold: Any) -> float | None:
        if not isinstance(text, str) or gold is None:
            return None
        score = None
        with _Deadline(timeout_s) as deadline:
            score = _math_verify_score(text, str(gold), deadline)
        return None if deadline.expired else score

    def reward(completions: list[str], **fields: list) -> list[float | None]:
        golds = reward_field(fields, field, len(completions), "math_verify")
        return [one(text, gold) for text, gold in zip(completions, golds)]

    return reward


# --------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------


def _tags_in_order(text: str, tags: tuple[str, ...]) -> bool:
    """`<t1>...</t1> <t2>...</t2> ...`: each tag once, in order, only whitespace outside them."""
    pos = 0
    for tag in tags:
        open_, close = f"<{tag}>", f"</{tag}>"
        if text.count(open_) != 1 or text.count(close) != 1:
            return False
        i, j = text.find(open_), text.find(close)
        if i < pos or j < i or text[pos:i].strip():
            return False
        pos = j + len(close)
    return not text[pos:].strip()


@register_reward("format")
def format_reward(pattern: str | None = None, tags: list[str] | tuple[str, ...] = ("think", "answer")):
    """1.0 if the completion has the expected structure, else 0.0 (never None).

    Default: `<think>...</think>` then `<answer>...</answer>`, each exactly once, in order, with only
    whitespace around them (content may be empty). `tags` changes the tag sequence. `pattern`, when
    given, replaces the tag check: a regex matched with re.fullmatch and re.DOTALL (its run time on
    long outputs is the pattern author's responsibility).
    """
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ValueError(f"format: pattern must be a string, got {type(pattern).__name__}")
        try:
            regex = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ValueError(f"format: invalid regex pattern {pattern!r}: {e}") from None

        def check(text: str) -> bool:
            return regex.fullmatch(text) is not None

    else:
        if isinstance(tags, str) or not tags:
            raise ValueError(f"format: tags must be a non-empty list of tag names, got {tags!r}")
        tags = tuple(tags)
        for t in tags:
            if not isinstance(t, str) or not t or any(c in t for c in "<>/ \t\n"):
                raise ValueError(f"format: bad tag name {t!r} (a plain name like 'answer')")
        if len(set(tags)) != len(tags):
            raise ValueError(f"format: tags must be distinct, got {list(tags)}")

        def check(text: str) -> bool:
            return _tags_in_order(text, tags)

    def reward(completions: list[str], **fields: list) -> list[float]:
        return [1.0 if isinstance(t, str) and check(t) else 0.0 for t in completions]

    return reward


# --------------------------------------------------------------------------------------------
# overlong (DAPO overlong shaping, METHODS.md B.15)
# --------------------------------------------------------------------------------------------


def overlong_penalty(length: float, max_len: int, cache_len: int, factor: float = 1.0) -> float:
    """DAPO soft overlong punishment for a completion of `length` (L):

        0                                   if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache * factor   if L_max - L_cache < L < L_max
        -factor                             if L >= L_max
    """
    expected = max_len - cache_len
    if length <= expected:
        return 0.0
    if length < max_len:
        return (expected - length) / cache_len * factor
    return -factor


@register_reward("length_penalty")
@register_reward("overlong")
def overlong(max_len: int, cache_len: int, factor: float = 1.0, unit: str = "tokens"):
    """DAPO overlong shaping (METHODS.md B.15), a score in [-factor, 0] added to the accuracy reward.

    `unit="tokens"`: lengths come from the field `completion_length` (list[int], passed by the
    trainer); calling without it raises ValueError. `unit="chars"`: the completion's character count.
    A missing, negative or non-finite length gives None for that sample.
    """
    for name, v in (("max_len", max_len), ("cache_len", cache_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"overlong: {name} must be a positive integer, got {v!r}")
    if cache_len >= max_len:
        raise ValueError(f"overlong: cache_len ({cache_len}) must be smaller than max_len ({max_len})")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
        raise ValueError(f"overlong: factor must be a finite number >= 0, got {factor!r}")
    if unit not in ("tokens", "chars"):
        raise ValueError(f"overlong: unit must be 'tokens' or 'chars', got {unit!r}")

    def one(length: Any) -> float | None:
        if isinstance(length, bool):
            return None
        try:
            length = float(length)
        except (TypeError, ValueError, OverflowError):
            return None
        if not math.isfinite(length) or length < 0:
            return None
        return overlong_penalty(length, max_len, cache_len, float(factor))

    def reward(completions: list[str], **fields: list) -> list[float | None]:
        if unit == "chars":
            return [one(len(t)) if isinstance(t, str) else None for t in completions]
        if "completion_length" not in fields:
            raise ValueError(
                "overlong: unit='tokens' needs the field 'completion_length' (token counts, passed by the "
                "trainer); set unit='chars' to measure characters instead"
            )
        lengths = reward_field(fields, "completion_length", len(completions), "overlong")
        return [one(n) for n in lengths]

    return reward


# --------------------------------------------------------------------------------------------
# exploration (RLSP, METHODS.md B.13)
# --------------------------------------------------------------------------------------------


def reasoning_steps(text: str, delimiter: str = "\n") -> int:
    """Distinct non-empty steps of the reasoning: the text inside <think>...</think> when present (else
    all of it) split at `delimiter`, stripped; a repeated step counts once, so padding by copying
    earns nothing."""
    m = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    body = m.group(1) if m else text
    return len({s.strip() for s in body.split(delimiter) if s.strip()})


@register_reward("exploration")
def exploration(target: int = 16, unit: str = "steps", delimiter: str = "\n"):
    """RLSP's exploration reward (Ye et al. 2025, arXiv 2502.06773) [APPROX]: min(count / target, 1),
    decoupled from correctness, where count is the number of distinct reasoning steps (`reasoning_steps`)
    or the completion's tokens (`unit="tokens"`, from the field `completion_length`).

    The paper gives r = alpha * verifier + (1 - alpha) * r_explore without the exact r_explore: combine it
    with a verifier through the rewards' weights (e.g. 0.8 / 0.2); the verifier term is what keeps
    longer reasoning from being rewarded for its own sake.
    """
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ValueError(f"exploration: target must be a positive integer, got {target!r}")
    if unit not in ("steps", "tokens"):
        raise ValueError(f"exploration: unit must be 'steps' or 'tokens', got {unit!r}")
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError(f"exploration: delimiter must be a non-empty string, got {delimiter!r}")

    def reward(completions: list[str], **fields: list) -> list[float | None]:
        if unit == "tokens":
            lengths = reward_field(fields, "completion_length", len(completions), "exploration")
            return [min(float(n) / target, 1.0) if isinstance(n, (int, float)) and n >= 0 else None for n in lengths]
        return [min(reasoning_steps(t, delimiter) / target, 1.0) if isinstance(t, str) else None for t in completions]

    return reward
