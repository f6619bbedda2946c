"""Files, prompts and rewards: all that PAPO needs to know about its data, and nothing about models.

A training example is a question about one or more images together with a gold answer. This
module turns such examples into chat prompts for Qwen2.5-VL, reads and validates them from JSONL
files, generates a small synthetic task whose questions can only be answered by looking at the
picture, and scores the policy's answers with the paper's rule-based reward:

    reward = 0.9 * accuracy + 0.1 * format

where `format` checks that the response is "<think> ... </think> ... \\boxed{...}" and
`accuracy` checks that the content of the last \\boxed{...} equals the gold answer.

The module reads top to bottom in four parts:

    1. The prompt            INSTRUCTION, make_messages
    2. The dataset format    Example, load_jsonl, write_jsonl, DatasetError
    3. The toy task          TOY_TASKS, sample_toy_example, make_toy_dataset, tokenizer_corpus
    4. The rewards           format_reward, extract_boxed, accuracy_reward, reward, reward_details

It imports no deep-learning library on purpose: a reward that a reader can check by hand is the
ground truth the whole training loop optimises, so it must not depend on a model.
"""
from __future__ import annotations

import functools
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import math_verify
import numpy as np
from PIL import Image, ImageDraw


# =============================================================================================
# 1. The prompt
# =============================================================================================
# The paper appends one instruction to every question. It asks for two things the rewards check:
# reasoning inside <think> </think> (the format reward) and a final answer inside \boxed{} (the
# accuracy reward reads only what is inside the last box, so the thinking may say anything).

INSTRUCTION = ("First reason about the question inside <think> </think>, "
               "then write only the final answer inside \\boxed{}.")


def make_messages(problem: str, num_images: int) -> list[dict]:
    """One user turn in the chat format that Qwen2.5-VL's processor understands.

    The images come first, then the question and the instruction. Each {"type": "image"} entry is
    a placeholder: the processor's chat template turns it into the image's vision tokens, and the
    pictures themselves are passed to the processor separately, in the same order.

    >>> make_messages("How many shapes are in the image?", 1)[0]["content"][0]
    {'type': 'image'}
    >>> make_messages("What is 2+2?", 0)[0]["content"][0]["text"].splitlines()[0]
    'What is 2+2?'
    """
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": problem + "\n" + INSTRUCTION})
    return [{"role": "user", "content": content}]


# =============================================================================================
# 2. The dataset format
# =============================================================================================
# A dataset is a JSONL file, one JSON object per line:
#
#     {"problem": "How many circles?", "answer": "3", "images": ["images/00012.png"]}
#
#   problem   the question (a non-empty string; the instruction is added by make_messages)
#   answer    the gold answer (a non-empty string that the accuracy reward can compare, see part 4)
#   images    a non-empty list of image paths; a single "image": "path" string is accepted too.
#             Relative paths are relative to the folder of the JSONL file, so a dataset folder can
#             be moved or copied as a whole; absolute paths are allowed.
#   solution  optional: a worked answer "<think>...</think> \boxed{...}" for a supervised warm start
#   id, task  optional labels, kept for logging; every other key is ignored.
#
# Blank lines are skipped (an editor easily leaves one at the end), but every other line is
# checked BEFORE training starts, and all problems are reported together in one error. A dataset
# with a bad row is a bug in the data, and a bug found after two hours of RL costs two hours: so
# nothing is silently dropped and nothing is left to fail later.


class DatasetError(ValueError):
    """A dataset file that cannot be used as it is; `problems` has one "path:line: reason" each."""

    def __init__(self, problems: list[str], shown: int = 20):
        self.problems = list(problems)
        lines = self.problems[:shown]
        if len(self.problems) > shown:
            lines.append(f"... and {len(self.problems) - shown} more")
        super().__init__("invalid dataset:\n  " + "\n  ".join(lines))


@dataclass
class Example:
    """One question about one or more images, with its gold answer.

    `image_paths` are absolute, so an Example keeps working whatever the working directory.
    `source` says where it came from ("train.jsonl:12"), so a strange reward can be traced back to
    its row. `images`, when given, holds the pictures in memory instead (the toy task's fresh
    examples never touch the disk).
    """
    problem: str
    answer: str
    image_paths: list[Path]
    solution: str | None = None
    source: str = ""
    id: str | None = None
    task: str | None = None
    images: list[Image.Image] | None = None

    def load_images(self) -> list[Image.Image]:
        """The pictures as RGB PIL images (the processor and the pixel-space mask expect RGB;
        a PNG may be palette, grey or RGBA, and RGBA would keep an alpha channel)."""
        if self.images is not None:
            return [im.convert("RGB") for im in self.images]
        pictures = []
        for path in self.image_paths:
            with Image.open(path) as im:  # `with` closes the file: long runs open many images
                pictures.append(im.convert("RGB"))
        return pictures

    def to_prompt(self) -> dict:
        """What a rollout needs: the chat messages, the pictures in the same order, the answer."""
        pictures = self.load_images()
        return {"messages": make_messages(self.problem, len(pictures)), "images": pictures,
                "answer": self.answer, "solution": self.solution, "problem": self.problem}


def _check_text_field(row: dict, key: str) -> tuple[str | None, str | None]:
    """(value, None) for a usable non-empty string field, else (None, reason)."""
    if key not in row:
        return None, f'missing "{key}"'
    value = row[key]
    if not isinstance(value, str):
        # A bare number as answer is the usual case; asking for quotes keeps "007" and "1.50"
        # from being silently rewritten by the JSON parser into 7 and 1.5.
        return None, f'"{key}" must be a string, got {type(value).__name__} {value!r:.40}'
    if not value.strip():
        return None, f'"{key}" is empty'
    return value, None


def _check_image_field(row: dict) -> tuple[list[str] | None, str | None]:
    """The row's image paths as given (not yet resolved), or a reason why there are none."""
    if "images" in row and "image" in row:
        return None, 'both "images" and "image" are given; use one'
    if "image" in row:
        value = row["image"]
        if not isinstance(value, str) or not value.strip():
            return None, f'"image" must be a non-empty path string, got {value!r:.40}'
        return [value], None
    if "images" not in row:
        return None, 'missing "images" (a list of image paths) or "image" (one path)'
    value = row["images"]
    if isinstance(value, str):
        return None, '"images" must be a list of paths; for a single path use "image"'
    if not isinstance(value, list):
        return None, f'"images" must be a list of paths, got {type(value).__name__}'
    if not value:
        return None, '"images" is an empty list'
    if not all(isinstance(p, str) and p.strip() for p in value):
        return None, '"images" must contain only non-empty path strings'
    return value, None


def _check_image_file(path: Path) -> str | None:
    """None if `path` is a readable image file, else the reason. PIL's verify() checks the file's
    structure (headers, chunk checksums) without decoding every pixel, which keeps validating a
    dataset of tens of thousands of images to seconds."""
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError)
        return f"not a readable image: {path} ({type(err).__name__}: {err})"
    return None


def load_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a JSONL dataset; raise one DatasetError that lists every bad row.

    >>> rows = load_jsonl("toy/data.jsonl")                                 # doctest: +SKIP
    >>> rows[0].problem, rows[0].answer, rows[0].source                      # doctest: +SKIP
    ('How many shapes are in the image?', '3', 'toy/data.jsonl:1')
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError([f"{path}: file not found"])
    folder = path.absolute().parent  # relative image paths are relative to the file's folder
    problems: list[str] = []
    examples: list[Example] = []
    image_ok: dict[Path, str | None] = {}  # datasets often reuse a picture; check each file once
    rows_seen = 0
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{where}: not valid UTF-8 ({err.reason})")
            continue
        if not line.strip():
            continue  # blank lines are allowed and skipped
        rows_seen += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: malformed JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue

        reasons = []  # everything wrong with this row, reported together
        problem, why = _check_text_field(row, "problem")
        if why:
            reasons.append(why)
        answer, why = _check_text_field(row, "answer")
        if why:
            reasons.append(why)
        elif (why := gold_answer_problem(answer)):
            reasons.append(why)
        solution = row.get("solution")
        if solution is not None and not isinstance(solution, str):
            reasons.append(f'"solution" must be a string, got {type(solution).__name__}')
        given, why = _check_image_field(row)
        resolved = []
        if why:
            reasons.append(why)
        else:
            for p in given:
                full = Path(p) if Path(p).is_absolute() else folder / p
                if full not in image_ok:
                    image_ok[full] = _check_image_file(full)
                if image_ok[full]:
                    reasons.append(image_ok[full])
                resolved.append(full)
        if reasons:
            problems.append(f"{where}: " + "; ".join(reasons))
            continue
        examples.append(Example(
            problem=problem, answer=answer, image_paths=resolved, solution=solution,
            source=where, id=None if row.get("id") is None else str(row["id"]),
            task=None if row.get("task") is None else str(row["task"])))

    if rows_seen == 0 and not problems:
        problems.append(f"{path}: no rows (the file is empty or has only blank lines)")
    if problems:
        raise DatasetError(problems)
    return examples


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8, keys in the order given, so the same rows always
    give the same bytes). Creates the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# =============================================================================================
# 3. The toy task: questions that only the picture can answer
# =============================================================================================
# To run the whole method offline on a laptop we need a task that (a) a tiny model can learn in
# minutes, (b) cannot be solved from the text alone, so that "looking at the image" is exactly
# what perception-aware training rewards, and (c) has an unlimited supply of fresh examples, since
# a small fixed pool gets memorised.
#
# Each picture is a light 112x112 canvas with a few non-overlapping circles, squares and
# triangles in red, green and blue. Qwen2.5-VL cuts 112x112 pixels into 14-px patches and merges
# 2x2 of them into one token, so one picture costs 4x4 = 16 image tokens: cheap. A shape (18-24
# px) lies on 4 to 9 of the 14-px squares that PAPO's mask blacks out with probability 0.6 each,
# so in the masked copy most shapes lose parts and some vanish: the count becomes uncertain, and
# the masked-image policy really does know less.
#
# The ANSWER IS DRAWN FIRST, uniformly from the task's possible answers, and then a picture is
# built to match it. So within a task every answer is equally likely whatever the question says,
# and a model that ignores the picture can do no better than chance (1/5 for "count").

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 230)
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "shape": "shapes"}
MAX_SHAPES = 6  # at most this many shapes per picture; more would crowd 112 px (see _place_boxes)


def _noun(word: str, n: int) -> str:
    """'1 circle', '2 circles': the worked solutions should read naturally."""
    return f"{n} {word if n == 1 else PLURAL[word]}"


@dataclass(frozen=True)
class ToyTask:
    """One kind of question. `plan(rng)` draws the answer first, then returns
    (question, answer, shapes to draw as (colour, shape) pairs, the thought naming what is seen)."""
    answers: tuple[str, ...]
    plan: Callable[[np.random.Generator], tuple[str, str, list[tuple[str, str]], str]]


def _pick(rng: np.random.Generator, options) -> str:
    """A uniform choice that returns a plain Python str (np.str_ would leak into JSON and repr)."""
    return str(options[int(rng.integers(len(options)))])


def _random_shapes(rng, n: int, allowed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [allowed[int(rng.integers(len(allowed)))] for _ in range(n)]


ALL_KINDS = [(c, s) for c in COLOURS for s in SHAPES]  # the 9 (colour, shape) combinations


def _plan_count(rng):
    """How many shapes in all? Answers 1-5, colours and kinds random."""
    n = int(rng.integers(1, 6))
    shapes = _random_shapes(rng, n, ALL_KINDS)
    return "How many shapes are in the image?", str(n), shapes, f"I see {_noun('shape', n)}."


def _plan_count_colour(rng):
    """How many red (green, blue) shapes? Answers 1-4, plus 0-2 shapes of other colours, so that
    counting every shape (the shortcut a tiny model finds first) is right only a third of the
    time."""
    colour = _pick(rng, list(COLOURS))
    k = int(rng.integers(1, 5))
    others = int(rng.integers(0, 3))
    shapes = (_random_shapes(rng, k, [(colour, s) for s in SHAPES])
              + _random_shapes(rng, others, [(c, s) for c, s in ALL_KINDS if c != colour]))
    return (f"How many {colour} shapes are in the image?", str(k), shapes,
            f"I see {k} {colour} {'shape' if k == 1 else 'shapes'}.")


def _plan_count_shape(rng):
    """How many circles (squares, triangles)? Answers 1-4, plus 0-2 shapes of other kinds."""
    kind = _pick(rng, SHAPES)
    k = int(rng.integers(1, 5))
    others = int(rng.integers(0, 3))
    shapes = (_random_shapes(rng, k, [(c, kind) for c in COLOURS])
              + _random_shapes(rng, others, [(c, s) for c, s in ALL_KINDS if s != kind]))
    return (f"How many {PLURAL[kind]} are in the image?", str(k), shapes,
            f"I see {_noun(kind, k)}.")


def _plan_colour_shape(rng):
    """How many red circles? Answers 1-3, plus 0-3 other shapes that share at most one of the two
    properties, so the question needs colour AND kind at once."""
    colour, kind = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    k = int(rng.integers(1, 4))
    others = int(rng.integers(0, 4))
    shapes = [(colour, kind)] * k + _random_shapes(
        rng, others, [cs for cs in ALL_KINDS if cs != (colour, kind)])
    return (f"How many {colour} {PLURAL[kind]} are in the image?", str(k), shapes,
            f"I see {k} {colour} {kind if k == 1 else PLURAL[kind]}.")


def _plan_most_colour(rng):
    """Which colour appears most often? The answer is a colour word, with a unique winner:
    the winner has 2 or 3 shapes and each other colour fewer, at most MAX_SHAPES in all."""
    winner = _pick(rng, list(COLOURS))
    top = int(rng.integers(2, 4))
    while True:  # redraw the losers until the picture fits (a few tries at most)
        counts = {c: (top if c == winner else int(rng.integers(0, top))) for c in COLOURS}
        if sum(counts.values()) <= MAX_SHAPES:
            break
    shapes = [(c, _pick(rng, SHAPES)) for c, n in counts.items() for _ in range(n)]
    seen = ", ".join(f"{n} {c}" for c, n in counts.items())
    return ("Which colour appears most often in the image: red, green or blue?", winner, shapes,
            f"I see {seen}.")


TOY_TASKS: dict[str, ToyTask] = {
    "count": ToyTask(("1", "2", "3", "4", "5"), _plan_count),
    "count_color": ToyTask(("1", "2", "3", "4"), _plan_count_colour),
    "count_shape": ToyTask(("1", "2", "3", "4"), _plan_count_shape),
    "color_shape": ToyTask(("1", "2", "3"), _plan_colour_shape),
    "most_color": ToyTask(tuple(COLOURS), _plan_most_colour),
}
DEFAULT_TOY_TASKS = ("count", "count_color")  # what `python train.py` trains on (see README)


def _place_boxes(rng, sizes: list[int], image_size: int, gap: int = 3,
                 tries: int = 200, restarts: int = 100) -> list[tuple[int, int, int]]:
    """Random non-overlapping square boxes (x, y, size), at least `gap` px apart and off the edge.

    Rejection sampling: draw a position, keep it if it clears every box placed so far. With at
    most 6 boxes of <= 24 px on 112 px they cover about a third of the canvas, far below the point
    where random placement jams, so a retry is rare; the bounded loops make a bad case an error
    instead of a hang."""
    for _ in range(restarts):
        boxes: list[tuple[int, int, int]] = []
        for s in sizes:
            for _ in range(tries):
                x = int(rng.integers(gap, image_size - s - gap + 1))
                y = int(rng.integers(gap, image_size - s - gap + 1))
                if all(x + s + gap <= bx or bx + bs + gap <= x or y + s + gap <= by
                       or by + bs + gap <= y for bx, by, bs in boxes):
                    boxes.append((x, y, s))
                    break
            else:
                break  # this shape found no room: start the whole layout again
        if len(boxes) == len(sizes):
            return boxes
    raise RuntimeError(f"could not place {len(sizes)} shapes on a {image_size}-px canvas")


def draw_shapes(rng: np.random.Generator, shapes: list[tuple[str, str]],
                image_size: int = 112) -> Image.Image:
    """A light canvas with each (colour, shape) drawn once at a random free spot.

    Drawn without anti-aliasing, so every shape pixel has exactly its colour's RGB value: a test
    can count a colour's pixels or its connected blobs and recover the answer."""
    lo, hi = round(18 * image_size / 112), round(24 * image_size / 112)  # scale with the canvas
    sizes = [int(rng.integers(lo, hi + 1)) for _ in shapes]
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for (colour, kind), (x, y, s) in zip(shapes, _place_boxes(rng, sizes, image_size)):
        fill = COLOURS[colour]
        if kind == "circle":
            draw.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
        elif kind == "square":
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
        else:  # an upright triangle filling its box
            draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
    return image


def sample_toy_example(rng: np.random.Generator, tasks=DEFAULT_TOY_TASKS,
                       image_size: int = 112) -> dict:
    """One fresh example: a task drawn uniformly from `tasks`, its answer, a matching picture.

    >>> ex = sample_toy_example(np.random.default_rng(0), tasks=("count_color",))
    >>> sorted(ex), ex["image"].size
    (['answer', 'image', 'problem', 'solution', 'task'], (112, 112))
    >>> ex["problem"], ex["answer"]
    ('How many blue shapes are in the image?', '3')
    >>> print(ex["solution"])
    <think>I see 3 blue shapes.</think> \\boxed{3}
    """
    task = _pick(rng, list(tasks))
    problem, answer, shapes, thought = TOY_TASKS[task].plan(rng)
    # Mix asked-about shapes and distractors: shapes placed later fill the gaps left by earlier
    # ones, and that faint trace should not tell them apart.
    shapes = [shapes[i] for i in rng.permutation(len(shapes))]
    return {"image": draw_shapes(rng, shapes, image_size), "problem": problem, "answer": answer,
            "solution": f"<think>{thought}</think> \\boxed{{{answer}}}", "task": task}


def toy_example(rng: np.random.Generator, tasks=DEFAULT_TOY_TASKS, image_size: int = 112,
                ) -> Example:
    """sample_toy_example as an in-memory Example, for a trainer that draws fresh prompts."""
    ex = sample_toy_example(rng, tasks, image_size)
    return Example(problem=ex["problem"], answer=ex["answer"], image_paths=[],
                   solution=ex["solution"], source="toy", task=ex["task"], images=[ex["image"]])


def text_only_accuracy(rows: list[dict]) -> float:
    """Accuracy of the best guess that never looks at the picture.

    For each distinct problem text, guess the answer that is most frequent among the rows with that
    same text. Measured on the rows themselves, so it slightly flatters the guesser on small
    splits; on the toy task it should sit near 1/k (k answers per task).

    >>> text_only_accuracy([{"problem": "q", "answer": "1"}, {"problem": "q", "answer": "1"},
    ...                     {"problem": "q", "answer": "2"}, {"problem": "r", "answer": "5"}])
    0.75
    """
    by_text: dict[str, Counter] = {}
    for row in rows:
        by_text.setdefault(row["problem"], Counter())[row["answer"]] += 1
    right = sum(c.most_common(1)[0][1] for c in by_text.values())
    return right / max(len(rows), 1)


def make_toy_dataset(n: int, seed: int, out_dir: str | Path, tasks=DEFAULT_TOY_TASKS,
                     image_size: int = 112) -> Path:
    """Write n toy examples as a user-facing dataset: out_dir/data.jsonl + out_dir/images/*.png.

    Example i is drawn from its own generator seeded with (seed, i): the files are byte-identical
    for the same seed, and the first 100 examples are the same whether n is 100 or 10,000.
    Also writes out_dir/summary.json (answer counts per task, text-only accuracy) and prints a
    one-line summary. Returns the path of data.jsonl.
    """
    unknown = [t for t in tasks if t not in TOY_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown toy task(s) {unknown or tasks}; choose from {list(TOY_TASKS)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        ex = sample_toy_example(np.random.default_rng([seed, i]), tasks, image_size)
        name = f"images/{i:05d}.png"
        ex["image"].save(out_dir / name)
        rows.append({"id": f"toy-{seed}-{i:05d}", "problem": ex["problem"], "answer": ex["answer"],
                     "images": [name], "solution": ex["solution"], "task": ex["task"]})
    path = write_jsonl(rows, out_dir / "data.jsonl")
    acc = text_only_accuracy(rows)
    counts = {t: dict(sorted(Counter(r["answer"] for r in rows if r["task"] == t).items()))
              for t in tasks}
    chance = {t: 1 / len(TOY_TASKS[t].answers) for t in tasks}
    summary = {"n": n, "seed": seed, "tasks": list(tasks), "image_size": image_size,
               "text_only_accuracy": acc, "chance_per_task": chance, "answer_counts": counts}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"toy dataset: {n} examples of {','.join(tasks)} -> {path} "
          f"(text-only best-guess accuracy {acc:.3f})")
    return path


def tokenizer_corpus() -> list[str]:
    """Every kind of text the tiny model will read or write, for training its tokenizer offline.

    A byte-level BPE tokenizer can encode anything, but it only learns merges for what it was
    trained on; training it on exactly these texts makes the toy prompts and solutions short in
    tokens. Deterministic (fixed seeds), so the same tokenizer is built every time.
    """
    texts = [INSTRUCTION,
             # Qwen's chat template adds a default system turn and role names around the messages.
             "You are a helpful assistant.", "system", "user", "assistant",
             " ".join(str(d) for d in range(10)), " ".join(COLOURS), " ".join(SHAPES),
             " ".join(PLURAL.values()), "<think> </think> \\boxed{}"]
    # Every question with the instruction, as make_messages writes it, and every worked solution:
    # each task's plan is run 400 times, enough to produce each of its (at most 36) solutions.
    seen: set[str] = set()
    for k, task in enumerate(TOY_TASKS):
        rng = np.random.default_rng([12345, k])
        for _ in range(400):
            problem, answer, _, thought = TOY_TASKS[task].plan(rng)
            for text in (problem + "\n" + INSTRUCTION,
                         f"<think>{thought}</think> \\boxed{{{answer}}}"):
                if text not in seen:
                    seen.add(text)
                    texts.append(text)
    return texts


# =============================================================================================
# 4. The rewards
# =============================================================================================
# Rule-based and verifiable: no reward model to hack, just two checks a reader can do by hand.

_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)  # DOTALL: "." spans lines


def format_reward(text: str) -> float:
    """1.0 if the whole response is <think>...</think>...\\boxed{...}..., else 0.0.

    Surrounding whitespace is stripped first: a tokenizer may decode a leading space or a trailing
    newline, and that says nothing about the format.

    >>> format_reward("<think>I see 2 red shapes.</think> \\\\boxed{2}")
    1.0
    >>> format_reward("The answer is \\\\boxed{2}")  # no thinking
    0.0
    """
    return 1.0 if _FORMAT.fullmatch(text.strip()) else 0.0


def extract_boxed(text: str) -> str | None:
    """The content of the LAST \\boxed{...}, braces balanced; None if there is none.

    The content is read by counting braces, so nested braces are kept whole; a backslash escapes
    the next character, so \\{ and \\} (set braces in LaTeX) do not count. If the last \\boxed is
    never closed - the response was cut off at the token limit - the answer is None even when an
    earlier box was complete: the model had not finished, so its final answer is unknown.
    Only "\\boxed{" exactly is recognised ("\\boxed {" with a space is not), the same rule as the
    format reward's pattern, so the two rewards never disagree about where the box is.

    >>> extract_boxed("<think>...</think> \\\\boxed{\\\\frac{1}{\\\\sqrt{2}}}")
    '\\\\frac{1}{\\\\sqrt{2}}'
    >>> extract_boxed("\\\\boxed{1} then \\\\boxed{2}")
    '2'
    >>> extract_boxed("\\\\boxed{3"), extract_boxed("3")
    (None, None)
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth, begin = 1, i
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


# --- Comparing two answers ------------------------------------------------------------------
# Step 1, a cheap normalised string comparison: drop surrounding whitespace and $ signs, a
# trailing period and a \text{...} wrapper; this settles most answers without any parsing.
#
# Step 2, for everything else, math-verify (the maintained successor of the official grader,
# mathruler) parses both sides with sympy and compares the values, so 1/2 = 0.5 = \frac{1}{2} =
# \dfrac12, 3 = 3.0, 2 = 2.00, 1000 = 1,000, 50\% = 0.5, {1,2} = {2,1}, x=3 = 3, and
# \frac{1}{\sqrt{2}} = \sqrt{2}/2. Numbers are compared after rounding to 6 decimals
# (math-verify's default), so 0.5000001 also equals 1/2.
#
# WORD ANSWERS are the exception. An answer made only of letters and single spaces ("red",
# "north east", "B") is compared as text, case-insensitively, and never given to math-verify:
# sympy would read "red" as the product r*e*d (e being Euler's number), and then "der" would be
# "equal" to it. Every other gold answer must be something math-verify can parse into a value;
# one it cannot parse is an error (load_jsonl reports it), because a reward computed against an
# unreadable gold answer would be noise at best, and a free 1.0 at worst. (Letters mixed with
# punctuation, like "red, blue" or "n/a", are NOT word answers: math-verify reads them as
# formulas in the symbols r, e, d, ... Keep text answers to letters and spaces.)

_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{(.*)\}", re.DOTALL)
_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


def _normalise(s: str) -> str:
    """'$5$' -> '5', ' Red. ' -> 'Red', '\\text{red}' -> 'red', 'north  east' -> 'north east'."""
    s = s.strip().strip("$").strip()
    if (m := _WRAPPER.fullmatch(s)):
        s = m.group(1).strip()
    s = s.removesuffix(".").strip()
    return " ".join(s.split())


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


def _too_complex(pred: str, gold: str) -> bool:
    """Limits that real answers never reach, with room for forms more complex than the gold:
    at most max(200, 4x the gold's) characters, nesting 6 (or the gold's + 2), 10 powers (or the
    gold's + 2). Inside them math-verify took at most about 2 s on the worst inputs tried, and
    milliseconds on ordinary answers."""
    (n, d, p), (gn, gd, gp) = _complexity(pred), _complexity(gold)
    return n > max(200, 4 * gn) or d > max(6, gd + 2) or p > max(10, gp + 2)


def _timeout() -> int | None:
    """math-verify's time limit for one parse or comparison, in seconds.

    It enforces the limit with signal.alarm, which Python allows only in the main thread; from any
    other thread (a reward worker, a data-loader thread) math-verify raises instead. So: 5 s in the
    main thread, no limit elsewhere. Without a limit a pathological expression could stall sympy;
    _too_complex keeps such inputs away, and toy or benchmark answers parse in milliseconds.
    (math-verify logs a one-time warning when the limit is off.)"""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(s: str) -> list:
    """math-verify's parse of one bare answer. Wrapping it in \\boxed{} tells math-verify where the
    answer is (it searches a whole response otherwise); the caller has balanced its braces."""
    return math_verify.parse("\\boxed{" + s + "}", parsing_timeout=_timeout())


def _is_value(x) -> bool:
    """math-verify returns sympy values, plus the matched text as a string fallback."""
    return not isinstance(x, str)


@functools.lru_cache(maxsize=65536)  # one gold answer is scored against G rollouts every step
def _gold(answer: str) -> tuple[str, object]:
    """('words', lowercased text) or ('math', parsed values); ValueError when unusable."""
    s = _normalise(answer)
    if _WORDS.fullmatch(s):
        return "words", s.lower()
    if not s or extract_boxed("\\boxed{" + s + "}") != s:
        raise ValueError(f"gold answer {answer!r} is empty or has unbalanced braces")
    parsed = _parse(s)
    if not any(_is_value(x) for x in parsed):
        raise ValueError(f"gold answer {answer!r} cannot be parsed by math-verify and is not a "
                         f"plain word answer (letters and spaces only)")
    return "math", tuple(parsed)


def gold_answer_problem(answer: str) -> str | None:
    """None if `answer` can serve as a gold answer, else why not (load_jsonl reports it)."""
    try:
        _gold(answer)
    except ValueError as err:
        return str(err)
    return None


def answers_match(predicted: str, answer: str) -> bool:
    """Is the predicted answer (the content of a box) equivalent to the gold answer?

    Raises ValueError for an unusable gold answer; never raises for any prediction.

    >>> answers_match("\\\\dfrac12", "0.5"), answers_match("Red", "red"), answers_match("4", "3")
    (True, True, False)
    """
    kind, gold = _gold(answer)
    pred = _normalise(predicted)
    if kind == "words":
        return pred.lower() == gold
    if pred.replace(" ", "") == _normalise(answer).replace(" ", ""):
        return True
    if not pred or _too_complex(pred, _normalise(answer)):
        return False
    try:
        return bool(math_verify.verify(list(gold), _parse(pred), timeout_seconds=_timeout()))
    except Exception:  # a garbage prediction must score 0, never stop the training run
        return False


def accuracy_reward(text: str, answer: str) -> float:
    """1.0 if the last \\boxed{...} of the response is equivalent to the gold answer, else 0.0.

    >>> accuracy_reward("<think>half</think> \\\\boxed{\\\\frac{1}{2}}", "0.5")
    1.0
    >>> accuracy_reward("the answer is 0.5", "0.5")  # no box, no credit
    0.0
    """
    boxed = extract_boxed(text)
    if boxed is None:
        _gold(answer)  # an unusable gold answer is an error whatever the response
        return 0.0
    return 1.0 if answers_match(boxed, answer) else 0.0


def reward_details(text: str, answer: str) -> dict[str, float]:
    """The reward and its two parts, for logging accuracy and format rate separately.

    >>> reward_details("<think>I see 2.</think> \\\\boxed{3}", "2")
    {'reward': 0.1, 'accuracy': 0.0, 'format': 1.0}
    """
    acc, fmt = accuracy_reward(text, answer), format_reward(text)
    return {"reward": 0.9 * acc + 0.1 * fmt, "accuracy": acc, "format": fmt}


def reward(text: str, answer: str) -> float:
    """The paper's rule-based reward: 0.9 * accuracy + 0.1 * format, so 1.0, 0.9, 0.1 or 0.0.

    >>> reward("<think>I see 2 red shapes.</think> \\\\boxed{2}", "2")
    1.0
    """
    return reward_details(text, answer)["reward"]
