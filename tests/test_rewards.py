"""Tests of the reward's answer rules and cost bounds (rewards.py), from a user audit.

Each rule has rows that must match and rows that must stay different; the format and tidy checks
are compared with the official regexes they replace (oracles) on random strings; and adversarial
responses are timed, on the main thread and in a worker thread, against a fixed budget.
"""
import multiprocessing
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import rewards


def boxed(content: str) -> str:
    """A well-formed response whose final answer is `content`."""
    return f"<think>looking at it</think> \\boxed{{{content}}}"


# ---------------------------------------------------------------------------------------------
# Equations: the answer only with a lone variable on the left
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, expected", [
    ("4=3", 0.0), ("1+1=3", 0.0), ("0=3", 0.0),   # math-verify took the right side: 1.0
    ("2x=6", 0.0), ("\\pi=3", 0.0), ("3=x", 0.0), ("AB+1=3", 0.0), ("f(x)+1=3", 0.0),
    ("AB=4", 0.0), ("f(x)=4", 0.0),
    ("AB=3", 1.0), ("f(x)=3", 1.0),               # a named quantity: a segment, a function
    ("x=3", 1.0), ("y = 3", 1.0), ("x_1=3", 1.0), ("x_{12} = 3", 1.0), ("\\theta=3", 1.0),
    ("x = 2+1", 1.0), ("x=4", 0.0),
])
def test_an_equation_is_the_answer_only_when_its_left_side_names_the_quantity(pred, expected):
    assert rewards.accuracy_reward(boxed(pred), "3") == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("y=2x+1", "y=2x+1", 1.0), ("2x+1", "y=2x+1", 1.0), ("y = 1+2x", "y=2x+1", 1.0),
    ("y=2x+2", "y=2x+1", 0.0),
])
def test_an_equation_gold_answer_keeps_math_verify_rules(pred, gold, expected):
    assert rewards.accuracy_reward(boxed(pred), gold) == expected


# ---------------------------------------------------------------------------------------------
# Boxes: an unclosed final box is no answer, whatever it contains
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("\\boxed{\\boxed{3}", None),                  # the outer (final) box never closes
    ("\\boxed{1} \\boxed{\\boxed{3}", None),
    ("\\boxed{3 and then \\boxed{4}", None),       # a later box inside an unclosed one
    ("\\boxed{\\boxed{3}}", "3"),                  # closed: the inner box, as before
    ("\\boxed{2} \\boxed{\\boxed{3}}", "3"),
    ("\\boxed{\\{1\\} \\boxed{3}}", "3"),
    ("\\boxed{a} b \\boxed{c}", "c"),
])
def test_extract_boxed_needs_the_final_top_level_box_closed(text, expected):
    assert rewards.extract_boxed(text) == expected


def test_an_unclosed_outer_box_scores_no_accuracy():
    text = "<think>x</think> \\boxed{\\boxed{3}"
    assert rewards.reward_details(text, "3") == {"reward": 0.1, "accuracy": 0.0, "format": 1.0}


# ---------------------------------------------------------------------------------------------
# Numbers: one rule at every scale, scientific notation by value
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, equal", [
    ("3.0000004", "3", True), ("0.3000004", "0.3", True),    # once 0 and 1: now the same rule
    ("2.9999996", "3", True), ("3000000.4", "3000000", True), ("0.0000030000004", "3e-6", True),
    ("0.333333", "\\frac{1}{3}", True), ("0.142857", "\\frac{1}{7}", True),
    ("3.14159", "\\pi", True), ("0.707107", "\\frac{\\sqrt{2}}{2}", True),
    ("3.01", "3", False), ("0.31", "0.3", False), ("3.00001", "3", False),
    ("3.1416", "\\pi", False), ("0.0000001", "0", False), ("0.666666", "\\frac{2}{3}", False),
    ("1234567", "1234568", False),                           # integers are exact
])
def test_rounded_numbers_match_to_half_a_unit_in_the_sixth_significant_digit(a, b, equal):
    assert rewards.answers_match(a, b) == equal
    assert rewards.answers_match(b, a) == equal


@pytest.mark.parametrize("a, b, equal", [
    ("100000", "1e5", True), ("1.5e-3", "0.0015", True), ("1.5E-3", "0.0015", True),
    ("10^5", "100000", True), ("10^{5}", "1e5", True), ("1.5\\times10^{-3}", "0.0015", True),
    ("2\\cdot 10^{4}", "20000", True), ("1e5", "\\frac{10^{6}}{10}", True),
    ("1.5e-3", "\\frac{3}{2000}", True), ("-2e3", "-2000", True),
    ("2e5", "100000", False), ("1e-5", "1e5", False), ("1e5", "1e6", False),
])
def test_scientific_notation_compares_by_value(a, b, equal):
    assert rewards.answers_match(a, b) == equal
    assert rewards.answers_match(b, a) == equal


def test_scientific_notation_is_a_usable_gold_answer():
    assert rewards.gold_answer_problem("1e5") is None
    assert rewards.accuracy_reward(boxed("100000"), "1e5") == 1.0


# ---------------------------------------------------------------------------------------------
# Percent: a sign on one side only accepts both readings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gold, equal", [
    ("50\\%", "50", True), ("50%", "50", True),
    ("50", "50\\%", True), ("0.5", "50\\%", True), ("\\frac{1}{2}", "50\\%", True),
    ("50\\%", "0.5", True), ("50%", "50\\%", True), ("12.5\\%", "0.125", True),
    ("0.5", "50", False), ("50", "0.5", False), ("5", "50\\%", False), ("0.05", "50\\%", False),
    ("50\\%", "5", False), ("\\%", "50", False),
])
def test_percent_rule(pred, gold, equal):
    assert rewards.answers_match(pred, gold) == equal


# ---------------------------------------------------------------------------------------------
# The linear format and tidy checks equal the official regexes (oracles)
# ---------------------------------------------------------------------------------------------

OFFICIAL_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
PIECES = ["<think>", "</think>", "\\boxed{", "}", "</ think>",     # the format's parts, drawn
          "{", "<", ">", "/", "think", "\\boxed", "a", " ", "\n", "\t", "< think >", "x"]
WEIGHTS = np.array([1, 4, 4, 4, 2] + [1] * 12) / 27                  # more often than the rest


def random_strings(n: int, seed: int):
    """Up to 8 random pieces; half of them open with a think tag, so that both verdicts occur."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        pieces = rng.choice(PIECES, size=rng.integers(0, 9), p=WEIGHTS)
        yield ("<think>" if k % 2 else "") + "".join(pieces)


def test_format_reward_equals_the_official_regex_on_random_strings():
    matched = 0
    for s in random_strings(20000, seed=0):
        expected = 1.0 if OFFICIAL_FORMAT.fullmatch(rewards.tidy_response(s).strip()) else 0.0
        assert rewards.format_reward(s) == expected, repr(s)
        matched += expected == 1.0
    assert matched > 300  # the random strings do reach both verdicts (428 of 20000 match)


OFFICIAL_QWEN3_FORMAT = re.compile(r".*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def test_format_reward_after_an_opened_think_equals_the_official_qwen3_regex():
    """A Thinking model's prompt opens <think>, so its responses start inside the block: the
    official Qwen3 check asks only for </think>, then a box. Same random strings, both verdicts;
    the Qwen2.5 check (no thinking_open) refuses the responses that lack the opening tag."""
    matched = 0
    for s in random_strings(20000, seed=2):
        tidy = rewards.tidy_response(s).strip()
        expected = 1.0 if OFFICIAL_QWEN3_FORMAT.fullmatch(tidy) else 0.0
        assert rewards.format_reward(s, thinking_open=True) == expected, repr(s)
        matched += expected == 1.0
    assert matched > 600
    inside = "I count 3 shapes.</think> \\boxed{3}"
    assert rewards.format_reward(inside, thinking_open=True) == 1.0
    assert rewards.format_reward(inside) == 0.0
    assert rewards.reward_details(inside, "3", thinking_open=True) == {
        "reward": 1.0, "accuracy": 1.0, "format": 1.0}
    assert rewards.format_reward("I count 3 shapes. \\boxed{3}", thinking_open=True) == 0.0


def test_tidy_response_equals_the_official_regex_on_random_strings():
    for s in random_strings(20000, seed=1):
        assert rewards.tidy_response(s) == re.sub(r"\s*([<>/])\s*", r"\1", s), repr(s)


# ---------------------------------------------------------------------------------------------
# Cost: any response is graded within a fixed budget, on any thread
# ---------------------------------------------------------------------------------------------

BUDGET_S = 2.0  # per call; the worst case measured is MATH_TIME_LIMIT + about 20 ms

rng = np.random.default_rng(0)
ADVERSARIAL = {
    "random unicode, 100k": "".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, 100_000)),
    "random {}\\^!<>/ 100k": "<think>" + "".join(rng.choice(list("{}\\^!<>/ 9x"), 100_000)),
    "cubic for the format regex": "<think>" + "</think>\\boxed{" * 6600,
    "quadratic for the tidy regex": " " * 100_000 + "a",
    "many unclosed boxes": "<think></think>" + "\\boxed{" * 14000,
    "many closed boxes": "<think></think>" + "\\boxed{1}" * 11000,
    "deep braces": boxed("{" * 50000 + "}" * 50000),
    "long digits": boxed("9" * 99_950),
    "tower": boxed("9^{9^{9}}"),
    "huge exponent": boxed("10^{9999999}"),
    "factorial": boxed("(10^{10})!"),
    "binomial": boxed("\\binom{100000}{50000}"),
    "huge e-notation": boxed("1e999999999"),
    "nested powers (passes the screen)": boxed("((9^{9999})^{9999})^{9999}"),
    "polynomial simplify (passes the screen)": boxed(
        "(x+1)^{9}(y+2)^{9}(z+3)^{9}(w+4)^{9}-(x+2)^{9}(y+1)^{9}"),
}


def timed_reward(text: str, gold: str) -> tuple[float, float]:
    start = time.perf_counter()
    value = rewards.reward(text, gold)
    return time.perf_counter() - start, value


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_any_response_is_graded_within_the_budget_on_any_thread(name):
    text = ADVERSARIAL[name]
    for gold in ("3", "2x+1"):
        seconds, value = timed_reward(text, gold)
        assert value in (0.0, 0.1) and seconds < BUDGET_S, (gold, seconds)
        out = {}
        worker = threading.Thread(target=lambda: out.update(result=timed_reward(text, gold)))
        worker.start()
        worker.join()
        assert out["result"][1] == value and out["result"][0] < BUDGET_S, (gold, out)


def test_an_overrunning_comparison_is_killed_and_the_next_call_works():
    assert rewards.answers_match("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}")  # starts this thread's process
    first = rewards._MATH.process.process.pid
    start = time.perf_counter()
    assert not rewards.answers_match("((9^{9999})^{9999})^{9999}", "2x+1")
    assert time.perf_counter() - start < rewards.MATH_TIME_LIMIT + 0.5
    assert rewards._MATH.process.process is None  # killed
    assert rewards.answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    assert rewards._MATH.process.process.pid != first  # a fresh one


def test_a_math_process_that_died_is_replaced():
    assert rewards.answers_match("\\frac{1}{2}", "0.5")
    rewards._MATH.process.process.kill()
    rewards._MATH.process.process.join()
    assert rewards.answers_match("\\frac{1}{2}", "0.5")


REAL_ANSWERS = [  # (prediction, gold): equal values, as models and benchmarks write them
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("2\\sqrt{3}+\\frac{\\pi}{6}", "\\frac{\\pi}{6}+2\\sqrt{3}"),
    ("(1,\\infty)", "(1, \\infty)"), ("x^2+2x+1", "(x+1)^2"), ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("\\sqrt{50}", "5\\sqrt{2}"), ("e^{2}", "\\exp(2)"), ("2^{10}", "1024"), ("5!", "120"),
    ("\\binom{5}{2}", "10"), ("\\frac{(n+1)(n+2)}{2}", "\\frac{n^2+3n+2}{2}"),
    ("-\\frac{5}{12}", "-0.416667"), ("y=2x+1", "2x+1"),
]


@pytest.mark.parametrize("pred, gold", REAL_ANSWERS)
def test_real_answers_pass_the_screen_and_finish_well_inside_the_time_limit(pred, gold):
    assert not rewards._too_complex(pred, gold)
    start = time.perf_counter()
    assert rewards.answers_match(pred, gold) and rewards.answers_match(gold, pred)
    assert time.perf_counter() - start < rewards.MATH_TIME_LIMIT  # two calls, each far below it


@pytest.mark.parametrize("pred", ["9^{9^{9}}", "2^{2^{100}}", "10^{10^{10}}", "9^99999999",
                                  "10^{9999999}", "100000!", "(10^{10})!", "((6!)!)!",
                                  "\\binom{100000}{50000}", "\\Gamma(100000)", "1e999999999",
                                  "\\sum_{i=1}^{1000000} i^i", "\\int_0^1 e^{x^2} dx",
                                  "{" * 20 + "}" * 20, "x^" * 12 + "2", "9" * 250])
def test_the_screen_turns_away_explosive_shapes(pred):
    assert rewards._too_complex(pred, "3")
    start = time.perf_counter()
    assert not rewards.answers_match(pred, "3")
    assert time.perf_counter() - start < 0.1  # no process, no sympy


def _grade_in_a_fork(queue):
    queue.put(rewards.answers_match("\\frac{1}{2}", "0.5"))


def test_a_forked_process_grades_with_its_own_math_process():
    """A fork (a data-loader worker, say) inherits this thread's math process, but not as its
    child: it must start its own."""
    assert rewards.answers_match("\\frac{1}{2}", "0.5")  # this process now has a math process
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_grade_in_a_fork, args=(queue,))
    child.start()
    assert queue.get(timeout=30) is True
    child.join(timeout=30)
    assert child.exitcode == 0


def test_a_trainer_with_its_stop_handler_exits_after_using_the_math_process():
    """train.py catches SIGTERM to stop after a step (processes.catch_stop_signals); at exit,
    multiprocessing stops the daemon math process with SIGTERM and waits for it. A forked math
    process that kept the trainer's handler ignored that and the trainer hung forever after its
    last step - every run of an experiment script waited on it. Here the whole sequence runs in
    a fresh interpreter, which must exit by itself."""
    script = ("import processes, rewards\n"
              "processes.catch_stop_signals()\n"
              "assert rewards.answers_match('\\\\frac{1}{2}', '0.5')\n"
              "assert rewards._MATH.process.process.is_alive()\n"
              "print('graded')\n")
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                              text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter did not exit: the math process ignored SIGTERM")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "graded"


def test_a_spawned_math_process_grades_too_and_its_start_does_not_count(monkeypatch):
    """Where there is no safe fork (macOS, Windows) the math process is spawned: a fresh
    interpreter that imports this module, which takes longer than MATH_TIME_LIMIT. The limit
    counts from the child's "ready", so the first comparison is still graded, not zeroed."""
    monkeypatch.setattr(rewards, "_PROCESSES", multiprocessing.get_context("spawn"))
    monkeypatch.setattr(rewards, "MATH_TIME_LIMIT", 0.5)
    worker = rewards._MathProcess()
    try:
        assert worker.compare([("\\frac{1}{2}", "0.5")], False) is True
        assert worker.compare([("\\frac{1}{3}", "0.5")], False) is False
    finally:
        worker.stop()


def _slow_start_serve(conn, parent_end):
    time.sleep(1.0)                               # a start slower than the time limit below
    _REAL_SERVE(conn, parent_end)


_REAL_SERVE = rewards._serve_math


def test_the_time_limit_counts_from_ready_not_from_the_start(monkeypatch):
    """A math process that takes 1 s to start (as a spawned interpreter can) is waited for; the
    0.5 s limit then applies to the comparison alone. Without the ready handshake this first
    comparison would be cut off and scored 0."""
    monkeypatch.setattr(rewards, "_PROCESSES", multiprocessing.get_context("fork"))
    monkeypatch.setattr(rewards, "_serve_math", _slow_start_serve)
    monkeypatch.setattr(rewards, "MATH_TIME_LIMIT", 0.5)
    worker = rewards._MathProcess()
    try:
        start = time.perf_counter()
        assert worker.compare([("\\frac{1}{2}", "0.5")], False) is True
        assert time.perf_counter() - start >= 1.0
    finally:
        worker.stop()
    monkeypatch.setattr(rewards, "STARTUP_LIMIT", 0.2)   # a start that never says ready in time
    worker = rewards._MathProcess()
    try:
        assert worker.compare([("\\frac{1}{2}", "0.5")], False) is False
    finally:
        worker.stop()


# ---------------------------------------------------------------------------------------------
# What a careful human grader decides (docs/rewards.md, "The comparison rules")
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred,gold,expected", [
    # units: the same number in another unit is wrong; a bare number against a unit is right
    ("5 m", "5 cm", False), ("3 km", "3 m", False), ("5\\text{ m}", "5\\text{ cm}", False),
    ("3", "3 m/s", True), ("3 m/s", "3 m/s", True), ("3\\ \\text{m/s}", "3 m/s", True),
    ("\\frac{1}{2} m", "0.5 m", True), ("5 cm", "5", True), ("4 cm", "5 cm", False),
    ("12 cm^2", "12 cm^2", True), ("12 cm^2", "12 cm^3", False),
    # multiple choice: the option letter in any usual wrapping
    ("(B)", "B", True), ("B)", "B", True), ("\\text{(B)}", "B", True), ("B. 42", "B", True),
    ("B: 42", "B", True), ("(B) 42", "B", True), ("Option B", "B", True), ("b", "B", True),
    ("(C)", "B", False), ("C. 42", "B", False), ("BC", "B", False),
    # several options: the set, in any order or spelling
    ("A, C", "AC", True), ("CA", "AC", True), ("A and C", "AC", True), ("(A)(C)", "AC", True),
    ("A", "AC", False), ("ACD", "AC", False),
    # degrees, thin spaces, full-width characters
    ("30°", "30", True), ("30", "30°", True), ("30^\\circ", "30", True), ("30^{\\circ}", "30°", True),
    ("30 degrees", "30", True), ("31°", "30", False),
    ("1\\,000", "1000", True), ("1000", "1\\,000", True), ("1\\!000", "1000", True),
    ("３", "3", True), ("3", "３", True), ("３.５", "3.5", True),
    # what must stay as it was
    ("2x", "2", False), ("x = 3", "3", True), ("4", "3", False), ("Red", "red", True),
])
def test_grading_decides_as_a_careful_human_grader(pred, gold, expected):
    assert rewards.answers_match(pred, gold) is expected


@pytest.mark.parametrize("gold", ["30°", "３", "3 m/s", "B", "AC", "1\\,000", "12 cm^2"])
def test_those_gold_answers_are_usable(gold):
    assert rewards.gold_answer_problem(gold) is None


# ---------------------------------------------------------------------------------------------
# Multiple choice: a hedge names every letter it lists (an RL policy learns to list them all)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", ["(B) or (A)", "B. or maybe A", "B) A) C) D)", "B or A",
                                  "(B) 42 or (C)", "B. 42, or C"])
def test_a_hedged_multiple_choice_answer_is_wrong(pred):
    assert rewards.answers_match(pred, "B") is False
    assert rewards.accuracy_reward(boxed(pred), "B") == 0.0


@pytest.mark.parametrize("pred,gold", [("(B) or (A)", "AB"), ("B) A) C) D)", "ABCD")])
def test_the_letters_a_hedge_names_are_right_when_the_gold_is_that_set(pred, gold):
    assert rewards.answers_match(pred, gold) is True


@pytest.mark.parametrize("pred", ["B. A circle", "(B) A triangle", "B. 42", "B. \\frac{A}{C}",
                                  "B. A+1"])
def test_a_capital_in_an_options_text_that_is_a_word_or_math_names_no_other_option(pred):
    assert rewards.answers_match(pred, "B") is True


# ---------------------------------------------------------------------------------------------
# Right answers that were scored wrong
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred,gold,expected", [
    # a lead-in before the letter
    ("The answer is B", "B", True), ("Answer: B", "B", True), ("The answer is C", "B", False),
    # a gold answer written as an option: the letter, or the option's text
    ("C", "C. 42", True), ("(C)", "C. 42", True), ("42", "C. 42", True), ("B", "C. 42", False),
    ("43", "C. 42", False), ("C", "Option C", True), ("B", "Option C", False),
    ("C", "(C)", True), ("B", "(C)", False),
    # several options, each in parentheses
    ("(B) and (C)", "BC", True), ("(B) and (C)", "BCD", False),
    # an inequality against an interval, either way round
    ("1<x<3", "(1,3)", True), ("1 < x < 3", "(1, 3)", True), ("(1,3)", "1<x<3", True),
    ("1\\le x<3", "[1,3)", True), ("3>x>1", "(1,3)", True), ("x\\ge 2", "[2,\\infty)", True),
    ("1<x<3", "[1,3)", False), ("1<x<4", "(1,3)", False),
    # the empty set, however it is spelled
    ("\\emptyset", "\\varnothing", True), ("\\varnothing", "\\emptyset", True),
    ("∅", "\\emptyset", True), ("\\{1\\}", "\\varnothing", False),
    # a named quantity on the left: a segment, an angle, a function
    ("AB = 5", "5", True), ("f(x)=2x+1", "2x+1", True), ("\\angle ABC = 30", "30", True),
    ("AB = 6", "5", False), ("f(x)=2x+2", "2x+1", False), ("AB + 1 = 5", "4", False),
    # what must stay as it was
    ("5 m", "5 cm", False), ("4=3", "3", False), ("2x=6", "3", False),
])
def test_right_answers_are_scored_right(pred, gold, expected):
    assert rewards.answers_match(pred, gold) is expected


@pytest.mark.parametrize("gold", ["C. 42", "Option C", "(C)", "\\varnothing", "(1,3)"])
def test_option_and_set_gold_answers_are_usable(gold):
    assert rewards.gold_answer_problem(gold) is None


@pytest.mark.parametrize("pred", ["1<" * 20_000 + "x", "AB=" * 20_000, "(B) " * 20_000,
                                  "B. " + "or A " * 20_000])
def test_the_new_rules_keep_long_answers_cheap(pred):
    start = time.perf_counter()
    for gold in ("(1,3)", "5", "B", "C. 42"):
        rewards.answers_match(pred, gold)
    assert time.perf_counter() - start < 2 * rewards.MATH_TIME_LIMIT + 1.0
