"""Built-in text rewards (llm_rl/rewards.py): hand-written cases, adversarial inputs, time bounds."""

import math
import signal
import sys
import threading
import time

import pytest

import llm_rl.rewards  # noqa: F401  (registers the rewards)
from llm_rl.rewards import overlong_penalty
from shared.rewards import REWARDS

ADVERSARIAL = [
    "",
    " ",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e999",
    "-1e999",
    "1e99999999999999999999999999",
    "NaN-like",
    "\x00\x01\ufffd\u202e\U0001f600",
    "٣٤",  # Arabic-Indic digits
    "<answer>" * 5000,
    "</answer>" * 5000,
    "<think></think>" * 3000 + "<answer>1</answer>" * 3000,
    "\\boxed{" * 5000,
    "}" * 5000 + "\\boxed{",
    "\\boxed{" + "{" * 20000,
    "1," * 50000,
    "9" * 100000,
    "$$$$",
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{(10^{10})!}",
    "\\boxed{(x+y+z)^{100}}",
    "(" * 3000 + "1" + ")" * 3000,
]
ADVERSARIAL_REFS = ["42", None, "nan", "inf", "1e999", "", 3, 2.5, float("nan"), "\\frac{1}{2}"]


def make(name, **kwargs):
    return REWARDS[name](**kwargs)


def em(completions, answers, **kwargs):
    return make("exact_match", **kwargs)(completions, answer=answers)


# --------------------------------------------------------------------------------------------
# exact_match
# --------------------------------------------------------------------------------------------


def test_exact_match_last_number():
    out = em(
        ["So 6*7 = 42", "The answer is 41.", "I think 42.0 apples", "no number here", "answer: -3", "1,000 people"],
        ["42", "42", "42", "42", "-3", "1000"],
    )
    assert out == [1.0, 0.0, 1.0, None, 1.0, 1.0]


def test_exact_match_number_normalisation():
    out = em(
        ["x = 1000", "It costs 1,234,567.50", "0.5", "2e3", "007"],
        ["1,000", "1234567.5", " .5. ", "2000", "7"],
    )
    assert out == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_exact_match_reference_types():
    # numeric references from a dataset column; None means the row cannot be scored
    assert em(["42", "2.5", "3", "3"], [42, 2.5, 3.0, None]) == [1.0, 1.0, 1.0, None]


def test_exact_match_nan_and_inf_never_match():
    full = dict(extract="full")
    assert em(["nan", "inf", "-inf", "NaN", "Infinity"], ["nan", "inf", "-inf", "NaN", "infinity"], **full) == [0.0] * 5
    # 1e999 overflows a float: numeric but beyond range, so it never matches either
    assert em(["1e999", "1e99999999999999999999999"], ["1e999", "1e99999999999999999999999"]) == [0.0, 0.0]
    assert em(["42"], [float("nan")]) == [0.0]
    assert em(["42"], [float("inf")]) == [0.0]


def test_exact_match_answer_tag():
    out = em(
        [
            "<think>hmm 41</think><answer> 42 </answer>",
            "<answer>1</answer> then <answer>42.</answer>",  # the last tag counts
            "<answer>Paris</answer>",
            "<answer>paris</answer>",
            "42 without tags",
            "<answer>42",
        ],
        ["42", "42", "Paris", "Paris", "42", "42"],
        extract="answer_tag",
    )
    assert out == [1.0, 1.0, 1.0, 0.0, None, None]


def test_exact_match_boxed_nested_braces():
    out = em(
        [
            "so \\boxed{\\frac{1}{2}}.",
            "\\boxed{1} then finally \\boxed{ 42 }",
            "\\boxed{\\sqrt{\\frac{a}{b}}}",
            "\\boxed{\\frac{1}{2}",  # unclosed
            "no box",
            "\\boxed {1,000}",
        ],
        ["\\frac{1}{2}", "42.0", "\\sqrt{\\frac{a}{b}}", "\\frac{1}{2}", "1", "1000"],
        extract="boxed",
    )
    assert out == [1.0, 1.0, 1.0, None, None, 1.0]


def test_exact_match_full():
    out = em(
        ["  Paris. ", "Paris   is nice", "Paris is  nice", "42.00"],
        ["Paris", "Paris is nice", "Paris is nice", "42"],
        extract="full",
    )
    assert out == [1.0, 1.0, 1.0, 1.0]


def test_exact_match_bad_kwargs_and_missing_field():
    with pytest.raises(ValueError, match="extract must be one of"):
        make("exact_match", extract="last")
    with pytest.raises(ValueError, match="field 'answer'"):
        make("exact_match")(["1"], label=["1"])
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        make("exact_match")(["1"], answer=["1", "2"])
    assert make("exact_match", field="label")(["7"], label=["7"]) == [1.0]


# --------------------------------------------------------------------------------------------
# math_verify
# --------------------------------------------------------------------------------------------


def test_math_verify_equivalent_forms():
    mv = make("math_verify")
    out = mv(
        ["so \\boxed{\\frac{1}{2}}", "The answer is 0.5", "\\boxed{3}", "\\boxed{2\\pi}", "x = \\boxed{x^2+2x+1}"],
        answer=["0.5", "\\frac{1}{2}", "4", "2\\pi", "(x+1)^2"],
    )
    assert out == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_math_verify_unparseable_gives_none():
    mv = make("math_verify")
    assert mv(["", "no math at all", "\\boxed{1}"], answer=["1", "1", None]) == [None, None, None]


def test_math_verify_nan_never_matches_and_huge_refused():
    mv = make("math_verify")
    out = mv(
        ["\\boxed{\\text{nan}}", "\\boxed{10^{10^{10}}}", "\\boxed{(x+1)^{1000}}", "\\boxed{(10^{10})!}"],
        answer=["\\text{nan}", "1", "x", "1"],
    )
    assert out[0] == 0.0
    assert out[1:] == [None, None, None]  # could take unbounded time to verify: refused


def test_math_verify_reads_only_the_tail():
    mv = make("math_verify")
    head = "\\boxed{7} " + "x" * 5000  # the box lies before the last 2000 characters
    assert mv([head, "y" * 1_000_000 + " \\boxed{7}"], answer=["7", "7"]) == [None, 1.0]


def test_math_verify_in_a_thread():
    mv = make("math_verify", timeout_s=1.0)
    result, errors = [], []

    def work():
        try:
            result.append(mv(["\\boxed{\\frac{1}{2}}", "\\boxed{2}"], answer=["0.5", "3"]))
        except Exception as e:  # pragma: no cover - the failure is asserted below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert not errors and result == [[1.0, 0.0]]


@pytest.mark.parametrize("in_thread", [False, True])
def test_math_verify_time_limit_holds_in_any_thread(in_thread):
    # math-verify's LaTeX parser is exponential in such chains (~30 s for 20 links): the per-sample
    # deadline must cut it off in the main thread and in worker threads alike.
    mv = make("math_verify", timeout_s=0.5)
    tower = "\\boxed{" + "x^" * 30 + "2}"  # slow to parse
    expansion = "\\boxed{(x+y+z+w)^{16}}"  # parses fast, ~4 s to compare with x^2
    handler, tracer = signal.getsignal(signal.SIGALRM), sys.gettrace()
    result = []

    def work():
        t0 = time.perf_counter()
        result.append((mv([tower, expansion, "\\boxed{3}"], answer=["1", "x^2", "3"]), time.perf_counter() - t0))

    if in_thread:
        t = threading.Thread(target=work)
        t.start()
        t.join(30)
    else:
        work()
    (out, elapsed), = result
    assert out == [None, None, 1.0]  # the next sample still gets its own time
    assert elapsed < 4.0
    assert signal.getsignal(signal.SIGALRM) is handler and sys.gettrace() is tracer


def test_math_verify_bad_kwargs():
    for bad in (0, -1.0, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="timeout_s"):
            make("math_verify", timeout_s=bad)


# --------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------


def test_format_default_tags():
    fmt = make("format")
    cases = {
        "<think>reason</think><answer>42</answer>": 1.0,
        "  <think>\nreason\n</think>\n\n<answer> 42 </answer>\n": 1.0,
        "<think></think><answer></answer>": 1.0,
        "<answer>42</answer><think>r</think>": 0.0,  # wrong order
        "<think>r</think>": 0.0,  # missing answer
        "<think>r</think><answer>1</answer><answer>2</answer>": 0.0,  # duplicate
        "<think>a</think><think>b</think><answer>1</answer>": 0.0,
        "text <think>r</think><answer>1</answer>": 0.0,  # text outside the tags
        "<think>r</think> text <answer>1</answer>": 0.0,
        "<think>r</think><answer>1</answer> trailing": 0.0,
        "<think>r<answer>1</think></answer>": 0.0,  # interleaved
        "<think>r</think><answer>1": 0.0,
        "": 0.0,
    }
    assert fmt(list(cases)) == list(cases.values())
    assert fmt([None, 3]) == [0.0, 0.0]


def test_format_custom_tags_and_pattern():
    fmt = make("format", tags=["reasoning", "code"])
    assert fmt(["<reasoning>r</reasoning> <code>x=1</code>", "<think>r</think><answer>1</answer>"]) == [1.0, 0.0]
    pat = make("format", pattern=r"<answer>\d+</answer>")
    assert pat(["<answer>42</answer>", "<answer>4\n2</answer>", "x<answer>42</answer>"]) == [1.0, 0.0, 0.0]
    dotall = make("format", pattern=r"<think>.*</think>")
    assert dotall(["<think>a\nb</think>"]) == [1.0]


def test_format_bad_kwargs():
    with pytest.raises(ValueError, match="invalid regex"):
        make("format", pattern="(")
    for bad in ([], "answer", ["<answer>"], ["a", "a"], [""]):
        with pytest.raises(ValueError, match="tag"):
            make("format", tags=bad)


# --------------------------------------------------------------------------------------------
# overlong (DAPO, METHODS.md B.15)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, expected",
    [
        (0, 0.0),
        (16, 0.0),  # = max_len - cache_len: no penalty
        (17, -0.25),  # (16 - 17) / 4
        (18, -0.5),  # (16 - 18) / 4
        (19, -0.75),
        (20, -1.0),  # at max_len
        (25, -1.0),  # beyond
    ],
)
def test_overlong_formula(length, expected):
    assert overlong_penalty(length, max_len=20, cache_len=4) == pytest.approx(expected)
    r = make("overlong", max_len=20, cache_len=4)
    assert r(["x"], completion_length=[length]) == [pytest.approx(expected)]


def test_overlong_factor_units_and_alias():
    r = make("length_penalty", max_len=20, cache_len=4, factor=0.5)
    assert r(["a", "b", "c"], completion_length=[10, 18, 30]) == [0.0, -0.25, -0.5]
    chars = make("overlong", max_len=20, cache_len=4, unit="chars")
    assert chars(["x" * 16, "x" * 18, "x" * 20, "x" * 10**6]) == [0.0, -0.5, -1.0, -1.0]
    # DAPO's own numbers: L_max = 20480, L_cache = 4096
    dapo = make("overlong", max_len=20480, cache_len=4096)
    assert dapo(["", "", ""], completion_length=[16384, 18432, 20480]) == [0.0, -0.5, -1.0]


def test_overlong_missing_field_and_bad_lengths():
    r = make("overlong", max_len=20, cache_len=4)
    with pytest.raises(ValueError, match="completion_length"):
        r(["abc"])
    out = r(["a"] * 6, completion_length=[None, -1, float("nan"), float("inf"), "x", True])
    assert out == [None] * 6


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_len=20, cache_len=20),
        dict(max_len=20, cache_len=30),
        dict(max_len=0, cache_len=4),
        dict(max_len=20, cache_len=0),
        dict(max_len=20, cache_len=-1),
        dict(max_len=20.5, cache_len=4),
        dict(max_len=20, cache_len=4, factor=-1.0),
        dict(max_len=20, cache_len=4, factor=float("nan")),
        dict(max_len=20, cache_len=4, unit="words"),
    ],
)
def test_overlong_bad_kwargs(kwargs):
    with pytest.raises(ValueError, match="overlong"):
        make("overlong", **kwargs)


# --------------------------------------------------------------------------------------------
# adversarial inputs and time bounds
# --------------------------------------------------------------------------------------------

ALL = [
    ("exact_match", dict(extract="last_number")),
    ("exact_match", dict(extract="answer_tag")),
    ("exact_match", dict(extract="boxed")),
    ("exact_match", dict(extract="full")),
    ("math_verify", dict(timeout_s=2.0)),
    ("format", dict()),
    ("overlong", dict(max_len=20, cache_len=4, unit="chars")),
]


@pytest.mark.parametrize("name, kwargs", ALL)
def test_adversarial_inputs_never_raise(name, kwargs):
    r = make(name, **kwargs)
    n = len(ADVERSARIAL)
    refs = [ADVERSARIAL_REFS[i % len(ADVERSARIAL_REFS)] for i in range(n)]
    out = r(ADVERSARIAL, answer=refs, completion_length=list(range(n)))
    assert len(out) == n
    for v in out:
        assert v is None or (isinstance(v, float) and math.isfinite(v))
    if name == "format":
        assert all(v is not None for v in out)


MB = 1_000_000
HUGE = [
    "x" * MB,
    "1 " * (MB // 2),
    "1," * (MB // 2),
    "9" * MB,
    "<answer>" * (MB // 8),
    "<think>" * (MB // 14) + "</think>" * 10,
    "\\boxed{" * (MB // 7),
    "{" * MB,
    "\\boxed{" + "{" * MB,
    "a" * MB + "<answer>42</answer>",
    "\ufffd\U0001f600" * (MB // 2),
]


@pytest.mark.parametrize("name, kwargs", ALL)
def test_one_megabyte_inputs_are_fast(name, kwargs):
    r = make(name, **kwargs)
    for text in HUGE:
        t0 = time.perf_counter()
        out = r([text], answer=["42"], completion_length=[len(text)])
        elapsed = time.perf_counter() - t0
        assert elapsed < 2.0, f"{name}{kwargs} took {elapsed:.2f}s on {text[:20]!r}..."
        assert len(out) == 1


# ------------------------------------------------------------------ exploration (RLSP)

def test_reasoning_steps_counts_distinct_non_empty_steps():
    from llm_rl.rewards import reasoning_steps

    assert reasoning_steps("a\nb\n\n c \n") == 3
    assert reasoning_steps("a\na\na\nb") == 2  # copies earn nothing
    assert reasoning_steps("<think>x\ny</think>\n<answer>1\n2\n3</answer>") == 2  # only the reasoning counts
    assert reasoning_steps("") == 0
    assert reasoning_steps("s1; s2; s1", delimiter=";") == 2


def test_exploration_reward_by_hand():
    from shared.rewards import REWARDS

    r = REWARDS["exploration"](target=4)
    assert r(["a\nb", "a\nb\nc\nd\ne\nf", "", None]) == [0.5, 1.0, 0.0, None]
    t = REWARDS["exploration"](target=10, unit="tokens")
    assert t(["x", "y", "z"], completion_length=[5, 20, -1]) == [0.5, 1.0, None]
    with pytest.raises(ValueError, match="exploration: target"):
        REWARDS["exploration"](target=0)
    with pytest.raises(ValueError, match="exploration: unit"):
        REWARDS["exploration"](unit="words")
