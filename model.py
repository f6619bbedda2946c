"""model.py - everything in this project that knows about Hugging Face transformers.

The RL math (papo.py) sees only tensors: per-token log-probs, masks, advantages. This module
turns a Qwen2.5-VL or Qwen3-VL model and its processor into exactly those tensors, and it is the
only place that has to know the models' quirks. Read it top to bottom:

  1. Loading     load_model: a hub id or a saved folder of either family, no torchvision
                 (what differs between Qwen2.5-VL and Qwen3-VL is in families.py).
  2. Rollouts    the dataclass that carries G sampled answers per prompt, with their images
                 (stored once per prompt).
  3. Encoding    chat template -> token ids (left padded) + image patches, repeated G times.
  4. Sampling    generate_rollouts: HF `generate`; completion masks from the FIRST end token.
  5. Scoring     completion_logprobs: log pi(o_t | q, I, o_<t) for every completion token, one
                 forward per row and a chunked log-softmax gather, never holding [batch,
                 length, vocabulary] logits in memory; naive_completion_logprobs, the obvious
                 version, is the tests' oracle; next_token_logits, its forward, gives whole
                 distributions for analysis.
  6. Targets     rollouts_from_texts: given answers as Rollouts (supervised warm start).

FAST_PATHS, just below, is the one switch between two ways of doing 4 and 5. Off, this module
does the plain thing: `generate` over the N x G repeated prompts, and one forward over prompt +
completion per row, every row with its own copy of its pictures. On (the default), the same
numbers with less work: each prompt and picture read once per group (speedups.py). The float64
equivalence tests of tests/test_model.py compare the two through this switch.

The offline tiny model (the same classes, random weights, a tokenizer trained locally) is built
in toy.py, next to the toy task it learns.

Shapes in comments: B rollouts (= N prompts x G samples, group-major: row b = prompt * G + g),
P prompt length, T completion length, V vocabulary, H hidden size, D numbers per image patch row
(3 x 2 x 14 x 14 = 1176 for Qwen2.5-VL, 3 x 2 x 16 x 16 = 1536 for Qwen3-VL).
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, GenerationConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (Qwen2VLImageProcessorPil,
                                                                       smart_resize)

import papo
import speedups
# the families' classes and special tokens, used here and re-exported (model.family_of, ...)
from families import (ENDOFTEXT, FAMILIES, IM_END, IM_START, IMAGE_PAD,  # noqa: F401
                      SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN, VIDEO_PAD, VISION_END, VISION_START, Family,
                      Qwen3VLImageTextProcessor, QwenVLImageTextProcessor, family_of,
                      prompt_opens_thinking, save_processor)

# True: generation and scoring read each prompt and picture once per group (speedups.py:
# generate_from_shared_prompts, states_prompt_once, encode_each_picture_once). False: the plain
# paths, Hugging Face's own calls on every row (_generate_plain, _states_one_pass) - for a model
# whose quirks the fast paths do not know yet, or to check them. Same tokens, log-probs and
# gradients either way (to float64 rounding); read at each call.
FAST_PATHS = True

# ---------------------------------------------------------------------------------------------
# 1. Loading Qwen2.5-VL and Qwen3-VL
# ---------------------------------------------------------------------------------------------

def unwrap(model):
    """The bare Hugging Face model inside a DistributedDataParallel (or DataParallel) wrapper.

    Rule of thumb used below: anything that must trigger DDP's gradient synchronisation (the
    scoring forward that a loss is built on) goes through the WRAPPER; everything else
    (generate, reading the config, the lm_head weight) uses the bare model."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _as_dtype(dtype):
    """torch.float32 / "float32" / "bf16"-style names / "auto" / None -> what from_pretrained takes.

    float32 is the default on purpose: RL learning rates (1e-6) vanish when added to bfloat16
    weights, so the trainable policy keeps fp32 master weights and uses bf16 autocast for speed."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":   # "auto": the checkpoint's own dtype
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (try 'bfloat16' or 'float32')")
    return value


def _folder_model_type(path: Path) -> str | None:
    """config.json's model_type of a saved model folder; errors name the folder, instead of
    failing deep inside transformers' loading code."""
    if not path.is_dir():
        raise ValueError(f"load_model: {path} is a file, not a model folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"load_model: {path} has no config.json, so it is not a saved model "
                         "(expected a folder written by save_pretrained)")
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"load_model: {config_file} is not a valid JSON config ({err})") from None


def _looks_like_hub_id(name: str) -> bool:
    """'owner/name' with nothing that marks a file-system path."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and "\\" not in name and all(name.split("/")))


def model_source(name_or_path) -> tuple[str, Family]:
    """(the folder or hub id to load from, its model family), checked: an error names the path
    or id and the supported families, instead of failing deep inside transformers."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        source, model_type = str(path), _folder_model_type(path)
    elif not _looks_like_hub_id(name):
        raise FileNotFoundError(f"load_model: no such model folder: {path}")
    else:
        try:
            source, model_type = name, AutoConfig.from_pretrained(name).model_type
        except OSError as err:  # offline without a cache, or a misspelt id
            raise ValueError(f"load_model: {name!r} is not a local folder and could not be "
                             f"loaded as a Hugging Face hub id: {err}") from None
    try:
        return source, family_of(model_type)
    except ValueError as err:
        raise ValueError(f"load_model: {source} holds a {model_type!r} model (config.json "
                         f"model_type): {err}") from None


def load_processor(name_or_path) -> QwenVLImageTextProcessor | Qwen3VLImageTextProcessor:
    """The processor alone (tokenizer + PIL image processor) of a model folder or hub id: what
    train.py needs to measure prompt lengths before it loads gigabytes of weights."""
    source, family = model_source(name_or_path)
    try:
        processor = family.processor_class.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"load_model: {source} has no usable processor files (tokenizer, image "
                         f"processor); save them next to the weights with "
                         f"model.save_processor(processor, folder). Cause: {err}") from None
    if not isinstance(processor.image_processor, Qwen2VLImageProcessorPil):
        # with torchvision installed, transformers picks its torchvision image processor (both
        # families use Qwen2-VL's image processor, with their own patch size, mean and std)
        processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(source)
    return processor


def load_model(name_or_path, *, dtype=None, device=None, gradient_checkpointing: bool = False,
               attn_implementation: str | None = None):
    """Load a Qwen2.5-VL or Qwen3-VL model and its processor -> (model, processor).

    name_or_path: a hub id such as "Qwen/Qwen2.5-VL-3B-Instruct" or "Qwen/Qwen3-VL-2B-Thinking"
        (downloaded, or read from the local cache), or a folder written by
        `model.save_pretrained` + `save_processor` (the tiny model, a warm start, a training
        checkpoint; older folders from a plain `processor.save_pretrained` load too). The
        family comes from config.json's model_type (FAMILIES).
    dtype: torch dtype or name ("bfloat16", "float32", "auto" = as stored); None = float32
        master weights (use torch.autocast for bf16 compute, as train.py does).
    device: where to put the model ("cuda:0", torch.device, ...); None leaves it on the CPU.
    gradient_checkpointing: recompute each decoder/vision block in the backward pass instead of
        storing its activations (non-reentrant torch.utils.checkpoint). generate_rollouts still
        decodes with the KV cache (see there).
    attn_implementation: "sdpa" (default), "eager", "flash_attention_2", ...

    The processor always uses the PIL image processor: no torchvision needed, and identical
    pixels on every machine (the torchvision backend resizes slightly differently)."""
    source, family = model_source(name_or_path)
    # the processor first: it is cheap, and a folder without one should fail before gigabytes load
    processor = load_processor(source)
    kwargs = {"dtype": _as_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = family.model_class.from_pretrained(source, **kwargs)
    fill_generation_config(model, processor.tokenizer)
    speedups.patch_embed_as_matmul(model)

    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if device is not None:
        model.to(device)
    return model, processor


def _enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing: works with inputs that do not require grad, with DDP, and with
    # autocast, and gives the same gradients as no checkpointing (tests/test_model.py checks).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):    # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def fill_generation_config(model, tokenizer) -> None:
    """End-of-turn ids and the pad id that `generate` needs (and that save_pretrained writes).

    Qwen's own generation_config.json already lists [<|im_end|>, <|endoftext|>] as EOS and
    <|endoftext|> as pad; a model built from scratch has none of that."""
    gc = model.generation_config
    eos = gc.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for token in (IM_END, ENDOFTEXT):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    gc.eos_token_id = eos
    if gc.pad_token_id is None:
        gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[-1]


# ---------------------------------------------------------------------------------------------
# 2. Rollouts
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rollouts:
    """G sampled completions for each of N prompts, with everything needed to score them again.

    Layout is group-major: row b = prompt_index * num_samples + g, so the G rollouts of a group
    are adjacent and `view(N, G)` recovers the groups. The pictures are stored once per PROMPT,
    not per row: row b shows the pictures of prompt entry prompt_of[b] (the G rows of a group
    point to one entry). At the official pixel budget a picture of ~600 image tokens is 2,400
    patch rows of 1,176 floats (11 MB): a copy per rollout would hold G = 5 of them, ~11 GB for
    the 960 rows of a step on one rank (2.1 GB once per prompt), as much again for the masked
    branch. Any subset of rows (select, a micro-batch) carries exactly the pictures its rows
    show, so it stays a complete, scoreable batch; row_pictures() gives the per-row copies a
    plain forward needs.

    Frozen: build a variant with dataclasses.replace(r, pixel_values=...) (the masked-image
    branch), never by assigning to a field - other phases of a step may hold the same object."""
    prompt_ids: torch.Tensor          # [B, P] long, LEFT padded (generation needs the prompt's
                                      #        last token at the same column for every row)
    prompt_mask: torch.Tensor         # [B, P] long, 1 = real prompt token, 0 = left padding
    mm_token_type_ids: torch.Tensor   # [B, P] long, 1 where the token is an <|image_pad|>: tells
                                      #        the model where images sit, for the 3-D positions
    pixel_values: torch.Tensor | None  # [rows, D] float, patch rows of every picture of every
                                       #        prompt entry, entry after entry, each ONCE
                                       #        (host memory from generate_rollouts)
    image_grid_thw: torch.Tensor      # [n_images, 3] long, (t, h, w) patches of those pictures
    images_per_prompt: torch.Tensor   # [N] long, how many pictures each prompt entry has
    prompt_of: torch.Tensor           # [B] long, the prompt entry whose pictures row b shows
    completion_ids: torch.Tensor      # [B, T] long, sampled tokens, padded on the right
    completion_mask: torch.Tensor     # [B, T] float, 1 on generated tokens up to and INCLUDING
                                      #        the first end-of-sequence token, 0 after it
    texts: list[str]                  # [B] decoded completions, special tokens stripped
    num_samples: int                  # G, rollouts per prompt in the original layout
    pad_token_id: int = 0             # filler id under mask 0 (never an image token)

    def __post_init__(self):
        B, P = self.prompt_ids.shape
        if self.prompt_mask.shape != (B, P) or self.mm_token_type_ids.shape != (B, P):
            raise ValueError("Rollouts: prompt_ids, prompt_mask, mm_token_type_ids differ in shape")
        if self.completion_ids.shape != self.completion_mask.shape or len(self.completion_ids) != B:
            raise ValueError("Rollouts: completion_ids and completion_mask must both be [B, T]")
        if len(self.texts) != B or self.prompt_of.shape != (B,):
            raise ValueError("Rollouts: texts and prompt_of need one entry per row")
        N = len(self.images_per_prompt)
        if B and not (0 <= int(self.prompt_of.min()) and int(self.prompt_of.max()) < N):
            raise ValueError(f"Rollouts: prompt_of points outside the {N} prompt entries")
        if int(self.images_per_prompt.sum()) != len(self.image_grid_thw):
            raise ValueError("Rollouts: images_per_prompt does not add up to image_grid_thw")
        rows = int(self.image_grid_thw.prod(-1).sum())
        have = 0 if self.pixel_values is None else len(self.pixel_values)
        if rows != have:
            raise ValueError(f"Rollouts: image_grid_thw describes {rows} patch rows but "
                             f"pixel_values has {have}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def images_per_rollout(self) -> torch.Tensor:
        """[B] long: how many pictures each row's prompt has."""
        return self.images_per_prompt[self.prompt_of]

    def _picture_rows(self, entries: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch-row indices, image indices) of the pictures of prompt `entries`, in order (an
        entry listed twice comes twice)."""
        count = self.images_per_prompt.tolist()                            # [N]
        first_image = [0, *accumulate(count)]                              # [N + 1]
        rows_per_image = self.image_grid_thw.prod(-1).tolist()             # [n_images]
        first_row = [0, *accumulate(rows_per_image)]                       # [n_images + 1]
        images = [i for e in entries for i in range(first_image[e], first_image[e] + count[e])]
        rows = [torch.arange(first_row[i], first_row[i] + rows_per_image[i]) for i in images]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        return rows, torch.tensor(images, dtype=torch.long)

    def row_images(self) -> torch.Tensor:
        """[n] long: the stored image behind each image a plain forward over the rows sees, row
        after row (G entries for each picture of a group)."""
        return self._picture_rows(self.prompt_of.tolist())[1]

    def row_pictures(self, pixel_values=None,
                     copy_pixels: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(pixel_values, image_grid_thw) with every ROW's pictures, row after row: the layout
        of a plain forward over the rows (G copies of a group's pictures). pixel_values: these
        patch rows instead of the rollouts' own (same layout, e.g. the masked branch).
        copy_pixels=False: the grid only (pixel_values None), nothing copied."""
        pixels = self.pixel_values if pixel_values is None else pixel_values
        rows, images = self._picture_rows(self.prompt_of.tolist())
        grid = self.image_grid_thw[images.to(self.image_grid_thw.device)]
        if pixels is None or not len(rows) or not copy_pixels:
            return None, grid
        return pixels[rows.to(pixels.device)], grid

    def select(self, indices) -> "Rollouts":
        """A new Rollouts with rows `indices` (list, range or 1-D tensor) and THEIR pictures,
        still once per prompt entry (renumbered in order of first use).

        Copies, never views that a later in-place edit could leak through."""
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        if any(not -len(self) <= i < len(self) for i in idx):
            raise IndexError(f"Rollouts.select: indices {idx} out of range for {len(self)} rows")
        idx = [i % len(self) for i in idx]                     # -1 -> last row, as in a list
        of = self.prompt_of.tolist()
        entries = list(dict.fromkeys(of[i] for i in idx))      # the entries kept, first use first
        renumber = {e: k for k, e in enumerate(entries)}
        rows, images = self._picture_rows(entries)
        where = lambda t: torch.tensor(idx, dtype=torch.long, device=t.device)
        pixels = None
        if self.pixel_values is not None and len(rows):
            pixels = self.pixel_values[rows.to(self.pixel_values.device)]
        return Rollouts(
            prompt_ids=self.prompt_ids[where(self.prompt_ids)],
            prompt_mask=self.prompt_mask[where(self.prompt_mask)],
            mm_token_type_ids=self.mm_token_type_ids[where(self.mm_token_type_ids)],
            pixel_values=pixels,
            image_grid_thw=self.image_grid_thw[images.to(self.image_grid_thw.device)],
            images_per_prompt=self.images_per_prompt[
                torch.tensor(entries, dtype=torch.long, device=self.images_per_prompt.device)],
            prompt_of=torch.tensor([renumber[of[i]] for i in idx], dtype=torch.long,
                                   device=self.prompt_of.device),
            completion_ids=self.completion_ids[where(self.completion_ids)],
            completion_mask=self.completion_mask[where(self.completion_mask)],
            texts=[self.texts[i] for i in idx],
            num_samples=self.num_samples, pad_token_id=self.pad_token_id)

    def to(self, device) -> "Rollouts":
        """The same rollouts with every tensor on `device` (tensors already there are shared)."""
        move = lambda t: None if t is None else t.to(device)
        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name))
                                            for f in dataclasses.fields(self)
                                            if torch.is_tensor(getattr(self, f.name))})


def cat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Stack several Rollouts (e.g. from repeated draws of DAPO's dynamic sampling) into one.

    Prompts are re-padded on the LEFT and completions on the RIGHT to the longest of all parts;
    padding carries mask 0, so scores of the real tokens do not change."""
    if not parts:
        raise ValueError("cat_rollouts: nothing to concatenate")
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)
    pad = parts[0].pad_token_id
    left = lambda t, value: F.pad(t, (P - t.shape[1], 0), value=value)   # [b, P]
    right = lambda t, value: F.pad(t, (0, T - t.shape[1]), value=value)  # [b, T]
    pixels = [r.pixel_values for r in parts if r.pixel_values is not None]
    offsets = [0, *accumulate(len(r.images_per_prompt) for r in parts)]   # entries before part k
    return Rollouts(
        prompt_ids=torch.cat([left(r.prompt_ids, pad) for r in parts]),
        prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in parts]),
        mm_token_type_ids=torch.cat([left(r.mm_token_type_ids, 0) for r in parts]),
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat([r.image_grid_thw for r in parts]),
        images_per_prompt=torch.cat([r.images_per_prompt for r in parts]),
        prompt_of=torch.cat([r.prompt_of + k for r, k in zip(parts, offsets)]),
        completion_ids=torch.cat([right(r.completion_ids, pad) for r in parts]),
        completion_mask=torch.cat([right(r.completion_mask, 0) for r in parts]),
        texts=[t for r in parts for t in r.texts],
        num_samples=parts[0].num_samples, pad_token_id=pad)


# ---------------------------------------------------------------------------------------------
# 3. Encoding prompts and images
# ---------------------------------------------------------------------------------------------

def _repeat_images(pixel_values, image_grid_thw, images_per_prompt: list[int], num_samples: int):
    """Repeat each prompt's patch rows and grid entries G times, group-major.

    pixel_values holds the rows of all images back to back ([rows, D]); image i owns
    image_grid_thw[i].prod() consecutive rows. Rollout b = n * G + g needs the rows of prompt
    n's images, so prompt n's block of rows is repeated G times in place. G = 1: the input
    itself (no copy of the rows)."""
    if num_samples == 1:
        return pixel_values, image_grid_thw
    rows_per_image = image_grid_thw.prod(-1).tolist()                  # [n_images]
    blocks, grids, start, image = [], [], 0, 0
    for count in images_per_prompt:
        n_rows = sum(rows_per_image[image:image + count])
        blocks += [pixel_values[start:start + n_rows]] * num_samples     # G x [n_rows, D]
        grids += [image_grid_thw[image:image + count]] * num_samples     # G x [count, 3]
        start, image = start + n_rows, image + count
    return torch.cat(blocks), torch.cat(grids)


def fit_min_pixels(image_processor, min_pixels: int) -> int:
    """min_pixels, lowered to the most pixels the processor keeps where it is above them.

    A pixel budget scales every raw picture up to at least min_pixels; the processor then scales
    any picture over its own maximum (size["longest_edge"], an area despite the name) back
    down. Above that maximum, every small picture would go up, then straight down again: two
    bicubic resizes (about 3 ms of CPU for a 112 px toy picture scaled to 448 px and back) that
    blur it and add no pixel the model sees. Lowered, a picture inside the processor's range
    reaches the model untouched. The tiny processors keep 12,544 (Qwen2.5-VL, 112 x 112) or
    16,384 pixels (Qwen3-VL, 128 x 128); Qwen2.5-VL's own keeps 12,845,056, far above the
    official budgets, which therefore never change for it. A processor set up some other way
    (no resize, no budget) leaves min_pixels as it is."""
    ip = image_processor
    top = (ip.size.get("longest_edge") if getattr(ip, "do_resize", True)
           and getattr(ip, "size", None) else None)
    return min_pixels if not top or min_pixels <= top else top


def _processor_size(image_processor, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) that Qwen's processor resizes a picture to: the nearest multiples of
    patch_size * merge_size (28 px) inside its pixel budget (smart_resize). None for a processor
    set up some other way (no resize, no budget)."""
    ip = image_processor
    low, high = ip.size.get("shortest_edge"), ip.size.get("longest_edge")   # the pixel budget
    if not getattr(ip, "do_resize", True) or not low or not high:
        return None
    factor = ip.patch_size * ip.merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
    return w, h


def resize_kwargs(image_processor, images: list) -> dict:
    """{"do_resize": False} when the processor's resize would give every picture back at its own
    size, else {}.

    Qwen's processor resizes each picture to the nearest multiple of patch_size * merge_size
    (28 px) within its pixel budget. A picture that is already that size is resampled onto
    itself, which PIL does as a plain copy: skipping the step gives bit-for-bit the same pixels
    and saves well over half of the processor's time on small pictures (the toy task's 112 x
    112, or any dataset stored at a multiple of 28). Both branches - the original pictures in
    generate_rollouts and the masked ones in encode_images - decide with this same function, so
    they are always processed alike (tests/test_model.py checks the bitwise equality)."""
    for image in images:
        if (not isinstance(image, Image.Image)
                or _processor_size(image_processor, image.width, image.height) != image.size):
            return {}                  # a resize to do, or a processor set up some other way
    return {"do_resize": False}


def presize(image_processor, images: list) -> list:
    """Each picture resized to the size the processor will give it, on one thread per core.

    The processor resizes its pictures one after the other; PIL releases the GIL while it
    resamples, so doing the same resize here in threads is faster, and the processor then skips
    its own (resize_kwargs sees the identity). Same target size (smart_resize in its pixel
    budget), same filter: bit-for-bit the processor's pixels (tests/test_model.py checks)."""
    ip = image_processor
    if (getattr(ip, "resample", None) is None
            or not all(isinstance(image, Image.Image) for image in images)):
        return images

    sizes = [_processor_size(ip, image.width, image.height) for image in images]
    if all(size is None or size == image.size for size, image in zip(sizes, images)):
        return images         # nothing to do (or a processor set up otherwise): no thread pool

    def one(image, size):
        if size is None or size == image.size:
            return image
        return image.resize(size, Image.Resampling(ip.resample))
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        return list(pool.map(one, images, sizes))


def image_token_count(image_processor, width: int, height: int) -> int:
    """How many <|image_pad|> tokens a width x height picture becomes in the prompt.

    The processor resizes it to multiples of patch_size * merge_size (28 px) inside its own pixel
    budget (smart_resize), cuts it into 14-px patches and merges 2 x 2 patches into one token:
    (H / 28) * (W / 28) tokens. Computed from the size alone, so a dataset's prompt lengths are
    known without decoding a single picture. Example: 112 x 112 -> 4 * 4 = 16."""
    ip = image_processor
    factor = ip.patch_size * ip.merge_size
    w, h = _processor_size(ip, width, height) or (width, height)
    return (h // factor) * (w // factor)


def prompt_lengths(processor, prompts: list[tuple[list[dict], list[tuple[int, int]]]],
                   ) -> list[int]:
    """Prompt length in tokens, image tokens included, of each (chat messages, picture sizes).

    Exactly the length _encode_prompts produces (tests/test_model.py checks): the chat template
    with one <|image_pad|> per picture, tokenised, plus (tokens of the picture - 1) per picture,
    since the processor expands each placeholder to the picture's token count. The sizes are
    those the processor will receive (after any pixel-budget resize)."""
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
             for messages, _ in prompts]
    ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(tokens) + sum(image_token_count(processor.image_processor, w, h) - 1
                              for w, h in sizes)
            for tokens, (_, sizes) in zip(ids, prompts)]


def encode_images(processor, images_per_prompt: list[list], num_samples: int = 1) -> dict:
    """Image patches for N prompts: {"pixel_values": [rows, D], "image_grid_thw": [n_images, 3]}.

    num_samples = 1 (default): each prompt's pictures once, the layout of the Rollouts that
    generate_rollouts returns for those prompts (Rollouts.pixel_values). num_samples = G: each
    prompt's pictures G times, the layout of a plain forward over the N * G rows.

    train.py calls this with the MASKED pictures (blacked out in pixel space, before resizing
    and normalising) to build the masked-image branch: the same processor settings make the same
    grid, hence the same number of image tokens, so the rollouts' token ids can be reused as is.
    Compare the returned grid with the rollouts' before using the pixels."""
    flat = presize(processor.image_processor,
                   [image for images in images_per_prompt for image in images])
    if not flat:
        return {"pixel_values": None, "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)}
    out = processor.image_processor(images=flat, return_tensors="pt",
                                    **resize_kwargs(processor.image_processor, flat))
    pixels, grid = _repeat_images(out["pixel_values"], out["image_grid_thw"],
                                  [len(images) for images in images_per_prompt], num_samples)
    return {"pixel_values": pixels, "image_grid_thw": grid}


def _count_image_entries(messages: list[dict]) -> int:
    return sum(1 for m in messages if not isinstance(m.get("content"), str)
               for part in m["content"] if part.get("type") == "image")


def _encode_prompts(processor, prompts: list[dict]) -> dict:
    """Chat template + tokenizer + image processor for N prompts, one row each.

    Returns prompt_ids / prompt_mask / mm_token_type_ids [N, P] (left padded), pixel_values,
    image_grid_thw and images_per_rollout [N] (_repeat_encoded makes N * G rows of it)."""
    for i, prompt in enumerate(prompts):
        n_entries, n_images = _count_image_entries(prompt["messages"]), len(prompt["images"])
        if n_entries != n_images:
            raise ValueError(f"prompt {i}: its messages have {n_entries} image entries but "
                             f"{n_images} images were given")
    texts = [processor.apply_chat_template(p["messages"], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    # The processor expands each <|image_pad|> into as many copies as its image has tokens
    # (read from the image grid) and runs the image processor - the same call encode_images
    # makes, so the masked branch's pixels line up row for row with these.
    flat = presize(processor.image_processor, [image for p in prompts for image in p["images"]])
    inputs = processor(text=texts, images=flat or None, padding=True, padding_side="left",
                       return_tensors="pt", **resize_kwargs(processor.image_processor, flat))
    counts = [len(p["images"]) for p in prompts]
    encoded = dict(prompt_ids=inputs["input_ids"], prompt_mask=inputs["attention_mask"],
                   mm_token_type_ids=inputs["mm_token_type_ids"],
                   pixel_values=inputs["pixel_values"] if flat else None,
                   image_grid_thw=(inputs["image_grid_thw"] if flat
                                   else torch.zeros(0, 3, dtype=torch.long)),
                   images_per_rollout=torch.tensor(counts, dtype=torch.long))
    return encoded


def _repeat_encoded(encoded: dict, num_samples: int) -> dict:
    """_encode_prompts' output for N prompts -> the same for N*G rows, each prompt G times."""
    if num_samples == 1:
        return encoded
    counts = encoded["images_per_rollout"].tolist()
    pixels, grid = encoded["pixel_values"], encoded["image_grid_thw"]
    if pixels is not None:
        pixels, grid = _repeat_images(pixels, grid, counts, num_samples)
    repeat = lambda t: t.repeat_interleave(num_samples, dim=0)           # [N, P] -> [N*G, P]
    return dict(prompt_ids=repeat(encoded["prompt_ids"]), prompt_mask=repeat(encoded["prompt_mask"]),
                mm_token_type_ids=repeat(encoded["mm_token_type_ids"]),
                pixel_values=pixels, image_grid_thw=grid,
                images_per_rollout=repeat(encoded["images_per_rollout"]))


# ---------------------------------------------------------------------------------------------
# 4. Sampling rollouts
# ---------------------------------------------------------------------------------------------

def eos_ids(model) -> list[int]:
    """The end-of-sequence token ids generation stops at."""
    eos = unwrap(model).generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def _vision_token_ids(model) -> list[int]:
    """Tokens that only the processor may place. If the policy SAMPLES one, the next forward
    sees an <|image_pad|> without an image (or a vision bracket without content) and fails with
    "Image features and image tokens do not match" - a random or RL-perturbed model does sample
    them now and then, so generation forbids them."""
    c = unwrap(model).config
    return [c.vision_start_token_id, c.vision_end_token_id, c.image_token_id, c.video_token_id]


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1.0 up to and including the FIRST end-of-sequence token of each row, 0.0 after it.

    Not `completion_ids != pad_id`: Qwen pads with <|endoftext|>, which is also an EOS id, so
    that test would drop the EOS itself - and the EOS is a generated token the policy must get
    credit (or blame) for. A row without EOS (cut at max_new_tokens) is all ones.
    Example: eos = 2, ids [5, 7, 2, 0, 0] -> [1, 1, 1, 0, 0]."""
    eos = torch.tensor(eos_ids, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos).long()                     # [B, T]
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos                  # [B, T] EOSs strictly before
    return (eos_before == 0).float()                                    # [B, T]


def truncated_rows(rollouts: "Rollouts", max_new_tokens: int, eos: list[int]) -> torch.Tensor:
    """[B] bool: the rows cut at max_new_tokens - as long as that, and their last token is not
    an end-of-sequence token (a response that ends exactly at the limit is not truncated).
    Example: max 3, eos 2: ids [5, 7, 9] -> True; [5, 7, 2] -> False; [5, 2, 0] -> False."""
    lengths = rollouts.completion_mask.sum(-1).long()                          # [B]
    ids = rollouts.completion_ids                                              # [B, T]
    last = ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)       # [B]
    ends = torch.isin(last, torch.tensor(eos, device=ids.device))
    return (lengths >= max_new_tokens) & ~ends


def _generate_plain(net, once: dict, num_samples: int, config) -> torch.Tensor:
    """The plain path of generation (FAST_PATHS off): Hugging Face `generate` over the N prompts
    repeated G times, group-major, each row with its own copy of its pictures - the first
    forward reads every prompt and picture G times. -> [B, P + T] prompt and sampled ids."""
    rows = _repeat_encoded(once, num_samples)                              # N * G rows
    pictures = {} if rows["pixel_values"] is None else dict(
        pixel_values=rows["pixel_values"], image_grid_thw=rows["image_grid_thw"])
    return net.generate(input_ids=rows["prompt_ids"], attention_mask=rows["prompt_mask"],
                        mm_token_type_ids=rows["mm_token_type_ids"], **pictures,
                        generation_config=config,
                        # sharded: every rank runs the same number of decode steps (each
                        # gathers layers collectively), as in the fast path
                        synced_gpus=(speedups.sharded(net)
                                     and torch.distributed.get_world_size() > 1))


@torch.no_grad()
def generate_rollouts(model, processor, prompts: list[dict], *, num_samples: int,
                      max_new_tokens: int, temperature: float = 1.0,
                      top_p: float = 1.0, top_k: int = 0) -> Rollouts:
    """Sample `num_samples` completions for each prompt with Hugging Face `generate`.

    prompts: [{"messages": chat messages (data.make_messages), "images": [PIL images]}, ...]
    temperature: 0 means greedy decoding; otherwise logits are divided by it before sampling
        (completion_logprobs(..., temperature=same value) scores exactly that distribution).
    top_p: nucleus sampling. Note that log-probs are always those of the full (temperature-
        scaled) distribution, as in the official code; with top_p < 1 the sampler and the scorer
        differ slightly, which the clipped importance ratio tolerates.
    top_k: sample only among the k most likely tokens; 0 = off (training, as the official
        rollouts). The paper's evaluation sampled with top_k 50, eval.py's default.

    Works on a DDP-wrapped model (generation needs no gradient synchronisation, so it runs on the
    bare model). The model is put in eval mode for sampling and restored afterwards.

    The returned Rollouts live on the model's device except pixel_values, which stay in host
    memory: each prompt's pictures once, ~2 GB at the official pixel budget for 192 prompts
    and as much again for the masked branch, host RAM rather than GPU memory.
    completion_logprobs moves only the pictures of the micro-batch it scores."""
    net = unwrap(model)
    device = next(net.parameters()).device
    host = _encode_prompts(processor, prompts)                          # N rows, one per prompt
    once = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in host.items()}
    repeat = lambda t: t.repeat_interleave(num_samples, dim=0).to(device)   # [N, ...] -> [B, ...]
    eos = eos_ids(net)
    pad = net.generation_config.pad_token_id
    greedy = temperature == 0

    # Every sampling knob is spelled out: unset fields are filled from the model's
    # generation_config.json, and Qwen2.5-VL-Instruct ships top_k=1, top_p=0.001 and
    # repetition_penalty=1.05 there - which would silently turn "sampling" into greedy decoding
    # with a penalty. The global default top_k=50 would also truncate the distribution, so it
    # is set explicitly too (0 = off).
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, num_beams=1,
        temperature=1.0 if greedy else float(temperature), top_p=1.0 if greedy else float(top_p),
        top_k=None if greedy else int(top_k),                 # 0 = off; greedy ignores it
        repetition_penalty=1.0, no_repeat_ngram_size=0,       # switched off
        eos_token_id=eos, pad_token_id=pad,
        suppress_tokens=_vision_token_ids(net),
        # Gradient checkpointing switches the KV cache off, but only for forwards that record
        # gradients in train mode. Generation runs in eval mode under no_grad, so with
        # use_cache=True it keeps the cache: one pass over the prompt, then one token per step
        # (the tests count the passes). Measured on the "small" model with checkpointing on,
        # 16 rollouts x 32 tokens, 2 CPU threads: 0.065 s with the cache, 0.35 s without.
        use_cache=True)

    modes = {m: m.training for m in net.modules()}   # restore exactly, frozen parts included
    net.eval()
    try:
        # inference_mode, not only no_grad: no autograd bookkeeping at all on the many small ops
        # of a decode step (~5% of generation on the tiny model). Its tensors may never enter
        # autograd, so the result is cloned outside it into an ordinary tensor. Not for a
        # sharded model: FSDP allocates the gathered parameters on first use and reuses them in
        # training forwards, and a tensor born under inference_mode cannot enter autograd.
        # Generation with FSDP: every decode step gathers each layer through FSDP's hooks and
        # frees it again (the root's parameters stay gathered throughout, root_gathered) - no
        # full copy of the model is ever held.
        no_autograd = torch.no_grad() if speedups.sharded(net) else torch.inference_mode()
        generate = speedups.generate_from_shared_prompts if FAST_PATHS else _generate_plain
        with no_autograd, speedups.root_gathered(net):
            sequences = generate(net, once, num_samples, config)
        sequences = sequences.clone()                                      # [B, P + T]
    finally:
        for m, mode in modes.items():
            m.training = mode

    completion_ids = sequences[:, host["prompt_ids"].shape[1]:]            # [B, T]
    completion_mask = completion_mask_from_eos(completion_ids, eos)        # [B, T]
    texts = processor.tokenizer.batch_decode(
        [ids[mask.bool()] for ids, mask in zip(completion_ids, completion_mask)],
        skip_special_tokens=True)
    N = len(prompts)
    return Rollouts(prompt_ids=repeat(host["prompt_ids"]), prompt_mask=repeat(host["prompt_mask"]),
                    mm_token_type_ids=repeat(host["mm_token_type_ids"]),
                    pixel_values=host["pixel_values"], image_grid_thw=once["image_grid_thw"],
                    images_per_prompt=once["images_per_rollout"],
                    prompt_of=repeat(torch.arange(N)),             # each group: its prompt's entry
                    completion_ids=completion_ids, completion_mask=completion_mask, texts=texts,
                    num_samples=num_samples, pad_token_id=pad)


# ---------------------------------------------------------------------------------------------
# 5. Scoring: per-token log-probs (and entropies) of the completions
# ---------------------------------------------------------------------------------------------
#
# Memory is the whole story here. With Qwen's vocabulary of 151,936 tokens, the logits of one
# 2,048-token completion are 311M floats (1.2 GB in fp32), and log_softmax makes a second copy;
# for a micro-batch of 8 that is ~20 GB before any backward - more than the model itself.
#
# Design:
#   (a) one forward of prompt + completion through `model(...)` - the WRAPPER, so a
#       DistributedDataParallel model registers the forward and all-reduces gradients later.
#   (b) the model itself computes logits for the LAST position only (logits_to_keep=1, a
#       [B, 1, V] throwaway). What we need are the hidden states after the final RMSNorm - the
#       input of lm_head - and a forward hook on that norm catches them inside the wrapped
#       call. Alternatives considered: output_hidden_states keeps every layer's [B, S, H]
#       states alive until the call returns; calling the inner model directly would bypass
#       DDP's hooks (no gradient all-reduce); logits_to_keep=T+1 still makes [B, T, V].
#   (c) lm_head is applied by hand to chunks of `chunk_size` completion positions (only real
#       ones: positions after the first EOS are skipped and get 0). Per chunk, in fp32:
#           logp_t = z[token] - logsumexp(z)     H_t = logsumexp(z) - sum_v softmax(z)_v z_v
#       with z = logits / temperature. Peak memory: chunk_size x V floats, not B x T x V.
#   (d) with gradients, each chunk runs under torch.utils.checkpoint: its logits are freed
#       after the forward and recomputed in the backward, so the graph holds only the hidden
#       states and the [B, T] results.
# The fast paths (speedups.py), with FAST_PATHS on (the default), where they apply:
#   (e) the vision tower runs once per DISTINCT picture, not once per row: the G rollouts of a
#       group show the same picture (stored once, Rollouts.prompt_of), and a plain forward would
#       encode it G times (speedups.encode_each_picture_once).
#   (f) the language model reads each DISTINCT prompt once, too: a forward over the distinct
#       prompts fills a KV cache, each row attends to its prompt's entry, and a second forward
#       reads only the completions (speedups.states_prompt_once). With the official prompt
#       (~100 text tokens + 256-1,280 image tokens) and G = 5, most tokens of a batch are prompt
#       tokens. Gradient checkpointing drops caches, so with it the update takes the one-pass
#       forward (_states_one_pass), pictures still encoded once.
# With FAST_PATHS off, every batch takes the plain one-pass forward, pictures in per row.


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 / fp32 -> fp32; fp64 stays fp64 (a float64 model, as the tests use to compare
    two computations to 1e-10, keeps its precision all the way to the log-probs)."""
    return x if x.dtype == torch.float64 else x.float()


def _chunk_logp_entropy(hidden, weight, bias, targets, temperature: float, with_entropy: bool):
    """Log-prob of `targets` and entropy under softmax(lm_head(hidden) / temperature).

    hidden [n, H], targets [n] -> logp [n] (fp32), entropy [n] (fp32; zeros if not asked). The
    entropy is papo.entropy_from_logits, the objective's own exact entropy."""
    z = _at_least_fp32(F.linear(hidden, weight, bias)) / temperature  # [n, V] fp32
    lse = torch.logsumexp(z, dim=-1)                                  # [n]
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse           # [n]
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    return logp, papo.entropy_from_logits(z)                          # [n], [n]


def _scoring_inputs(rollouts: Rollouts, pixel_values, with_pixels: bool = True) -> dict:
    """Keyword arguments of the forward over prompt + completion: every row's pictures, row
    after row (a plain forward's layout, Rollouts.row_pictures). with_pixels=False leaves out
    pixel_values (the caller hands the forward precomputed features) and copies nothing."""
    r = rollouts
    has_images = ((pixel_values is not None or r.pixel_values is not None)
                  and len(r.image_grid_thw) > 0)
    pixel_values, image_grid_thw = r.row_pictures(pixel_values, copy_pixels=with_pixels)
    input_ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)                     # [B, S]
    attention_mask = torch.cat([r.prompt_mask, r.completion_mask.long()], dim=1)       # [B, S]
    # Completion tokens are text (type 0). mm_token_type_ids is how the forward finds the images
    # to give their tokens (time, row, column) positions, as generate did for the prompt.
    # Without it there is no error: positions silently fall back to 1-D and log-probs drift.
    mm_types = torch.cat([r.mm_token_type_ids, torch.zeros_like(r.completion_ids)], dim=1)  # [B, S]
    return dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_types,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw if has_images else None,
                use_cache=False)    # a scoring pass has no next step: building a cache is waste


def _checkpointing(net) -> bool:
    return any(getattr(layer, "gradient_checkpointing", False)
               for layer in net.model.language_model.layers)


def _final_states(net, keep):
    """A forward hook on the language model's final norm (the input of lm_head) that appends
    keep(states) of each call to the returned list: (list, hook handle)."""
    captured = []
    hook = net.model.language_model.norm.register_forward_hook(
        lambda module, args, output: captured.append(keep(output)))
    return captured, hook


def _states_one_pass(model, r: Rollouts, pixels) -> torch.Tensor:
    """Final hidden states predicting the completion tokens, [B, T, H], from ONE forward over
    prompt + completion per row: position P-1+t (the last prompt token, then each completion
    token) predicts token t. The plain path; with FAST_PATHS on, pictures are still encoded
    once each (e)."""
    net = unwrap(model)
    T = r.completion_ids.shape[1]
    shared = (FAST_PATHS and pixels is not None and len(r.image_grid_thw) > 0
              and not speedups.sharded(net))
    inputs = _scoring_inputs(r, pixels, with_pixels=not shared)
    # Not for a sharded (--fsdp) model: there the features would be an input of the root unit's
    # forward that requires grad, and FSDP runs a unit's post-backward (reduce-scatter its
    # gradients, free its gathered weights) as soon as the gradients of its inputs are done -
    # before the backward of the vision tower's root-owned patch_embed and merger, which would
    # then find their weights freed. So the pictures go in as pixels and the tower runs inside
    # the root's forward, once per row (only here: the one-pass path is the gradient-
    # checkpointing update's). Making the tower a unit of its own does not rescue the shared
    # encoding: the root's post-backward then still runs early and frees lm_head's gathered
    # weight before the backward is done with it (tried: a freed-storage error).
    if shared:
        # (e) the forward merges precomputed features into the token embeddings and computes the
        # 3-D positions from image_grid_thw as it would from pixels. The vision tower runs here,
        # outside the wrapper's forward: DDP still all-reduces its gradients, because DDP's hooks
        # sit on the parameters and fire in the backward. mm_encoder_outputs is the forward's
        # own argument for precomputed features (transformers 5.x); tests/test_model.py compares
        # with the plain pixel_values forward.
        images = r.row_images().tolist()                               # every row's pictures
        inputs["mm_encoder_outputs"] = {"image": speedups.encode_each_picture_once(
            net, pixels, r.image_grid_thw, images)}
    captured, hook = _final_states(net, lambda states: states[:, -T - 1:-1])
    try:
        model(**inputs, logits_to_keep=1)                            # (a) through the wrapper
    finally:
        hook.remove()
    return captured[0]                                                     # [B, T, H]


def completion_logprobs(model, rollouts: Rollouts, *, pixel_values=None, temperature: float = 1.0,
                        with_entropy: bool = False, chunk_size: int = 256):
    """Per-token log-probs of the completion tokens: logp [B, T] float32 (float64 for a float64
    model), or (logp, entropy).

    logp[b, t] = log softmax(logits / temperature)[completion_ids[b, t]] given the prompt, the
    images and completion_ids[b, :t]; entropy[b, t] = -sum_v p_v log p_v of that same
    distribution (exact, over the whole vocabulary). Positions with completion_mask 0 (after
    the first EOS) are 0 in both: they are not computed at all.

    pixel_values: use these image patches instead of the rollouts' own (the masked-image
        branch: same tokens, different picture; must have the same grid).
    temperature: must equal the sampling temperature, so that these are the log-probs of the
        distribution the tokens were drawn from. 0 (greedy) has no distribution: scored at 1.
    chunk_size: completion positions per lm_head chunk; peak extra memory ~ chunk_size x V x 8
        bytes (x12 with entropy).

    Differentiable when called with gradients enabled (the policy update); call it under
    torch.no_grad() for old / reference / masked-branch log-probs. `model` may be
    DDP-wrapped: the forward goes through the wrapper. Results live on the model's device."""
    net = unwrap(model)
    device = next(net.parameters()).device
    r = rollouts.to(device)
    pixels = r.pixel_values if pixel_values is None else pixel_values.to(device)
    own = r.pixel_values
    if pixel_values is not None and own is not None and pixels.shape != own.shape:
        raise ValueError(f"completion_logprobs: pixel_values {tuple(pixels.shape)} do not match "
                         f"the rollouts' {tuple(own.shape)} (different image grid?)")
    temperature = float(temperature) if temperature > 0 else 1.0
    # a sharded (--fsdp) model: gather the root's own parameters for everything below, which
    # enters the model through its parts and reads lm_head.weight directly (root_gathered)
    with speedups.root_gathered(net):
        return _completion_logprobs(model, net, r, pixels, temperature, with_entropy,
                                    chunk_size, device)


def _completion_logprobs(model, net, r: Rollouts, pixels, temperature: float,
                         with_entropy: bool, chunk_size: int, device):
    B, T = r.completion_ids.shape
    # (a, b, e, f) the final hidden states that predict the completion tokens: (f) where rows
    # share a prompt and the layers keep a cache, else one forward per row
    prompt_once = FAST_PATHS and not (torch.is_grad_enabled() and _checkpointing(net))
    first, prompt_of = speedups.distinct_prompts(r) if prompt_once else (range(B), None)
    if len(first) < B:
        hidden = speedups.states_prompt_once(model, net, r, pixels, first, prompt_of,
                                             _final_states)                    # [B, T, H]
    else:
        hidden = _states_one_pass(model, r, pixels)                          # [B, T, H]

    # (c) lm_head on the real completion positions only, chunk by chunk
    real = r.completion_mask.bool()                                       # [B, T]
    h = hidden[real]                                                      # [N, H]  N = real tokens
    targets = r.completion_ids[real]                                      # [N]
    weight, bias = net.lm_head.weight, net.lm_head.bias                   # [V, H], None
    use_checkpoint = torch.is_grad_enabled() and h.requires_grad
    logps, entropies = [], []
    for start in range(0, len(h), chunk_size):
        args = (h[start:start + chunk_size], weight, bias, targets[start:start + chunk_size],
                temperature, with_entropy)
        if use_checkpoint:   # (d) recompute this chunk's [n, V] logits in the backward
            lp, ent = checkpoint(_chunk_logp_entropy, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logp_entropy(*args)
        logps.append(lp)
        entropies.append(ent)

    def scatter(values):    # [N] -> [B, T], zeros where the mask is 0 (out of place: keeps grad)
        full = torch.zeros(B, T, dtype=_at_least_fp32(hidden).dtype, device=device)
        if not values:                                      # no real tokens: keep the graph alive
            return full + 0.0 * hidden.sum()
        return full.masked_scatter(real, torch.cat(values))

    logp = scatter(logps)                                                 # [B, T]
    return (logp, scatter(entropies)) if with_entropy else logp


def next_token_logits(model, rollouts: Rollouts, *, pixel_values=None) -> torch.Tensor:
    """The full next-token logits [B, T, V] at every completion position: logits[b, t] is what
    the model predicts for completion_ids[b, t] (the model's plain forward, no chunking). For
    analysis and oracles that need whole distributions - e.g. the original and the masked
    branch's at one position (notebook 03) - not for training (it holds B x T x V floats)."""
    net = unwrap(model)
    device = next(net.parameters()).device
    r = rollouts.to(device)
    pixels = r.pixel_values if pixel_values is None else pixel_values.to(device)
    T = r.completion_ids.shape[1]
    return model(**_scoring_inputs(r, pixels)).logits[:, -T - 1:-1]            # [B, T, V]


def naive_completion_logprobs(model, rollouts: Rollouts, *, pixel_values=None,
                              temperature: float = 1.0, with_entropy: bool = False):
    """THE ORACLE for tests and benchmarks - same contract as completion_logprobs, computed the
    obvious way: the model's plain forward (pixel_values in, so the vision tower runs once per
    row), full [B, T, V] logits -> log_softmax -> gather. Memory-hungry; do not train with it."""
    temperature = float(temperature) if temperature > 0 else 1.0
    logits = next_token_logits(model, rollouts, pixel_values=pixel_values)     # [B, T, V]
    logp_all = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)  # [B, T, V]
    r = rollouts.to(logits.device)
    mask = r.completion_mask                                                   # [B, T]
    logp = logp_all.gather(-1, r.completion_ids[..., None]).squeeze(-1) * mask  # [B, T]
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask                      # [B, T]
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# 6. Given answers as Rollouts (supervised warm start, evaluation of reference answers)
# ---------------------------------------------------------------------------------------------

def rollouts_from_texts(processor, prompts: list[dict], texts: list[str]) -> Rollouts:
    """Rollouts whose completions are the given texts, each followed by <|im_end|>.

    completion_logprobs on these is teacher forcing: -mean(logp) is the supervised loss, and it
    uses the very code path that scores RL rollouts. One completion per prompt (G = 1)."""
    if len(prompts) != len(texts):
        raise ValueError(f"rollouts_from_texts: {len(prompts)} prompts but {len(texts)} texts")
    tokenizer = processor.tokenizer
    enc = _encode_prompts(processor, prompts)
    end = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    T = max(len(x) for x in ids)
    completion_ids = torch.tensor([x + [pad] * (T - len(x)) for x in ids])            # [B, T]
    completion_mask = torch.tensor([[1.0] * len(x) + [0.0] * (T - len(x)) for x in ids])  # [B, T]
    return Rollouts(prompt_ids=enc["prompt_ids"], prompt_mask=enc["prompt_mask"],
                    mm_token_type_ids=enc["mm_token_type_ids"], pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"],
                    images_per_prompt=enc["images_per_rollout"],
                    prompt_of=torch.arange(len(prompts)),                 # one row per prompt
                    completion_ids=completion_ids, completion_mask=completion_mask,
                    texts=list(texts), num_samples=1, pad_token_id=pad)
