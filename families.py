"""The two model families, Qwen2.5-VL and Qwen3-VL: what differs between them, in one place.

    FAMILIES, family_of      the model, config and processor classes of each family
    *ImageTextProcessor      the stock processors without their video part (no torchvision)
    prompt_opens_thinking    whether the chat template opens <think> (Qwen3-VL-Thinking)
    save_processor           folders that stock AutoProcessor (with torchvision) loads in full
    special tokens           the same strings in both families and in the tiny model

model.py imports these (and re-exports them: model.family_of is this family_of).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLProcessor)
from transformers.processing_utils import ProcessorMixin


# Qwen's special tokens. The tiny model's tokenizer uses the same strings, so every piece of code
# (chat template, image placeholders, end-of-turn detection) is identical for both models.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]


class _ImagesOnly:
    """A Qwen processor without its video processor (the mixin behind the two classes below).

    The stock processors take a video processor as their third part, and without torchvision
    transformers cannot provide one (its video processors need torchvision; constructing or
    loading the stock processor fails). Images are all this project needs. ProcessorMixin
    discovers a processor's parts from the names of `__init__`'s arguments, so leaving
    `video_processor` out of this signature is what removes it - from construction, from
    save_pretrained and from from_pretrained alike. Everything else (the <|image_pad|>
    expansion, mm_token_type_ids) is inherited from the stock class unchanged.

    Saving: write folders with `save_processor(processor, folder)`, not plain save_pretrained.
    A plain save names this project's class in processor_config.json, which AutoProcessor does
    not know (it then silently returns only the tokenizer); save_processor names the stock class
    and adds a video processor config, so `AutoProcessor.from_pretrained` on a machine with
    torchvision returns the full stock processor. Either kind of folder loads here with
    `load_model` (or the class's from_pretrained)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # the attributes the stock __init__ would set around its call of ProcessorMixin's
        for name, token in (("image", IMAGE_PAD), ("video", VIDEO_PAD),
                            ("vision_start", VISION_START), ("vision_end", VISION_END)):
            value = getattr(tokenizer, f"{name}_token", None) or token
            setattr(self, f"{name}_token", value)
            setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(value))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template,
                                **kwargs)


class QwenVLImageTextProcessor(_ImagesOnly, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor (see _ImagesOnly)."""


class Qwen3VLImageTextProcessor(_ImagesOnly, Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor (see _ImagesOnly)."""


# ---------------------------------------------------------------------------------------------
# The two model families
# ---------------------------------------------------------------------------------------------
#
# Qwen2.5-VL (what the paper trained) and Qwen3-VL (2B / 4B / 8B, Instruct and Thinking) run
# through the same code. What differs between them is listed here, and handled where it says:
#
#   classes          the model, config and processor classes, and the stock names a saved
#                    folder must carry                                         -> Family
#   patch size       14 px vs 16 px; merge 2 x 2 in both, so one image token covers 28 vs
#                    32 px. Always read from the processor or config, never assumed (the PAPO
#                    mask keeps its 14-px squares on both, as the official Qwen3-VL branch does).
#   normalisation    CLIP mean / std vs 0.5 / 0.5: stored in the processor's own config.
#   3-D positions    both give image tokens (time, row, column) positions, by the same rule
#                    for pictures (videos differ); Qwen3-VL interleaves the three among the
#                    rotary frequencies instead of giving each a block - inside the model. Here
#                    positions come only from the model's own get_rope_index (speedups.rotary_positions)
#   vision features  Qwen3-VL (DeepStack) also adds features of a few vision layers to the
#                    first decoder layers' hidden states at the image tokens
#                                                      -> speedups.encode_each_picture_once
#   chat template    Qwen2.5-VL adds a default system turn; Qwen3-VL-Thinking's generation
#                    prompt opens a <think> block, so its answers start inside it
#                                                      -> prompt_opens_thinking, the format reward
#   special tokens   the same strings (and ids) in both; Qwen3's tokenizer adds <think> and
#                    </think> as ordinary tokens, so decoding keeps them.

@dataclasses.dataclass(frozen=True)
class Family:
    name: str                     # as users write it: --tiny-family, the README
    model_type: str               # config.json's "model_type"
    model_class: type             # ...ForConditionalGeneration
    config_class: type
    processor_class: type         # this project's images-only processor
    stock_processor: type         # the transformers class a saved folder names (AutoProcessor)
    stock_video_processor: str    # the video processor type such a folder names


FAMILIES = {f.model_type: f for f in (
    Family("qwen2.5-vl", "qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig,
           QwenVLImageTextProcessor, Qwen2_5_VLProcessor, "Qwen2VLVideoProcessor"),
    Family("qwen3-vl", "qwen3_vl", Qwen3VLForConditionalGeneration, Qwen3VLConfig,
           Qwen3VLImageTextProcessor, Qwen3VLProcessor, "Qwen3VLVideoProcessor"),
)}


def family_of(thing) -> Family:
    """The Family of a model, a config, a processor, or a config.json model_type string."""
    if isinstance(thing, ProcessorMixin):
        family = next((f for f in FAMILIES.values() if isinstance(thing, f.stock_processor)), None)
        if family is None:
            raise ValueError(f"{type(thing).__name__} is not the processor of a supported model "
                             f"family ({', '.join(f.name for f in FAMILIES.values())})")
        return family
    model_type = thing if isinstance(thing, str) else getattr(getattr(thing, "config", thing),
                                                              "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"{model_type!r} is not a supported model family; supported: "
                         + ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values()))
    return FAMILIES[model_type]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(processor) -> bool:
    """Whether the chat template's generation prompt opens a <think> block that it leaves open
    (Qwen3-VL-Thinking), so that a response starts INSIDE the thinking and has no opening tag.

    Decided by rendering the template, not by a name or a flag: what the model sees is what
    counts. The format reward reads this (rewards.format_reward(..., thinking_open=...))."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    opening = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    closed = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    added = opening.removeprefix(closed)        # what add_generation_prompt appends
    return added.rfind(THINK_OPEN) > added.rfind(THINK_CLOSE)


# The image processor settings that a video processor shares (same vision tower, same patching,
# same normalisation). Video-only knobs (frame sampling, fps) keep their class defaults.
_SHARED_WITH_VIDEO = ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                      "image_mean", "image_std", "do_convert_rgb", "patch_size",
                      "temporal_patch_size", "merge_size")


def save_processor(processor, folder) -> None:
    """processor.save_pretrained(folder), rewritten so the folder names transformers' STOCK classes.

    Why: this project's processor classes (_ImagesOnly) exist only because it runs without
    torchvision.
    A checkpoint, though, is also read by people with a normal GPU install (torchvision present)
    calling `AutoProcessor.from_pretrained(folder)`. AutoProcessor picks the class named by
    processor_config.json's "processor_class"; it does not know ours, and falls back to the
    tokenizer alone - no error, just a processor that cannot take images. So after saving:

      * "processor_class" becomes the stock class, "Qwen2_5_VLProcessor" or "Qwen3VLProcessor"
        (in processor_config.json and in tokenizer_config.json, which save_pretrained stamps
        too), the class such a user expects;
      * a nested "video_processor" entry is added, because the stock processor has a third part
        and transformers looks for its config first inside processor_config.json (then in
        video_preprocessor_config.json, then preprocessor_config.json). Its type is the
        family's (Qwen2VLVideoProcessor, Qwen3VLVideoProcessor) and its settings come from the saved
        image processor: same patch / temporal patch / merge sizes, same mean and std, and the
        same pixel budget `size` = {"shortest_edge": min pixels, "longest_edge": max pixels} -
        the key the video class reads (its min_pixels / max_pixels arguments only fill `size`).
        Falling back to the image processor's settings is also what transformers itself does for
        a folder with no video config.

    Loading stays torchvision-free: load_model uses our subclass, which has no video_processor
    argument, so the nested entry is simply ignored, and it forces the PIL image processor.
    Folders saved before this function existed (naming our class, no video entry) load there too.
    """
    family = family_of(processor)
    processor.save_pretrained(folder)
    folder = Path(folder)
    config_file = folder / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = family.stock_processor.__name__
    image = config["image_processor"]
    video = {key: image[key] for key in _SHARED_WITH_VIDEO if key in image}
    size = dict(image.get("size") or {})
    if "min_pixels" in image:                  # an older image processor that saved the budget flat
        size.setdefault("shortest_edge", image["min_pixels"])
    if "max_pixels" in image:
        size.setdefault("longest_edge", image["max_pixels"])
    if size:
        video["size"] = {k: size[k] for k in ("shortest_edge", "longest_edge") if k in size}
    video["video_processor_type"] = family.stock_video_processor
    config["video_processor"] = video
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tokenizer_file = folder / "tokenizer_config.json"
    if tokenizer_file.is_file():
        tokenizer_config = json.loads(tokenizer_file.read_text())
        if "processor_class" in tokenizer_config:
            tokenizer_config["processor_class"] = family.stock_processor.__name__
            tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False)
                                      + "\n")
