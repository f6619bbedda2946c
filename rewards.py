"""The paper's rule-based reward: what RL optimises, checkable by hand.

    reward = 0.9 * accuracy + 0.1 * format

`format` checks that the response is "<think> ... </think> ... \\boxed{...}" (for a model whose
prompt already opened the <think> block, Qwen3-VL-Thinking: "... </think> ... \\boxed{...}");
`accuracy` checks that the content of the last \\boxed{...} equals the gold answer. Both run on
the response after tidy_response (whitespace around "<", ">" and "/" removed), as the official
reward does.

The module reads top to bottom: tidying and the format check, finding the boxed answer, the
rules for comparing two answers (words, numbers, percent, equations), and why a comparison can
never stall training (a screen, then a child process with a time limit). It imports no
deep-learning library on purpose: a reward that a reader can check by hand is the ground truth
the whole training loop optimises, so it must not depend on a model. data.py uses it to refuse
gold answers it cannot compare; train.py and eval.py call reward_details. A reward of the user's
own (--reward FILE.py:function) is custom_reward.py's, which runs it in a child process as this
module runs math-verify.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import re
import signal
import sys
import threading
import unicodedata
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, localcontext

import math_verify
import sympy

# Rule-based and verifiable: no reward model to hack, just two checks a reader can do by hand.
#
# COST. The policy can write anything, and a reward that stalls on one response stalls the whole
# run. So every check here finishes in bounded time on any response (tests/test_rewards.py times
# 100k-character adversarial ones): the string checks are single linear scans, with no regular
# expression that can backtrack, and the one step whose cost nothing can bound - sympy, inside
# math-verify - runs in a child process that is killed when it overruns (see answers_match).

# Each run of whitespace next to a "<", ">" or "/". (?<!\s) lets a match start only where a run
# starts, so each run is scanned once; the obvious \s*([<>/])\s* rescans a run from each of its
# characters, quadratic: 100k spaces took about a minute.
_AROUND_TAG_CHARS = re.compile(r"(?<=[<>/])\s+|(?<!\s)\s+(?=[<>/])")


def tidy_response(text: str) -> str:
    """The response with the whitespace around every "<", ">" and "/" removed.

    The official reward does this before both checks, so "< think >", "</ think>" and
    "<think>\\n...\\n</think>" all count as tags, and "1 / 2" in a box reads as "1/2". It also
    removes spaces around "<" in an answer such as "x < 3": harmless, since answers are compared
    by value. Both format_reward and accuracy_reward apply it (it is idempotent).

    >>> tidy_response("< think > a </ think > \\\\boxed{1 / 2}")
    '<think>a</think>\\\\boxed{1/2}'
    """
    return _AROUND_TAG_CHARS.sub("", text)


def format_reward(text: str, thinking_open: bool = False) -> float:
    """1.0 if the whole response is <think>...</think>...\\boxed{...}..., else 0.0.

    thinking_open: the prompt already opened the <think> block (the chat template of a Thinking
        model, model.prompt_opens_thinking), so a well-formed response starts INSIDE it and has
        no opening tag: the check is then ...</think>...\\boxed{...}..., the official Qwen3
        regex .*</think>.*\\boxed\\{.*\\}.* (DOTALL). A response that repeats the opening tag
        still passes, as it does there.

    The response is tidied first (tidy_response), and surrounding whitespace is stripped: a
    tokenizer may decode a leading space or a trailing newline, and that says nothing about the
    format.

    >>> format_reward("<think>I see 2 red shapes.</think> \\\\boxed{2}")
    1.0
    >>> format_reward("The answer is \\\\boxed{2}")  # no thinking
    0.0
    >>> format_reward("I see 2 red shapes.</think> \\\\boxed{2}", thinking_open=True)
    1.0

    The official check is the regex <think>.*</think>.*\\boxed\\{.*\\}.* (DOTALL, whole string),
    which backtracks: its cost grows with the cube of the length (a 48k-character response took a
    minute). It says: the string starts with "<think>", and after it come a "</think>", then a
    "\\boxed{", then a "}". Taking the earliest of each leaves the most room for the next, so four
    find() calls succeed exactly when the regex matches (tests/test_rewards.py checks this against
    the regex on random strings), in linear time.
    """
    s = tidy_response(text).strip()
    pos = 0 if thinking_open else len("<think>") if s.startswith("<think>") else -1
    for tag in ("</think>", "\\boxed{", "}"):
        found = s.find(tag, pos) if pos >= 0 else -1
        pos = found + len(tag) if found >= 0 else -1
    return 1.0 if pos >= 0 else 0.0


_ESCAPE_OR_BRACE = re.compile(r"\\.|[{}]", re.DOTALL)  # a backslash pair, or a brace


def _closing_brace(text: str, begin: int) -> int | None:
    """Where the "}" closing a "{" just before `begin` is, counting braces; None if none does.
    A backslash escapes the next character, so \\{ and \\} (set braces in LaTeX) do not count."""
    depth = 1
    for m in _ESCAPE_OR_BRACE.finditer(text, begin):
        if m[0] == "{":
            depth += 1
        elif m[0] == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the LAST \\boxed{...}, braces balanced; None if there is none.

    The content is read by counting braces, so nested braces are kept whole; a backslash escapes
    the next character, so \\{ and \\} (set braces in LaTeX) do not count. The response's final
    answer is its last top-level box (one not inside another box). If that box is never closed -
    the response was cut off at the token limit - the answer is None even when an earlier box, or
    a box inside it, was complete: the model had not finished, so its final answer is unknown.
    Inside a closed box, the last box opened wins (a box in a box is read as its inner box).
    Only "\\boxed{" exactly is recognised ("\\boxed {" with a space is not), the same rule as the
    format reward's pattern, so the two rewards never disagree about where the box is.

    >>> extract_boxed("<think>...</think> \\\\boxed{\\\\frac{1}{\\\\sqrt{2}}}")
    '\\\\frac{1}{\\\\sqrt{2}}'
    >>> extract_boxed("\\\\boxed{1} then \\\\boxed{2}")
    '2'
    >>> extract_boxed("\\\\boxed{3"), extract_boxed("3"), extract_boxed("\\\\boxed{\\\\boxed{3}")
    (None, None, None)
    """
    box = "\\boxed{"
    last = None  # (start, end) of the last top-level box
    start = text.find(box)
    while start >= 0:  # top-level boxes, left to right: each character is scanned once
        end = _closing_brace(text, start + len(box))
        if end is None:
            return None  # the rest of the response is inside this unclosed box
        last = (start, end)
        start = text.find(box, end + 1)
    if last is None:
        return None
    inner = text.rfind(box, *last) + len(box)  # the last box opened inside it (or itself)
    return text[inner:_closing_brace(text, inner)]


# --- Comparing two answers ------------------------------------------------------------------
# Both answers are normalised first: surrounding whitespace and $ signs, a trailing period and a
# \text{...} wrapper go. Then, cheapest first:
#
# 1. TEXT. Equal strings (spaces aside) match. WORD ANSWERS - only letters and single spaces,
#    like "red", "north east", "B" - are compared as text, case-insensitively, and never given to
#    math-verify: sympy would read "red" as the product r*e*d (e being Euler's number), and then
#    "der" would be "equal" to it. Every other gold answer must be something math-verify can parse
#    into a value; one it cannot parse is an error (data.load_dataset reports it), because a reward
#    computed against an unreadable gold answer would be noise at best, and a free 1.0 at worst.
#    (Letters mixed with punctuation, like "red, blue" or "n/a", are NOT word answers:
#    math-verify reads them as formulas in the symbols r, e, d, ... Keep text answers to letters
#    and spaces.)
# 2. PLAIN NUMBERS on both sides are compared here, by value: 12, -3.5, .5, 1,000, 1e5, 1.5E-3,
#    1.5\times10^{-3}, 2\cdot10^{4}, 10^{5}. Our own code, because math-verify reads 1e5 as
#    1*e*5 (Euler's number again) and so scored 100000 != 1e5.
# 3. EVERYTHING ELSE goes to math-verify (the maintained successor of the official grader,
#    mathruler), which parses both sides with sympy and compares values: 1/2 = \frac{1}{2} =
#    \dfrac12, {1,2} = {2,1}, \frac{1}{\sqrt{2}} = \sqrt{2}/2, x=3 = 3.
#
# The rules, the same on every path:
# - NUMBERS. Exact values (integers, fractions, roots, powers) must be equal. When either answer
#   is written with a decimal point it is a rounded value, and the two match when they differ by
#   at most half a unit in the 6th significant digit of the larger (|a - b| <= 5e-6 * 10^k, 10^k
#   the leading digit's place): 3.0000004 = 3 and 0.3000004 = 0.3, 0.333333 = 1/3, 3.14159 = \pi,
#   but 3.01 != 3, 0.31 != 0.3, 3.1416 != \pi, 1e-7 != 0. The tolerance is relative, so it means
#   the same at every scale. (math-verify rounds to 6 decimals, and since sympy 1.13 a Float never
#   equals an Integer, so it scored 3.0000004 != 3 but 0.3000004 = 0.3.) Numbers inside sets,
#   tuples and intervals keep math-verify's rule.
# - PERCENT. "50\%" may mean 50 or 0.5, and benchmarks write percentages both ways. A trailing
#   percent sign (\% or %) on one side only accepts both readings: gold 50 matches 50\% and 50%,
#   gold 50\% matches 50 and 0.5, gold 0.5 matches 50\%. On both sides it is dropped (50\% = 50%).
#   (mathruler drops it everywhere, so 0.5 != 50\%; we keep 0.5 = 50\%, which math-verify and
#   this project's tests always accepted.)
# - EQUATIONS. An equation is the answer only when its left side is a lone variable - a letter,
#   Latin or Greek, optionally with a subscript: x=3, y = 3 and x_1=3 are the answer 3, but 4=3,
#   1+1=3, 0=3, AB=3 and 2x=6 are not. (math-verify takes the right side of ANY equation, so
#   4=3 scored 1.0.) When the gold answer is itself an equation, math-verify's rules apply.
#
# COST. sympy can take unbounded time on short inputs - 9^{9^{9}} builds a 370-million-digit
# integer, (10^{10})! never ends, simplify on (x+1)^{9}(y+2)^{9}(z+3)^{9}(w+4)^{9} ran past 20 s
# - and no timeout can stop it in this process: math-verify's signal.alarm works only in the main
# thread, and a long integer operation holds the GIL even there. So step 3 runs in a child process
# (one per calling thread, forked on first use) that is killed, and replaced at the next call,
# when a comparison takes longer than MATH_TIME_LIMIT; the prediction then scores 0. Before that,
# _too_complex turns away predictions no real answer looks like, which would otherwise burn the
# whole time limit: too long or deep, towers, huge exponents, factorials and binomials of
# anything but small numbers, sums, products, integrals and limits the gold answer does not have.

# Seconds. Real answers take milliseconds: at most 50 ms seen, 0.2 s in a just-forked process.
# 1 s leaves room for a machine whose cores are busy (data loaders, other ranks): a comparison
# stopped too early would score a right answer 0, so every stop is reported (_report_stop).
MATH_TIME_LIMIT = 1.0
_STOPS = {"count": 0}


def _report_stop(readings) -> None:
    """A comparison ran past MATH_TIME_LIMIT and scored 0: say so on stderr (the first time, then
    every 100th), so that a time limit too short for a busy machine cannot silently cost reward."""
    _STOPS["count"] += 1
    n = _STOPS["count"]
    if n == 1 or n % 100 == 0:
        pred = str(readings[0][0])[:80] if readings else ""
        print(f"rewards: a math-verify comparison ran past {MATH_TIME_LIMIT} s and scored 0 "
              f"({n} so far; this one: {pred!r}). If these are real answers, raise "
              "rewards.MATH_TIME_LIMIT.", file=sys.stderr)

_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{(.*)\}", re.DOTALL)
_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_PLAIN_NUMBER = re.compile(r"""
      (?P<mantissa> [-+]? (?: (?:\d{1,3}(?:,\d{3})+ | \d+) (?:\.\d*)? | \.\d+ ) )
      (?: [eE] (?P<e>[-+]?\d{1,9})
        | (?:\\times|\\cdot|\*) 10\^ (?: \{(?P<e_braced>[-+]?\d{1,9})\} | (?P<e_digit>\d) ) )?
    | (?P<sign>[-+]?) 10\^ (?: \{(?P<ten_braced>[-+]?\d{1,9})\} | (?P<ten_digit>\d) )
""", re.VERBOSE)
_DECIMAL_POINT = re.compile(r"\.\d")
_TOLERANCE_CONTEXT = Context(prec=60, Emax=MAX_EMAX, Emin=MIN_EMIN)
# Symbol names sympy gives a letter: x, x_1, x_{12}, theta (from \theta), delta (from \Delta).
_GREEK = ("alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|"
          "mu|nu|xi|omicron|rho|sigma|tau|upsilon|phi|varphi|chi|psi|omega")
_VARIABLE = re.compile(rf"(?:[A-Za-z]|{_GREEK})(?:_\{{?\w+\}}?)?", re.IGNORECASE)
_HEAVY_COMMAND = re.compile(r"\\(?:sum|prod|int|iint|iiint|oint|lim|operatorname|mathop)"
                            r"(?![A-Za-z])")
_BINOMIAL = re.compile(r"\\(?:binom|dbinom|tbinom|choose|Gamma)(?![A-Za-z])")
_FACTORIAL = re.compile(r"(?<!\\)!")  # "\!" is a thin space, not a factorial
_SMALL_FACTORIAL = re.compile(r"(?<![\w.}^)\]])\d{1,3}!")  # 5!, 120!: a literal of <= 3 digits
_BIG_E_EXPONENT = re.compile(r"\d[eE][-+]?\d{5}")


def _normalise(s: str) -> str:
    """'$5$' -> '5', ' Red. ' -> 'Red', '\\text{red}' -> 'red', 'north  east' -> 'north east'."""
    s = s.strip().strip("$").strip()
    if (m := _WRAPPER.fullmatch(s)):
        s = m.group(1).strip()
    s = s.removesuffix(".").strip()
    return " ".join(s.split())


def _drop_percent(s: str) -> tuple[str, bool]:
    """'50\\%' -> ('50', True), '50%' -> ('50', True), '50' -> ('50', False)."""
    for sign in ("\\%", "%"):
        if s.endswith(sign):
            return s[: -len(sign)].strip(), True
    return s, False


def _plain_number(s: str) -> Decimal | None:
    """The exact value of a plain number (the forms listed above), else None.

    >>> _plain_number("1,000"), _plain_number("1.5\\\\times10^{-3}"), _plain_number("10^5")
    (Decimal('1000'), Decimal('0.0015'), Decimal('1E+5'))
    >>> _plain_number("2e3"), _plain_number("x"), _plain_number("1/2")
    (Decimal('2E+3'), None, None)
    """
    m = _PLAIN_NUMBER.fullmatch(s.replace(" ", ""))
    if m is None:
        return None
    if m["mantissa"] is None:
        return Decimal(f"{m['sign']}1E{m['ten_braced'] or m['ten_digit']}")
    exponent = m["e"] or m["e_braced"] or m["e_digit"] or "0"
    return Decimal(f"{m['mantissa'].replace(',', '')}E{exponent}")  # exact: no context rounding


def _close(a: Decimal, b: Decimal) -> bool:
    """Do a and b differ by at most half a unit in the 6th significant digit of the larger?

    >>> _close(Decimal("3"), Decimal("3.0000004")), _close(Decimal("0.3"), Decimal("0.3000004"))
    (True, True)
    >>> _close(Decimal("3"), Decimal("3.01")), _close(Decimal("0.3"), Decimal("0.31"))
    (False, False)
    """
    with localcontext(_TOLERANCE_CONTEXT):  # wide exponents: 1e-999999999 stays exact, no trap
        larger = max(abs(a), abs(b))
        return larger == 0 or abs(a - b) <= Decimal(5).scaleb(larger.adjusted() - 6)


def _per_cent(s: str) -> str:
    """The answer divided by 100: '50' -> '0.50', 'x' -> '\\frac{x}{100}'."""
    if (value := _plain_number(s)) is None:
        return "\\frac{" + s + "}{100}"
    sign, digits, exponent = value.as_tuple()
    return str(Decimal((sign, digits, exponent - 2)))  # exact, where scaleb rounds to 28 digits


def _complexity(s: str) -> tuple[int, int, int]:
    """(length, deepest bracket nesting, number of ^) of an answer.

    Why: sympy's parsing time explodes on a few shapes of input that a degenerate policy can
    emit - 20 nested braces take a minute, a tower x^x^...^x of 50 powers half a minute - while
    real answers ("\\frac{\\sqrt{3}}{2}", "(1, \\infty)") are short and shallow. accuracy_reward
    only sends a prediction to math-verify when it is not much more complex than the gold answer.

    >>> _complexity("\\\\frac{1}{\\\\sqrt{2}}"), _complexity("\\\\{(1,2)\\\\}")
    ((18, 2, 0), (9, 2, 0))
    >>> _complexity("x^{y^2}")
    (7, 1, 2)
    """
    depth = deepest = 0
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            ch, i = s[i + 1], i + 1  # \{ \} are brackets too (set braces)
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(depth - 1, 0)
        i += 1
    return len(s), deepest, s.count("^")


def _exponents(s: str) -> list[tuple[str, bool]]:
    """Each exponent of s - the braced group, digit run or character after a ^ - and whether
    another ^ follows it at once (x^{2}^{3}).

    >>> _exponents("x^{y^2}+10^99+e^\\\\pi")
    [('y^2', False), ('2', False), ('99', False), ('\\\\pi', False)]
    """
    found = []
    for m in re.finditer(r"\^\s*", s):
        i = m.end()
        if s.startswith("{", i):
            end = _closing_brace(s, i + 1)
            end = len(s) if end is None else end
            found.append((s[i + 1:end], end + 1))
        elif (word := re.match(r"[-+]?\d+|\\[A-Za-z]+|.", s[i:i + 64], re.DOTALL)):
            found.append((word[0], i + len(word[0])))
    return [(e, s[after:].lstrip().startswith("^")) for e, after in found]


def _tower(s: str) -> bool:
    """A power in an exponent, or an exponent of 5+ digits: 9^{9^{9}}, 2^{10^{5}}, 9^99999."""
    return any("^" in e or "!" in e or then_power or re.search(r"\d{5}", e)
               for e, then_power in _exponents(s))


def _too_complex(pred: str, gold: str) -> bool:
    """Is `pred` a shape no real answer takes, and one that can make sympy run for minutes?

    With room for forms more complex than the gold, and the gold's own shapes allowed: at most
    max(200, 4x the gold's) characters, nesting 6 (or the gold's + 2), 10 powers (or the gold's
    + 2); no tower or exponent of 5+ digits (9^{9^{9}}, 10^{99999}, 1e99999); no factorial but of
    a literal of at most 3 digits (5!, 120!); a binomial or Gamma only of small literals (no 4+
    digits, no ^ or ! anywhere); no sum, product, integral or limit unless the gold has one.
    A screen, not the guarantee (that is MATH_TIME_LIMIT): it spares the usual explosions a
    killed process each, and keeps real answers, which take milliseconds, well away from it.

    >>> [_too_complex(p, "3") for p in ("\\\\frac{1}{2}", "5!", "\\\\binom{5}{2}", "9^{9^{9}}",
    ...                                 "100000!", "\\\\binom{10000}{5000}", "1e99999",
    ...                                 "\\\\sum_{i=1}^{9} i")]
    [False, False, False, True, True, True, True, True]
    """
    if len(pred) > max(200, 4 * len(gold)):  # first: the checks below walk the string
        return True
    (_, d, p), (_, gd, gp) = _complexity(pred), _complexity(gold)
    return (d > max(6, gd + 2) or p > max(10, gp + 2)
            or (_tower(pred) and not _tower(gold))
            or bool(_BIG_E_EXPONENT.search(pred))
            or len(_FACTORIAL.findall(pred)) > len(_SMALL_FACTORIAL.findall(pred))
            or bool(_BINOMIAL.search(pred) and re.search(r"\d{4}|\^|(?<!\\)!", pred))
            or bool(set(_HEAVY_COMMAND.findall(pred)) - set(_HEAVY_COMMAND.findall(gold))))


def _timeout() -> int | None:
    """math-verify's time limit for one parse or comparison, in seconds.

    It enforces the limit with signal.alarm, which Python allows only in the main thread; from any
    other thread (a reward worker, a data-loader thread) math-verify raises instead. So: 5 s in the
    main thread, no limit elsewhere. It matters only for gold answers, parsed here (data, not
    policy output); predictions are compared in the math process, whose hard limit is
    MATH_TIME_LIMIT. (math-verify logs a one-time warning when its limit is off.)"""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(s: str) -> list:
    """math-verify's parse of one bare answer. Wrapping it in \\boxed{} tells math-verify where the
    answer is (it searches a whole response otherwise); the caller has balanced its braces. A
    plain number in e-notation is rewritten first: math-verify would read 1e5 as 1*e*5."""
    m = _PLAIN_NUMBER.fullmatch(s.replace(" ", ""))
    if m and m["e"]:
        s = f"{m['mantissa']}\\times10^{{{m['e']}}}"
    return math_verify.parse("\\boxed{" + s + "}", parsing_timeout=_timeout())


def _is_value(x) -> bool:
    """math-verify returns sympy values, plus the matched text as a string fallback."""
    return not isinstance(x, str)


def _as_answer(pred, gold):
    """The parsed prediction as an answer to `gold`, by the EQUATIONS rule: x = v with a lone
    variable on the left stands for v; any other equation is no answer (None), unless the gold
    answer is itself a relation (then math-verify compares the two)."""
    grader = math_verify.grader
    if not grader.is_equation(pred) or grader.is_relation(gold):
        return pred
    lhs = grader.take_first_relation(pred).lhs
    if isinstance(lhs, sympy.Symbol) and _VARIABLE.fullmatch(lhs.name):
        return grader.take_last_relation(pred).rhs
    return None


def _real_value(x) -> Decimal | None:
    """x to 30 digits if it is a real number, else None (a symbol, a set, an infinity, ...)."""
    if not isinstance(x, sympy.Expr) or not x.is_number:
        return None
    value = x.evalf(30)
    return Decimal(str(value)) if isinstance(value, sympy.Float) else None


def _math_equal(readings: list[tuple[str, str]], approximate: bool) -> bool:
    """Does any (prediction, gold) reading match by math-verify, under the NUMBERS and EQUATIONS
    rules? `approximate`: an answer has a decimal point. Runs in the math process."""
    for pred_text, gold_text in readings:
        golds = [g for g in _parse(gold_text) if _is_value(g)]
        for parsed in _parse(pred_text):
            for gold in golds if _is_value(parsed) else ():
                pred = _as_answer(parsed, gold)
                if pred is None:
                    continue
                values = (_real_value(pred), _real_value(gold)) if approximate else (None,)
                if None not in values:  # two real numbers, one of them rounded
                    if _close(*values):
                        return True
                elif math_verify.verify(gold, pred, timeout_seconds=_timeout()):
                    return True
    return False


# On Linux a forked child starts in milliseconds with math-verify already imported (as PyTorch's
# data loaders do there). Elsewhere "spawn" starts a fresh interpreter, which imports this module
# first (a second or two): macOS has fork, but its system frameworks are not safe to fork, which
# is why Python itself defaults to spawn there. The time limit counts only from the moment the
# child says it is ready (STARTUP_LIMIT covers the start), so a slow start never costs a reward.
_PROCESSES = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
STARTUP_LIMIT = 120.0   # seconds for a new math process to say it is ready


def _serve_math(conn, parent_end) -> None:
    """The math process: answer each (readings, approximate) request with _math_equal."""
    # A forked child inherits the trainer's signal handlers. The trainer's SIGTERM handler only
    # sets a flag (processes.catch_stop_signals), and at exit Python's multiprocessing stops this
    # daemon child WITH SIGTERM and then waits for it: inherited, the handler would keep this
    # process alive and the trainer would wait forever after its last step.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    parent_end.close()  # then the trainer's exit ends recv() below with EOFError
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        try:
            verdict = _math_equal(*request)
        except Exception:  # a garbage prediction scores 0, and the process lives on
            verdict = False
        conn.send(verdict)


class _MathProcess:
    """A child process running _math_equal, killed when a request overruns MATH_TIME_LIMIT and
    started afresh at the next one."""

    def __init__(self):
        self.process = self.conn = None
        self.owner = os.getpid()  # a forked child inherits this object, but not the process

    def compare(self, readings: list[tuple[str, str]], approximate: bool) -> bool:
        if os.getpid() != self.owner:  # we are a fork of its owner: that process is not ours
            self.process = self.conn = None
            self.owner = os.getpid()
        if self.process is None or not self.process.is_alive():
            self.stop()
            self.conn, child_end = _PROCESSES.Pipe()
            self.process = _PROCESSES.Process(target=_serve_math, args=(child_end, self.conn),
                                              daemon=True)  # ends with the trainer
            self.process.start()
            child_end.close()
            try:
                ready = self.conn.poll(STARTUP_LIMIT) and self.conn.recv() == "ready"
            except (EOFError, OSError):
                ready = False
            if not ready:
                print(f"rewards: the math process did not start within {STARTUP_LIMIT} s; "
                      "this answer scored 0", file=sys.stderr)
                self.stop()
                return False
        try:
            self.conn.send((readings, approximate))
            if self.conn.poll(MATH_TIME_LIMIT):
                return self.conn.recv()
            _report_stop(readings)
        except (EOFError, OSError):  # the process died (out of memory, say)
            pass
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is not None and os.getpid() == self.owner:
            self.process.kill()
            self.process.join()
            self.conn.close()
            self.process = self.conn = None

    def __del__(self):  # its thread has ended
        try:
            self.stop()
        except Exception:  # at interpreter exit the modules stop() needs may be gone already;
            pass           # the daemon child ends with this process anyway


_MATH = threading.local()  # one math process per thread, so threads never wait for each other


# ---------------------------------------------------------------------------------------------
# What a careful grader reads past: spacing, full-width characters, degree signs, the wrapping
# of a multiple-choice letter, and units (the same number in another unit is WRONG; a bare
# number against a gold answer with a unit is right). docs/rewards.md lists every rule.
# ---------------------------------------------------------------------------------------------
_LATEX_SPACING = re.compile(r"\\[,;:! ]|~")                      # 1\,000, 3\ m
_DEGREES = re.compile(r"(?:\s*(?:°|\^\s*\{?\s*\\circ\s*\}?|\\degree|\\circ)|\s+degrees?)$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textrm|textbf|mathrm|mathbf|mbox|operatorname)"
                           r"\s*\{([^{}]*)\}")
_BASE_UNITS = ("mm cm dm m km in inch inches ft foot feet yd yard yards mi mile miles nm "
               "mg g kg t lb lbs oz ms s sec secs second seconds min mins minute minutes h hr "
               "hrs hour hours day days week weeks year years ml mL l L N kN J kJ W kW V mV A "
               "mA Pa kPa Hz kHz cal kcal mol °C °F K dollars dollar cents cent units unit "
               "yuan euros pounds").split()
_UNITS = set(_BASE_UNITS) | {f"{u}{p}" for u in ("mm", "cm", "dm", "m", "km", "in", "ft", "yd")
                             for p in ("^2", "^3", "^{2}", "^{3}", "²", "³")} | {
    "m/s", "km/h", "kmh", "mph", "ft/s", "m/s^2", "m/s^{2}", "m/s²", "km/s", "cm/s", "g/cm^3",
    "kg/m^3", "squareunits", "squnits", "cubicunits", "sqcm", "sqm"}
_NUMBER_AND_UNIT = re.compile(r"(?P<number>.*?[\d})])\s*(?P<unit>[A-Za-z°][A-Za-z0-9/^{}²³° ]*)")
_EMPTY_SET = re.compile(r"\\varnothing(?![A-Za-z])|∅|\\\{\s*\\\}")   # \varnothing, ∅, \{\}
# The left side of an equation that names the quantity asked for: a segment or angle named by
# capital letters (AB = 5, \angle ABC = 30), or a function applied (f(x) = 2x+1, g(2) = 5).
_NAMED_QUANTITY = re.compile(r"(?:(?:\\angle\s*|\\overline\{)?[A-Z]{2,3}\}?"
                             r"|[A-Za-z](?:_\{?\w+\}?)?\([^()=]*\))\s*=(?P<rhs>[^=<>]+)")
# Inequalities in one variable, read as intervals when the other answer is one: 1<x<3, x \ge 2.
_LESS, _MORE = r"(?:<=?|\\leq?|\\lt|≤)", r"(?:>=?|\\geq?|\\gt|≥)"
_BOUND, _VAR = r"[^<>=≤≥]+?", r"\s*[A-Za-z]\s*"
_UP = re.compile(rf"(?P<lo>{_BOUND})\s*(?P<o1>{_LESS}){_VAR}(?P<o2>{_LESS})\s*(?P<hi>{_BOUND})")
_DOWN = re.compile(rf"(?P<hi>{_BOUND})\s*(?P<o2>{_MORE}){_VAR}(?P<o1>{_MORE})\s*(?P<lo>{_BOUND})")
_ABOVE = re.compile(rf"{_VAR}(?P<o1>{_MORE})\s*(?P<lo>{_BOUND})")
_BELOW = re.compile(rf"{_VAR}(?P<o2>{_LESS})\s*(?P<hi>{_BOUND})")
_INTERVAL_SHAPE = re.compile(r"[(\[][^,]*,[^,]*[)\]]")
_OPTION_GOLD = re.compile(r"[A-Z]|[A-H]{2,8}")     # "B", or several options "AC"
# an option letter, then its text: "B. 42", "B: 42", "B) 42", "(B) 42" (group 3: the text)
_OPTION_WITH_TEXT = re.compile(r"(?:\(?([A-Za-z])\)?\s*[.:)]|\(([A-Za-z])\))\s+(\S.*)", re.DOTALL)
_OPTION_NOISE = re.compile(r"(?i)\b(?:and|or|options?|choices?|answer)\b|[\s,;&()\[\]:]")
# "The answer is", "Answer:", "The correct option is", "Option" before the letter(s)
_LEAD_IN = re.compile(r"(?i)(?:the\s+)?(?:final\s+|correct\s+|right\s+)?"
                      r"(?:answer|option|choice)\s*(?:is\b|:)?\s*")
# Another option named in an option's text: "(A)", "A)", or a capital A-H standing alone that
# does not open a sentence ("B. or maybe A" names A; "C. A circle" does not).
# A capital next to braces or an operator is math, not an option ("D. \frac{A}{B}", "B. A+1").
_OTHER_OPTION = re.compile(r"\(([A-Z])\)|(?<![\w\\])([A-Z])\)"
                           r"|(?<![\w\\({^_])([A-H])(?![\w)}])(?!\s+[a-z])(?!\s*[=+\-*/^_<>])")


def _canonical(s: str) -> str:
    """Full-width characters as ASCII (NFKC), LaTeX spacing removed, a trailing degree sign
    dropped: '３０°' -> '30', '1\\,000' -> '1000', '30^\\circ' -> '30'."""
    s = unicodedata.normalize("NFKC", s)
    s = _LATEX_SPACING.sub(lambda m: " " if m.group(0) == "\\ " else "", s).strip()
    # the degree mark is searched in the last 40 characters only: a search over the whole
    # string would rescan each run of spaces from each of its characters (quadratic)
    head, tail = s[:-40], s[-40:]
    s = (head + _DEGREES.sub("", tail)).strip()
    return _EMPTY_SET.sub(lambda m: "\\emptyset", s)      # one spelling of the empty set


def _split_unit(s: str) -> tuple[str, str] | None:
    """(number part, unit) when `s` is a number followed by a unit of _UNITS, else None:
    '5 \\text{ cm}' -> ('5', 'cm'), '\\frac{1}{2}m/s' -> ('\\frac{1}{2}', 'm/s'), '2x' -> None."""
    if len(s) > 200:            # an answer with a unit is short; the match below is not linear
        return None
    plain = _TEXT_WRAPPER.sub(lambda m: " " + m.group(1) + " ", s).strip()
    m = _NUMBER_AND_UNIT.fullmatch(plain)
    if m is None:
        return None
    unit = m["unit"].replace(" ", "")
    return (m["number"].strip(), unit) if unit in _UNITS else None


def _options(s: str) -> frozenset[str] | None:
    """The option letters an answer names: '(B)', 'B)', 'B. 42', '\\text{(B)}', 'Option B',
    'The answer is B' -> {B}; 'A, C', 'CA', 'A and C', '(A) and (C)' -> {A, C}; a hedge names
    every letter it lists: '(B) or (A)', 'B. or maybe A', 'B) A) C) D)' -> {A, B, ...}; anything
    else None.

    Why every letter: scored by the first letter named, "(B) or (A)" would be right against B
    and against A, and an RL policy learns to list them all."""
    s = _TEXT_WRAPPER.sub(lambda m: m.group(1), s).strip()
    s = s[m.end():] if (m := _LEAD_IN.match(s)) and m.end() < len(s) else s
    if (m := _OPTION_WITH_TEXT.fullmatch(s)):
        named = {(m.group(1) or m.group(2)).upper()}
        named |= {next(g for g in o.groups() if g) for o in _OTHER_OPTION.finditer(m.group(3))}
        return frozenset(named)
    letters = _OPTION_NOISE.sub("", s).removesuffix(".")
    if 1 <= len(letters) <= 8 and letters.isalpha() and letters.isascii() \
            and len(set(letters.upper())) == len(letters):
        return frozenset(letters.upper())
    return None


# A gold answer written as an option: "(C)", "C)", "Option C", "C. 42", "(C) 42" (the text, if
# any, in group "text"); capital letters only, so that a gold answer "x: 5" stays math.
_OPTION_GOLD_FORM = re.compile(r"(?:(?i:option|choice)\s+)?(?:\(([A-Z])\)|([A-Z])\))"
                               r"|(?:(?i:option|choice)\s+)([A-Z])"
                               r"|(?:\(?([A-Z])\)?\s*[.:)]|\(([A-Z])\))\s+(?P<text>\S.*)",
                               re.DOTALL)


def _gold_option(s: str) -> tuple[frozenset[str], str | None] | None:
    """(letters, the option's text or None) when the gold answer names options, else None:
    'AC' -> ({A, C}, None), 'C. 42' -> ({C}, '42'), 'Option C' -> ({C}, None)."""
    if _OPTION_GOLD.fullmatch(s):
        return frozenset(s), None
    if (m := _OPTION_GOLD_FORM.fullmatch(s)):
        letter = next(g for g in m.groups()[:5] if g)
        text = m["text"]
        usable = text is not None and _OPTION_GOLD_FORM.fullmatch(text) is None \
            and not _OPTION_GOLD.fullmatch(text) and gold_answer_problem(text) is None
        return frozenset(letter), text if usable else None
    return None


def _interval(s: str) -> str | None:
    """An inequality in one variable as interval notation, else None: '1<x<3' -> '(1,3)',
    '3 \\ge x > 1' -> '(1,3]', 'x \\ge 2' -> '[2,\\infty)'. Short answers only (the patterns
    backtrack)."""
    if len(s) > 200:
        return None
    for pattern in (_UP, _DOWN, _ABOVE, _BELOW):
        if (m := pattern.fullmatch(s)):
            parts = m.groupdict()
            lo, hi = (parts.get("lo") or "-\\infty").strip(), (parts.get("hi") or "\\infty").strip()
            closed = lambda op: op is not None and ("=" in op or op[-1] in "eq≤≥")
            return (("[" if closed(parts.get("o1")) else "(") + f"{lo},{hi}"
                    + ("]" if closed(parts.get("o2")) else ")"))
    return None


@functools.lru_cache(maxsize=65536)  # one gold answer is scored against G rollouts every step
def _gold(answer: str) -> tuple[str, object]:
    """('options', letters), ('words', lowercased text) or ('math', parsed values); ValueError
    when unusable."""
    s = _canonical(_normalise(answer))
    if (option := _gold_option(s)) is not None:
        return "options", option
    if _WORDS.fullmatch(s):
        return "words", s.lower()
    if (split := _split_unit(s)) is not None:     # the number part is what must parse
        s = split[0]
    if not s or extract_boxed("\\boxed{" + s + "}") != s:
        raise ValueError(f"gold answer {answer!r} is empty or has unbalanced braces")
    parsed = _parse(s)
    if not any(_is_value(x) for x in parsed):
        raise ValueError(f"gold answer {answer!r} cannot be parsed by math-verify and is not a "
                         f"plain word answer (letters and spaces only)")
    return "math", tuple(parsed)


def gold_answer_problem(answer: str) -> str | None:
    """None if `answer` can serve as a gold answer, else why not (data.load_dataset reports it)."""
    try:
        _gold(answer)
    except ValueError as err:
        return str(err)
    return None


def answers_match(predicted: str, answer: str) -> bool:
    """Is the predicted answer (the content of a box) equivalent to the gold answer?

    Raises ValueError for an unusable gold answer; never raises for any prediction, and returns
    within about MATH_TIME_LIMIT whatever the prediction holds.

    >>> answers_match("\\\\dfrac12", "0.5"), answers_match("Red", "red"), answers_match("4", "3")
    (True, True, False)
    >>> answers_match("3.0000004", "3"), answers_match("1e5", "100000"), answers_match("4=3", "3")
    (True, True, False)
    """
    kind, gold_value = _gold(answer)
    pred = _canonical(_normalise(predicted))
    if kind == "options":            # by the letters named, or else by the option's text
        letters, text = gold_value
        named = _options(pred)
        return named == letters if named is not None else (
            text is not None and answers_match(predicted, text))
    if kind == "words":
        return pred.lower() == gold_value
    gold = _canonical(_normalise(answer))
    if "=" not in gold and len(pred) <= 200 and (m := _NAMED_QUANTITY.fullmatch(pred)):
        pred = m["rhs"].strip()                  # AB = 5 is the answer 5 (EQUATIONS rule)
    if _INTERVAL_SHAPE.fullmatch(gold) and (interval := _interval(pred)):
        pred = interval                          # 1<x<3 against (1,3)
    elif _INTERVAL_SHAPE.fullmatch(pred) and (interval := _interval(gold)):
        gold = interval
    pred_unit, gold_unit = _split_unit(pred), _split_unit(gold)
    if pred_unit and gold_unit and pred_unit[1] != gold_unit[1]:
        return False                             # 5 m is not 5 cm
    pred = pred_unit[0] if pred_unit else pred   # then the numbers decide
    gold = gold_unit[0] if gold_unit else gold
    pred, pred_percent = _drop_percent(pred)
    gold, gold_percent = _drop_percent(gold)
    readings = [(pred, gold)]  # PERCENT: a sign on one side only may also mean "divided by 100"
    if pred_percent and not gold_percent:
        readings.append((_per_cent(pred), gold))
    elif gold_percent and not pred_percent:
        readings.append((pred, _per_cent(gold)))
    if any(p.replace(" ", "") == g.replace(" ", "") for p, g in readings):
        return True
    if not pred or _too_complex(pred, gold):
        return False
    approximate = bool(_DECIMAL_POINT.search(pred) or _DECIMAL_POINT.search(gold))
    numbers = [(_plain_number(p), _plain_number(g)) for p, g in readings]
    if all(None not in pair for pair in numbers):
        return any(p == g or (approximate and _close(p, g)) for p, g in numbers)
    if not hasattr(_MATH, "process"):
        _MATH.process = _MathProcess()
    return _MATH.process.compare(readings, approximate)


def accuracy_reward(text: str, answer: str) -> float:
    """1.0 if the last \\boxed{...} of the tidied response (tidy_response) is equivalent to the
    gold answer, else 0.0.

    >>> accuracy_reward("<think>half</think> \\\\boxed{\\\\frac{1}{2}}", "0.5")
    1.0
    >>> accuracy_reward("the answer is 0.5", "0.5")  # no box, no credit
    0.0
    """
    boxed = extract_boxed(tidy_response(text))
    if boxed is None:
        _gold(answer)  # an unusable gold answer is an error whatever the response
        return 0.0
    return 1.0 if answers_match(boxed, answer) else 0.0


def reward_details(text: str, answer: str, thinking_open: bool = False) -> dict[str, float]:
    """The reward and its two parts, for logging accuracy and format rate separately.
    thinking_open: see format_reward.

    >>> reward_details("<think>I see 2.</think> \\\\boxed{3}", "2")
    {'reward': 0.1, 'accuracy': 0.0, 'format': 1.0}
    """
    acc, fmt = accuracy_reward(text, answer), format_reward(text, thinking_open)
    return {"reward": 0.9 * acc + 0.1 * fmt, "accuracy": acc, "format": fmt}


def reward(text: str, answer: str, thinking_open: bool = False) -> float:
    """The paper's rule-based reward: 0.9 * accuracy + 0.1 * format, so 1.0, 0.9, 0.1 or 0.0.

    >>> reward("<think>I see 2 red shapes.</think> \\\\boxed{2}", "2")
    1.0
    """
    return reward_details(text, answer, thinking_open)["reward"]
