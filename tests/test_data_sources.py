"""Where examples come from: every data source data.load_dataset reads, in its REAL format.

The PAPO datasets are parquet tables whose "images" column is a list of `datasets` Image
features (encoded picture bytes), with "<image>" markers in the problem text where the pictures
go; the evaluation suite is ShareGPT JSON with an image folder beside it; a hub id is read from
the local Hugging Face cache when there is no network. A loader that puts picture 2 where
picture 1 belongs, drops the instruction, or mis-sizes a picture does not crash - it quietly
trains on a different task. So these tests write small data in each format (with the very
libraries that write the real thing: `datasets`, pyarrow, PIL) and check, against hand-written
oracles:

    1. tables: parquet file, glob, folder, save_to_disk, DatasetDict "folder:split" -> the same
       rows, the exact pixels of each picture, each row's "source:row" label; slices, subsets
       and numpy indices keep the right pictures
    2. laziness: a table-backed Dataset keeps no picture bytes in its rows
    3. ShareGPT JSON, both spellings, user turn verbatim, --image-dir
    4. the prompt, token for token, with the official instruction written out literally
    5. the pixel budget (hand-computed sizes), applied AFTER the patch mask on the raw picture
    6. model.prompt_lengths == the length the processor really produces
    7. bad rows: every one reported, with its source and row, in ONE DatasetError
    8. hub ids, offline: a fast, named error when not cached; rows when the cache has them
    9. pre-masked pictures (--masked-image-key) from tables and JSONL: the right pixels for the
       right row, and every count or size mismatch named by row and column

Nothing touches the network or ~/.cache: the `datasets` cache is moved into tmp_path and the
hub libraries are put in offline mode for every test (autouse fixture below).
"""
import io
import json
import math
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

import data
import imaging
import model
import toy
import papo

# The instruction of the official PAPO recipe, written out by hand as the oracle: the released
# checkpoints were trained on exactly these words, so a "harmless" rewording in data.py must
# fail a test rather than silently move evaluation off the training distribution.
OFFICIAL_INSTRUCTION = ("You first think through the reasoning process as an internal monologue, "
                        "enclosed within <think> </think> tags. Then, provide your final answer "
                        "enclosed within \\boxed{}.")

# The schema of PAPOGalaxy/PAPO_ViRL39K_train and PAPO_MMK12_test (docs/paper.md section 6).
FEATURES = datasets.Features({"problem": datasets.Value("string"),
                              "answer": datasets.Value("string"),
                              "images": datasets.List(datasets.Image())})

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"   # one picture in the chat template


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def offline_tmp_cache(tmp_path, monkeypatch):
    """Every test: the `datasets` cache under tmp_path, and the hub libraries offline.

    Why both module constants and not only the environment: datasets and huggingface_hub read
    HF_DATASETS_CACHE / HF_HUB_OFFLINE into constants at import, and look the constants up at
    call time, so patching the constants is what takes effect. Offline mode makes any attempt to
    reach the network fail at once instead of waiting on a socket."""
    import huggingface_hub.constants as hub
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def processor():
    """The tiny Qwen2.5-VL processor (the real processor class, small pixel budget: 112 x 112
    -> 16 image tokens). Built once: it trains a tokenizer and builds a model (a few seconds)."""
    return toy.build_tiny_model()[1]


def noise(width: int, height: int, seed: int) -> np.ndarray:
    """A picture of random pixels, [height, width, 3] uint8. Noise rather than a flat colour: if
    two pictures were swapped, cropped, transposed or resized, their pixels could not match."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encoded PNG bytes - how the PAPO tables store a picture (lossless, so pixels round-trip)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# The rows every table test writes: one and two pictures, markers in the middle, at the start,
# at the end, and none (pictures then go first). Picture sizes are all different and
# non-square, so a swapped width and height shows up in `sizes`.
ROWS = [
    dict(problem="  How many dots are there? <image>  ", answer="3",      # trimmed in the prompt
         pictures=[noise(30, 20, 0)]),
    dict(problem="First picture: <image> Second picture: <image> Which is larger?", answer="2",
         pictures=[noise(24, 36, 1), noise(40, 16, 2)]),
    dict(problem="<image>What colour is the square?", answer="red",
         pictures=[noise(16, 18, 3)]),
    dict(problem="Which one is taller?\nA: <image>\nB: <image>", answer="B",
         pictures=[noise(22, 14, 4), noise(14, 22, 5)]),
    dict(problem="How many shapes are in the image?", answer="4",           # no marker
         pictures=[noise(28, 12, 6)]),
]


def table_columns(rows: list[dict]) -> dict:
    """Rows -> the columns of a PAPO table, pictures as {"bytes", "path"} cells (an Image
    feature's storage; path None as in the hub parquet files)."""
    return {"problem": [r["problem"] for r in rows], "answer": [r["answer"] for r in rows],
            "images": [[{"bytes": png_bytes(p), "path": None} for p in r["pictures"]]
                       for r in rows]}


def hf_table(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(table_columns(rows), features=FEATURES)


def write_parquet(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    hf_table(rows).to_parquet(str(path))
    return path


def make_source(kind: str, tmp_path: Path) -> str:
    """ROWS, stored the way `kind` names, as the string a user passes to --dataset."""
    if kind == "parquet file":
        return str(write_parquet(ROWS, tmp_path / "train.parquet"))
    if kind in ("parquet glob", "parquet folder"):
        # Two shards, as the hub stores large sets; sorted by name, they give ROWS in order.
        write_parquet(ROWS[:3], tmp_path / "shards" / "part-00000.parquet")
        write_parquet(ROWS[3:], tmp_path / "shards" / "part-00001.parquet")
        return str(tmp_path / "shards" / "*.parquet") if kind == "parquet glob" \
            else str(tmp_path / "shards")
    if kind == "save_to_disk":
        hf_table(ROWS).save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    if kind == "DatasetDict folder:split":
        # A second split with other rows: loading the wrong one would fail the pixel checks.
        datasets.DatasetDict({"train": hf_table(ROWS[::-1]), "test": hf_table(ROWS)}) \
            .save_to_disk(str(tmp_path / "dict"))
        return str(tmp_path / "dict") + ":test"
    raise ValueError(kind)


def sizes_of(pictures: list[np.ndarray]) -> list[tuple[int, int]]:
    return [(p.shape[1], p.shape[0]) for p in pictures]                 # (width, height)


def assert_row(ex: data.Example, expected: dict, source: str, index: int):
    """Row `index` of ROWS came through whole: texts, sizes, label, and every pixel in order."""
    assert ex.problem == expected["problem"]
    assert ex.answer == expected["answer"]
    assert ex.sizes == sizes_of(expected["pictures"])
    assert ex.source == f"{source}:{index}"
    pictures = ex.load_images()
    assert len(pictures) == len(expected["pictures"])
    for picture, pixels in zip(pictures, expected["pictures"]):
        assert picture.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(picture), pixels)


def dataset_error(call) -> data.DatasetError:
    with pytest.raises(data.DatasetError) as info:
        call()
    return info.value


def assert_problems(err: data.DatasetError, source: str, expected: dict):
    """err lists exactly the rows of `expected` ({row: words its reason must contain}), in row
    order, each as "source:row: reason" - the format that lets a user jump to the bad row."""
    assert len(err.problems) == len(expected), err.problems
    for line, (row, words) in zip(err.problems, expected.items()):
        assert line.startswith(f"{source}:{row}: "), line
        for word in ([words] if isinstance(words, str) else words):
            assert word in line, line


# ---------------------------------------------------------------------------------------------
# 1. Tables in every storage form
# ---------------------------------------------------------------------------------------------

TABLE_KINDS = ["parquet file", "parquet glob", "parquet folder", "save_to_disk",
               "DatasetDict folder:split"]


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_table_source_gives_the_rows_pictures_and_labels_written(kind, tmp_path):
    # The same five rows, whatever the storage: a shard order, a split or a folder layout that
    # shifted rows or pictures would break the pixel comparison of some row.
    source = make_source(kind, tmp_path)
    ds = data.load_dataset(source)
    assert isinstance(ds, data.Dataset) and len(ds) == len(ROWS)
    assert ds.name == source
    for i, expected in enumerate(ROWS):
        assert_row(ds[i], expected, source, i)      # `source` names where the row came from


def test_slices_subsets_and_numpy_indices_keep_each_rows_pictures(tmp_path):
    # A slice or subset remaps row numbers; the pictures live in the table under the ORIGINAL
    # row numbers. Getting that mapping wrong would pair a question with another row's picture.
    source = make_source("parquet folder", tmp_path)
    ds = data.load_dataset(source)

    part = ds[1:4]
    assert isinstance(part, data.Dataset) and len(part) == 3
    for j, i in enumerate(range(1, 4)):
        assert_row(part[j], ROWS[i], source, i)     # the label keeps the ORIGINAL row number

    chosen = ds.subset([4, 0, 3])
    for j, i in enumerate([4, 0, 3]):
        assert_row(chosen[j], ROWS[i], source, i)

    nested = chosen[::2]                            # a slice of a subset: rows 4 and 3
    for j, i in enumerate([4, 3]):
        assert_row(nested[j], ROWS[i], source, i)

    # The trainer indexes with a numpy permutation: np.int64 indices and arrays must work.
    order = np.random.default_rng(0).permutation(len(ds))
    for i in order:
        assert_row(ds[i], ROWS[int(i)], source, int(i))
    for j, i in enumerate(np.array([2, 1])):
        assert_row(ds.subset(np.array([2, 1]))[j], ROWS[int(i)], source, int(i))


# ---------------------------------------------------------------------------------------------
# 2. Pictures stay in the table until a row is drawn
# ---------------------------------------------------------------------------------------------

class RecordingTable:
    """Wraps the `datasets` table of a Dataset and records which rows are read from it."""

    def __init__(self, table):
        self.table, self.reads = table, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.table[key]

    def __getattr__(self, name):
        return getattr(self.table, name)


def test_table_rows_hold_no_picture_bytes_until_indexed(tmp_path):
    # Why it matters: ViRL39K's pictures are gigabytes; holding them all in Python would cost
    # that much memory in every data-parallel process. The rows keep text, answer and sizes;
    # the bytes stay in the memory-mapped Arrow file.
    ds = data.load_dataset(make_source("parquet file", tmp_path))
    assert all(ex.images == [] for ex in ds.rows)
    assert [ex.sizes for ex in ds.rows] == [sizes_of(r["pictures"]) for r in ROWS]  # yet known

    ds._table = RecordingTable(ds._table)          # watch the reads (white-box, on purpose)
    picked = ds.subset([3, 1])
    ex = picked[0]
    # Indexing reads exactly one row - the right one in the table - and returns its bytes ...
    assert ds._table.reads == [slice(3, 4)]
    assert ex.images == [png_bytes(p) for p in ROWS[3]["pictures"]]
    # ... without storing them: the row list stays picture-free, so memory does not grow as
    # training draws rows.
    assert ds.rows[3].images == [] and picked.rows[0].images == []


# ---------------------------------------------------------------------------------------------
# 3. ShareGPT JSON: the evaluation suite's format
# ---------------------------------------------------------------------------------------------

def write_sharegpt(folder: Path, rows: list, pictures: dict[str, np.ndarray]) -> Path:
    """data.json plus its pictures at the given relative paths inside `folder`."""
    for rel, pixels in pictures.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / rel)
    path = folder / "data.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


SHAREGPT_PICTURES = {"imgs/a.png": noise(20, 30, 10), "imgs/b.png": noise(33, 17, 11)}
SHAREGPT_ROWS = [
    # LLaMA-Factory spelling; the user turn already carries its own instruction.
    {"messages": [{"role": "user", "content": "<image>How many circles? Answer in \\boxed{}."},
                  {"role": "assistant", "content": "3"}],
     "images": ["imgs/a.png"]},
    # Original ShareGPT spelling, two pictures placed by markers.
    {"conversations": [{"from": "human", "value": "Left: <image> Right: <image> Which is wider?"},
                       {"from": "gpt", "value": " right "}],
     "images": ["imgs/b.png", "imgs/a.png"]},
]


def test_sharegpt_user_turn_is_the_prompt_verbatim_and_assistant_turn_the_answer(tmp_path,
                                                                                 processor):
    path = write_sharegpt(tmp_path, SHAREGPT_ROWS, SHAREGPT_PICTURES)
    ds = data.load_dataset(path)
    assert len(ds) == 2

    first, second = ds[0], ds[1]
    assert first.source == f"{path}:0" and second.source == f"{path}:1"
    assert first.answer == "3" and second.answer == "right"     # the assistant turn, trimmed
    assert first.sizes == [(20, 30)] and second.sizes == [(33, 17), (20, 30)]

    # The user text is used as it is: the suite's prompts carry their own instruction, and
    # adding PAPO's would change the benchmark's question.
    for ex, row, user in [(first, SHAREGPT_ROWS[0], "<image>How many circles? Answer in \\boxed{}."),
                          (second, SHAREGPT_ROWS[1], "Left: <image> Right: <image> Which is wider?")]:
        item = ex.to_prompt()
        assert item["messages"] == data.chat_messages(user, len(row["images"]))
        assert data.INSTRUCTION not in json.dumps(item["messages"])
        # Pictures in the order the row lists them (b then a in the second row).
        for picture, rel in zip(item["images"], row["images"]):
            np.testing.assert_array_equal(np.asarray(picture), SHAREGPT_PICTURES[rel])

    # Token for token: the rendered chat is the user text with each marker replaced by a vision
    # block, and nothing else added to the user turn.
    text = processor.apply_chat_template(second.to_prompt()["messages"],
                                         add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nLeft: " + VISION_BLOCK + " Right: " + VISION_BLOCK
                         + " Which is wider?<|im_end|>\n<|im_start|>assistant\n")


def test_sharegpt_image_dir_resolves_relative_paths(tmp_path):
    # The suite ships its JSON files apart from its image folder: --image-dir says where the
    # relative paths start. Without it they are relative to the JSON file's folder.
    pictures_home = tmp_path / "suite_images"
    write_sharegpt(pictures_home, [], SHAREGPT_PICTURES)            # only the pictures
    json_home = tmp_path / "suite_json"
    json_home.mkdir()
    path = json_home / "bench.json"
    path.write_text(json.dumps(SHAREGPT_ROWS), encoding="utf-8")

    err = dataset_error(lambda: data.load_dataset(path))
    assert_problems(err, str(path), {0: ["image not found", str(json_home / "imgs" / "a.png")],
                                     1: "image not found"})

    ds = data.load_dataset(path, image_dir=pictures_home)
    np.testing.assert_array_equal(np.asarray(ds[1].load_images()[0]),
                                  SHAREGPT_PICTURES["imgs/b.png"])


# ---------------------------------------------------------------------------------------------
# 4. The prompt, token for token
# ---------------------------------------------------------------------------------------------

def test_instruction_is_the_official_text_verbatim():
    assert data.INSTRUCTION == OFFICIAL_INSTRUCTION
    assert data.DEFAULT_TEMPLATE == "{problem}\n\n" + OFFICIAL_INSTRUCTION


def test_marker_row_prompt_places_pictures_where_the_markers_stand(tmp_path, processor):
    ds = data.load_dataset(make_source("parquet file", tmp_path))

    # Hand-written oracle: the text is cut at each marker; the last piece ends with the blank
    # line and the official instruction. No empty text parts.
    two = ds[1].to_prompt()
    assert two["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "First picture: "},
        {"type": "image"},
        {"type": "text", "text": " Second picture: "},
        {"type": "image"},
        {"type": "text", "text": " Which is larger?\n\n" + OFFICIAL_INSTRUCTION},
    ]}]
    # The marker at the END of a padded question: trimmed first, so the picture is followed
    # directly by the blank line (the official template trims the question).
    assert ds[0].to_prompt()["messages"][0]["content"] == [
        {"type": "text", "text": "How many dots are there? "},
        {"type": "image"},
        {"type": "text", "text": "\n\n" + OFFICIAL_INSTRUCTION}]
    # No marker: the pictures first, then the text (Qwen's own convention).
    assert ds[4].to_prompt()["messages"][0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "How many shapes are in the image?\n\n" + OFFICIAL_INSTRUCTION}]

    # Rendered by the real chat template: each vision block sits exactly where its marker was.
    text = processor.apply_chat_template(two["messages"], add_generation_prompt=True,
                                         tokenize=False)
    user = ("<|im_start|>user\nFirst picture: " + VISION_BLOCK + " Second picture: "
            + VISION_BLOCK + " Which is larger?\n\n" + OFFICIAL_INSTRUCTION + "<|im_end|>\n")
    assert text.endswith(user + "<|im_start|>assistant\n")
    assert text.count(VISION_BLOCK) == 2 and "<image>" not in text


def test_custom_template_file(tmp_path):
    path = tmp_path / "template.txt"
    # \boxed{} and {a, b} are LaTeX, not placeholders: only {problem} is replaced.
    path.write_text("Question: {problem}\nGive {a, b} as \\boxed{}.", encoding="utf-8")
    template = data.read_template(path)
    ex = data.Example(problem="  <image> How many?  ", answer="3",
                      images=[Image.fromarray(noise(14, 14, 0))])
    assert ex.to_prompt(template)["messages"][0]["content"] == [
        {"type": "text", "text": "Question: "},
        {"type": "image"},
        {"type": "text", "text": " How many?\nGive {a, b} as \\boxed{}."}]

    for bad in ("No placeholder \\boxed{}.", "{problem} twice {problem}"):
        path.write_text(bad, encoding="utf-8")
        with pytest.raises(ValueError, match="problem") as info:
            data.read_template(path)
        assert str(path) in str(info.value)         # the user is told WHICH file is wrong


# ---------------------------------------------------------------------------------------------
# 5. The pixel budget, and its place after the patch mask
# ---------------------------------------------------------------------------------------------

MIN_PIXELS, MAX_PIXELS = 200_704, 1_003_520      # the official budget: 256..1,280 image tokens


def test_budget_size_matches_the_hand_computation():
    # Too large: scale by f = sqrt(max / area), round each side down.
    f = math.sqrt(MAX_PIXELS / (2000 * 1000))
    assert (int(2000 * f), int(1000 * f)) == (1416, 708)
    assert imaging.budget_size(2000, 1000, MIN_PIXELS, MAX_PIXELS) == (1416, 708)
    # Too small: scale up by f = sqrt(min / area) = sqrt(200704 / 12544) = 4 exactly.
    assert imaging.budget_size(112, 112, MIN_PIXELS, MAX_PIXELS) == (448, 448)
    # Inside, or no budget: unchanged.
    assert imaging.budget_size(640, 480, MIN_PIXELS, MAX_PIXELS) == (640, 480)
    assert imaging.budget_size(2000, 1000, None, None) == (2000, 1000)

    big = Image.new("RGB", (2000, 1000))
    assert imaging.budget_resize(big, MIN_PIXELS, MAX_PIXELS).size == (1416, 708)
    small = Image.fromarray(noise(112, 112, 0))
    assert imaging.budget_resize(small, MIN_PIXELS, MAX_PIXELS).size == (448, 448)
    inside = Image.new("RGB", (640, 480))
    assert imaging.budget_resize(inside, MIN_PIXELS, MAX_PIXELS) is inside   # no copy, no resample


def test_to_prompt_resizes_into_the_budget(tmp_path):
    ds = data.load_dataset(make_source("parquet file", tmp_path))
    # Row 1's pictures are 24x36 (864 px) and 40x16 (640 px); with min_pixels 56*56 = 3136
    # both are scaled UP by sqrt(3136 / area), each side rounded down.
    item = ds[1].to_prompt(min_pixels=56 * 56, max_pixels=112 * 112)
    f1, f2 = math.sqrt(3136 / 864), math.sqrt(3136 / 640)
    assert [p.size for p in item["images"]] == [(int(24 * f1), int(36 * f1)),
                                                (int(40 * f2), int(16 * f2))] == [(45, 68), (88, 35)]
    # The same pixels budget_resize gives the decoded original (bicubic, no other processing).
    for picture, pixels in zip(item["images"], ROWS[1]["pictures"]):
        expected = imaging.budget_resize(Image.fromarray(pixels), 56 * 56, 112 * 112)
        np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))


def test_the_patch_mask_comes_before_the_budget_resize(processor):
    """docs/paper.md section 3, the official order: black out 14 x 14 squares of the RAW
    picture, then resize the masked copy into the budget exactly like the original. Checked
    pixel by pixel: wherever a resized pixel's bicubic support lies inside one raw square, it is
    exactly 0 if that square was blacked out and exactly the resized original's value if not;
    and the masked copy gives the processor the same grid as the original, so the rollouts'
    image tokens line up with the masked patches."""
    pixels = noise(300, 150, 7)
    raw = Image.fromarray(pixels)
    fit = lambda im: imaging.budget_resize(im, 56 * 56, 112 * 112)
    f = math.sqrt(112 * 112 / (300 * 150))
    original = fit(raw)
    masked = fit(papo.mask_image(raw, rng=0))
    assert masked.size == original.size == (int(300 * f), int(150 * f)) == (158, 79)
    grid = papo.patch_mask_grid(150, 300, 14, 0.6, rng=0)                 # [11, 22] raw squares
    before, after = np.asarray(original), np.asarray(masked)

    def square_of(out_index, out_size, in_size):
        """The raw square index whose pixels alone feed this output pixel, or None."""
        scale = in_size / out_size
        centre, support = (out_index + 0.5) * scale, 2.0 * scale        # PIL's bicubic filter
        low, high = math.floor(centre - support - 0.5), math.ceil(centre + support - 0.5)
        low, high = max(low, 0), min(high, in_size - 1)
        return low // 14 if low // 14 == high // 14 else None

    rows = [square_of(y, 79, 150) for y in range(79)]
    cols = [square_of(x, 158, 300) for x in range(158)]
    black = kept = 0
    for y, sy in enumerate(rows):
        for x, sx in enumerate(cols):
            if sy is None or sx is None:
                continue
            if grid[sy, sx]:
                assert not after[y, x].any(), (x, y)
                black += 1
            else:
                assert (after[y, x] == before[y, x]).all(), (x, y)
                kept += 1
    assert black > 100 and kept > 50                # both kinds of square seen, many pixels each
    # the other order (mask the resized picture) blacks out 14-px squares of the resized grid
    assert not np.array_equal(after, np.asarray(papo.mask_image(original, rng=0)))
    grid = model.encode_images(processor, [[original]], 1)["image_grid_thw"]
    assert torch_equal(grid, model.encode_images(processor, [[masked]], 1)["image_grid_thw"])


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


# ---------------------------------------------------------------------------------------------
# 6. Prompt lengths, known without running the processor
# ---------------------------------------------------------------------------------------------

def test_image_token_count_of_112_square_is_16(processor):
    # 112 / 28 = 4 merged patches a side: 4 * 4 = 16 tokens (28 = patch 14 x merge 2).
    assert model.image_token_count(processor.image_processor, 112, 112) == 16


@pytest.fixture(scope="module")
def qwen3_processor():
    """The tiny Qwen3-VL processor with the Thinking template: 32-px tokens, and a generation
    prompt that ends in <think>."""
    return toy.build_tiny_model(family="qwen3-vl-thinking")[1]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl-thinking"])
@pytest.mark.parametrize("sizes", [[(112, 112)], [(30, 20)], [(300, 150)],
                                   [(112, 112), (56, 84)], [(200, 60), (28, 28)]])
def test_prompt_lengths_equal_the_encoded_prompt_length(request, family, sizes):
    # The long-prompt filter (4,096 tokens) uses prompt_lengths on a whole dataset without
    # decoding pictures; it must agree with what the processor really builds, image tokens
    # included, or the filter lets through prompts that are too long (or drops good ones).
    processor = request.getfixturevalue("processor" if family == "qwen2.5-vl"
                                        else "qwen3_processor")
    markers = " and ".join(f"picture {k}: <image>" for k in range(len(sizes)))
    pictures = [Image.fromarray(noise(w, h, k)) for k, (w, h) in enumerate(sizes)]
    ex = data.Example(problem=f"Look at {markers}. Which is larger?", answer="1", images=pictures)
    item = ex.to_prompt()
    [predicted] = model.prompt_lengths(processor, [(item["messages"],
                                                   [p.size for p in item["images"]])])
    encoded = model._encode_prompts(processor, [item])
    assert predicted == int(encoded["prompt_mask"].sum())
    # And the image tokens are image_token_count per picture.
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((encoded["prompt_ids"] == pad).sum()) == sum(
        model.image_token_count(processor.image_processor, w, h) for w, h in sizes)


# ---------------------------------------------------------------------------------------------
# 7. Bad rows: all of them, named, in one error
# ---------------------------------------------------------------------------------------------

def test_every_bad_table_row_is_reported_in_one_error(tmp_path):
    # One parquet file with one good row and one bad row per kind of problem. A user fixing a
    # dataset wants the whole list at once, each line pointing at "source:row".
    ok = noise(20, 20, 0)
    thin = np.zeros((2, 402, 3), dtype=np.uint8)                     # 402 x 2: ratio 201
    rows = [
        ("Good: <image>", "1", [png_bytes(ok)]),
        ("A: <image> B: <image> Which?", "1", [png_bytes(ok)]),      # 2 markers, 1 picture
        *[(f"What is {token} here?", "1", [png_bytes(ok)]) for token in data.VISION_TOKENS],
        ("Undecodable: <image>", "1", [b"this is not a picture"]),
        ("No pictures at all", "1", []),
        (None, "1", [png_bytes(ok)]),                                # missing problem
        ("   ", "1", [png_bytes(ok)]),                               # empty problem
        ("Unparseable gold: <image>", "abc+", [png_bytes(ok)]),
        ("Too thin: <image>", "1", [png_bytes(thin)]),
    ]
    columns = {"problem": [r[0] for r in rows], "answer": [r[1] for r in rows],
               "images": [[{"bytes": b, "path": None} for b in r[2]] for r in rows]}
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_dict(columns, features=FEATURES).to_parquet(str(path))

    err = dataset_error(lambda: data.load_dataset(path))
    assert isinstance(err, ValueError)
    assert_problems(err, str(path), {
        1: ['2 "<image>" markers', "1 pictures"],
        2: "<|image_pad|>", 3: "<|vision_start|>", 4: "<|vision_end|>", 5: "<|video_pad|>",
        6: "not a readable image",
        7: "no pictures",
        8: '"problem" must be a string',
        9: '"problem" is empty',
        10: ["gold answer", "abc+"],
        11: ["402x2", "aspect ratio"],
    })


def test_missing_column_is_named_with_the_existing_ones(tmp_path):
    # A table with its answers under another name: the error must say which column is missing
    # and which exist, so the user can pass --answer-key.
    columns = table_columns(ROWS[:2])
    columns["solution"] = columns.pop("answer")
    path = tmp_path / "renamed.parquet"
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    err = dataset_error(lambda: data.load_dataset(path))
    [line] = err.problems
    assert line.startswith(f"{path}: ") and "'answer'" in line
    assert "problem, images, solution" in line

    ds = data.load_dataset(path, answer_key="solution")              # ... and the key fixes it
    assert [ex.answer for ex in ds.rows] == ["3", "2"]


def test_every_bad_sharegpt_row_is_reported_in_one_error(tmp_path):
    user = lambda text: {"role": "user", "content": text}
    assistant = {"role": "assistant", "content": "3"}
    rows = [
        {"messages": [user("<image>Fine?"), assistant], "images": ["imgs/a.png"]},
        {"messages": [user("<image>Where is the answer?")], "images": ["imgs/a.png"]},
        {"messages": [user("<image>Lost picture?"), assistant], "images": ["imgs/gone.png"]},
        {"messages": [user("<|vision_start|>Injected?"), assistant], "images": ["imgs/a.png"]},
        {"messages": [user("<image> and <image>?"), assistant], "images": ["imgs/a.png"]},
    ]
    path = write_sharegpt(tmp_path, rows, SHAREGPT_PICTURES)
    err = dataset_error(lambda: data.load_dataset(path))
    assert_problems(err, str(path), {               # rows of a JSON list count from 0
        1: "no assistant turn",
        2: ["image not found", "gone.png"],
        3: "<|vision_start|>",
        4: ['2 "<image>" markers', "1 pictures"],
    })


def test_jsonl_rows_get_the_same_marker_and_vision_token_checks(tmp_path):
    Image.fromarray(noise(20, 20, 0)).save(tmp_path / "a.png")
    rows = [
        {"problem": "Fine: <image>", "answer": "1", "images": ["a.png"]},
        {"problem": "Two: <image> <image>", "answer": "1", "images": ["a.png"]},
        {"problem": "Pad <|image_pad|> <image>", "answer": "1", "images": ["a.png"]},
        {"problem": "Video <|video_pad|>", "answer": "1", "images": ["a.png", "a.png"]},
    ]
    path = data.write_jsonl(rows, tmp_path / "train.jsonl")
    err = dataset_error(lambda: data.load_dataset(path))
    assert_problems(err, str(path), {               # JSONL rows are LINE numbers, from 1
        2: ['2 "<image>" markers', "1 pictures"],
        3: "<|image_pad|>",
        4: "<|video_pad|>",
    })


# ---------------------------------------------------------------------------------------------
# 8. Hub ids, offline
# ---------------------------------------------------------------------------------------------

def test_uncached_hub_id_offline_fails_fast_naming_the_id(monkeypatch):
    # On a cluster node without internet, a typo in --dataset must say so at once, not after
    # half a minute of retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    err = dataset_error(lambda: data.load_dataset("nobody-here/no-such-set:train"))
    assert time.perf_counter() - start < 5
    [line] = err.problems
    assert line.startswith("nobody-here/no-such-set:train: ") and "not in the local" in line


def test_hub_offline_false_in_the_environment_is_not_offline(monkeypatch):
    # HF_HUB_OFFLINE=0 means ONLINE to huggingface_hub and datasets; treating any non-empty
    # value as "offline" would skip the reachability check and refuse to download. Here the
    # probe is stubbed (no network in tests) to record that it was consulted.
    probes = []
    monkeypatch.setattr(data, "_hub_reachable", lambda *a, **k: probes.append(1) or False)
    for value, probed in [("0", True), ("false", True), ("1", False), ("ON", False)]:
        probes.clear()
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        dataset_error(lambda: data.load_dataset("nobody-here/no-such-set"))
        assert bool(probes) == probed, value


def fabricate_hub_cache(tmp_path: Path, cache: Path) -> None:
    """Put ROWS into `cache` as `datasets` stores a downloaded hub dataset "owner/name" with one
    split "test": prepare it from parquet, then move the prepared folder to the hub dataset's
    place (owner___name/default/0.0.0/<hash>) and name its Arrow file after the dataset."""
    shard = write_parquet(ROWS, tmp_path / "hub_source" / "test.parquet")
    datasets.load_dataset("parquet", data_files={"test": [str(shard)]}, cache_dir=str(cache))
    [prepared] = [p for p in cache.glob("parquet/*/*/*") if p.is_dir()]   # skips *.lock files
    target = cache / "owner___name" / "default" / "0.0.0" / prepared.name
    target.parent.mkdir(parents=True)
    shutil.move(str(prepared), str(target))
    (target / "parquet-test.arrow").rename(target / "name-test.arrow")


def test_hub_id_is_read_from_the_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "dc"
    fabricate_hub_cache(tmp_path, cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)

    for source in ("owner/name:test", "owner/name"):      # one split: naming it is optional
        ds = data.load_dataset(source)
        assert len(ds) == len(ROWS) and all(ex.images == [] for ex in ds.rows)
        for i, expected in enumerate(ROWS):
            assert_row(ds[i], expected, source, i)

    err = dataset_error(lambda: data.load_dataset("owner/name:train"))
    [line] = err.problems
    # a wrong split is named as such, with the split that exists - not taken for a cache miss
    assert line == "owner/name:train: no split 'train'; it has test"


@pytest.mark.parametrize("source", ["data/missing.parquet", "missing_folder", "a/b/c",
                                    "runs/x.json", "./owner/name"])
def test_a_missing_path_is_reported_as_missing_not_looked_up_on_the_hub(source, tmp_path,
                                                                        monkeypatch):
    """Only owner/name without a file suffix is taken for a hub id; a mistyped path must not send
    the user to the hub (or wait for it)."""
    monkeypatch.chdir(tmp_path)
    err = dataset_error(lambda: data.load_dataset(source))
    [line] = err.problems
    assert line.startswith(source)
    assert "file not found" in line or "no such file or folder" in line
    assert "cache" not in str(err)


# ---------------------------------------------------------------------------------------------
# 9. Pre-masked pictures: a second picture column, read like the first
# ---------------------------------------------------------------------------------------------

MASKED_FEATURES = datasets.Features({**FEATURES, "images_aug": datasets.List(datasets.Image())})


def masked_copy(pixels: np.ndarray, seed: int) -> np.ndarray:
    """A 'pre-masked' picture: the same size, other pixels (so a mix-up with the original shows)."""
    return noise(pixels.shape[1], pixels.shape[0], 100 + seed)


def masked_table(rows: list[dict], masked: list[list[np.ndarray]]) -> datasets.Dataset:
    columns = table_columns(rows)
    columns["images_aug"] = [[{"bytes": png_bytes(p), "path": None} for p in pics]
                             for pics in masked]
    return datasets.Dataset.from_dict(columns, features=MASKED_FEATURES)


@pytest.mark.parametrize("kind", ["parquet file", "save_to_disk"])
def test_table_pre_masked_pictures_come_with_their_row(kind, tmp_path):
    masked = [[masked_copy(p, 10 * i + j) for j, p in enumerate(r["pictures"])]
              for i, r in enumerate(ROWS)]
    table = masked_table(ROWS, masked)
    if kind == "parquet file":
        table.to_parquet(str(tmp_path / "t.parquet"))
        source = str(tmp_path / "t.parquet")
    else:
        table.save_to_disk(str(tmp_path / "saved"))
        source = str(tmp_path / "saved")
    ds = data.load_dataset(source, masked_image_key="images_aug")
    assert all(ex.masked_images is None for ex in ds.rows)          # no bytes held in the rows
    for i in (3, 0, 4, 1):                                            # any order, subsets too
        for ex in (ds[i], ds.subset([i])[0]):
            assert_row(ex, ROWS[i], source, i)                        # originals untouched
            got = ex.load_masked_images()
            assert [np.asarray(g).tolist() for g in got] == [m.tolist() for m in masked[i]]
    # without the key the column is ignored, and there is nothing to load
    plain = data.load_dataset(source)[0]
    assert plain.masked_images is None
    with pytest.raises(ValueError, match="no pre-masked pictures"):
        plain.load_masked_images()


def test_pre_masked_pictures_go_through_the_same_pixel_budget(tmp_path):
    masked = [[masked_copy(p, j) for j, p in enumerate(r["pictures"])] for r in ROWS[:2]]
    masked_table(ROWS[:2], masked).to_parquet(str(tmp_path / "t.parquet"))
    ex = data.load_dataset(tmp_path / "t.parquet", masked_image_key="images_aug")[1]
    budget = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    originals, pre_masked = ex.load_images(**budget), ex.load_masked_images(**budget)
    assert [im.size for im in pre_masked] == [im.size for im in originals] == [
        imaging.budget_size(w, h, **budget) for w, h in ex.sizes]
    expected = imaging.budget_resize(Image.fromarray(masked[1][0]), **budget)
    np.testing.assert_array_equal(np.asarray(pre_masked[0]), np.asarray(expected))


def test_table_pre_masked_count_and_size_mismatches_are_named_by_row_and_column(tmp_path):
    good = [[masked_copy(p, j) for j, p in enumerate(r["pictures"])] for r in ROWS[:4]]
    bad = list(good)
    bad[1] = good[1][:1]                                  # row 1 has 2 pictures, 1 masked copy
    bad[2] = [noise(17, 18, 7)]                           # original 16 x 18
    bad[3] = [good[3][0], np.zeros((3, 3, 3), np.uint8)]  # second picture 3 x 3, not 14 x 22
    masked_table(ROWS[:4], bad).to_parquet(str(tmp_path / "t.parquet"))
    path = str(tmp_path / "t.parquet")
    err = dataset_error(lambda: data.load_dataset(path, masked_image_key="images_aug"))
    assert_problems(err, path, {
        1: ['"images_aug" has 1 pre-masked pictures but the row has 2'],
        2: ['"images_aug" picture 1 is 17x18 px but its original is 16x18 px'],
        3: ['"images_aug" picture 2 is 3x3 px but its original is 14x22 px'],
    })
    err = dataset_error(lambda: data.load_dataset(path, masked_image_key="images_blurred"))
    [line] = err.problems
    assert "'images_blurred'" in line and "images_aug" in line and "--masked-image-key" in line


def test_jsonl_pre_masked_pictures_are_a_list_of_paths_checked_like_the_originals(tmp_path):
    for name, pixels in (("a.png", noise(20, 16, 0)), ("a_masked.png", noise(20, 16, 1)),
                         ("b.png", noise(12, 12, 2)), ("small.png", noise(10, 12, 3))):
        Image.fromarray(pixels).save(tmp_path / name)
    rows = [
        {"problem": "Fine: <image>", "answer": "1", "images": ["a.png"],
         "images_aug": ["a_masked.png"]},
        {"problem": "No copies", "answer": "1", "images": ["a.png"]},
        {"problem": "Two for one", "answer": "1", "images": ["a.png"],
         "images_aug": ["a_masked.png", "a_masked.png"]},
        {"problem": "Wrong size", "answer": "1", "image": "b.png", "images_aug": ["small.png"]},
        {"problem": "A string", "answer": "1", "images": ["a.png"], "images_aug": "a_masked.png"},
        {"problem": "Lost", "answer": "1", "images": ["a.png"], "images_aug": ["gone.png"]},
    ]
    path = data.write_jsonl(rows, tmp_path / "train.jsonl")
    err = dataset_error(lambda: data.load_dataset(path, masked_image_key="images_aug"))
    assert_problems(err, str(path), {
        2: 'missing "images_aug"',
        3: '"images_aug" has 2 pre-masked pictures but the row has 1',
        4: '"images_aug" picture 1 is 10x12 px but its original is 12x12 px',
        5: '"images_aug" must be a non-empty list of paths',
        6: ['"images_aug"', "image not found", "gone.png"],
    })
    path = data.write_jsonl(rows[:1], tmp_path / "good.jsonl")
    [ex] = data.load_dataset(path, masked_image_key="images_aug")
    assert ex.masked_images == [tmp_path / "a_masked.png"]
    np.testing.assert_array_equal(np.asarray(ex.load_masked_images()[0]), noise(20, 16, 1))
    np.testing.assert_array_equal(np.asarray(ex.load_images()[0]), noise(20, 16, 0))
    # the evaluation suite's ShareGPT files have no such pictures: refused, not ignored
    sharegpt = write_sharegpt(tmp_path, SHAREGPT_ROWS, SHAREGPT_PICTURES)
    err = dataset_error(lambda: data.load_dataset(sharegpt, masked_image_key="images_aug"))
    assert "ShareGPT" in err.problems[0]
