"""Files, prompts and rewards: all that PAPO needs to know about its data, and nothing about models.

A training example is a question about one or more images together with a gold answer. This
module turns such examples into chat prompts for Qwen2.5-VL, reads and checks them from JSONL
files, parquet tables, hub datasets and the ShareGPT files of the evaluation suite, generates a
small synthetic task whose questions can only be answered by looking at the picture, and scores
the policy's answers with the paper's rule-based reward:

    reward = 0.9 * accuracy + 0.1 * format

where `format` checks that the response is "<think> ... </think> ... \\boxed{...}" and
`accuracy` checks that the content of the last \\boxed{...} equals the gold answer.

The module reads top to bottom in four parts:

    1. The prompt            INSTRUCTION, format_prompt, chat_messages, budget_resize
    2. Datasets              Example, Dataset, load_dataset (JSONL, ShareGPT, tables), DatasetError
    3. The toy task          TOY_TASKS, sample_toy_example, make_toy_dataset, tokenizer_corpus
    4. The rewards           format_reward, extract_boxed, accuracy_reward, reward, reward_details

It imports no deep-learning library on purpose (`datasets` only reads tables, and only
when a table is loaded): a reward that a reader can check by hand is the
ground truth the whole training loop optimises, so it must not depend on a model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import io
import json
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import math_verify
import numpy as np
from PIL import Image, ImageDraw


# =============================================================================================
# 1. The prompt
# =============================================================================================
# The instruction appended to every question. It asks for the two things the rewards check:
# reasoning inside <think> </think> (the format reward) and a final answer inside \boxed{} (the
# accuracy reward reads only what is inside the last box, so the thinking may say anything).
#
# The text is the official PAPO recipe's, verbatim (its EasyR1-based training config formats
# every question as: the trimmed question, a blank line, this sentence). It is data, like a chat
# template: the released PAPO checkpoints were trained and evaluated with exactly these words, so
# any other wording puts them off their training distribution. --prompt-template replaces it.

INSTRUCTION = ("You first think through the reasoning process as an internal monologue, enclosed "
               "within <think> </think> tags. Then, provide your final answer enclosed within "
               "\\boxed{}.")
DEFAULT_TEMPLATE = "{problem}\n\n" + INSTRUCTION

# Where a picture goes in the question text. The PAPO datasets (ViRL39K, MMK12) and the ShareGPT
# evaluation suite write "First picture: <image> Second picture: <image> ...": each marker is
# replaced by its picture, in order.
IMAGE_MARKER = "<image>"

# Qwen's vision special tokens. In a question's text they would be tokenised as real control
# tokens: an <|image_pad|> the processor did not place breaks the one-to-one match between image
# tokens and image patches (the forward then fails deep inside transformers, or worse, an image's
# features land on the wrong positions). A row containing one is a bad row.
VISION_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")


def read_template(path: str | Path) -> str:
    """A prompt template from a plain-text file: any text with one "{problem}" where the trimmed
    question goes. Only "{problem}" is special, so a template may contain \\boxed{} freely."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompt-template {path}: cannot read it ({err})") from None
    if text.count("{problem}") != 1:
        raise ValueError(f"--prompt-template {path}: must contain \"{{problem}}\" exactly once "
                         f"(found {text.count('{problem}')})")
    return text


def format_prompt(problem: str, template: str | None = None) -> str:
    """The user's text: the template with the trimmed question in place of "{problem}".

    >>> format_prompt("  What is 2+2? ").splitlines()[:2]
    ['What is 2+2?', '']
    >>> format_prompt("q", "Q: {problem} -> \\\\boxed{}")
    'Q: q -> \\\\boxed{}'
    """
    # str.replace, not str.format: a template (or a question) full of LaTeX braces is ordinary
    return (template or DEFAULT_TEMPLATE).replace("{problem}", problem.strip())


def chat_messages(text: str, num_images: int) -> list[dict]:
    """One user turn in the chat format of Qwen2.5-VL's processor, pictures placed by markers.

    With "<image>" markers in `text`, picture i goes where marker i stands (the marker itself is
    removed); their number must equal num_images. Without markers the pictures come first, then
    the text. Each {"type": "image"} entry becomes the picture's vision tokens in the chat
    template; the pictures themselves are passed to the processor separately, in the same order.

    >>> [p.get("text", "IMG") for p in chat_messages("A: <image> B: <image> Which?", 2)[0]["content"]]
    ['A: ', 'IMG', ' B: ', 'IMG', ' Which?']
    >>> [p.get("text", "IMG") for p in chat_messages("How many?", 1)[0]["content"]]
    ['IMG', 'How many?']
    """
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) == 1:
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": text})
    else:
        if len(pieces) - 1 != num_images:
            raise ValueError(f"the text has {len(pieces) - 1} {IMAGE_MARKER} markers but "
                             f"{num_images} pictures were given")
        content = []
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image"})
            if piece:       # no empty text parts ("<image>How many?" starts with the picture)
                content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def make_messages(problem: str, num_images: int, template: str | None = None) -> list[dict]:
    """chat_messages(format_prompt(problem, template), num_images): a dataset question as Qwen
    chat messages, with the instruction.

    >>> make_messages("How many shapes are in the image?", 1)[0]["content"][0]
    {'type': 'image'}
    >>> make_messages("What is 2+2?", 0)[0]["content"][0]["text"].splitlines()[0]
    'What is 2+2?'
    """
    return chat_messages(format_prompt(problem, template), num_images)


def budget_size(width: int, height: int, min_pixels: int | None,
                max_pixels: int | None) -> tuple[int, int]:
    """The (width, height) that budget_resize gives a picture of this size (see there).

    >>> budget_size(2000, 1000, 200_704, 1_003_520), budget_size(112, 112, 200_704, 1_003_520)
    ((1416, 708), (448, 448))
    >>> budget_size(640, 480, 200_704, 1_003_520)    # inside the budget: unchanged
    (640, 480)
    """
    for limit, too_far in ((max_pixels, lambda a: a > max_pixels),
                           (min_pixels, lambda a: a < min_pixels)):
        if limit and too_far(width * height):
            f = math.sqrt(limit / (width * height))
            width, height = max(1, int(width * f)), max(1, int(height * f))
    return width, height


def budget_resize(image: Image.Image, min_pixels: int | None, max_pixels: int | None,
                  ) -> Image.Image:
    """Scale a RAW picture, keeping its aspect ratio, so that its area lies in the pixel budget.

    The official recipe does this to every picture before anything else - before the patch mask
    and before the processor's own resize - so both branches of PAPO (original and masked) see
    the same picture size and therefore the same image-token grid, and a large picture cannot
    blow up the prompt (Qwen2.5-VL's processor alone allows 12.8M pixels: 16,384 tokens). With
    area A > max_pixels, the factor is f = sqrt(max_pixels / A) and the new size (int(W f),
    int(H f)); then, with area < min_pixels, the same with min_pixels (upscaling). int() rounds
    down, so the result can fall a few pixels short of min_pixels, as in the official code.
    Resampling: bicubic (PIL's default for Image.resize). None disables that side of the budget;
    a picture already inside the budget is returned as it is.
    """
    size = budget_size(image.width, image.height, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


# =============================================================================================
# 2. Datasets: where examples come from, and how they are checked
# =============================================================================================
# An example is a question, a gold answer and one or more pictures. They arrive in four shapes,
# and load_dataset(source) reads them all into the same Example rows:
#
#   a JSONL file (this project's own format), one JSON object per line:
#       {"problem": "How many circles?", "answer": "3", "images": ["images/00012.png"]}
#     problem   the question (the instruction is added by the prompt template, part 1)
#     answer    the gold answer, a string the accuracy reward can compare (part 4)
#     images    a non-empty list of image paths; a single "image": "path" string is accepted too.
#               Relative paths are relative to the folder of the JSONL file (or --image-dir)
#     solution  optional: a worked answer "<think>...</think> \boxed{...}" (supervised warm start)
#     id, task  optional labels, kept for logging; every other key is ignored
#   a table - a parquet file, a glob of them, a folder of them, a folder written by
#     Dataset.save_to_disk, or a Hugging Face hub dataset "owner/name[:split]" - with a problem,
#     an answer and a picture column (the PAPO sets: problem, answer, images = a list of Image
#     features holding the encoded picture bytes). Column names are arguments.
#   a ShareGPT / LLaMA-Factory JSON file - the paper's evaluation suite - a list of
#       {"messages": [{"role": "user", "content": "<image>question ..."},
#                     {"role": "assistant", "content": "ANSWER"}], "images": ["rel/path.png"]}
#     The user turn is the prompt, used VERBATIM (it already carries its instruction); the
#     assistant turn is the gold answer.
#
# A picture may be given as a path (relative to the file's folder, or to --image-dir), as a
# {"bytes", "path"} dict (how `datasets` stores an Image feature), or as a PIL image. Pictures are
# never decoded while loading: a row keeps its path or its encoded bytes (for tables, not even
# those: they stay in the memory-mapped Arrow file until the row is drawn), so a 39K-row set
# costs the memory of its text, not of its pictures.
#
# Every row is checked BEFORE training starts, and all problems are reported together in one
# error, "source:row: reason". A bad row is a bug in the data, and a bug found after two hours
# of RL costs two hours: nothing is silently dropped and nothing is left to fail later. Rows are
# numbered by line (from 1) in JSONL files, as an editor shows them, and by index (from 0) in
# tables and JSON lists, as `datasets` and Python index them.


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; `problems` has one "source:row: reason" each."""

    def __init__(self, problems: list[str], shown: int = 20):
        self.problems = list(problems)
        lines = self.problems[:shown]
        if len(self.problems) > shown:
            lines.append(f"... and {len(self.problems) - shown} more")
        super().__init__("invalid dataset:\n  " + "\n  ".join(lines))


@dataclass
class Example:
    """One question about one or more pictures, with its gold answer.

    `images` says where each picture is: an absolute Path, the picture's encoded bytes, or a PIL
    image already in memory (the toy task's fresh examples); load_images decodes them. `sizes`
    are their (width, height), read from the file headers when the dataset was checked.
    `prompt`, when set, is the user's text used verbatim (ShareGPT rows); otherwise the prompt
    template is applied to `problem`. `source` says where the row came from ("train.jsonl:12"),
    so a strange reward can be traced back to it."""
    problem: str
    answer: str
    images: list
    solution: str | None = None
    source: str = ""
    id: str | None = None
    task: str | None = None
    prompt: str | None = None
    sizes: list[tuple[int, int]] | None = None

    def prompt_text(self, template: str | None = None) -> str:
        """The user's text, "<image>" markers included: verbatim, or the template applied."""
        return self.prompt if self.prompt is not None else format_prompt(self.problem, template)

    def load_images(self, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> list[Image.Image]:
        """The pictures as RGB PIL images, resized into the pixel budget (budget_resize).

        RGB because the processor and the pixel-space mask expect three channels: a PNG may be
        palette, grey or RGBA, and RGBA would keep an alpha channel."""
        pictures = []
        for item in self.images:
            if isinstance(item, Image.Image):
                picture = item.convert("RGB")
            else:   # `with` closes the file: long runs open many pictures
                with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as im:
                    picture = im.convert("RGB")
            pictures.append(budget_resize(picture, min_pixels, max_pixels))
        return pictures

    def to_prompt(self, template: str | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None) -> dict:
        """What a rollout needs: the chat messages, the pictures in the same order (resized into
        the budget), the answer."""
        pictures = self.load_images(min_pixels, max_pixels)
        return {"messages": chat_messages(self.prompt_text(template), len(pictures)),
                "images": pictures, "answer": self.answer, "solution": self.solution,
                "problem": self.problem}


class Dataset(Sequence):
    """The checked rows of one source, as a read-only sequence of Examples.

    Rows from files hold their pictures' paths. Rows from a table leave their pictures in the
    table (an Arrow file that the OS memory-maps): indexing row i reads that row's encoded bytes
    and nothing else. Slicing and subset() give another Dataset over the same storage."""

    def __init__(self, name: str, rows: list[Example], table=None,
                 table_rows: list[int] | None = None, image_key: str | None = None,
                 image_dir: Path | None = None):
        self.name = name
        self.rows = rows                 # texts, answers, sizes; pictures only for file rows
        self._table = table              # a `datasets` Dataset in Arrow format, or None
        self._table_rows = table_rows    # row i's index in the table
        self._image_key = image_key
        self._image_dir = image_dir

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices) -> "Dataset":
        """The rows at `indices`, in that order, over the same storage."""
        indices = [int(i) for i in indices]
        rows = None if self._table_rows is None else [self._table_rows[i] for i in indices]
        return Dataset(self.name, [self.rows[i] for i in indices], self._table, rows,
                       self._image_key, self._image_dir)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        i = int(i)                       # numpy indices from a shuffled order are fine
        row = self.rows[i]
        if self._table is None:
            return row
        at = self._table_rows[i]
        cell = self._table[at:at + 1].column(self._image_key).to_pylist()[0]
        refs, _ = _picture_refs(cell, self._image_dir)   # checked when loaded
        return dataclasses.replace(row, images=refs)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} rows)"


# --- checks shared by every format -----------------------------------------------------------

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


def _text_problems(text: str, num_pictures: int, what: str) -> list[str]:
    """Reasons why a prompt text cannot go with `num_pictures` pictures: vision special tokens
    in it, or "<image>" markers that do not match the pictures one to one."""
    reasons = [f'{what} contains the vision special token "{token}" (only the processor may '
               f'place it: it would misalign image tokens and image patches)'
               for token in VISION_TOKENS if token in text]
    markers = text.count(IMAGE_MARKER)
    if markers and markers != num_pictures:
        reasons.append(f'{what} has {markers} "{IMAGE_MARKER}" markers but the row has '
                       f"{num_pictures} pictures")
    return reasons


def _picture_refs(value, folder: Path | None) -> tuple[list | None, str | None]:
    """A row's picture cell -> (list of Path | bytes | PIL image, None) or (None, reason).

    Accepted: one picture or a list of them, each a path string (relative to `folder`), a
    {"bytes", "path"} dict (an Image feature; bytes win when both are there) or a PIL image."""
    items = value if isinstance(value, (list, tuple)) else [value]
    refs = []
    for item in items:
        if isinstance(item, dict) and item.get("bytes"):
            refs.append(bytes(item["bytes"]))
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"].strip():
            refs.append(_resolve(item["path"], folder))
        elif isinstance(item, str) and item.strip():
            refs.append(_resolve(item, folder))
        elif isinstance(item, (bytes, Image.Image)):
            refs.append(item)
        else:
            return None, f"a picture must be a path, a {{bytes, path}} dict or an image, got {item!r:.60}"
    if not refs:
        return None, "no pictures (PAPO masks the pictures: every row needs at least one)"
    return refs, None


def _resolve(path: str, folder: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or folder is None else folder / p


# Qwen2.5-VL's processor refuses pictures whose longer side is over 200 times the shorter one.
MAX_ASPECT_RATIO = 200


def _check_picture(ref) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) for a readable picture, else (None, reason).

    PIL's verify() checks the file's structure (headers, chunk checksums) without decoding every
    pixel, which keeps checking tens of thousands of pictures to seconds."""
    if isinstance(ref, Image.Image):
        size = ref.size
    else:
        name = "picture bytes" if isinstance(ref, bytes) else str(ref)
        if isinstance(ref, Path) and not ref.is_file():
            return None, f"image not found: {ref}"
        try:
            with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
                size = im.size
                im.verify()
        except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
            return None, f"not a readable image: {name} ({type(err).__name__}: {err})"
    if max(size) > MAX_ASPECT_RATIO * max(min(size), 1):
        return None, (f"picture of {size[0]}x{size[1]} px: an aspect ratio over "
                      f"{MAX_ASPECT_RATIO}, which Qwen2.5-VL's processor refuses")
    return size, None


class _PictureChecker:
    """Checks pictures, each file only once (datasets often reuse a picture)."""

    def __init__(self):
        self.seen: dict[Path, tuple] = {}

    def __call__(self, refs: list) -> tuple[list, list[str]]:
        sizes, reasons = [], []
        for ref in refs:
            if isinstance(ref, Path):
                if ref not in self.seen:
                    self.seen[ref] = _check_picture(ref)
                size, why = self.seen[ref]
            else:
                size, why = _check_picture(ref)
            sizes.append(size)
            if why:
                reasons.append(why)
        return sizes, reasons


def _check_example(ex: Example, check_pictures: _PictureChecker, refs: list) -> list[str]:
    """Everything wrong with one row's answer, text and pictures (the row's text fields were
    checked for type and emptiness by the caller). Fills ex.sizes."""
    reasons = []
    if (why := gold_answer_problem(ex.answer)):
        reasons.append(why)
    text, what = (ex.prompt, "the user turn") if ex.prompt is not None else (ex.problem, "problem")
    reasons += _text_problems(text, len(refs), what)
    sizes, why = check_pictures(refs)
    ex.sizes = sizes
    return reasons + why


# --- JSONL -------------------------------------------------------------------------------------

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


def load_jsonl(path: str | Path, image_dir: str | Path | None = None) -> list[Example]:
    """Read and check a JSONL dataset; raise one DatasetError that lists every bad row.

    >>> rows = load_jsonl("toy/data.jsonl")                                 # doctest: +SKIP
    >>> rows[0].problem, rows[0].answer, rows[0].source                      # doctest: +SKIP
    ('How many shapes are in the image?', '3', 'toy/data.jsonl:1')
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError([f"{path}: file not found"])
    folder = Path(image_dir) if image_dir else path.absolute().parent
    problems: list[str] = []
    examples: list[Example] = []
    check_pictures = _PictureChecker()
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
        problem, why_problem = _check_text_field(row, "problem")
        answer, why_answer = _check_text_field(row, "answer")
        reasons += [w for w in (why_problem, why_answer) if w]
        solution = row.get("solution")
        if solution is not None and not isinstance(solution, str):
            reasons.append(f'"solution" must be a string, got {type(solution).__name__}')
        given, why = _check_image_field(row)
        if why:
            reasons.append(why)
        if not reasons:
            ex = Example(problem=problem, answer=answer,
                         images=[_resolve(p, folder) for p in given], solution=solution,
                         source=where, id=None if row.get("id") is None else str(row["id"]),
                         task=None if row.get("task") is None else str(row["task"]))
            reasons += _check_example(ex, check_pictures, ex.images)
        elif answer is not None and (why := gold_answer_problem(answer)):
            reasons.append(why)   # still report an unusable answer alongside the other reasons
        if reasons:
            problems.append(f"{where}: " + "; ".join(reasons))
            continue
        examples.append(ex)

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


# --- ShareGPT JSON (the evaluation suite) ------------------------------------------------------

def _sharegpt_turns(row: dict) -> tuple[str | None, str | None, str | None]:
    """(user text, assistant text, None) of a ShareGPT row, or (None, None, reason).

    Both spellings are read: {"messages": [{"role", "content"}]} (LLaMA-Factory, the suite) and
    {"conversations": [{"from": "human" | "gpt", "value"}]} (the original ShareGPT)."""
    turns = row.get("messages", row.get("conversations"))
    if not isinstance(turns, list) or not turns:
        return None, None, 'missing "messages" (a list of {"role", "content"} turns)'
    role_names = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
    user = assistant = None
    for turn in turns:
        if not isinstance(turn, dict):
            return None, None, f"a turn must be an object, got {type(turn).__name__}"
        role = role_names.get(turn.get("role", turn.get("from")))
        content = turn.get("content", turn.get("value"))
        if role == "user" and user is None:
            user = content
        elif role == "assistant" and user is not None and assistant is None:
            assistant = content
    if not isinstance(user, str) or not user.strip():
        return None, None, "no user turn with text content"
    if not isinstance(assistant, str) or not assistant.strip():
        return None, None, "no assistant turn (the gold answer) after the user turn"
    return user, assistant.strip(), None


def load_sharegpt(path: str | Path, image_dir: str | Path | None = None) -> list[Example]:
    """Read and check a ShareGPT JSON file (see the top of this part); one DatasetError lists
    every bad row as "file:index: reason"."""
    path = Path(path)
    folder = Path(image_dir) if image_dir else path.absolute().parent
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError([f"{path}: not a readable JSON file ({err})"]) from None
    if not isinstance(rows, list) or not rows:
        raise DatasetError([f"{path}: expected a non-empty JSON list of ShareGPT rows "
                            f"({{\"messages\": [...], \"images\": [...]}})"])
    problems, examples = [], []
    check_pictures = _PictureChecker()
    for i, row in enumerate(rows):
        where = f"{path}:{i}"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object, got {type(row).__name__}")
            continue
        user, answer, why = _sharegpt_turns(row)
        reasons = [why] if why else []
        refs, why = _picture_refs(row.get("images", []), folder)
        if why:
            reasons.append(f'"images": {why}')
        if not reasons:
            ex = Example(problem=user.replace(IMAGE_MARKER, "").strip(), answer=answer,
                         images=refs, source=where, prompt=user,
                         id=None if row.get("id") is None else str(row["id"]))
            reasons += _check_example(ex, check_pictures, refs)
        if reasons:
            problems.append(f"{where}: " + "; ".join(reasons))
        else:
            examples.append(ex)
    if problems:
        raise DatasetError(problems)
    return examples


# --- Tables: parquet, save_to_disk folders, hub datasets ---------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the hub? A short probe, so that a machine without
    network reads the local cache at once instead of retrying for half a minute."""
    import socket
    import urllib.parse
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Run `datasets` in offline mode (cache only) for the duration, when `offline`. Both
    libraries read the setting from a module constant at call time; HF_HUB_OFFLINE=1 in the
    environment sets the same constants at import."""
    import datasets
    import huggingface_hub.constants as hub
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _one_split(loaded, source: str, split: str | None):
    """A Dataset from what `datasets` returned: a Dataset, or the one split of a DatasetDict."""
    import datasets
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split:
        if split not in loaded:
            raise DatasetError([f"{source}: no split {split!r}; it has {', '.join(loaded)}"])
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise DatasetError([f"{source}: it has several splits ({', '.join(loaded)}); "
                        f"name one as {source}:SPLIT"])


def _open_table(source: str):
    """(datasets.Dataset, folder for relative picture paths, display name) for a table source;
    None when `source` is not a table (a JSON or JSONL file)."""
    import datasets
    path = Path(source).expanduser()
    spec, split = source, None
    if not path.exists() and ":" in source and not any(c in source for c in "*?["):
        spec, split = source.rsplit(":", 1)    # "owner/name:split" or "folder:split"
        path = Path(spec).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                          or (path / "dataset_dict.json").is_file()):
        return _one_split(datasets.load_from_disk(str(path)), source, split), path, source
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise DatasetError([f"{path}: a folder with no .parquet files and not written by "
                                "Dataset.save_to_disk"])
    elif path.is_file() and path.suffix == ".parquet":
        files = [str(path)]
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not files:
            raise DatasetError([f"{spec}: no file matches this pattern"])
    elif path.exists():
        return None
    elif (spec.count("/") == 1 and all(spec.split("/")) and not spec.startswith((".", "~"))
          and path.suffix not in (".parquet", ".arrow", ".json", ".jsonl", ".csv")):
        return _open_hub(spec, split, source), None, source
    else:
        raise DatasetError([f"{source}: no such file or folder (and not a hub id owner/name)"])
    if not all(f.endswith(".parquet") for f in files):
        raise DatasetError([f"{spec}: matches files that are not .parquet: "
                            + ", ".join(f for f in files if not f.endswith(".parquet"))[:300]])
    table = datasets.load_dataset("parquet", data_files=files, split="train")
    return table, Path(files[0]).absolute().parent, source


def _open_hub(repo: str, split: str | None, source: str):
    """A hub dataset: from the hub when it is reachable, else from the local cache."""
    import datasets
    # Parsed as huggingface_hub does: "0" or "false" means online, not "set, hence offline".
    offline = (os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
               or not _hub_reachable())
    try:
        with _hub_offline(offline):
            # every split, then pick: an unknown split is then an error naming the known ones,
            # not a ValueError that would read like a cache miss
            loaded = datasets.load_dataset(repo)
    except DatasetError:
        raise
    except Exception as err:   # ConnectionError, FileNotFoundError, ValueError for a bad split, ...
        where = "is not in the local Hugging Face cache and the hub cannot be reached" if offline \
            else "could not be loaded from the hub"
        raise DatasetError([
            f"{source}: the dataset {where} ({type(err).__name__}: {str(err)[:200]}). Fetch it "
            f"once on a machine with internet (python -c \"import datasets; "
            f"datasets.load_dataset('{repo}')\"), then copy the cache folder "
            f"({datasets.config.HF_DATASETS_CACHE}) here, or pass a parquet file or folder"])
    return _one_split(loaded, source, split)


def load_table(source: str, *, problem_key: str = "problem", answer_key: str = "answer",
               image_key: str = "images", image_dir: str | Path | None = None,
               progress: bool = False) -> Dataset:
    """Open a table source and check every row in one streaming pass (text columns in memory,
    pictures read batch by batch and let go); one DatasetError lists every bad row."""
    opened = _open_table(source)
    if opened is None:
        raise DatasetError([f"{source}: not a table (expected .parquet, a folder or a hub id)"])
    table, folder, name = opened
    folder = Path(image_dir) if image_dir else folder
    missing = [k for k in (problem_key, answer_key, image_key) if k not in table.column_names]
    if missing:
        raise DatasetError([f"{name}: no column {', '.join(map(repr, missing))}; it has "
                            f"{', '.join(table.column_names)} (see --problem-key, --answer-key, "
                            "--image-key)"])
    table = table.select_columns([problem_key, answer_key, image_key]).with_format("arrow")
    problems, rows, table_rows = [], [], []
    check_pictures = _PictureChecker()
    batches = table.iter(batch_size=256)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=math.ceil(len(table) / 256), desc=f"checking {name}",
                       leave=False)
    index = 0
    for batch in batches:
        columns = [batch.column(k).to_pylist() for k in (problem_key, answer_key, image_key)]
        for problem, answer, pictures in zip(*columns):
            where = f"{name}:{index}"
            index += 1
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)   # a typed number column: no "007" to lose, unlike JSON
            cells = {problem_key: problem, answer_key: answer}
            reasons = [w for k in (problem_key, answer_key) if (w := _check_text_field(cells, k)[1])]
            refs, why = _picture_refs(pictures, folder)
            if why:
                reasons.append(f'"{image_key}": {why}')
            if not reasons:
                ex = Example(problem=problem, answer=answer, images=[], source=where)
                reasons += _check_example(ex, check_pictures, refs)
            if reasons:
                problems.append(f"{where}: " + "; ".join(reasons))
            else:
                rows.append(ex)
                table_rows.append(index - 1)
    if index == 0:
        problems.append(f"{name}: no rows")
    if problems:
        raise DatasetError(problems)
    return Dataset(name, rows, table, table_rows, image_key, folder)


def load_dataset(source: str | Path, *, problem_key: str = "problem", answer_key: str = "answer",
                 image_key: str = "images", image_dir: str | Path | None = None,
                 progress: bool = False) -> Dataset:
    """Any supported source (see the top of this part) -> a checked Dataset of Examples.

    .jsonl -> load_jsonl; .json -> load_sharegpt; anything else -> load_table (parquet file,
    glob or folder, save_to_disk folder, hub id with optional ":split"). The column names apply
    to tables; JSONL and ShareGPT files have fixed keys."""
    source = str(source)
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        return Dataset(source, load_jsonl(path, image_dir))
    if path.suffix == ".json":
        if not path.is_file():
            raise DatasetError([f"{path}: file not found"])
        return Dataset(source, load_sharegpt(path, image_dir))
    return load_table(source, problem_key=problem_key, answer_key=answer_key, image_key=image_key,
                      image_dir=image_dir, progress=progress)


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
    # Every question with the instruction, as the default template writes it, and every worked
    # solution: each task's plan is run 400 times, enough to produce each of its (at most 36)
    # solutions.
    seen: set[str] = set()
    for k, task in enumerate(TOY_TASKS):
        rng = np.random.default_rng([12345, k])
        for _ in range(400):
            problem, answer, _, thought = TOY_TASKS[task].plan(rng)
            for text in (format_prompt(problem),
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
_AROUND_TAG_CHARS = re.compile(r"\s*([<>/])\s*")


def tidy_response(text: str) -> str:
    """The response with the whitespace around every "<", ">" and "/" removed.

    The official reward does this before both checks, so "< think >", "</ think>" and
    "<think>\\n...\\n</think>" all count as tags, and "1 / 2" in a box reads as "1/2". It also
    removes spaces around "<" in an answer such as "x < 3": harmless, since answers are compared
    by value. Both format_reward and accuracy_reward apply it (it is idempotent).

    >>> tidy_response("< think > a </ think > \\\\boxed{1 / 2}")
    '<think>a</think>\\\\boxed{1/2}'
    """
    return _AROUND_TAG_CHARS.sub(r"\1", text)


def format_reward(text: str) -> float:
    """1.0 if the whole response is <think>...</think>...\\boxed{...}..., else 0.0.

    The response is tidied first (tidy_response), and surrounding whitespace is stripped: a
    tokenizer may decode a leading space or a trailing newline, and that says nothing about the
    format.

    >>> format_reward("<think>I see 2 red shapes.</think> \\\\boxed{2}")
    1.0
    >>> format_reward("The answer is \\\\boxed{2}")  # no thinking
    0.0
    """
    return 1.0 if _FORMAT.fullmatch(tidy_response(text).strip()) else 0.0


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
