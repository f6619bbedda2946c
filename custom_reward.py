"""Your own reward: --reward FILE.py:function (or module:function), run safely in a child process.

The built-in reward (rewards.py) grades math answers. A task other than math needs another
reward, and this module runs one that the user wrote: it loads the function (load_reward), tells
its form from its signature (reward_form: ours or one of EasyR1's two), runs it in a child
process with a time limit (UserReward), checks every number it returns, and tries it on a few
rows before any model loads (check_user_reward). train.py and eval.py call UserReward exactly
as they call rewards.reward_details. It imports no deep-learning library.
"""
from __future__ import annotations

import math
import os
import re
import signal
import sys

import rewards   # its child process starts as the math process's does (rewards._PROCESSES)

# A task other than math needs another reward. train.py and eval.py take a function in one of
# three forms (docs/rewards.md has worked examples):
#
#   ours        f(response, gold, example) -> (accuracy, format), each a number in [0, 1];
#               the run pays 0.9 * accuracy + 0.1 * format, as for the built-in reward.
#   EasyR1, one f(reward_input: dict) -> {"overall": ..., "accuracy": ..., "format": ...}
#   EasyR1, batch  f(reward_inputs: list[dict]) -> [{"overall": ..., ...}, ...]
#
# The EasyR1 forms (the official PAPO code's reward files) get {"response", "response_length"
# (tokens), "ground_truth"} plus the row's text fields, and are told apart by the annotation of
# their one parameter. Their "overall" is the reward paid; "accuracy" is the accuracy logged and
# evaluated; "format" is optional (a reward without one logs format 0).
#
# The function runs in a child process, like math-verify in rewards.py, so that one call that
# hangs cannot stall training: a call past --reward-time-limit seconds (a batch: that many per
# response) scores 0 and is reported. What it returns is checked on every call - anything but
# the numbers above stops the run naming the function and the row - and before training (or
# evaluation) loads any model, check_user_reward runs it on a few rows with made-up responses,
# so that a reward that raises, exits or returns the wrong thing is refused in seconds, not
# after a whole generation phase.

class RewardError(ValueError):
    """A user reward that cannot be loaded, raised, or returned something unusable."""


MAX_REWARD_TIME_LIMIT = 3600.0   # seconds; the process wait below overflows past ~24 days
_BATCH_LIMIT = 86400.0           # one batch call's limit is capped at a day


def load_reward(spec: str):
    """The function named by "FILE.py:function" or "module:function" (RewardError, naming what
    is missing, otherwise)."""
    import importlib
    import importlib.util
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardError(f"--reward {spec!r}: expected FILE.py:function or module:function")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise RewardError(f"--reward {spec}: no such file {where}")
            loader = importlib.util.spec_from_file_location(f"user_reward_{abs(hash(where))}",
                                                            where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardError:
        raise
    except (Exception, SystemExit) as err:     # the user's module itself failed to import
        raise RewardError(f"--reward {spec}: importing {where} failed: "
                          f"{type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"--reward {spec}: {where} has no function {name!r}")
    reward_form(function, spec)                 # refuse a signature we cannot call now
    return function


def reward_form(function, spec: str) -> str:
    """"ours", "one" or "batch" (the forms above), from the function's signature: one required
    parameter is an EasyR1 reward, batch when that parameter is annotated as a list.

    >>> def f(reward_inputs: "list[dict]"): ...
    >>> reward_form(f, "x.py:f"), reward_form(lambda r, g, e: (1, 1), "x.py:g")
    ('batch', 'ours')
    """
    import inspect
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):             # a builtin without a signature: call it as ours
        return "ours"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) != 1:
        if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise RewardError(f"--reward {spec}: takes {len(positional)} arguments; expected "
                              "(response, gold, example), or EasyR1's one (reward_input)")
        return "ours"
    note = required[0].annotation
    if note is required[0].empty:
        raise RewardError(f"--reward {spec}: takes one argument, not annotated: annotate it as "
                          "list[dict] (EasyR1's batch form) or dict (one response at a time)")
    text = (note if isinstance(note, str) else getattr(note, "__name__", "") or repr(note))
    text = text.strip("'\" ")                 # "'list[dict]'": a quoted annotation, postponed
    is_list = re.match(r"(?:typing\.|collections\.abc\.)?(?:list|sequence)\b", text, re.I)
    return "batch" if is_list else "one"


def _reward_input(response: str, gold: str, fields: dict, length: int) -> dict:
    """What an EasyR1 reward reads about one response (its keys), plus the row's text fields."""
    return {"response": response, "response_length": length, "ground_truth": gold, **fields}


def _serve_user_reward(conn, parent_end, spec: str) -> None:
    """The reward process: load the user's function once, then answer each request with
    ("ok", result) or ("error", description)."""
    # As rewards._serve_math: a forked child inherits the trainer's flag-only SIGTERM handler,
    # and at exit multiprocessing stops this daemon WITH SIGTERM and waits for it - forever, with
    # that handler. The default handlers let it end.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    parent_end.close()
    try:
        function = load_reward(spec)
        form = reward_form(function, spec)
    except RewardError as err:
        conn.send(("error", str(err)))
        return
    conn.send("ready")
    while True:
        try:
            items = conn.recv()                  # [(response, gold, fields, length), ...]
        except EOFError:
            return
        try:
            if form == "ours":
                result = function(*items[0][:3])
            elif form == "one":
                result = function(_reward_input(*items[0]))
            else:
                result = function([_reward_input(*item) for item in items])
            reply = ("ok", result)
        except SystemExit as stop:               # sys.exit() in the reward: reported, not obeyed
            reply = ("error", f"it called sys.exit({stop.code!r})")
        except Exception as err:
            reply = ("error", f"{type(err).__name__}: {err}")
        try:
            conn.send(reply)
        except Exception as err:                 # a result pickle cannot carry (a generator)
            conn.send(("error", f"it returned a {type(reply[1]).__name__}, which cannot be "
                                f"sent back ({type(err).__name__}: {err})"))


def user_reward_runner(spec: str, time_limit: float) -> "UserReward":
    """One UserReward (and one child process) per (spec, time limit) for the whole process:
    training's reward phase and its held-out evaluation share it."""
    key = (spec, time_limit)
    if key not in _RUNNERS:
        _RUNNERS[key] = UserReward(spec, time_limit)
    return _RUNNERS[key]


_RUNNERS: dict = {}


class UserReward:
    """--reward as train.py and eval.py call it: reward_details' contract for a user function,
    run in a child process (started on first use, restarted after a call that overran)."""

    def __init__(self, spec: str, time_limit: float = 10.0):
        if not 0 < time_limit <= MAX_REWARD_TIME_LIMIT:
            raise RewardError(f"--reward-time-limit {time_limit!r}: must be in (0, "
                              f"{MAX_REWARD_TIME_LIMIT:g}] seconds")
        self.spec, self.time_limit = spec, time_limit
        self.form = reward_form(load_reward(spec), spec)   # refuse a bad spec now, here
        self.process = self.conn = None
        self.stops = 0
        self.strict = False                       # check_user_reward: an overrun is an error

    def __call__(self, response: str, example, length: int | None = None) -> dict[str, float]:
        return self.score([response], [example], [length])[0]

    def score(self, responses, examples, lengths=None) -> list[dict[str, float]]:
        """reward_details' dict for each (response, example); lengths: the responses' token
        counts (an EasyR1 reward's "response_length")."""
        lengths = lengths if lengths is not None else [None] * len(responses)
        items = [(r, ex.answer, {k: getattr(ex, k, None)
                                 for k in ("problem", "answer", "id", "task", "source")}, n)
                 for r, ex, n in zip(responses, examples, lengths)]
        where = [ex.source or "a row" for ex in examples]
        if self.form == "batch":
            got = self._call(items, min(self.time_limit * len(items), _BATCH_LIMIT),
                             where[0] if len(items) == 1 else f"{len(items)} rows from {where[0]}")
            if got is not None and (not isinstance(got, (list, tuple)) or len(got) != len(items)):
                raise RewardError(f"--reward {self.spec} returned a {type(got).__name__}"
                                  f"{f' of {len(got)}' if isinstance(got, (list, tuple)) else ''}"
                                  f" for a batch of {len(items)}: expected a list of "
                                  f"{len(items)} dicts")
            values = got if got is not None else [None] * len(items)
        else:
            values = [self._call([item], self.time_limit, w) for item, w in zip(items, where)]
        return [_checked(v, self.spec, w, self.form) for v, w in zip(values, where)]

    def _call(self, items, limit: float, where: str):
        """The function's result for `items`, or None when it ran past `limit` (scored 0)."""
        if self.process is None or not self.process.is_alive():
            self._start()
        try:
            self.conn.send(items)
            reply = self.conn.recv() if self.conn.poll(limit) else None
        except (EOFError, OSError):              # it died: os._exit, a crash, out of memory
            self.process.join(1)
            code = self.process.exitcode
            self.stop()
            raise RewardError(f"--reward {self.spec}: its process died on {where} (exit code "
                              f"{code})") from None
        if reply is not None:
            kind, value = reply
            if kind == "error":
                raise RewardError(f"--reward {self.spec} failed on {where}: {value}")
            return value
        self.stop()
        if self.strict:
            raise RewardError(f"--reward {self.spec} ran past --reward-time-limit "
                              f"{self.time_limit} s on {where}")
        self.stops += 1
        if self.stops == 1 or self.stops % 100 == 0:
            print(f"rewards: --reward {self.spec} ran past {self.time_limit} s and scored 0 "
                  f"({self.stops} so far); raise --reward-time-limit if that was a real answer",
                  file=sys.stderr)
        return None

    def _start(self) -> None:
        self.stop()
        self.conn, child_end = rewards._PROCESSES.Pipe()
        self.process = rewards._PROCESSES.Process(target=_serve_user_reward,
                                                  args=(child_end, self.conn, self.spec),
                                                  daemon=True)
        self.process.start()
        child_end.close()
        try:
            ready = self.conn.poll(rewards.STARTUP_LIMIT) and self.conn.recv()
        except (EOFError, OSError):
            ready = None
        if ready != "ready":
            self.stop()
            raise RewardError(ready[1] if isinstance(ready, tuple) else
                              f"--reward {self.spec}: its process did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.conn.close()
            self.process = self.conn = None

    def __del__(self):
        try:
            self.stop()
        except Exception:
            pass


_SCORE_KEYS = ("overall", "accuracy", "format")


def _number(value) -> bool:
    """A number: int, float, bool, numpy's or a one-element tensor - anything with __float__,
    which a string has not (float("10") parses it; that is how "10" passed as (1, 0))."""
    if not hasattr(value, "__float__"):
        return False
    try:
        float(value)                             # a tensor of several elements cannot
    except (TypeError, ValueError):
        return False
    return True


def _checked(value, spec: str, where: str, form: str = "ours") -> dict[str, float]:
    """reward_details' dict from what a user reward returned, or RewardError saying what is
    wrong. None (the call ran past its time limit) scores 0.

    Ours: (accuracy, format), two numbers - a string such as "10" or a dict is refused, not read
    as (1, 0). EasyR1's: a dict with "overall" and "accuracy" and optionally "format", nothing
    else. Every number finite and in [0, 1]."""
    if value is None:
        return {"reward": 0.0, "accuracy": 0.0, "format": 0.0}
    if form == "ours":
        if (isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list))
                or len(value) != 2 or not all(_number(v) for v in value)):
            raise RewardError(f"--reward {spec} returned {_describe(value)} on {where}: expected "
                              "(accuracy, format), a tuple of two numbers")
        parts = {"accuracy": value[0], "format": value[1]}
    else:
        keys = set(value) if isinstance(value, dict) else None
        if (keys is None or not {"overall", "accuracy"} <= keys or keys - set(_SCORE_KEYS)
                or not all(_number(value[k]) or (k == "format" and value[k] is None)
                           for k in keys)):
            raise RewardError(f"--reward {spec} returned {_describe(value)} on {where}: expected "
                              "a dict of numbers with the keys 'overall' and 'accuracy', and "
                              "optionally 'format' (no others)")
        parts = {k: value.get(k) for k in _SCORE_KEYS}
        parts["format"] = 0.0 if parts["format"] is None else parts["format"]
    for what, v in parts.items():
        if not (math.isfinite(float(v)) and 0.0 <= float(v) <= 1.0):
            raise RewardError(f"--reward {spec} returned {what} {v!r} on {where}: expected a "
                              "finite number in [0, 1]")
    acc, fmt = float(parts["accuracy"]), float(parts["format"])
    overall = float(parts["overall"]) if "overall" in parts else 0.9 * acc + 0.1 * fmt
    return {"reward": overall, "accuracy": acc, "format": fmt}


def _describe(value) -> str:
    """'a str \\'10\\'', 'a dict with keys [\\'0\\', \\'1\\']', 'a tuple of 3' - for errors."""
    kind = type(value).__name__
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (str, bytes)):
        return f"a {kind} {value[:40]!r}"
    if isinstance(value, (tuple, list)):
        return f"a {kind} of {len(value)}: {value!r:.60}"
    return f"a {kind}"


def check_user_reward(runner: UserReward, rows, n_rows: int = 3) -> None:
    """Run the user's reward on the first n_rows rows before any model loads, each row's gold
    answer against made-up responses - the gold in the official format, the bare gold, an
    empty response and garbage: a reward that raises, calls sys.exit, overruns its time limit
    or returns anything unusable is refused now (RewardError naming the row and the function),
    not after a generation phase. (response_length: the made-up response's word count.)"""
    runner.strict = True
    try:
        for ex in list(rows)[:n_rows]:
            made_up = [f"<think>checking the picture</think> \\boxed{{{ex.answer}}}",
                       str(ex.answer), "", "#%& no answer here ]]"]
            runner.score(made_up, [ex] * len(made_up), [len(r.split()) for r in made_up])
    except RewardError as err:
        raise RewardError(f"checked before loading any model: {err}") from None
    finally:
        runner.strict = False
