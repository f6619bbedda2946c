"""The real Qwen-VL architectures, by their published numbers, built with random weights.

    ARCHITECTURES             name -> Architecture: every width, depth and index of the model's
                              published config.json (the hub repository is named beside each)
    reduced(name, ...)        the same architecture with fewer decoder layers and / or vision
                              blocks and every width kept, so a CPU can run the REAL widths
    build(arch, ...)          a randomly initialised model of the real class and a processor
    OFFICIAL_MIN_PIXELS, ...  the training recipe's pixel budget (256 .. 1,280 image tokens)
    parameter_count(arch)     its parameters, counted without memory (the meta device)

Why random weights: what code does at scale - shapes, memory, the windows of the vision tower,
the M-RoPE sections, the shared-prefix and picture-once paths, LoRA's module names, FSDP's
units - does not depend on what the weights know. Every test and measurement that must see the
real sizes builds them here; the offline toy model (toy.py) stays tiny for speed.

The tokenizer is the offline one (toy.build_tokenizer, a few hundred tokens), with Qwen's
special tokens; the vocabulary of the embedding and lm_head is the real one (151,936 or 152,064)
unless a caller asks for the tokenizer's own (tests: a 400 x 2,048 embedding instead of 311M
parameters; everything else is the real width). The ids above the tokenizer's range that a
random model samples decode to nothing.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import model as qwen
import speedups
import toy

# The recipe's pixel budget (docs/reproducing.md): every raw picture is scaled into it before
# masking and processing; in Qwen2.5-VL's 28-px tokens, 256 .. 1,280 image tokens.
OFFICIAL_MIN_PIXELS, OFFICIAL_MAX_PIXELS = 200_704, 1_003_520


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    source: str        # the hub repository whose config.json / preprocessor_config.json these are
    family: str        # families.Family.name: "qwen2.5-vl" | "qwen3-vl"
    text: dict         # text_config entries (Qwen2.5-VL's config.json has them at its top level)
    vision: dict       # vision_config entries
    tie_embeddings: bool
    image: dict        # the image processor: patch, merge, mean / std, the processor's own range

    @property
    def text_layers(self) -> int:
        return self.text["num_hidden_layers"]

    @property
    def vision_blocks(self) -> int:
        return self.vision["depth"]


# Qwen2.5-VL's image processor (preprocessor_config.json of both sizes): 14-px patches, 2 x 2
# merge, CLIP's mean and std, and a processor range far wider than the training budget.
_QWEN25_IMAGE = dict(patch_size=14, merge_size=2, temporal_patch_size=2,
                     min_pixels=3_136, max_pixels=12_845_056)
# Qwen3-VL's (preprocessor_config.json of 2B / 4B / 8B): 16-px patches, mean = std = 0.5, size
# {"shortest_edge": 65,536, "longest_edge": 16,777,216}.
_QWEN3_IMAGE = dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=65_536,
                    max_pixels=16_777_216, image_mean=[0.5] * 3, image_std=[0.5] * 3)

# Qwen2.5-VL's vision tower, the same in 3B and 7B (their config.json's vision_config): 32 blocks
# of width 1,280 attending within 112-px windows (8 x 8 patches, 4 x 4 image tokens), except the
# full-attention blocks 7, 15, 23, 31 that see the whole picture.
_QWEN25_VISION = dict(depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420,
                      num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                      tokens_per_second=2)


def _qwen25_text(hidden, layers, heads, kv_heads, intermediate, vocab):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=128_000,
                # head_dim 128: a quarter of its 64 frequencies for time, 3/8 each for height
                # and width, in three consecutive blocks
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                 "mrope_section": [16, 24, 24]})


def _qwen3_text(hidden, layers, heads, intermediate, vocab):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=8, head_dim=128, intermediate_size=intermediate,
                vocab_size=vocab, hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False,
                max_position_embeddings=262_144,
                # the same 64 frequencies, INTERLEAVED among time, height and width
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                 "mrope_section": [24, 20, 20], "mrope_interleaved": True})


def _qwen3_vision(depth, hidden, intermediate, out, deepstack):
    # every block attends over the whole picture; a learned 48 x 48 position table; DeepStack
    # adds the features of three blocks to the first decoder layers' hidden states
    return dict(depth=depth, hidden_size=hidden, hidden_act="gelu_pytorch_tanh",
                intermediate_size=intermediate, num_heads=16, in_channels=3, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                out_hidden_size=out, deepstack_visual_indexes=deepstack)


ARCHITECTURES = {a.name: a for a in (
    Architecture("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl",
                 _qwen25_text(2048, 36, 16, 2, 11008, 151_936),
                 dict(_QWEN25_VISION, out_hidden_size=2048), True, _QWEN25_IMAGE),
    Architecture("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl",
                 _qwen25_text(3584, 28, 28, 4, 18944, 152_064),
                 dict(_QWEN25_VISION, out_hidden_size=3584), False, _QWEN25_IMAGE),
    Architecture("qwen3-vl-2b", "Qwen/Qwen3-VL-2B-Instruct (and -Thinking)", "qwen3-vl",
                 _qwen3_text(2048, 28, 16, 6144, 151_936),
                 _qwen3_vision(24, 1024, 4096, 2048, [5, 11, 17]), True, _QWEN3_IMAGE),
    Architecture("qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct (and -Thinking)", "qwen3-vl",
                 _qwen3_text(2560, 36, 32, 9728, 151_936),
                 _qwen3_vision(24, 1024, 4096, 2560, [5, 11, 17]), True, _QWEN3_IMAGE),
    Architecture("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct (and -Thinking)", "qwen3-vl",
                 _qwen3_text(4096, 36, 32, 12288, 151_936),
                 _qwen3_vision(27, 1152, 4304, 4096, [8, 16, 24]), False, _QWEN3_IMAGE),
)}


def reduced(name: str, text_layers: int | None = None,
            vision_blocks: int | None = None) -> Architecture:
    """ARCHITECTURES[name] with `text_layers` decoder layers and `vision_blocks` vision blocks
    (None: the real number), every width unchanged.

    What a shallower vision tower keeps, so that each kind of block still runs:
      Qwen2.5-VL  the real full-attention blocks that remain (7, 15, ...), and the last block
                  always attends over the whole picture, as the real tower's last block does;
                  the others attend within windows. 2 blocks: [windowed, full].
      Qwen3-VL    DeepStack's blocks at the same relative depth, i * blocks // depth: 2 blocks
                  of the 2B's 24 -> [0, 1] (from 5, 11, 17)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {list(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    layers = arch.text_layers if text_layers is None else text_layers
    blocks = arch.vision_blocks if vision_blocks is None else vision_blocks
    if not (1 <= layers <= arch.text_layers and 1 <= blocks <= arch.vision_blocks):
        raise ValueError(f"{name}: text layers must be 1..{arch.text_layers} and vision blocks "
                         f"1..{arch.vision_blocks} (got {layers}, {blocks})")
    vision = dict(arch.vision, depth=blocks)
    if "fullatt_block_indexes" in vision:
        full = [i for i in arch.vision["fullatt_block_indexes"] if i < blocks - 1]
        vision["fullatt_block_indexes"] = full + [blocks - 1]
    else:
        depth = arch.vision_blocks
        vision["deepstack_visual_indexes"] = sorted(
            {i * blocks // depth for i in arch.vision["deepstack_visual_indexes"]})
    suffix = "" if (layers, blocks) == (arch.text_layers, arch.vision_blocks) else \
        f" ({layers} of {arch.text_layers} layers, {blocks} of {arch.vision_blocks} blocks)"
    return dataclasses.replace(arch, name=arch.name + suffix,
                               text=dict(arch.text, num_hidden_layers=layers), vision=vision)


def config(arch: Architecture, tokenizer, vocab: int | None = None):
    """The transformers config of `arch`, with the special-token ids of `tokenizer` (the
    offline one: Qwen's strings at other ids) and `vocab` rows of embedding (None: the real)."""
    family = toy.family_classes(arch.family)
    token = tokenizer.convert_tokens_to_ids
    text = dict(arch.text, bos_token_id=token(qwen.ENDOFTEXT), eos_token_id=token(qwen.IM_END))
    if vocab is not None:
        text["vocab_size"] = vocab
    return family.config_class(
        text_config=text, vision_config=dict(arch.vision, out_hidden_size=arch.text["hidden_size"]),
        image_token_id=token(qwen.IMAGE_PAD), video_token_id=token(qwen.VIDEO_PAD),
        vision_start_token_id=token(qwen.VISION_START),
        vision_end_token_id=token(qwen.VISION_END), tie_word_embeddings=arch.tie_embeddings)


def build(arch: Architecture | str, *, seed: int = 0, dtype=torch.float32, device="cpu",
          vocab: int | str | None = None):
    """A randomly initialised model of `arch` (a name of ARCHITECTURES or reduced(...)) and its
    processor -> (model, processor).

    vocab: None = the real vocabulary; "tokenizer" = the offline tokenizer's few hundred ids
        (tests: every other width stays real); an int = that many.
    Built in place on `device` in `dtype`: a full 3B never exists as 15 GB of float32 on the way
    to bf16. The processor keeps the real image processor's patching, normalisation and range,
    so pictures in the training budget reach the model at their budget size."""
    arch = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    qwen3 = arch.family == "qwen3-vl"
    tokenizer = toy.build_tokenizer(toy.SIZES["tiny"]["vocab"], extra_tokens=(
        (qwen.THINK_OPEN, qwen.THINK_CLOSE) if qwen3 else ()))
    cfg = config(arch, tokenizer, len(tokenizer) if vocab == "tokenizer" else vocab)
    family = toy.family_classes(arch.family)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        net = family.model_class._from_config(cfg, dtype=dtype)
    qwen.fill_generation_config(net, tokenizer)        # the end-of-turn ids generate stops at
    speedups.patch_embed_as_matmul(net)                 # as load_model does
    template = toy.QWEN3_CHAT_TEMPLATE if qwen3 else toy.CHAT_TEMPLATE
    tokenizer.chat_template = template
    image = dict(arch.image)
    limits = image.pop("min_pixels"), image.pop("max_pixels")
    processor = family.processor_class(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=limits[0], max_pixels=limits[1],
                                                      **image),
        tokenizer=tokenizer, chat_template=template)
    return net, processor


def parameter_count(arch: Architecture | str, vocab: int | None = None) -> int:
    """Parameters of `arch`, counted on the meta device (no memory)."""
    net, _ = build(arch, dtype=torch.bfloat16, device="meta", vocab=vocab)
    return sum(p.numel() for p in net.parameters())

