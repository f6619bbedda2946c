"""Files and prompts: all that PAPO needs to know about its data, and nothing about models.

A training example is a question about one or more images together with a gold answer. This
module turns such examples into chat prompts for Qwen2.5-VL, reads and checks them from JSONL
files, parquet tables, hub datasets and the ShareGPT files of the evaluation suite. What happens
to one picture (its mode, size and orientation checks, the pixel budget) lives in imaging.py; the
reward that scores the answers lives in rewards.py (this module uses it only to refuse gold
answers it cannot compare); the offline toy world that generates examples lives in toy.py.

The module reads top to bottom in two parts:

    1. The prompt            INSTRUCTION, format_prompt, chat_messages, make_messages
    2. Datasets              Example, Dataset, load_dataset (JSONL, ShareGPT, tables), DatasetError

It imports no deep-learning library (`datasets` reads tables, and only when a table is loaded).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import imaging                            # one picture: open, check, convert, resize
from rewards import gold_answer_problem   # a gold answer the reward cannot compare is a bad row


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

# Qwen's chat control tokens. The chat template writes each turn as "<|im_start|>user\n...
# <|im_end|>\n", and the tokenizer turns these strings into the control tokens wherever they
# stand, so a question containing "<|im_end|>\n<|im_start|>assistant\n..." would end the user's
# turn and forge an assistant turn (the model then continues a conversation the data wrote).
# <|endoftext|> is the pad and end-of-document token. A row containing one is a bad row, and a
# prompt template containing one (or a vision token) is refused by read_template.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


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
    found = [token for token in CHAT_TOKENS + VISION_TOKENS if token in text]
    if found:
        raise ValueError(f"--prompt-template {path}: contains the special token(s) "
                         f"{', '.join(found)}; the tokenizer would read them as control tokens "
                         "(a forged turn boundary, or image tokens without their picture), so "
                         "only the chat template and the processor may place them")
    return text


@functools.lru_cache(maxsize=4)
def template_text(path: str) -> str | None:
    """read_template(path), read once per path; None for "" (the official prompt)."""
    return read_template(path) if path else None


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



# =============================================================================================
# 2. Datasets: where examples come from, and how they are checked
# =============================================================================================
# An example is a question, a gold answer and one or more pictures. They arrive in four shapes,
# and load_dataset(source) reads them all into the same Example rows:
#
#   a JSONL file (this project's own format), one JSON object per line:
#       {"problem": "How many circles?", "answer": "3", "images": ["images/00012.png"]}
#     problem   the question (the instruction is added by the prompt template, part 1)
#     answer    the gold answer, a string the accuracy reward can compare (rewards.py)
#     images    a non-empty list of image paths; a single "image": "path" string is accepted too.
#               Relative paths are relative to the folder of the JSONL file (or --image-dir)
#     solution  optional: a worked answer "<think>...</think> \boxed{...}" (supervised warm start)
#     id, task  optional labels, kept for logging; every other key is ignored
#     The first three keys are arguments (--problem-key, --answer-key, --image-key), as a
#     table's column names are; under another picture key, one path or a list of them. The
#     file's extension is read in any case (data.JSONL).
#   a table - a parquet file, a glob of them, a folder of them, a folder written by
#     Dataset.save_to_disk, or a Hugging Face hub dataset "owner/name[:split]" - with a problem,
#     an answer and a picture column (the PAPO sets: problem, answer, images = a list of Image
#     features holding the encoded picture bytes). Column names are arguments. A number column of
#     answers is read as text; a NaN (pandas' missing value) or infinite answer is a bad row.
#   In both, an optional key / column named by masked_image_key (--masked-image-key; the
#     official code's "images_aug") holds PRE-MASKED pictures, for masks that are not random
#     patches (the semantic-aware masking ablation): one per picture, in the same order and of
#     the same size, in the forms of the picture column (a list of paths in JSONL).
#   a ShareGPT / LLaMA-Factory JSON file - the paper's evaluation suite - a list of
#       {"messages": [{"role": "user", "content": "<image>question ..."},
#                     {"role": "assistant", "content": "ANSWER"}], "images": ["rel/path.png"]}
#     The user turn is the prompt, used VERBATIM (it already carries its instruction); the
#     assistant turn is the gold answer.
#
# A picture may be given as a path (relative to the file's folder, or to --image-dir), as a
# {"bytes", "path"} dict (how `datasets` stores an Image feature), or as a PIL image. Pictures are
# not kept while loading: each is decoded once to check it, then let go; a row keeps its path or
# its encoded bytes (for tables, not even those: they stay in the memory-mapped Arrow file until
# the row is drawn), so a 39K-row set costs the memory of its text, not of its pictures.
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
    so a strange reward can be traced back to it. `masked_images`, when the dataset has a column
    of pre-masked pictures (--masked-image-key), holds one such picture per picture of `images`,
    of the same size, in the same forms; load_masked_images decodes them."""
    problem: str
    answer: str
    images: list
    solution: str | None = None
    source: str = ""
    id: str | None = None
    task: str | None = None
    prompt: str | None = None
    sizes: list[tuple[int, int]] | None = None
    masked_images: list | None = None

    def prompt_text(self, template: str | None = None) -> str:
        """The user's text, "<image>" markers included: verbatim, or the template applied."""
        return self.prompt if self.prompt is not None else format_prompt(self.problem, template)

    def load_images(self, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> list[Image.Image]:
        """The pictures as 8-bit RGB PIL images (imaging.to_rgb), resized into the pixel budget
        (imaging.budget_resize).

        RGB because the processor and the pixel-space mask expect three channels: a PNG may be
        palette, grey, 16-bit or transparent, and to_rgb maps each of them by its own rule.
        Raises ValueError, naming the row, for a picture that validation would have refused."""
        return self._decode(self.images, "picture", min_pixels, max_pixels)

    def load_masked_images(self, min_pixels: int | None = None,
                           max_pixels: int | None = None) -> list[Image.Image]:
        """The pre-masked pictures, exactly as load_images reads the originals (RGB, the same
        pixel budget): same sizes in, same sizes out, so both branches of PAPO get the same
        image-token grid. ValueError when the row has none."""
        if self.masked_images is None:
            raise ValueError(f"{self.source or 'example'}: no pre-masked pictures (the dataset "
                             "was loaded without a masked-image column)")
        return self._decode(self.masked_images, "pre-masked picture", min_pixels, max_pixels)

    def _decode(self, refs: list, what: str, min_pixels: int | None,
                max_pixels: int | None) -> list[Image.Image]:
        pictures = []
        for i, item in enumerate(refs):
            try:
                if isinstance(item, Image.Image):
                    picture = imaging.load_picture(item)
                else:
                    # Validation applied --max-image-pixels to this very picture and recorded its
                    # size; a row that was never validated gets the default guard.
                    limit = imaging.MAX_IMAGE_PIXELS if not self.sizes else max(
                        imaging.MAX_IMAGE_PIXELS, self.sizes[i][0] * self.sizes[i][1])
                    picture = imaging.load_picture(item, limit)
            except ValueError as err:
                raise ValueError(f"{self.source or 'example'}: {what} {i + 1}: {err}") from None
            pictures.append(imaging.budget_resize(picture, min_pixels, max_pixels))
        return pictures

    def to_prompt(self, template: str | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None, pictures: list | None = None) -> dict:
        """What a rollout needs: the chat messages, the pictures in the same order (resized into
        the budget), the answer. pictures: the row's pictures already decoded and resized by
        the caller (who also needed the raw ones, to mask them), used as they are."""
        if pictures is None:
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
                 image_dir: Path | None = None, masked_image_key: str | None = None):
        self.name = name
        self.rows = rows                 # texts, answers, sizes; pictures only for file rows
        self._table = table              # a `datasets` Dataset in Arrow format, or None
        self._table_rows = table_rows    # row i's index in the table
        self._image_key = image_key
        self._image_dir = image_dir
        self._masked_image_key = masked_image_key   # the pre-masked pictures' column, or None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices) -> "Dataset":
        """The rows at `indices`, in that order, over the same storage."""
        indices = [int(i) for i in indices]
        rows = None if self._table_rows is None else [self._table_rows[i] for i in indices]
        return Dataset(self.name, [self.rows[i] for i in indices], self._table, rows,
                       self._image_key, self._image_dir, self._masked_image_key)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        i = int(i)                       # numpy indices from a shuffled order are fine
        row = self.rows[i]
        if self._table is None:
            return row
        at = self._table_rows[i]
        one = self._table[at:at + 1]                     # one read, both picture columns
        refs, _ = _picture_refs(one.column(self._image_key).to_pylist()[0], self._image_dir)
        masked = None
        if self._masked_image_key:
            masked, _ = _picture_refs(one.column(self._masked_image_key).to_pylist()[0],
                                      self._image_dir)
        return dataclasses.replace(row, images=refs, masked_images=masked)   # checked when loaded

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
    """Reasons why a prompt text cannot go with `num_pictures` pictures: vision or chat control
    tokens in it (one reason per token), or "<image>" markers that do not match the pictures one
    to one."""
    reasons = [f'{what} contains the vision special token "{token}" (only the processor may '
               f'place it: it would misalign image tokens and image patches)'
               for token in VISION_TOKENS if token in text]
    reasons += [f'{what} contains the chat control token "{token}" (only the chat template may '
                f'place it: the row could end the user turn and forge an assistant turn)'
                for token in CHAT_TOKENS if token in text]
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


def budget_problems(rows: list["Example"], min_pixels: int | None, max_pixels: int | None,
                    ) -> list[str]:
    """"source: reason" for each row with a picture whose size AFTER budget_resize is one the
    processor refuses (an aspect ratio over MAX_ASPECT_RATIO). The budget's rounding can push
    a picture over the limit that it was under: 1x199 px, scaled up to the toy budget's 3,136
    pixels, becomes 3x789. From the sizes the rows' check recorded: nothing is decoded."""
    problems = []
    for ex in rows:
        for i, (w, h) in enumerate(ex.sizes or ()):
            bw, bh = imaging.budget_size(w, h, min_pixels, max_pixels)
            if max(bw, bh) > imaging.MAX_ASPECT_RATIO * max(min(bw, bh), 1):
                problems.append(f"{ex.source}: picture {i + 1} of {w}x{h} px becomes {bw}x{bh} "
                                f"px in the pixel budget (--min-pixels {min_pixels}, "
                                f"--max-pixels {max_pixels}): an aspect ratio over "
                                f"{imaging.MAX_ASPECT_RATIO}, which Qwen2.5-VL's processor refuses")
    return problems


def _check_masked(ex: Example, check_pictures: imaging.PictureChecker, refs: list | None,
                  why: str | None, key: str) -> list[str]:
    """Everything wrong with a row's pre-masked pictures (column `key`): `refs` as read from the
    cell (or None and `why`). Call after _check_example, which filled ex.sizes. There must be one
    readable picture per original, each of its original's size: the masked branch reuses the
    rollouts' image tokens, so its pictures must give the processor the same grid."""
    if why:
        return [f'"{key}": {why}']
    if len(refs) != len(ex.sizes):
        return [f'"{key}" has {len(refs)} pre-masked pictures but the row has {len(ex.sizes)} '
                f"pictures (one pre-masked copy per picture, in the same order)"]
    sizes, reasons = check_pictures(refs)
    reasons = [f'"{key}": {w}' for w in reasons]
    for i, (got, want) in enumerate(zip(sizes, ex.sizes)):
        if got is not None and want is not None and got != want:
            reasons.append(f'"{key}" picture {i + 1} is {got[0]}x{got[1]} px but its original is '
                           f"{want[0]}x{want[1]} px (a pre-masked picture keeps the original's "
                           "size, so that both branches get the same image tokens)")
    return reasons


def _check_example(ex: Example, check_pictures: imaging.PictureChecker, refs: list) -> list[str]:
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

def _check_image_field(row: dict, key: str = "images") -> tuple[list[str] | None, str | None]:
    """The row's image paths as given (not yet resolved), or a reason why there are none. Under
    the default key "images" a list, or one path under "image"; under another key (--image-key)
    a list or one path, as a table column may hold."""
    if key != "images":
        value = row.get(key)
        if isinstance(value, str):
            value = [value]
        if key not in row:
            return None, f'missing "{key}" (the pictures\' key, --image-key)'
        if not isinstance(value, list) or not value:
            return None, f'"{key}" must be a path or a non-empty list of paths, got {value!r:.40}'
        if not all(isinstance(p, str) and p.strip() for p in value):
            return None, f'"{key}" must contain only non-empty path strings'
        return value, None
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


def _check_masked_field(row: dict, key: str) -> tuple[list[str] | None, str | None]:
    """A JSONL row's pre-masked picture paths under `key` (not yet resolved), or a reason."""
    if key not in row:
        return None, f'missing "{key}" (the pre-masked pictures, --masked-image-key)'
    value = row[key]
    if not isinstance(value, list) or not value:
        return None, f'"{key}" must be a non-empty list of paths, got {value!r:.40}'
    if not all(isinstance(p, str) and p.strip() for p in value):
        return None, f'"{key}" must contain only non-empty path strings'
    return value, None


def load_jsonl(path: str | Path, image_dir: str | Path | None = None, *,
               max_image_pixels: int = imaging.MAX_IMAGE_PIXELS,
               masked_image_key: str | None = None, problem_key: str = "problem",
               answer_key: str = "answer", image_key: str = "images") -> list[Example]:
    """Read and check a JSONL dataset; raise one DatasetError that lists every bad row. A row
    with a picture of more than `max_image_pixels` pixels is a bad row. The keys of the
    question, the gold answer and the pictures are problem_key, answer_key and image_key
    (--problem-key, --answer-key, --image-key), as for tables. With masked_image_key,
    every row must also list its pre-masked pictures under that key (paths, like "images"):
    as many as it has pictures, each of the same size.

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
    check_pictures = imaging.PictureChecker(max_image_pixels)
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
        problem, why_problem = _check_text_field(row, problem_key)
        answer, why_answer = _check_text_field(row, answer_key)
        reasons += [w for w in (why_problem, why_answer) if w]
        solution = row.get("solution")
        if solution is not None and not isinstance(solution, str):
            reasons.append(f'"solution" must be a string, got {type(solution).__name__}')
        given, why = _check_image_field(row, image_key)
        if why:
            reasons.append(why)
        if not reasons:
            ex = Example(problem=problem, answer=answer,
                         images=[_resolve(p, folder) for p in given], solution=solution,
                         source=where, id=None if row.get("id") is None else str(row["id"]),
                         task=None if row.get("task") is None else str(row["task"]))
            reasons += _check_example(ex, check_pictures, ex.images)
            if masked_image_key:
                masked, why = _check_masked_field(row, masked_image_key)
                if masked is not None:
                    masked = ex.masked_images = [_resolve(p, folder) for p in masked]
                reasons += _check_masked(ex, check_pictures, masked, why, masked_image_key)
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


def load_sharegpt(path: str | Path, image_dir: str | Path | None = None, *,
                  max_image_pixels: int = imaging.MAX_IMAGE_PIXELS) -> list[Example]:
    """Read and check a ShareGPT JSON file (see the top of this part); one DatasetError lists
    every bad row as "file:index: reason" (a picture over `max_image_pixels` makes a bad row)."""
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
    check_pictures = imaging.PictureChecker(max_image_pixels)
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
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:   # a damaged arrow file, a missing one, bad JSON metadata
            raise DatasetError([f"{path}: a Dataset.save_to_disk folder that does not load "
                                f"({type(err).__name__}: {str(err)[:300]})"]) from None
        return _one_split(loaded, source, split), path, source
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise DatasetError([f"{path}: a folder with no .parquet files and not written by "
                                "Dataset.save_to_disk"])
    elif path.is_file() and path.suffix.lower() == ".parquet":
        files = [str(path)]
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not files:
            raise DatasetError([f"{spec}: no file matches this pattern"])
    elif path.exists():
        return None
    elif (spec.count("/") == 1 and all(spec.split("/")) and not spec.startswith((".", "~"))
          and path.suffix.lower() not in (".parquet", ".arrow", ".json", ".jsonl", ".csv")):
        return _open_hub(spec, split, source), None, source
    else:
        raise DatasetError([f"{source}: no such file or folder (and not a hub id owner/name)"])
    if not all(f.lower().endswith(".parquet") for f in files):
        raise DatasetError([f"{spec}: matches files that are not .parquet: "
                            + ", ".join(f for f in files
                                        if not f.lower().endswith(".parquet"))[:300]])
    _check_parquet_files(files)
    try:
        table = datasets.load_dataset("parquet", data_files=files, split="train")
    except Exception as err:      # a damaged page past a sound footer, files whose columns differ
        raise DatasetError([f"{spec}: the parquet data does not load ({type(err).__name__}: "
                            f"{str(err)[:300]})"]) from None
    return table, Path(files[0]).absolute().parent, source


def _check_parquet_files(files: list[str]) -> None:
    """Each file's parquet footer is read first, so that a damaged or truncated file is named
    (the `datasets` loader would fail deep inside pyarrow, mostly without the file's name)."""
    import pyarrow.parquet
    bad = []
    for f in files:
        try:
            pyarrow.parquet.ParquetFile(f).metadata
        except Exception as err:
            bad.append(f"{f}: not a readable parquet file ({type(err).__name__}: "
                       f"{str(err)[:200]})")
    if bad:
        raise DatasetError(bad)


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
               progress: bool = False, max_image_pixels: int = imaging.MAX_IMAGE_PIXELS,
               masked_image_key: str | None = None) -> Dataset:
    """Open a table source and check every row in one streaming pass (text columns in memory,
    pictures read batch by batch and let go); one DatasetError lists every bad row (a picture
    over `max_image_pixels` makes a bad row). masked_image_key names a column of pre-masked
    pictures (in the forms of the picture column), one per picture and of its size."""
    opened = _open_table(source)
    if opened is None:
        raise DatasetError([f"{source}: not a table (expected .parquet, a folder or a hub id)"])
    table, folder, name = opened
    folder = Path(image_dir) if image_dir else folder
    keys = [problem_key, answer_key, image_key] + ([masked_image_key] if masked_image_key else [])
    missing = [k for k in keys if k not in table.column_names]
    if missing:
        raise DatasetError([f"{name}: no column {', '.join(map(repr, missing))}; it has "
                            f"{', '.join(table.column_names)} (see --problem-key, --answer-key, "
                            "--image-key, --masked-image-key)"])
    table = table.select_columns(keys).with_format("arrow")
    problems, rows, table_rows = [], [], []
    check_pictures = imaging.PictureChecker(max_image_pixels)
    batches = table.iter(batch_size=256)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=math.ceil(len(table) / 256), desc=f"checking {name}",
                       leave=False)
    index = 0
    for batch in batches:
        columns = [batch.column(k).to_pylist() for k in (problem_key, answer_key, image_key)]
        masked_cells = (batch.column(masked_image_key).to_pylist() if masked_image_key
                        else [None] * len(columns[0]))
        for problem, answer, pictures, masked_cell in zip(*columns, masked_cells):
            where = f"{name}:{index}"
            index += 1
            number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
            not_finite = number and not math.isfinite(answer)
            if number and not not_finite:
                answer = str(answer)   # a typed number column: no "007" to lose, unlike JSON
            cells = {problem_key: problem, answer_key: answer}
            reasons = [w for k in (problem_key, answer_key) if (w := _check_text_field(cells, k)[1])]
            if not_finite:
                # NaN (pandas' missing value) or inf: no gold answer, not the string "nan"
                reasons = [w for w in reasons if not w.startswith(f'"{answer_key}"')] + [
                    f'"{answer_key}" is {answer} (a missing or infinite number), not a gold answer']
            refs, why = _picture_refs(pictures, folder)
            if why:
                reasons.append(f'"{image_key}": {why}')
            if not reasons:
                ex = Example(problem=problem, answer=answer, images=[], source=where)
                reasons += _check_example(ex, check_pictures, refs)
                if masked_image_key:
                    masked, why = _picture_refs(masked_cell, folder)
                    reasons += _check_masked(ex, check_pictures, masked, why, masked_image_key)
            if reasons:
                problems.append(f"{where}: " + "; ".join(reasons))
            else:
                rows.append(ex)
                table_rows.append(index - 1)
    if index == 0:
        problems.append(f"{name}: no rows")
    if problems:
        raise DatasetError(problems)
    return Dataset(name, rows, table, table_rows, image_key, folder, masked_image_key)


def load_dataset(source: str | Path, *, problem_key: str = "problem", answer_key: str = "answer",
                 image_key: str = "images", image_dir: str | Path | None = None,
                 progress: bool = False, max_image_pixels: int = imaging.MAX_IMAGE_PIXELS,
                 masked_image_key: str | None = None) -> Dataset:
    """Any supported source (see the top of this part) -> a checked Dataset of Examples.

    .jsonl -> load_jsonl; .json -> load_sharegpt (either in any case: .JSONL too); anything
    else -> load_table (parquet file, glob or folder, save_to_disk folder, hub id with optional
    ":split"). The column names apply to tables and JSONL files alike; ShareGPT files have a
    fixed shape (conversations), which they do not apply to. A picture of more than
    `max_image_pixels` pixels (read from its header) makes its row a bad row, in every format.
    masked_image_key (a table column, or a JSONL key listing paths) adds each row's pre-masked
    pictures; ShareGPT files, the evaluation suite's format, have none."""
    source = str(source)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()                       # data.JSONL is a JSONL file too
    if suffix == ".jsonl":
        return Dataset(source, load_jsonl(path, image_dir, max_image_pixels=max_image_pixels,
                                          masked_image_key=masked_image_key,
                                          problem_key=problem_key, answer_key=answer_key,
                                          image_key=image_key))
    if suffix == ".json":
        if masked_image_key:
            raise DatasetError([f"{path}: pre-masked pictures (--masked-image-key "
                                f"{masked_image_key}) are read from JSONL files and tables, not "
                                "from ShareGPT JSON"])
        if not path.is_file():
            raise DatasetError([f"{path}: file not found"])
        return Dataset(source, load_sharegpt(path, image_dir, max_image_pixels=max_image_pixels))
    return load_table(source, problem_key=problem_key, answer_key=answer_key, image_key=image_key,
                      image_dir=image_dir, progress=progress, max_image_pixels=max_image_pixels,
                      masked_image_key=masked_image_key)
