"""The offline toy worlds: questions about synthetic pictures that the picture always answers,
and the tiny model that learns them.

This is what lets the whole method run on a laptop with no network: fresh examples without
end, drawn with PIL, for a tiny Qwen2.5-VL (or Qwen3-VL) that learns them in minutes. It also
writes the same examples as a user-facing dataset (data.py's JSONL format), trains the tiny
model's tokenizer on the toy's texts and builds the model itself.

    TOY_TASKS            the kinds of question (count, count_color, ...), each drawing its answer
                         FIRST and then a picture that shows it
    TOY_WORLDS           what a run trains and is scored on: "plain" (the wording says nothing
                         about the answer) or "shortcut" (a panel letter usually gives it away,
                         and a conflict split where it never does)
    wording_answer       the answer a question's wording points to (the shortcut), if any
    sample_toy_example   one fresh example; toy_example wraps it as a data.Example
    make_toy_dataset     n examples written as data.jsonl + images/
    tokenizer_corpus     every text the tiny model will read or write
    build_tiny_model     a randomly initialised Qwen2.5-VL or Qwen3-VL of the real class (SIZES,
                         TINY_FAMILIES), with a tokenizer trained on that corpus
    prepare_toy_data     the run's toy splits, written once to the cache folder
    warm_start           the tiny model trained on worked solutions until it is right some of
                         the time: where the offline RL run starts (cached)
    shortcut_decoys      per question, the wrong answer its wording points to
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import eval as evaluation
import model as qwen
import speedups
import papo
from data import INSTRUCTION, Example, format_prompt, template_text, write_jsonl

# To run the whole method offline on a laptop we need a task that (a) a tiny model can learn in
# minutes, (b) cannot be solved from the text alone, so that "looking at the image" is exactly
# what perception-aware training rewards, and (c) has an unlimited supply of fresh examples, since
# a small fixed pool gets memorised.
#
# Each picture is a light 112x112 canvas with a few non-overlapping circles, squares and
# triangles in red, green and blue. Qwen2.5-VL cuts 112x112 pixels into 14-px patches and merges
# 2x2 of them into one token, so one picture costs 4x4 = 16 image tokens: cheap (Qwen3-VL's
# processor scales it to 128 px, cut into 16-px patches: 16 tokens as well). A shape (18-24
# px) lies on 4 to 9 of the 14-px squares that PAPO's mask blacks out with probability 0.6 each,
# so in the masked copy most shapes lose parts and some vanish: the count becomes uncertain. On
# the light canvas, though, each black square is also a dark blob of its own, which the tiny
# model counts as a shape (docs/toy.md); on the dark canvas (--toy-canvas dark) the squares
# vanish into the background, and the masked-image policy really does know less.
#
# The ANSWER IS DRAWN FIRST, uniformly from the task's possible answers, and then a picture is
# built to match it. So within a task every answer is equally likely whatever the question says,
# and a model that ignores the picture can do no better than chance (1/5 for "count").

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 230)

# --toy-canvas: the colour the shapes are drawn on. "light" (the default) is how real diagrams
# look, and there PAPO's black squares ADD content: each is a dark blob the model can count as a
# shape (docs/toy.md). "dark" is the canvas in exactly the mask's black, so a masked square is
# indistinguishable from empty canvas: masking can only HIDE parts of shapes, never add any. It
# is the world where the masked branch really sees less.
CANVASES = {"light": BACKGROUND, "dark": (0, 0, 0)}
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


# --- A world with a shortcut -------------------------------------------------------------------
# The tasks above leave the text no say: a policy that does not look is right 1 time in 4 or 5,
# so any reward for right answers is already a reward for looking, and PAPO has nothing to add.
# The paper's case is a policy that CAN score from the wording and learns to. These two tasks
# build that case: every "count" question names a panel, A to E, and in the TRAINING-like task
# the panel letter agrees with the answer (A = 1 shape, ..., E = 5) 80% of the time - a dataset
# artifact, like a template word that usually goes with one answer. The picture always gives the
# exact answer. In the CONFLICT task the letter never agrees with the answer, so a policy that
# follows the wording is always wrong there, and only one that looks is right.
PANELS = ("A", "B", "C", "D", "E")      # panel i + 1 "goes with" answer i + 1
HINT_AGREEMENT = 0.8                    # how often the letter agrees with the answer in training
SHORTCUT_TASKS = ("count_hint", "count_conflict")   # where the wording DOES say something


def _plan_count_hinted(rng, agreement: float):
    n = int(rng.integers(1, 6))
    if rng.random() < agreement:
        panel = PANELS[n - 1]
    else:                                # one of the four letters that point elsewhere
        panel = _pick(rng, [p for i, p in enumerate(PANELS) if i != n - 1])
    shapes = _random_shapes(rng, n, ALL_KINDS)
    return (f"Panel {panel}: how many shapes are in the image?", str(n), shapes,
            f"I see {_noun('shape', n)}.")


def wording_answer(problem: str) -> str | None:
    """The answer the wording points to - the count its panel letter goes with - or None for a
    question without a panel letter. Answering this without looking is the shortcut."""
    head, sep, _ = problem.partition(":")
    if not sep or not head.startswith("Panel ") or head[6:] not in PANELS:
        return None
    return str(PANELS.index(head[6:]) + 1)


def wording_rule_accuracy(rows: list[dict]) -> float | None:
    """How often answering what the wording points to is right, over the rows whose wording
    points somewhere (None if none does): 0.8 on count_hint, 0 on count_conflict - the
    text-only accuracy of the shortcut itself."""
    pointed = [(wording_answer(r["problem"]), r["answer"]) for r in rows]
    pointed = [(w, a) for w, a in pointed if w is not None]
    return sum(w == a for w, a in pointed) / len(pointed) if pointed else None


def _plan_count_hint(rng):
    """Panel-named count questions whose letter agrees with the answer 80% of the time."""
    return _plan_count_hinted(rng, HINT_AGREEMENT)


def _plan_count_conflict(rng):
    """The same questions with a letter that always points to a wrong answer."""
    return _plan_count_hinted(rng, 0.0)


TOY_TASKS: dict[str, ToyTask] = {
    "count": ToyTask(("1", "2", "3", "4", "5"), _plan_count),
    "count_color": ToyTask(("1", "2", "3", "4"), _plan_count_colour),
    "count_shape": ToyTask(("1", "2", "3", "4"), _plan_count_shape),
    "color_shape": ToyTask(("1", "2", "3"), _plan_colour_shape),
    "most_color": ToyTask(tuple(COLOURS), _plan_most_colour),
    "count_hint": ToyTask(("1", "2", "3", "4", "5"), _plan_count_hint),
    "count_conflict": ToyTask(("1", "2", "3", "4", "5"), _plan_count_conflict),
}
DEFAULT_TOY_TASKS = ("count", "count_color")  # what `python train.py` trains on (see README)


@dataclass(frozen=True)
class ToyWorld:
    """What a toy run trains on, and the held-out splits it is scored on besides one drawn like
    training (`extra`: split name -> its tasks)."""
    tasks: tuple[str, ...]
    extra: dict[str, tuple[str, ...]]
    about: str


TOY_WORLDS: dict[str, ToyWorld] = {
    "plain": ToyWorld(DEFAULT_TOY_TASKS, {},
                      "counting questions whose wording says nothing about the answer"),
    # The plain tasks plus panel-lettered counting, whose letter agrees with the answer 80% of
    # the time: the plain questions teach the model to count, the lettered ones offer a cheaper
    # way to be right. The conflict split shows which way a policy answers when the two disagree.
    "shortcut": ToyWorld(DEFAULT_TOY_TASKS + ("count_hint",), {"conflict": ("count_conflict",)},
                         "the plain tasks plus lettered counting questions whose letter usually "
                         "gives the answer away; scored also on a split where it never does"),
}


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
                image_size: int = 112, canvas: str = "light") -> Image.Image:
    """A canvas (CANVASES) with each (colour, shape) drawn once at a random free spot.

    Drawn without anti-aliasing, so every shape pixel has exactly its colour's RGB value: a test
    can count a colour's pixels or its connected blobs and recover the answer."""
    lo, hi = round(18 * image_size / 112), round(24 * image_size / 112)  # scale with the canvas
    sizes = [int(rng.integers(lo, hi + 1)) for _ in shapes]
    image = Image.new("RGB", (image_size, image_size), CANVASES[canvas])
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
                       image_size: int = 112, canvas: str = "light") -> dict:
    """One fresh example: a task drawn uniformly from `tasks`, its answer, a matching picture
    on the canvas named (CANVASES; the same draws on either, only the background differs).

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
    return {"image": draw_shapes(rng, shapes, image_size, canvas), "problem": problem,
            "answer": answer, "solution": f"<think>{thought}</think> \\boxed{{{answer}}}", "task": task}


def toy_example(rng: np.random.Generator, tasks=DEFAULT_TOY_TASKS, image_size: int = 112,
                canvas: str = "light") -> Example:
    """sample_toy_example as an in-memory Example, for a trainer that draws fresh prompts."""
    ex = sample_toy_example(rng, tasks, image_size, canvas)
    return Example(problem=ex["problem"], answer=ex["answer"], images=[ex["image"]],
                   solution=ex["solution"], source="toy", task=ex["task"],
                   sizes=[ex["image"].size])


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
                     image_size: int = 112, canvas: str = "light") -> Path:
    """Write n toy examples as a user-facing dataset: out_dir/data.jsonl + out_dir/images/*.png.

    Example i is drawn from its own generator seeded with (seed, i): the files are byte-identical
    for the same seed, and the first 100 examples are the same whether n is 100 or 10,000.
    Also writes out_dir/summary.json (answer counts per task, text-only accuracy) and prints a
    one-line summary. Returns the path of data.jsonl.
    """
    unknown = [t for t in tasks if t not in TOY_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown toy task(s) {unknown or tasks}; choose from {list(TOY_TASKS)}")
    if canvas not in CANVASES:
        raise ValueError(f"unknown toy canvas {canvas!r}; choose from {list(CANVASES)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        ex = sample_toy_example(np.random.default_rng([seed, i]), tasks, image_size, canvas)
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
               "canvas": canvas,
               "text_only_accuracy": acc, "wording_rule_accuracy": wording_rule_accuracy(rows),
               "chance_per_task": chance, "answer_counts": counts}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    rule = summary["wording_rule_accuracy"]
    print(f"toy dataset: {n} examples of {','.join(tasks)} -> {path} "
          f"(text-only best-guess accuracy {acc:.3f}"
          + (f"; answering what a panel letter points to: {rule:.3f})" if rule is not None else ")"))
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
    # Every question with the instruction, as the default template writes it, and every worked
    # solution: each task's plan is run 400 times, enough to produce each of its (at most 36)
    # solutions.
    # The corpus covers the five original tasks only: a task added later must not change the
    # tokenizer (and so the trajectory) of every run that does not use it. The shortcut world's
    # "Panel X:" words are encoded from bytes and the merges they share with the rest.
    seen: set[str] = set()
    for k, task in enumerate(t for t in TOY_TASKS if t not in SHORTCUT_TASKS):
        rng = np.random.default_rng([12345, k])
        for _ in range(400):
            problem, answer, _, thought = TOY_TASKS[task].plan(rng)
            for text in (format_prompt(problem),
                         f"<think>{thought}</think> \\boxed{{{answer}}}"):
                if text not in seen:
                    seen.add(text)
                    texts.append(text)
    return texts


# ---------------------------------------------------------------------------------------------
# The tiny model: a randomly initialised Qwen2.5-VL or Qwen3-VL of the real class
# ---------------------------------------------------------------------------------------------

# One place for every model size this project builds offline. The names are shorthands for the
# knobs of the families' configs; head_dim = hidden / heads and the mrope split are derived from
# them (_text_config). For scale, Qwen2.5-VL-3B: text hidden 2048, 36 layers, 16 heads, 2 KV
# heads, intermediate 11008; vision hidden 1280, depth 32, 16 heads, intermediate 3420; vocab
# 151,936; patch 14, merge 2, temporal patch 2, tied embeddings. Qwen3-VL-2B: text hidden 2048,
# 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 6144; vision hidden 1024, depth 24,
# 16 heads, intermediate 4096, patch 16, DeepStack from vision blocks 5, 11, 17; tied embeddings.
SIZES = {
    # for the tests: as small and fast as the architecture allows
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
        vision_hidden=64, vision_depth=2, vision_heads=4, vision_intermediate=128,
        patch=14, merge=2, temporal_patch=2,
        tie_embeddings=True,
        vocab=400,                                 # target size of the BPE tokenizer
        min_pixels=56 * 56, max_pixels=112 * 112,  # image area range: 112x112 -> 16 tokens
    ),
    # the default demo: the configuration the offline toy-task probe trained successfully
    "small": dict(
        hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384,
        vision_hidden=64, vision_depth=2, vision_heads=4, vision_intermediate=256,
        patch=14, merge=2, temporal_patch=2,
        tie_embeddings=True,
        vocab=400,
        min_pixels=56 * 56, max_pixels=112 * 112,
    ),
}

# What a tiny Qwen3-VL changes in a SIZES entry: 16-px patches, so a token covers 32 px and the
# toy's 112-px pictures become 128 px (still 4 x 4 = 16 tokens); the vision tower's learned
# position table (an 8 x 8 grid, interpolated for other sizes as in the real model); DeepStack
# from its first block into the first decoder layer.
QWEN3_TINY = dict(patch=16, min_pixels=64 * 64, max_pixels=128 * 128, position_grid=64,
                  deepstack=[0])

# --tiny-family: the families build_tiny_model can build; "-thinking" selects the chat template
# of the Thinking models (its generation prompt opens <think>).
TINY_FAMILIES = ("qwen2.5-vl", "qwen3-vl", "qwen3-vl-thinking")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def _chat_template(default_system: str | None, generation_prompt: str) -> str:
    """A Qwen chat format as a Jinja template (what processor.apply_chat_template renders).

    Each message becomes  <|im_start|>{role}\n{content}<|im_end|>\n ; every {"type": "image"}
    entry of a content list becomes <|vision_start|><|image_pad|><|vision_end|> (the processor
    later repeats <|image_pad|> once per image token), and add_generation_prompt opens the
    assistant turn. Qwen2.5-VL adds a default system turn to a conversation without one, Qwen3-VL
    does not; Qwen3-VL-Thinking's generation prompt also opens the thinking block. Built by
    string concatenation so that no stray template whitespace reaches the prompt."""
    system = ("{% if loop.first and message['role'] != 'system' %}"
              "<|im_start|>system\n" + default_system + "<|im_end|>\n"
              "{% endif %}") if default_system else ""
    return ("{% for message in messages %}" + system +
            "<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for part in message['content'] %}"
            "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}"
            "{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}" + generation_prompt + "{% endif %}")


CHAT_TEMPLATE = _chat_template(DEFAULT_SYSTEM_PROMPT, "<|im_start|>assistant\n")   # Qwen2.5-VL
QWEN3_CHAT_TEMPLATE = _chat_template(None, "<|im_start|>assistant\n")
QWEN3_THINKING_CHAT_TEMPLATE = _chat_template(None,
                                              "<|im_start|>assistant\n" + qwen.THINK_OPEN + "\n")


def build_tokenizer(vocab_size: int = 400, extra_tokens=()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, on toy.tokenizer_corpus(), in well under a second.

    Byte-level: any string can be encoded (unknown characters fall back to bytes), so prompts and
    answers never hit an <unk>. Qwen's special tokens get ids 0..6 and are never split.
    extra_tokens: ordinary (not special) tokens added whole, as Qwen3's <think> and </think>:
    never split, and kept by decode(skip_special_tokens=True)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=qwen.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=qwen.IM_END, pad_token=qwen.ENDOFTEXT,
        additional_special_tokens=qwen.SPECIAL_TOKENS[1:], padding_side="left")
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _mrope_section(head_dim: int, family: str = "qwen2.5-vl") -> list[int]:
    """Split of the rotary frequencies between (time, height, width) positions; the parts must
    sum to head_dim // 2, or the first forward fails.

    Qwen2.5-VL: [16, 24, 24] for head_dim 128 - a quarter for time, the rest shared by height and
    width, in three consecutive blocks. head_dim 32 -> [4, 6, 6]; head_dim 16 -> [2, 3, 3].
    Qwen3-VL: [24, 20, 20] for head_dim 128, INTERLEAVED (frequency i goes to height if i % 3 == 1,
    to width if i % 3 == 2, up to 3 x the section; the rest to time). head_dim 16 -> [4, 2, 2]."""
    half = head_dim // 2
    if family.startswith("qwen3"):
        h = half * 5 // 16
        return [half - 2 * h, h, h]
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _text_config(s: dict, tokenizer, family: str = "qwen2.5-vl") -> dict:
    head_dim = s["hidden"] // s["heads"]
    qwen3 = family.startswith("qwen3")
    rope = {"rope_type": "default", "rope_theta": 5_000_000.0 if qwen3 else 1_000_000.0,
            "mrope_section": _mrope_section(head_dim, family)}
    if qwen3:
        rope["mrope_interleaved"] = True
    return dict(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        intermediate_size=s["intermediate"], max_position_embeddings=4096,
        rope_parameters=rope, **({"head_dim": head_dim} if qwen3 else {}),
        bos_token_id=tokenizer.convert_tokens_to_ids(qwen.ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(qwen.IM_END),
        # pad_token_id stays None: otherwise nn.Embedding would zero and freeze the pad row,
        # and <|endoftext|> is also an end-of-sequence token the model must learn to embed.
    )


def _vision_config(s: dict, family: str = "qwen2.5-vl") -> dict:
    common = dict(
        depth=s["vision_depth"], hidden_size=s["vision_hidden"], num_heads=s["vision_heads"],
        intermediate_size=s["vision_intermediate"], out_hidden_size=s["hidden"],
        patch_size=s["patch"], spatial_merge_size=s["merge"],
        temporal_patch_size=s["temporal_patch"])
    if family.startswith("qwen3"):
        return dict(common, num_position_embeddings=s["position_grid"],
                    deepstack_visual_indexes=s["deepstack"])
    # Qwen2.5-VL alternates windowed and full attention; with a handful of blocks, let only the
    # last one attend over the whole image (as the real model's last block does), unless the
    # knobs name the full-attention blocks (bench.py's log-prob memory model). The released
    # architectures, with their own indexes, are built by architectures.py, not here.
    return dict(common, fullatt_block_indexes=s.get("fullatt_blocks", [s["vision_depth"] - 1]),
                window_size=112)


def model_config(s: dict, tokenizer, family: str = "qwen2.5-vl", **text_overrides):
    """The transformers config (Qwen2_5_VLConfig or Qwen3VLConfig) of SIZES-style knobs `s`,
    with the token ids of `tokenizer`; text_overrides replace text_config entries (bench.py's
    shaped models: the real vocabulary, a longer position range)."""
    token = tokenizer.convert_tokens_to_ids
    return family_classes(family).config_class(
        text_config=dict(_text_config(s, tokenizer, family), **text_overrides),
        vision_config=_vision_config(s, family),
        image_token_id=token(qwen.IMAGE_PAD), video_token_id=token(qwen.VIDEO_PAD),
        vision_start_token_id=token(qwen.VISION_START), vision_end_token_id=token(qwen.VISION_END),
        tie_word_embeddings=s["tie_embeddings"])


def family_classes(family: str) -> qwen.Family:
    """families.FAMILIES' entry for a name of TINY_FAMILIES ("qwen3-vl-thinking" -> Qwen3-VL)."""
    return next(f for f in qwen.FAMILIES.values() if family.startswith(f.name))


def image_processor(s: dict, family: str, min_pixels: int, max_pixels: int):
    """The PIL image processor of SIZES-style knobs `s`, in the family's normalisation (Qwen3-VL:
    mean = std = 0.5; Qwen2.5-VL: CLIP's, the class default)."""
    qwen3 = family.startswith("qwen3")
    normalise = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if qwen3 else {}
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                    patch_size=s["patch"], temporal_patch_size=s["temporal_patch"],
                                    merge_size=s["merge"], **normalise)


def build_tiny_model(seed: int = 0, size: str = "tiny", family: str = "qwen2.5-vl"):
    """A randomly initialised Qwen-VL model of the real class and its processor, offline.

    family: one of TINY_FAMILIES - Qwen2_5_VLForConditionalGeneration, or
        Qwen3VLForConditionalGeneration with the Instruct or the Thinking chat template.
    Same class, same forward, same generate as the real model - only smaller (see SIZES). The
    weights depend only on `seed` (and the family); the tokenizer (trained on the toy corpus)
    only on the corpus. The caller's random number generator state is left untouched."""
    if size not in SIZES:
        raise ValueError(f"build_tiny_model: unknown size {size!r}; choose from {list(SIZES)}")
    if family not in TINY_FAMILIES:
        raise ValueError(f"build_tiny_model: unknown family {family!r}; choose from "
                         f"{list(TINY_FAMILIES)}")
    qwen3 = family.startswith("qwen3")
    s = dict(SIZES[size], **(QWEN3_TINY if qwen3 else {}))
    think = (qwen.THINK_OPEN, qwen.THINK_CLOSE) if qwen3 else ()   # Qwen3's ordinary added tokens
    tokenizer = build_tokenizer(s["vocab"], extra_tokens=think)
    kind = family_classes(family)
    with torch.random.fork_rng(devices=[]):      # weights from `seed`, caller's RNG unchanged
        torch.manual_seed(seed)
        model = kind.model_class(model_config(s, tokenizer, family))
    model.generation_config = GenerationConfig()
    qwen.fill_generation_config(model, tokenizer)
    speedups.patch_embed_as_matmul(model)                # as load_model does

    template = {"qwen2.5-vl": CHAT_TEMPLATE, "qwen3-vl": QWEN3_CHAT_TEMPLATE,
                "qwen3-vl-thinking": QWEN3_THINKING_CHAT_TEMPLATE}[family]
    tokenizer.chat_template = template
    processor = kind.processor_class(
        image_processor=image_processor(s, family, s["min_pixels"], s["max_pixels"]),
        tokenizer=tokenizer, chat_template=template)
    return model, processor


# =============================================================================================
# The offline run: the toy splits on disk, the warm start, the shortcut's decoys
# =============================================================================================
# What train.py does with the toy world when no --model is given: write its splits once to the
# cache folder (the same JSONL + images a user's data would be), train the tiny model on worked
# solutions until it is right some of the time, then hand that model to RL.

def world_tasks(cfg) -> tuple[str, ...]:
    """The toy tasks trained on: --toy-tasks, else the world's."""
    given = tuple(t for t in cfg.toy_tasks.split(",") if t)
    return given or TOY_WORLDS[cfg.toy_world].tasks


def toy_splits(cfg) -> dict[str, tuple[Path, tuple[str, ...], int, int]]:
    """Every toy split: name -> (folder, tasks, size, seed). Each split has its own seed, so no
    held-out picture is ever trained on; the folder is named by tasks and size (and a canvas
    other than the light default), so a world that shares a split with another (the plain
    tasks) shares its files too."""
    canvas = "" if cfg.toy_canvas == "light" else f"{cfg.toy_canvas}-"   # older names kept
    def folder(tasks, name, n):
        return Path(cfg.cache) / f"toy-{canvas}{'+'.join(tasks)}" / f"{name}-{n}"
    tasks = world_tasks(cfg)
    splits = {"train": (folder(tasks, "train", cfg.toy_train_size), tasks, cfg.toy_train_size, 1),
              "held-out": (folder(tasks, "heldout", cfg.toy_eval_size), tasks, cfg.toy_eval_size, 2)}
    for k, (name, extra) in enumerate(TOY_WORLDS[cfg.toy_world].extra.items()):
        splits[name] = (folder(extra, "heldout", cfg.toy_eval_size), extra, cfg.toy_eval_size, 3 + k)
    return splits


def prepare_toy_data(cfg) -> None:
    """Write the toy splits once (call it on one process), so every later run and every rank
    reads the same files."""
    for folder, tasks, n, seed in toy_splits(cfg).values():
        if not (folder / "data.jsonl").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            make_toy_dataset(n, seed=seed, out_dir=tmp, tasks=tasks, canvas=cfg.toy_canvas)
            tmp.rename(folder)


# The offline warm start: a short supervised stage on the toy task's worked solutions, so that
# RL starts from a model that formats its answers and is right some of the time (a random model
# earns reward 0 on every rollout, and every advantage is 0). Cached: it runs once per setting.

def warm_start_path(cfg) -> Path:
    """The cache folder of the warm start for these settings. The prompt is part of the key: a
    warm start trained on other wording (and a tokenizer trained on another corpus) would start
    RL off its own distribution; so is the canvas (a model that learned shapes on light never
    saw a dark picture)."""
    tasks = "+".join(world_tasks(cfg))
    prompt = hashlib.sha1(_prompt_fingerprint(cfg).encode()).hexdigest()[:8]
    family = "" if cfg.tiny_family == "qwen2.5-vl" else f"{cfg.tiny_family}-"   # older names kept
    canvas = "" if cfg.toy_canvas == "light" else f"{cfg.toy_canvas}-"
    # batch and learning rate: named unless they are the settings of the older names (32, 1e-3),
    # so a warm start trained with other ones is never taken for it, and older caches stay valid
    optim = ("" if (cfg.warm_start_batch, cfg.warm_start_lr) == (32, 1e-3)
             else f"-batch{cfg.warm_start_batch}-lr{cfg.warm_start_lr:g}")
    # likewise Adam's beta2 (named unless it is 0.999, that of the older names) and how often
    # the stopping rule is tested (it decides where the warm start stops)
    beta2 = "" if cfg.warm_start_beta2 == 0.999 else f"-beta2{cfg.warm_start_beta2:g}"
    probe = "" if cfg.warm_start_probe_every == 25 else f"-probe{cfg.warm_start_probe_every}"
    return (Path(cfg.cache) / f"warmstart-{family}{canvas}{cfg.tiny_size}-{tasks}-seed{cfg.seed}"
            f"-steps{cfg.warm_start_steps}{optim}{beta2}{probe}-target{cfg.warm_start_target_acc}"
            f"-prompt{prompt}")


def _prompt_fingerprint(cfg) -> str:
    """The prompt text of a fixed question: changes whenever the template or instruction does."""
    return format_prompt("{problem}", template_text(cfg.prompt_template))


def warm_start(cfg, train) -> Path:
    """The warm-started tiny model's folder, trained first if it is not in the cache (call it
    on one process). cfg: a config.Config (its seed, tiny_*, warm_start_*, prompt and budget fields).

    Supervised fine-tuning = maximising completion_logprobs of the worked solution: the same
    function that scores rollouts in RL, so the warm start exercises exactly the RL code path."""
    path = warm_start_path(cfg)
    if not (path / "config.json").is_file():
        random.seed(cfg.seed)                  # every generator, as a training run seeds them
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        options = dict(template=template_text(cfg.prompt_template), min_pixels=cfg.min_pixels,
                       max_pixels=cfg.max_pixels)
        policy, processor = build_tiny_model(seed=cfg.seed, size=cfg.tiny_size,
                                             family=cfg.tiny_family)
        # A Thinking template's prompt already opens <think>: the target starts inside it.
        opened = qwen.prompt_opens_thinking(processor)
        target = lambda ex: ex.solution.removeprefix(qwen.THINK_OPEN) if opened else ex.solution
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.warm_start_lr,
                                      betas=(0.9, cfg.warm_start_beta2), weight_decay=0.0)
        # The stopping rule watches a slice of the TRAINING split that the warm start never
        # trains on, so the held-out numbers reported later were not used to pick the model.
        n_probe = min(64, len(train) // 4)
        train, probe = train[:-n_probe], train[-n_probe:]
        bar = tqdm(range(1, cfg.warm_start_steps + 1), desc="warm start", dynamic_ncols=True)
        acc = 0.0
        for step in bar:
            rng = np.random.default_rng([cfg.seed, step, 17])
            batch = [train[i] for i in rng.integers(0, len(train), cfg.warm_start_batch)]
            prompts = [ex.to_prompt(**options) for ex in batch]
            targets = qwen.rollouts_from_texts(processor, prompts, [target(ex) for ex in batch])
            # A short linear warm-up keeps the first large-lr steps of a random model stable.
            for group in optimizer.param_groups:
                group["lr"] = cfg.warm_start_lr * min(1.0, step / 20)
            logp = qwen.completion_logprobs(policy, targets)                    # [B, T]
            loss = -papo.aggregate(logp, targets.completion_mask)               # token-mean NLL
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            if step % cfg.warm_start_probe_every == 0:
                acc = evaluation.evaluate(policy, processor, probe, samples=2, temperature=1.0,
                                          max_new_tokens=cfg.max_new_tokens, seed=step,
                                          mask_ratios=(), **options)["accuracy"]
                if acc >= cfg.warm_start_target_acc:
                    break
            bar.set_postfix(nll=f"{loss.item():.3f}", sampled_acc=f"{acc:.2f}")
        bar.close()
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp)
        qwen.save_processor(processor, tmp)
        tmp.rename(path)
        print(f"warm start: {step} steps, sampled accuracy on {n_probe} unseen training prompts {acc:.2f} "
              f"-> {path}")
    return path


def shortcut_decoys(examples) -> list[str | None] | None:
    """Per question, the answer its wording points to when that answer is WRONG (wording_answer),
    so the evaluation can count how often the policy takes the shortcut; None when no question
    has a panel letter (every dataset but the shortcut world's)."""
    pointed = [wording_answer(ex.problem) for ex in examples]
    if not any(pointed):
        return None
    return [w if w is not None and w != ex.answer else None for w, ex in zip(pointed, examples)]
