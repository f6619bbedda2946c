"""Tests of data.py: the rule-based rewards, dataset validation and the synthetic toy task.

The reward table pins exact reward values (1.0 / 0.9 / 0.1 / 0.0), so a change in how answers are
compared shows up as a failing row. The toy-task tests read the generated pictures back with an
independent pixel-level solver, so they fail if a picture does not show what its answer says.
"""
import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import custom_reward
import data
import imaging
import toy
import rewards


def boxed(content: str) -> str:
    """A well-formed response whose final answer is `content`."""
    return f"<think>looking at it</think> \\boxed{{{content}}}"


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------

REWARD_CASES = [
    # (response, gold answer, expected reward)  - equivalent forms of the same value
    (boxed("1/2"), "0.5", 1.0),
    (boxed("0.5"), "1/2", 1.0),
    (boxed("\\frac{1}{2}"), "0.5", 1.0),
    (boxed("\\dfrac12"), "1/2", 1.0),
    (boxed("\\dfrac{1}{2}"), "\\frac{1}{2}", 1.0),
    (boxed("3.0"), "3", 1.0),
    (boxed("3"), "3.0", 1.0),
    (boxed("$5$"), "5", 1.0),
    (boxed("5"), "$5$", 1.0),
    (boxed("2.00"), "2", 1.0),
    (boxed("-3"), "-3", 1.0),
    (boxed("1,000"), "1000", 1.0),
    (boxed("50\\%"), "0.5", 1.0),              # math-verify reads 50\% as 50/100
    (boxed("\\{2,1\\}"), "\\{1,2\\}", 1.0),     # sets: order does not matter
    (boxed("x=3"), "3", 1.0),                   # math-verify compares the right-hand side
    (boxed("\\frac{1}{\\sqrt{2}}"), "\\frac{\\sqrt{2}}{2}", 1.0),  # nested braces in the box
    (boxed(" 7. "), "7", 1.0),                  # spaces and a trailing period are dropped
    # words: compared as text, case-insensitively, never by sympy
    (boxed("Red"), "red", 1.0),
    (boxed("RED"), "red", 1.0),
    (boxed("\\text{red}"), "red", 1.0),
    (boxed("a"), "A", 1.0),
    (boxed("der"), "red", 0.1),                 # sympy would call r*e*d == d*e*r
    (boxed("blue"), "red", 0.1),
    (boxed("north east"), "North  East", 1.0),
    # wrong answers in a good format earn the format part only
    (boxed("4"), "3", 0.1),
    (boxed("3"), "-3", 0.1),
    (boxed("{1,2}"), "{1,2,3}", 0.1),
    (boxed("5.5"), "5", 0.1),
    (boxed("???"), "3", 0.1),                   # garbage in the box
    (boxed(""), "3", 0.1),                      # empty box
    (boxed("\\left( \\right"), "3", 0.1),
    (boxed("3"), "red", 0.1),
    # several boxes: the last one counts
    ("<think>a</think> \\boxed{1}, no wait, \\boxed{2}", "2", 1.0),
    ("<think>a</think> \\boxed{1}, no wait, \\boxed{2}", "1", 0.1),
    (boxed("\\boxed{5}"), "5", 1.0),            # a box in a box: the inner one is the last
    # format: missing or broken thinking costs 0.1, a correct answer still earns 0.9
    ("\\boxed{2}", "2", 0.9),
    ("The answer is \\boxed{2}.", "2", 0.9),
    ("<think>no closing tag \\boxed{3}", "3", 0.9),
    ("</think> \\boxed{3} <think>", "3", 0.9),   # tags in the wrong order
    ("<think>a</think><think>b</think> \\boxed{2}", "2", 1.0),
    ("  <think>\nline one\nline two\n</think>\n\\boxed{7}\n", "7", 1.0),  # newlines, outer spaces
    ("<think>我看到两个形状。🙂</think> \\boxed{2}", "2", 1.0),                 # unicode
    # no usable box: no accuracy
    ("", "2", 0.0),
    ("asdf qwerty 2", "2", 0.0),
    ("<think>the answer is 2</think> 2", "2", 0.0),
    ("<think>x</think> \\boxed{3", "3", 0.0),    # truncated: unbalanced, and no format either
    ("<think>x</think> \\boxed{3} then \\boxed{4", "3", 0.1),  # last box truncated -> unknown
    (boxed("\\frac{1}{2"), "0.5", 0.1),         # braces never balance inside the box
    ("<think>x</think> \\boxed {2}", "2", 0.0),  # "\boxed {" with a space is not a box
]


@pytest.mark.parametrize("text,answer,expected", REWARD_CASES)
def test_reward_table(text, answer, expected):
    assert rewards.reward(text, answer) == expected
    details = rewards.reward_details(text, answer)
    assert details["reward"] == expected
    assert details["reward"] == 0.9 * details["accuracy"] + 0.1 * details["format"]
    assert details["accuracy"] in (0.0, 1.0) and details["format"] in (0.0, 1.0)


def test_reward_takes_exactly_four_values():
    good = "<think>I see 2 red shapes.</think> \\boxed{2}"
    assert rewards.reward_details(good, "2") == {"reward": 1.0, "accuracy": 1.0, "format": 1.0}
    assert rewards.reward_details("\\boxed{2}", "2") == {"reward": 0.9, "accuracy": 1.0, "format": 0.0}
    assert rewards.reward_details(good, "3") == {"reward": 0.1, "accuracy": 0.0, "format": 1.0}
    assert rewards.reward_details("2", "2") == {"reward": 0.0, "accuracy": 0.0, "format": 0.0}


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{2}", "2"),
    ("a \\boxed{1} b \\boxed{22} c", "22"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),     # escaped braces do not count
    ("\\boxed{a\\}b}", "a\\}b"),
    ("\\boxed{}", ""),
    ("\\boxed{3", None),
    ("\\boxed{1} \\boxed{\\frac{1}{2}", None),
    ("no box here {3}", None),
    ("\\boxed {3}", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert rewards.extract_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("<think>a</think> \\boxed{1}", 1.0),
    ("<think>a</think>\\boxed{1} trailing words", 1.0),
    ("<think></think>\\boxed{}", 1.0),
    ("<think>\n\n</think>\n\n\\boxed{1}\n", 1.0),
    ("preamble <think>a</think> \\boxed{1}", 0.0),   # the WHOLE response must match
    ("<think>a</think> 1", 0.0),
    ("<think>a \\boxed{1}", 0.0),
    ("<think>a</think> \\boxed{1", 0.0),
])
def test_format_reward(text, expected):
    assert rewards.format_reward(text) == expected


@pytest.mark.parametrize("text,tidy", [
    ("< think > a </ think > \\boxed{1}", "<think>a</think>\\boxed{1}"),
    ("<think>\n  a\n</think>\n\\boxed{1}", "<think>a</think>\\boxed{1}"),
    ("\\boxed{1 / 2}", "\\boxed{1/2}"),
    ("\\boxed{x < 3}", "\\boxed{x<3}"),
    ("no tags at all", "no tags at all"),
])
def test_whitespace_around_angle_brackets_and_slashes_is_removed(text, tidy):
    """The official reward's rule: whitespace around "<", ">" and "/" goes before grading."""
    assert rewards.tidy_response(text) == tidy
    assert rewards.tidy_response(tidy) == tidy                          # idempotent


def test_the_whitespace_rule_applies_to_both_checks():
    # spaced-out tags pass the format check only because of the rule
    assert rewards.format_reward("< think >I see 2.</ think > \\boxed{2}") == 1.0
    assert rewards.format_reward("<think>I see 2.</th ink> \\boxed{2}") == 0.0  # not a tag
    # an answer whose box is written "\boxed{ 1 / 2 }" is the fraction, as in the official grader
    assert rewards.accuracy_reward("<think>x</think> \\boxed{ 1 / 2 }", "\\frac{1}{2}") == 1.0
    assert rewards.reward_details("< think >x</ think >\\boxed{3}", "3") == {
        "reward": 1.0, "accuracy": 1.0, "format": 1.0}


@pytest.mark.parametrize("gold", ["abc+", "", "   ", "\\frac{", "???", "$$", "1 + (", "#", "(3",
                                  "\\"])
def test_unparseable_gold_answer_is_an_error(gold):
    with pytest.raises(ValueError):
        rewards.accuracy_reward(boxed("3"), gold)
    with pytest.raises(ValueError):  # also when the response has no box at all
        rewards.reward("no box", gold)
    assert rewards.gold_answer_problem(gold) is not None


@pytest.mark.parametrize("gold", ["3", "-2.5", "\\frac{1}{2}", "red", "north east", "B", "$5$",
                                  "50\\%", "\\{1,2\\}", "x=3", "\\sqrt{2}"])
def test_parseable_gold_answers_are_accepted(gold):
    assert rewards.gold_answer_problem(gold) is None


def test_garbage_predictions_never_raise():
    rng = np.random.default_rng(0)
    junk = ["\\boxed{" + "".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, 40)) + "}"
            for _ in range(20)]
    junk += [boxed("{" * 50 + "}" * 50), boxed("\\frac" * 300), boxed("9" * 5000),
             boxed("\\sqrt{-1}/0"), boxed("1/0"), boxed("\\infty"), boxed("\\\\\\")]
    # Shapes that make sympy's parser explode (a minute for 20 nested braces) must be skipped.
    junk += [boxed("{" * 20 + "}" * 20), boxed("x^" * 50 + "2"), boxed("{x^{" * 8 + "2" + "}}" * 8),
             boxed("(" * 40 + "1" + ")" * 40)]
    start = time.perf_counter()
    for text in junk:
        for gold in ("3", "red", "\\frac{1}{2}"):
            assert rewards.reward(text, gold) in (0.0, 0.1, 0.9, 1.0)
    assert time.perf_counter() - start < 10


def test_rewards_work_outside_the_main_thread():
    """math-verify's signal-based timeout raises in worker threads unless it is switched off."""
    results, errors = [], []

    def work():
        try:
            results.append(rewards.reward(boxed("\\dfrac{1}{2}"), "0.5"))
            results.append(rewards.reward(boxed("0.25"), "\\frac{1}{3}"))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert not errors and results == [1.0, 0.1]


# ---------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------

def test_make_messages():
    messages = data.make_messages("How many circles?", 2)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert content[:2] == [{"type": "image"}, {"type": "image"}]
    assert content[2] == {"type": "text", "text": "How many circles?\n\n" + data.INSTRUCTION}
    assert len(data.make_messages("q", 0)[0]["content"]) == 1
    for needle in ("<think>", "</think>", "\\boxed{}"):
        assert needle in data.INSTRUCTION


# ---------------------------------------------------------------------------------------------
# Dataset loading and validation
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    """A dataset folder with two valid images in a sub-folder, a text file named .png and a
    truncated PNG."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "images" / "a.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "images" / "b.png")  # grey: loads as RGB
    (tmp_path / "images" / "fake.png").write_text("this is not a picture")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "images" / "cut.png")
    whole = (tmp_path / "images" / "cut.png").read_bytes()
    (tmp_path / "images" / "cut.png").write_bytes(whole[: len(whole) // 2])  # a broken download
    return tmp_path


GOOD = {"problem": "How many?", "answer": "3", "images": ["images/a.png"]}


def write_lines(path: Path, lines: list) -> Path:
    """Rows as JSON lines; a str is written verbatim (for malformed lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def load_error(path: Path) -> data.DatasetError:
    with pytest.raises(data.DatasetError) as info:
        data.load_jsonl(path)
    assert isinstance(info.value, ValueError)
    return info.value


def test_valid_dataset_with_relative_paths_loads_from_anywhere(folder, tmp_path_factory,
                                                              monkeypatch):
    path = write_lines(folder / "train.jsonl", [
        GOOD,
        "",  # a blank line is skipped
        {"problem": "Which colour?", "answer": "red", "image": "images/b.png",
         "solution": "<think>red</think> \\boxed{red}", "id": 7, "task": "colour", "extra": 1},
        {"problem": "Two pictures", "answer": "\\frac{1}{2}",
         "images": ["images/a.png", str((folder / "images" / "b.png").resolve())]},
    ])
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative to the file, not the cwd
    examples = data.load_jsonl(path)
    assert [ex.source for ex in examples] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert [len(ex.images) for ex in examples] == [1, 1, 2]
    assert all(p.is_absolute() and p.is_file() for ex in examples for p in ex.images)
    assert [ex.sizes for ex in examples] == [[(20, 10)], [(8, 8)], [(20, 10), (8, 8)]]
    assert examples[1].solution.endswith("\\boxed{red}") and examples[1].id == "7"
    assert examples[1].task == "colour" and examples[0].solution is None
    prompt = examples[2].to_prompt()
    assert prompt["answer"] == "\\frac{1}{2}" and prompt["problem"] == "Two pictures"
    assert [im.mode for im in prompt["images"]] == ["RGB", "RGB"]
    assert [im.size for im in prompt["images"]] == [(20, 10), (8, 8)]
    assert prompt["images"][0].getpixel((0, 0)) == (255, 0, 0)
    assert prompt["messages"] == data.make_messages("Two pictures", 2)


def test_missing_file():
    err = load_error(Path("/nonexistent/folder/train.jsonl"))
    assert "/nonexistent/folder/train.jsonl" in str(err) and "not found" in str(err)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    assert f"{path}" in str(load_error(path)) and "no rows" in str(load_error(path))


@pytest.mark.parametrize("row,line_no,reason", [
    ('{"problem": "q", "answer": ', 2, "malformed JSON"),
    ('[1, 2, 3]', 2, "expected a JSON object, got list"),
    ('"just a string"', 2, "expected a JSON object, got str"),
    ({"answer": "3", "images": ["images/a.png"]}, 2, 'missing "problem"'),
    ({"problem": "  ", "answer": "3", "images": ["images/a.png"]}, 2, '"problem" is empty'),
    ({"problem": 5, "answer": "3", "images": ["images/a.png"]}, 2, '"problem" must be a string'),
    ({"problem": "q", "answer": "", "images": ["images/a.png"]}, 2, '"answer" is empty'),
    ({"problem": "q", "images": ["images/a.png"]}, 2, 'missing "answer"'),
    ({"problem": "q", "answer": 3, "images": ["images/a.png"]}, 2, '"answer" must be a string'),
    ({"problem": "q", "answer": "abc+", "images": ["images/a.png"]}, 2, "cannot be parsed"),
    ({"problem": "q", "answer": "3"}, 2, 'missing "images"'),
    ({"problem": "q", "answer": "3", "images": []}, 2, "empty list"),
    ({"problem": "q", "answer": "3", "images": "images/a.png"}, 2, "must be a list"),
    ({"problem": "q", "answer": "3", "images": 4}, 2, "must be a list"),
    ({"problem": "q", "answer": "3", "images": [4]}, 2, "only non-empty path strings"),
    ({"problem": "q", "answer": "3", "image": ["images/a.png"]}, 2, '"image" must be'),
    ({"problem": "q", "answer": "3", "image": "images/a.png", "images": ["images/a.png"]}, 2,
     "use one"),
    ({"problem": "q", "answer": "3", "images": ["images/missing.png"]}, 2, "image not found"),
    ({"problem": "q", "answer": "3", "images": ["images"]}, 2, "image not found"),  # a folder
    ({"problem": "q", "answer": "3", "images": ["images/fake.png"]}, 2, "not a readable image"),
    ({"problem": "q", "answer": "3", "images": ["images/cut.png"]}, 2, "not a readable image"),
    ({"problem": "q", "answer": "3", "images": ["images/a.png"], "solution": 3}, 2,
     '"solution" must be a string'),
])
def test_each_kind_of_bad_row_is_reported_with_file_and_line(folder, row, line_no, reason):
    path = write_lines(folder / "d.jsonl", [GOOD, row, GOOD])
    err = load_error(path)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(f"{path}:{line_no}: ")
    assert reason in err.problems[0]
    assert f"{path}:{line_no}: " in str(err)


def test_invalid_utf8_line(folder):
    path = folder / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe{}\n")
    assert load_error(path).problems == [f"{path}:2: not valid UTF-8 (invalid start byte)"]


def test_line_numbers_count_blank_lines(folder):
    path = write_lines(folder / "d.jsonl", [GOOD, "", "", {"problem": "q"}])
    assert load_error(path).problems[0].startswith(f"{path}:4: ")


def test_all_bad_rows_are_listed_in_one_error(folder):
    path = write_lines(folder / "d.jsonl", [
        GOOD,
        "{oops",
        {"problem": "q", "answer": "abc+", "images": ["images/missing.png"]},  # two reasons
        GOOD,
        [1],
    ])
    err = load_error(path)
    assert [p.split(": ")[0] for p in err.problems] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "cannot be parsed" in err.problems[1] and "image not found" in err.problems[1]
    for p in err.problems:
        assert p in str(err)


def test_long_error_lists_are_cut_after_twenty(folder):
    path = write_lines(folder / "d.jsonl", [{"problem": "q"}] * 25)
    err = load_error(path)
    assert len(err.problems) == 25
    message = str(err)
    assert f"{path}:20: " in message and f"{path}:21: " not in message
    assert "... and 5 more" in message


def test_write_jsonl_round_trip(folder):
    rows = [dict(GOOD, problem="Wie viele Kreise? ünïcödé"), dict(GOOD, answer="red")]
    path = data.write_jsonl(rows, folder / "out.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert [ex.problem for ex in data.load_jsonl(path)] == [r["problem"] for r in rows]


# ---------------------------------------------------------------------------------------------
# The toy task
# ---------------------------------------------------------------------------------------------

def read_shapes(image: Image.Image) -> list[tuple[str, str]]:
    """An independent solver: the (colour, kind) of every shape in a toy picture.

    Each connected blob of one exact colour is one shape (the generator draws without
    anti-aliasing and keeps shapes apart); its kind follows from how much of its bounding box it
    fills: a square fills all of it, a circle about pi/4, a triangle about half."""
    pixels = np.asarray(image)
    found = []
    for colour, rgb in toy.COLOURS.items():
        mask = np.all(pixels == rgb, axis=-1)
        seen = np.zeros_like(mask)
        for y0, x0 in zip(*np.nonzero(mask)):
            if seen[y0, x0]:
                continue
            stack, blob = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                blob.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                            and not seen[ny, nx]):
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            ys, xs = np.array(blob).T
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = len(blob) / box
            assert 18 <= xs.max() - xs.min() + 1 <= 24, "shape size out of range"
            found.append((colour, "square" if fill > 0.95 else "circle" if fill > 0.65
                          else "triangle"))
    return found


def solve(problem: str, shapes: list[tuple[str, str]]) -> str:
    """Answer a toy question from the shapes a picture shows."""
    problem = problem.removeprefix(problem[:9] if problem.startswith("Panel ") else "")
    problem = problem[0].upper() + problem[1:]     # "Panel B: how many ..." -> "How many ..."
    words = problem.rstrip("?").split()
    if problem.startswith("Which colour"):
        counts = Counter(c for c, _ in shapes)
        return max(toy.COLOURS, key=lambda c: counts[c])
    target = words[2:words.index("are")]  # "How many [red] [circles|shapes] are ..."
    colour = target[0] if target[0] in toy.COLOURS else None
    kind = {v: k for k, v in toy.PLURAL.items()}[target[-1]]
    return str(sum((colour in (None, c)) and kind in ("shape", s) for c, s in shapes))


@pytest.mark.parametrize("task", list(toy.TOY_TASKS))
def test_pictures_show_the_answer(task):
    rng = np.random.default_rng(1)
    for _ in range(40):
        ex = toy.sample_toy_example(rng, tasks=(task,))
        assert ex["task"] == task and ex["image"].size == (112, 112) and ex["image"].mode == "RGB"
        shapes = read_shapes(ex["image"])
        assert 1 <= len(shapes) <= toy.MAX_SHAPES
        assert solve(ex["problem"], shapes) == ex["answer"]
        if task == "most_color":  # the winner is unique
            counts = sorted(Counter(c for c, _ in shapes).values())
            assert len(counts) == 1 or counts[-1] > counts[-2]


@pytest.mark.parametrize("task", ["count_color", "count_shape", "color_shape"])
def test_counting_every_shape_is_a_shortcut_that_often_fails(task):
    """Distractor shapes make "count all shapes" right only part of the time, so a model must
    tell colours and kinds apart."""
    rng = np.random.default_rng(6)
    hits = []
    for _ in range(60):
        ex = toy.sample_toy_example(rng, tasks=(task,))
        hits.append(len(read_shapes(ex["image"])) == int(ex["answer"]))
    assert 0.15 < np.mean(hits) < 0.6


@pytest.mark.parametrize("task", [t for t in toy.TOY_TASKS if t not in toy.SHORTCUT_TASKS])
def test_answers_are_balanced_and_independent_of_the_question(task):
    rng = np.random.default_rng(2)
    rows = [toy.sample_toy_example(rng, tasks=(task,)) for _ in range(400)]
    counts = Counter(r["answer"] for r in rows)
    answers = toy.TOY_TASKS[task].answers
    assert set(counts) == set(answers)
    expected = len(rows) / len(answers)
    chi2 = sum((counts[a] - expected) ** 2 / expected for a in answers)
    assert chi2 < 20, counts  # p < 0.001 for 2-4 degrees of freedom
    # The question text says nothing about the answer: no numeric answer appears in it.
    for r in rows:
        if r["answer"].isdigit():
            assert r["answer"] not in r["problem"]
    # ... and a guess from the question text alone is at chance: the most frequent answer per
    # question on one half scores about 1/k on the other half (measured on the same rows it would
    # flatter the guesser, since color_shape has 9 question texts and only ~44 rows each).
    best = {}
    for r in rows[:200]:
        best.setdefault(r["problem"], Counter())[r["answer"]] += 1
    held_out = [best[r["problem"]].most_common(1)[0][0] == r["answer"] for r in rows[200:]
                if r["problem"] in best]
    assert abs(np.mean(held_out) - 1 / len(answers)) < 0.1


@pytest.mark.parametrize("task", list(toy.TOY_TASKS))
def test_worked_solutions_are_short_and_earn_full_reward(task):
    rng = np.random.default_rng(3)
    for _ in range(30):
        ex = toy.sample_toy_example(rng, tasks=(task,))
        assert rewards.reward_details(ex["solution"], ex["answer"]) == {
            "reward": 1.0, "accuracy": 1.0, "format": 1.0}
        assert rewards.extract_boxed(ex["solution"]) == ex["answer"]
        assert ex["solution"].startswith("<think>I see ") and len(ex["solution"]) <= 60


def test_solutions_fit_a_tiny_bpe_tokenizer():
    """The tiny model generates ~32 tokens at most: a byte-level BPE of 340 tokens trained on
    tokenizer_corpus() must write every worked solution in far fewer."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=340, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(toy.tokenizer_corpus(), trainer)
    rng = np.random.default_rng(4)
    lengths = [len(tok.encode(toy.sample_toy_example(rng, tuple(toy.TOY_TASKS))["solution"]).ids)
               for _ in range(200)]
    assert max(lengths) <= 24


def test_tokenizer_corpus_covers_every_prompt_and_solution():
    corpus = toy.tokenizer_corpus()
    assert corpus == toy.tokenizer_corpus()  # deterministic
    assert data.INSTRUCTION in corpus and all(isinstance(t, str) and t for t in corpus)
    texts = set(corpus)
    rng = np.random.default_rng(5)
    for _ in range(300):
        ex = toy.sample_toy_example(rng, tuple(toy.TOY_TASKS))
        if ex["task"] in toy.SHORTCUT_TASKS:       # left out on purpose (see tokenizer_corpus),
            assert ex["solution"] in texts         # but its solutions are the count task's
            continue
        assert ex["problem"] + "\n\n" + data.INSTRUCTION in texts
        assert ex["solution"] in texts
    joined = " ".join(corpus)
    for word in [*toy.COLOURS, *toy.SHAPES, *"0123456789"]:
        assert word in joined


def dataset_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_make_toy_dataset_is_deterministic_and_loadable(tmp_path, capsys):
    first = toy.make_toy_dataset(24, seed=3, out_dir=tmp_path / "a")
    toy.make_toy_dataset(24, seed=3, out_dir=tmp_path / "b")
    toy.make_toy_dataset(24, seed=4, out_dir=tmp_path / "c")
    toy.make_toy_dataset(8, seed=3, out_dir=tmp_path / "short")
    a, b = dataset_files(tmp_path / "a"), dataset_files(tmp_path / "b")
    c, short = dataset_files(tmp_path / "c"), dataset_files(tmp_path / "short")
    assert first == tmp_path / "a" / "data.jsonl"
    assert a == b  # byte-identical
    assert a["data.jsonl"] != c["data.jsonl"] and a["images/00000.png"] != c["images/00000.png"]
    # Example i depends on (seed, i) only, not on how many examples were written.
    assert all(short[f"images/{i:05d}.png"] == a[f"images/{i:05d}.png"] for i in range(8))
    assert short["data.jsonl"].splitlines() == a["data.jsonl"].splitlines()[:8]

    examples = data.load_jsonl(first)
    assert len(examples) == 24 and {ex.task for ex in examples} <= set(toy.DEFAULT_TOY_TASKS)
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    for ex, row in zip(examples, rows):
        assert row["images"] == [f"images/{row['id'][-5:]}.png"]  # relative paths
        assert ex.answer == row["answer"] and rewards.reward(ex.solution, ex.answer) == 1.0
        image = ex.load_images()[0]
        assert solve(ex.problem, read_shapes(image)) == ex.answer
    assert "text-only best-guess accuracy" in capsys.readouterr().out


def test_text_only_accuracy_of_a_split_is_near_chance(tmp_path, capsys):
    path = toy.make_toy_dataset(600, seed=0, out_dir=tmp_path / "toy")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    acc = toy.text_only_accuracy(rows)
    assert summary["text_only_accuracy"] == acc
    assert f"{acc:.3f}" in capsys.readouterr().out
    # count has 5 answers and count_color 4, drawn equally often: chance is (1/5 + 1/4) / 2.
    assert abs(acc - (0.2 + 0.25) / 2) < 0.05
    for task, counts in summary["answer_counts"].items():
        assert sorted(counts) == sorted(toy.TOY_TASKS[task].answers)


def test_docstring_examples():
    import doctest
    assert doctest.testmod(data).failed == 0
    assert doctest.testmod(imaging).failed == 0
    assert doctest.testmod(rewards).failed == 0
    assert doctest.testmod(custom_reward).failed == 0
    assert doctest.testmod(toy).failed == 0


def test_text_only_accuracy_oracle():
    rows = [{"problem": "q", "answer": a} for a in "1123"] + [{"problem": "r", "answer": "x"}]
    assert toy.text_only_accuracy(rows) == pytest.approx(3 / 5)


def test_toy_example_in_memory_and_options(tmp_path):
    ex = toy.toy_example(np.random.default_rng(0), tasks=("most_color",))
    prompt = ex.to_prompt()
    assert len(ex.images) == 1 and ex.task == "most_color"
    assert prompt["images"][0].size == (112, 112) and ex.answer in toy.COLOURS
    assert prompt["messages"] == data.make_messages(ex.problem, 1)
    big = toy.sample_toy_example(np.random.default_rng(0), image_size=224)
    assert big["image"].size == (224, 224)
    assert set(toy.DEFAULT_TOY_TASKS) <= set(toy.TOY_TASKS)
    with pytest.raises(ValueError):
        toy.make_toy_dataset(2, seed=0, out_dir=tmp_path, tasks=("no_such_task",))


@pytest.mark.parametrize("task,agreement", [("count_hint", toy.HINT_AGREEMENT),
                                            ("count_conflict", 0.0)])
def test_the_shortcut_world_letter_agrees_with_the_answer_as_designed(task, agreement):
    """count_hint: the panel letter names the answer 80% of the time, so the wording alone is
    right about 80% of the time (binomial band of 4 sigma over 2,000 draws); count_conflict: the
    letter is never right, so a policy that learned the letter from training is always wrong."""
    rows = [toy.sample_toy_example(np.random.default_rng([11, i]), tasks=(task,))
            for i in range(2000)]
    follows = np.mean([r["problem"].split()[1].rstrip(":") == toy.PANELS[int(r["answer"]) - 1]
                       for r in rows])
    band = 4 * np.sqrt(agreement * (1 - agreement) / len(rows))
    assert abs(follows - agreement) <= band
    # the summary's shortcut accuracy is the same number, parsed by toy.wording_answer
    assert toy.wording_rule_accuracy(rows) == pytest.approx(follows)
    # the answers themselves stay uniform: the picture, not the answer distribution, decides
    counts = Counter(r["answer"] for r in rows)
    assert sorted(counts) == ["1", "2", "3", "4", "5"] and min(counts.values()) > 320


def test_wording_answer_reads_only_a_leading_panel_letter():
    assert toy.wording_answer("Panel C: how many shapes are in the image?") == "3"
    assert toy.wording_answer("Panel E: how many shapes are in the image?") == "5"
    # no letter, an unknown letter, or "Panel" elsewhere in the text: the wording points nowhere
    assert toy.wording_answer("How many shapes are in the image?") is None
    assert toy.wording_answer("Panel F: how many shapes are in the image?") is None
    assert toy.wording_answer("How many shapes? Panel A: see above") is None
    assert toy.wording_rule_accuracy([{"problem": "How many shapes?", "answer": "2"}]) is None
