"""bench.py - what PAPO costs on top of GRPO, phase by phase, on the same rollouts.

    python bench.py                          # CPU: the tiny and small offline models (1-3 min)
    python bench.py --out bench.json         # the same, and every number as JSON
    python bench.py --shape 3b               # GPU: a Qwen2.5-VL-3B-shaped model, random weights
    python bench.py --shape 3b-mini          # the 3B code path with tiny widths, on a CPU

Three objectives train on the SAME rollouts, each from a copy of the SAME initial weights:

    grpo           the baseline (preset grpo)
    papo-g         + the Implicit Perception Loss, masked branch detached (official): one extra
                   no-gradient forward per rollout batch, on the masked images
    papo-g+grad    the same with --perception-grad: the masked branch is recomputed WITH gradient
                   in every update (a forward and a backward more per micro-batch)

Every phase is timed by calling train.py's own function for it, so the bench measures the code
that trains:

    generate   train.generate_phase without masking      once per repeat, shared by all three
    mask       train.generate_phase with masking, its generation replayed from the rollouts it
               already made: what is left is masking the pictures and re-processing them
    old / ref / masked   train.score_phase (no-gradient log-probs), one part at a time
    update     train.update_phase: forward, backward and AdamW over the mini-batches

Times are medians over --repeats after --warmup repeats; within a repeat the objectives take
turns in a rotating order, so a machine that gets busier slows them alike.

Targets, printed against their limits with PASS / FAIL:

  1. The physical minimum of PAPO-G's extra cost is one no-gradient forward of the rollout batch
     on the masked images. PAPO-G step - GRPO step <= 1.1 x that forward; masking and
     re-processing the images < 5% of a PAPO-G step; peak memory PAPO-G / GRPO <= 1.10.
  2. model.completion_logprobs' peak memory <= 25% of the naive log_softmax + gather
     (model.naive_completion_logprobs) with a 151,936-token vocabulary and 1,024 completion
     tokens, same log-probs to 1e-5 (no gradient: how old / ref / masked log-probs are made).
  3. Rollouts keep the KV cache with gradient checkpointing on: generate's tokens/s with
     checkpointing on >= 0.8 x off, and the language model sees ONE new position per generated
     token (with use_cache forced off, as a control, it re-reads the whole sequence each step).

Random weights: a random model rarely samples an end-of-sequence token, so nearly every response
runs to --max-new-tokens. That is intended: every step does the same, known amount of work.

Memory is the peak during a step (score + update) of the tensors a training process holds - the
policy, the reference copy, the rollout batch - plus everything the step allocates on top
(gradients, AdamW state, activations, logits chunks). GPU: torch.cuda.max_memory_allocated. CPU:
the resident set size, measured inside this one process; see PeakMemory for why that is honest
and the "memory_probe" field of the JSON for a check against a known allocation.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import functools
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import model as qwen
import toy
import train

MIB = 2 ** 20


# ---------------------------------------------------------------------------------------------
# 1. The models: the offline sizes of model.py, and the Qwen2.5-VL-3B shape with random weights
# ---------------------------------------------------------------------------------------------

# Qwen2.5-VL-3B-Instruct's architecture. Random weights: the bench measures work, and the work of a
# forward pass does not depend on what the weights know.
QWEN_3B = dict(
    hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151_936,
    rope_theta=1_000_000.0, mrope_section=[16, 24, 24], max_positions=128_000, rms_eps=1e-6,
    vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420,
    fullatt_blocks=[7, 15, 23, 31], window=112, patch=14, merge=2, temporal_patch=2,
    tie_embeddings=True,
    # toy pictures drawn at 448 px and never downscaled: 32 x 32 patches -> 256 image tokens,
    # and 4 x 4 attention windows of 112 px in the vision tower
    image_size=448)

SHAPES = {
    "3b": QWEN_3B,
    # The same structure - 36 + 32 blocks, 8 query heads per KV head, full-attention vision blocks
    # 7/15/23/31, windows, the 151,936-token tied vocabulary - with tiny widths, so that the exact
    # code path of --shape 3b runs (and is tested) on a CPU. head_dim 16 keeps mrope's 1/4, 3/8,
    # 3/8 split of [16, 24, 24].
    "3b-mini": dict(QWEN_3B, hidden=128, heads=8, kv_heads=1, intermediate=512,
                    mrope_section=[2, 3, 3], vision_hidden=128, vision_heads=8,
                    vision_intermediate=256, image_size=112),
}

# For target 2: tiny widths and Qwen's real vocabulary, so that the logits dominate memory as they
# do for the real model (1,024 positions x 151,936 x 4 bytes = 594 MiB per copy).
LOGPROB_SHAPE = dict(QWEN_3B, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                     mrope_section=[2, 3, 3], max_positions=4096, vision_hidden=64,
                     vision_depth=2, vision_heads=4, vision_intermediate=128, fullatt_blocks=[1],
                     image_size=112)


def shaped_config(shape: dict, tokenizer) -> Qwen2_5_VLConfig:
    """The Qwen2_5_VLConfig of `shape`, with the special-token ids of `tokenizer`."""
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = shape["hidden"] // shape["heads"]
    if sum(shape["mrope_section"]) != head_dim // 2:    # else the first forward fails, obscurely
        raise ValueError(f"mrope_section {shape['mrope_section']} must sum to head_dim // 2 = "
                         f"{head_dim // 2}")
    text = dict(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"],
        max_position_embeddings=shape["max_positions"], rms_norm_eps=shape["rms_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"],
                         "mrope_section": shape["mrope_section"]},
        bos_token_id=token_id(qwen.ENDOFTEXT), eos_token_id=token_id(qwen.IM_END))
    vision = dict(
        depth=shape["vision_depth"], hidden_size=shape["vision_hidden"],
        num_heads=shape["vision_heads"], intermediate_size=shape["vision_intermediate"],
        out_hidden_size=shape["hidden"], patch_size=shape["patch"],
        spatial_merge_size=shape["merge"], temporal_patch_size=shape["temporal_patch"],
        fullatt_block_indexes=shape["fullatt_blocks"], window_size=shape["window"])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=token_id(qwen.IMAGE_PAD), video_token_id=token_id(qwen.VIDEO_PAD),
        vision_start_token_id=token_id(qwen.VISION_START),
        vision_end_token_id=token_id(qwen.VISION_END),
        tie_word_embeddings=shape["tie_embeddings"])


def build_shaped_model(shape: dict, *, seed: int, dtype: torch.dtype, device: torch.device):
    """A randomly initialised Qwen2_5_VLForConditionalGeneration of `shape`, and a processor.

    The processor is the offline tiny model's - its tokenizer only ever produces ids below 400 -
    while the model's vocabulary has the real size, so the embedding, lm_head and every logits
    chunk are as large as the real model's. A random model does sample the other ids; they
    decode to nothing, which only matters to the reward (0 either way). The image processor
    keeps pictures up to shape["image_size"] pixels square at full size."""
    tokenizer = qwen.build_tokenizer(qwen.SIZES["tiny"]["vocab"])
    config = shaped_config(shape, tokenizer)
    torch.manual_seed(seed)
    # Built in place, in its dtype: a 3B model first built in float32 on the CPU would take 15 GB
    # and minutes of random initialisation before it ever reached the GPU.
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    qwen._fill_generation_config(model, tokenizer)     # the end-of-turn ids generate stops at
    size = shape["image_size"]
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=size * size, patch_size=shape["patch"],
        temporal_patch_size=shape["temporal_patch"], merge_size=shape["merge"])
    processor = qwen.QwenVLImageTextProcessor(image_processor=image_processor,
                                              tokenizer=tokenizer, chat_template=qwen.CHAT_TEMPLATE)
    return model, processor


def build_model(name: str, *, seed: int, dtype: torch.dtype, device: torch.device):
    """(model, processor, picture size in pixels) for an offline size (model.SIZES) or a SHAPES
    entry."""
    if name in SHAPES:
        model, processor = build_shaped_model(SHAPES[name], seed=seed, dtype=dtype, device=device)
        return model, processor, SHAPES[name]["image_size"]
    model, processor = qwen.build_tiny_model(seed=seed, size=name)
    # the toy pictures at the largest size the tiny processor keeps unscaled
    image_size = int(qwen.SIZES[name]["max_pixels"] ** 0.5)
    return model.to(device=device, dtype=dtype), processor, image_size


def set_checkpointing(net, on: bool) -> None:
    """Gradient checkpointing on or off, through model.py's own switch (the one load_model uses)."""
    if on:
        qwen._enable_gradient_checkpointing(net)
    else:
        # activation_checkpointing_disable is the name since transformers 5.x (as in model.py)
        disable = getattr(net, "activation_checkpointing_disable", None)
        (disable or net.gradient_checkpointing_disable)()


# ---------------------------------------------------------------------------------------------
# 2. Measuring: clocks and peak memory
# ---------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: a clock read without this measures only the kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: torch.device):
    """(fn(), seconds it took)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):      # not glibc (macOS, musl): no malloc_trim
        return None


def cpu_peak_unsupported() -> str | None:
    """Why CPU peak memory cannot be measured in this process, or None if it can."""
    if _libc_malloc_trim() is None:
        return "needs glibc's malloc_trim"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
    except (OSError, KeyError):
        return "needs Linux >= 4.0 (/proc/self/clear_refs, VmHWM)"
    return None


class PeakMemory:
    """Peak memory of a block of code above what was in use when it began: `.extra` bytes.

    GPU: torch.cuda.max_memory_allocated - memory_allocated at the start (tensors only).

    CPU: the peak resident set size (VmHWM) - the resident size at the start. Two steps make that
    honest inside one long-lived process. First, malloc_trim(0) hands the memory that earlier work
    freed back to the kernel; otherwise the block could reuse it without the resident size
    growing, and the later of two measurements would look smaller than it is. Then writing 5 to
    /proc/self/clear_refs resets the high-water mark to the current resident size (Linux >= 4.0),
    so that an earlier, larger peak cannot hide this one. Resolution: pages, plus about 1 MiB that
    the interpreter and the allocator take on their own (the probe reads ~65.3 for 64 MiB).
    `.extra` is None where neither method is available (see cpu_peak_unsupported)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra: int | None = None

    def __enter__(self):
        gc.collect()                                    # tensors in reference cycles go now
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif cpu_peak_unsupported() is None:            # (this also resets the high-water mark)
            _libc_malloc_trim()(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _proc_status_kib("VmRSS") * 1024
        else:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.extra = _proc_status_kib("VmHWM") * 1024 - self.start
        return False


def memory_probe(device: torch.device) -> float | None:
    """MiB that PeakMemory reports for a block that allocates exactly 64 MiB: the method's check."""
    with PeakMemory(device) as mem:
        block = torch.ones(64 * MIB // 4, device=device)     # float32: 64 MiB, every page touched
        del block
    return None if mem.extra is None else mem.extra / MIB


def tensor_bytes(*things) -> int:
    """Bytes of the distinct tensor storages held by modules (parameters, buffers) and by
    dataclasses (tensor fields, recursively) - shared storages counted once, as memory is."""
    seen: dict[tuple, int] = {}

    def visit(x):
        if x is None:
            return
        if torch.is_tensor(x):
            storage = x.untyped_storage()
            seen[(x.device.type, storage.data_ptr())] = storage.nbytes()
        elif isinstance(x, torch.nn.Module):
            for t in (*x.parameters(), *x.buffers()):
                visit(t)
        elif dataclasses.is_dataclass(x):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))

    for thing in things:
        visit(thing)
    return sum(seen.values())


def median(values) -> float:
    """Medians, not means: one repeat slowed by another job on the machine should not count."""
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# 3. One model's setup: the policy, its reference copy, the three configurations, ONE batch
# ---------------------------------------------------------------------------------------------

# The three objectives, as train.py's own command line would give them.
OBJECTIVES = {
    "grpo": ["--preset", "grpo"],
    "papo-g": ["--preset", "papo-g"],
    "papo-g+grad": ["--preset", "papo-g", "--perception-grad"],
}
PHASES = ("generate", "mask", "old", "ref", "masked", "update")
STEP = 1   # the step number handed to train.py (it only seeds the update's mini-batch order)


@dataclasses.dataclass
class Setup:
    name: str
    policy: torch.nn.Module
    ref: torch.nn.Module
    processor: object
    prompts: list                    # the step's data.Examples, in collect_batch's order
    cfgs: dict                       # objective -> train.Config
    d: train.Dist
    initial: dict                    # the policy's initial state_dict, on the CPU
    batch: train.Batch               # the shared rollout batch, masked images included
    seed: int                        # generation seed of the step
    checkpointing: bool


def objective_configs(args) -> dict:
    """train.Config of each objective: the preset, then the bench's sizes."""
    common = ["--prompts-per-step", str(args.prompts), "--group-size", str(args.group_size),
              "--max-new-tokens", str(args.max_new_tokens),
              "--updates-per-step", str(args.updates_per_step),
              "--micro-batch-size", str(args.micro_batch_size), "--seed", str(args.seed),
              # train.py's dtype: "auto" = float32 master weights, bf16 autocast on a GPU
              "--dtype", "bfloat16" if args.dtype == "bfloat16" else "auto",
              "--gradient-checkpointing" if args.gradient_checkpointing
              else "--no-gradient-checkpointing"]
    cfgs = {name: train.parse_config(flags + common) for name, flags in OBJECTIVES.items()}
    for cfg in cfgs.values():
        train.check_config(cfg, world_size=1)
    return cfgs


def prepare(name: str, args, device: torch.device) -> Setup:
    """Build the model, its reference copy (as train.build_policy does: beta > 0 in both
    presets) and the step's rollout batch - generated ONCE, with the masked images, by
    train.collect_batch itself. Every objective is then scored and updated on this batch."""
    dtype = getattr(torch, args.dtype)
    policy, processor, image_size = build_model(name, seed=args.seed, dtype=dtype, device=device)
    set_checkpointing(policy, args.gradient_checkpointing)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    policy.train()
    # On the CPU so that it is not counted in GPU memory: it exists only for the bench.
    initial = {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}
    rng = np.random.default_rng(args.seed)
    examples = [toy.toy_example(rng, image_size=image_size) for _ in range(args.prompts)]
    cfgs = objective_configs(args)
    d = train.Dist(device=device)
    batch, _, _ = train.collect_batch(policy, processor, examples, cfgs["papo-g"], d, STEP, 0,
                                      need_masked=True)
    # collect_batch's own draw and seed, so that re-generating reproduces this batch
    prompts, _ = train.draw_prompts(examples, cfgs["papo-g"], d, 0, args.prompts)
    seed = train.step_seed(cfgs["papo-g"], STEP, d.rank)
    return Setup(name, policy, ref, processor, prompts, cfgs, d, initial, batch, seed,
                 args.gradient_checkpointing)


# ---------------------------------------------------------------------------------------------
# 4. The phases of a step, timed
# ---------------------------------------------------------------------------------------------

def time_generate(s: Setup, cfg=None):
    """One generation of the step's rollouts (no masking) -> (rollouts, seconds)."""
    cfg = cfg or s.cfgs["grpo"]
    (rollouts, _), seconds = clock(lambda: train.generate_phase(
        s.policy, s.processor, s.prompts, cfg, s.seed, need_masked=False), s.d.device)
    return rollouts, seconds


@contextlib.contextmanager
def replayed_generation(rollouts):
    """Make model.generate_rollouts return `rollouts` at once. train.generate_phase then does
    nothing but its PAPO work - mask the pictures, re-process them, check the grid - which is
    how the bench times exactly that code, without copying it."""
    original = qwen.generate_rollouts
    qwen.generate_rollouts = lambda *args, **kwargs: rollouts
    try:
        yield
    finally:
        qwen.generate_rollouts = original


def time_mask(s: Setup, cfg) -> float:
    """Seconds that train.generate_phase spends on PAPO's own work: masking the pictures,
    re-processing them and checking their grid. With generation replayed, the phase is timed
    with need_masked=True and with need_masked=False, and the difference is returned; what the
    two calls share (the prompts' chat messages, seeding) is paid by GRPO too, inside the shared
    "generate" phase, so it must not be counted twice."""
    with replayed_generation(s.batch.rollouts):
        (_, masked), with_mask = clock(lambda: train.generate_phase(
            s.policy, s.processor, s.prompts, cfg, s.seed, need_masked=True), s.d.device)
        _, without = clock(lambda: train.generate_phase(
            s.policy, s.processor, s.prompts, cfg, s.seed, need_masked=False), s.d.device)
    if masked is None or not torch.equal(masked.pixel_values, s.batch.masked.pixel_values):
        raise RuntimeError("bench: the replayed masking made different masked images")
    return max(with_mask - without, 0.0)


# train.score_phase computes the three kinds of no-gradient log-probs in one call, each under its
# own condition: old if updates_per_step > 1, ref if beta > 0, masked if the batch carries masked
# images and --perception-grad is off. Called once per part with the other two conditions
# switched off, it is timed part by part and still runs its own code.
SCORE_PARTS = {"old": "old_logp", "ref": "ref_logp", "masked": "masked_logp"}


def _only(part: str, cfg, batch):
    """(cfg, batch) under which score_phase computes `part` and nothing else; the batch is a
    shallow copy with no log-probs yet, so that what the call made can be checked."""
    blank = dict(old_logp=None, ref_logp=None, masked_logp=None, masked_entropy=None)
    if part == "old":
        return (dataclasses.replace(cfg, beta=0.0),
                dataclasses.replace(batch, masked=None, **blank))
    if part == "ref":
        return (dataclasses.replace(cfg, updates_per_step=1),
                dataclasses.replace(batch, masked=None, **blank))
    return (dataclasses.replace(cfg, updates_per_step=1, beta=0.0),
            dataclasses.replace(batch, **blank))


def run_step(s: Setup, objective: str, memory: bool = False) -> dict:
    """Score and update one objective on the shared batch, from the initial weights.

    Returns the seconds of each phase (0.0 for a phase the objective does not have), or with
    memory=True the step's peak memory instead: the larger of (tensors held before scoring +
    what scoring allocates) and (tensors held before the update + what the update allocates)."""
    cfg = s.cfgs[objective]
    uses_mask = train.uses_masked_branch(cfg)
    times = dict.fromkeys(PHASES, 0.0)
    if uses_mask and not memory:
        times["mask"] = time_mask(s, cfg)
    s.policy.load_state_dict(s.initial)          # every objective starts from the same weights
    # a fresh optimizer, as in train.main; its state is allocated in the first update (counted)
    optimizer = torch.optim.AdamW([p for p in s.policy.parameters() if p.requires_grad],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    # a shallow copy: score_phase fills ITS fields; GRPO never sees the masked images
    batch = dataclasses.replace(s.batch, masked=s.batch.masked if uses_mask else None)
    resident = tensor_bytes(s.policy, s.ref, batch)
    expected = {"old": cfg.updates_per_step > 1, "ref": cfg.beta > 0,
                "masked": uses_mask and not cfg.perception_grad}
    watch = lambda: PeakMemory(s.d.device) if memory else contextlib.nullcontext()
    with watch() as mem_score:
        for part, field in SCORE_PARTS.items():
            part_cfg, part_batch = _only(part, cfg, batch)
            _, seconds = clock(lambda: train.score_phase(part_batch, s.policy, s.ref, part_cfg,
                                                         s.d), s.d.device)
            made = {p for p, f in SCORE_PARTS.items() if getattr(part_batch, f) is not None}
            if made != ({part} if expected[part] else set()):   # score_phase's rules changed
                raise RuntimeError(f"bench: train.score_phase made {sorted(made) or 'nothing'} "
                                   f"where the bench expected only {part!r} for {objective}; "
                                   "update bench._only")
            if expected[part]:
                times[part] = seconds
                setattr(batch, field, getattr(part_batch, field))
                if part == "masked":
                    batch.masked_entropy = part_batch.masked_entropy
                    batch.masked = part_batch.masked   # score_phase drops the masked pictures
    # What the update starts from: score_phase has released what it no longer needs (the masked
    # pictures), so the two phases' peaks are measured apart and the larger one is the step's.
    resident_update = tensor_bytes(s.policy, s.ref, batch)
    with watch() as mem_update:
        _, times["update"] = clock(lambda: train.update_phase(batch, s.policy, optimizer, cfg,
                                                              s.d, STEP), s.d.device)
    del optimizer
    if memory:
        if mem_score.extra is None or mem_update.extra is None:
            return {"peak_mib": None, "resident_mib": resident / MIB, "step_extra_mib": None}
        peak = max(resident + mem_score.extra, resident_update + mem_update.extra)
        return {"peak_mib": peak / MIB, "resident_mib": resident / MIB,
                "step_extra_mib": (peak - resident) / MIB}
    return times


def bench_objectives(s: Setup, args) -> dict:
    """The timed repeats, then one memory pass per objective (kept apart: resetting the memory
    counters hands freed pages back to the kernel, and faulting them in again would slow the
    timed step)."""
    names = list(OBJECTIVES)
    runs = {name: [] for name in names}
    for r in range(args.warmup + args.repeats):
        rollouts, generate_s = time_generate(s)
        if r == 0:   # the rollouts every objective is scored on are what generation makes
            reproducible = torch.equal(rollouts.completion_ids, s.batch.rollouts.completion_ids)
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times = run_step(s, name)
            times["generate"] = generate_s      # shared: one generation serves every objective
            times["step"] = sum(times[p] for p in PHASES)
            if r >= args.warmup:
                runs[name].append(times)
        log(f"{s.name}: repeat {r + 1}/{args.warmup + args.repeats}"
            f"{' (warm-up)' if r < args.warmup else ''}")
    memory = {name: run_step(s, name, memory=True) for name in names}
    return {"runs": runs, "memory": memory, "rollouts_reproducible": reproducible}


# ---------------------------------------------------------------------------------------------
# 5. Target 3: generation keeps the KV cache with gradient checkpointing on
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def kv_cache_forced_off(net):
    """generate_rollouts hands generate a GenerationConfig with use_cache=True; this wraps the
    model's generate (an instance attribute shadows the method) to pass a copy without cache."""
    def generate(*args, generation_config, **kwargs):
        config = copy.deepcopy(generation_config)
        config.use_cache = False
        return type(net).generate(net, *args, generation_config=config, **kwargs)

    net.generate = generate
    try:
        yield
    finally:
        del net.generate                  # the instance attribute goes, the method is back


GENERATION_VARIANTS = {                 # name: (gradient checkpointing, KV cache)
    "checkpointing on": (True, True),
    "checkpointing off": (False, True),
    "checkpointing on, use_cache off": (True, False),
}


def bench_generation(s: Setup, args) -> dict:
    """Tokens/s of train.generate_phase on the step's prompts with checkpointing on and off, and
    with the KV cache forced off as a control, the policy in train mode as during training.

    A forward pre-hook on the language model records how many positions each call processes. With
    the cache: the prompt once, then 1 per generated token. Without: the whole sequence again at
    every step."""
    cfg = dataclasses.replace(s.cfgs["grpo"], max_new_tokens=args.cache_tokens)
    net = s.policy
    seen: list[int] = []
    hook = net.model.language_model.register_forward_pre_hook(
        lambda module, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    names = list(GENERATION_VARIANTS)
    runs = {name: [] for name in names}
    calls = {}
    try:
        for r in range(args.warmup + args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                checkpointing, cache = GENERATION_VARIANTS[name]
                set_checkpointing(net, checkpointing)
                net.train()
                seen.clear()
                with (contextlib.nullcontext() if cache else kv_cache_forced_off(net)):
                    rollouts, seconds = time_generate(s, cfg)
                new_tokens = rollouts.completion_ids.numel()       # rows x decoding steps
                calls[name] = (list(seen), rollouts.prompt_ids.shape[1],
                               rollouts.completion_ids.shape[1])
                if r >= args.warmup:
                    runs[name].append(new_tokens / seconds)
    finally:
        hook.remove()
        set_checkpointing(net, s.checkpointing)
        net.train()
    out = {}
    for name in names:
        seen_calls, P, T = calls[name]
        out[name] = {
            "tokens_per_s": median(runs[name]),
            # positions the language model processed per row, per generated token
            "positions_per_token": sum(seen_calls) / T,
            "kv_cache_used": seen_calls == [P] + [1] * (T - 1),
            "new_tokens": T, "prompt_tokens": P}
    return out


# ---------------------------------------------------------------------------------------------
# 6. Target 2: memory of the chunked log-probs against the naive full log_softmax
# ---------------------------------------------------------------------------------------------

def bench_logprob_memory(args, device: torch.device) -> dict:
    """Peak memory of model.completion_logprobs and of model.naive_completion_logprobs on one
    rollout of `--logprob-tokens` completion tokens, vocabulary 151,936, no gradient; and the
    largest difference of their log-probs. float32 without autocast: both must give the same
    numbers, and bf16 matrix products of different shapes round differently."""
    model, processor = build_shaped_model(LOGPROB_SHAPE, seed=args.seed, dtype=torch.float32,
                                          device=device)
    model.eval()
    T = args.logprob_tokens
    prompt = toy.toy_example(np.random.default_rng(args.seed)).to_prompt()
    # a prompt encoded exactly as in RL, then T completion tokens drawn from the tokenizer's
    # ordinary ids (0..6 are the special tokens)
    base = qwen.rollouts_from_texts(processor, [prompt], [""])
    ids = torch.randint(7, len(processor.tokenizer), (1, T),
                        generator=torch.Generator().manual_seed(args.seed))       # [1, T]
    rollouts = dataclasses.replace(base, completion_ids=ids, completion_mask=torch.ones(1, T),
                                   texts=[""]).to(device)
    chunk = args.logprob_chunk_size
    methods = {"naive": qwen.naive_completion_logprobs,
               "chunked": functools.partial(qwen.completion_logprobs, chunk_size=chunk)}
    out, logps = {}, {}
    for name, fn in methods.items():
        with torch.no_grad(), PeakMemory(device) as mem:
            logps[name] = fn(model, rollouts)                                     # [1, T]
        out[f"{name}_mib"] = None if mem.extra is None else mem.extra / MIB
    naive, chunked = out["naive_mib"], out["chunked_mib"]
    out.update(
        vocab=model.config.text_config.vocab_size, completion_tokens=T,
        prompt_tokens=rollouts.prompt_ids.shape[1], chunk_size=chunk,
        ratio=None if naive is None else chunked / naive,
        max_abs_diff=float((logps["naive"] - logps["chunked"]).abs().max()),
        logp_mean=float(logps["chunked"].mean()))
    return out


# ---------------------------------------------------------------------------------------------
# 7. Summaries, targets, the table
# ---------------------------------------------------------------------------------------------

def summarise(s: Setup, result: dict) -> dict:
    """Medians of every phase, the PAPO/GRPO ratios and target 1's three quantities."""
    runs, memory = result["runs"], result["memory"]
    phases = {name: {p: median([t[p] for t in ts]) for p in (*PHASES, "step")}
              for name, ts in runs.items()}
    for name, ts in runs.items():
        phases[name]["step_without_generate"] = median([t["step"] - t["generate"] for t in ts])
    ratios = {}
    for name in ("papo-g", "papo-g+grad"):
        ratios[name] = {
            "step": phases[name]["step"] / phases["grpo"]["step"],
            "step_without_generate": (phases[name]["step_without_generate"]
                                      / phases["grpo"]["step_without_generate"]),
            "update": phases[name]["update"] / phases["grpo"]["update"],
            "memory": (None if memory[name]["peak_mib"] is None
                       else memory[name]["peak_mib"] / memory["grpo"]["peak_mib"])}
    # Target 1, paired by repeat: both objectives of a repeat share its generation, so the
    # difference of their steps is PAPO-G's own extra work (masking, the masked forward, the
    # perception term in the update).
    extra = median([p["step"] - g["step"] for p, g in zip(runs["papo-g"], runs["grpo"])])
    forward = phases["papo-g"]["masked"]
    r = s.batch.rollouts
    eos = torch.tensor(s.policy.generation_config.eos_token_id, device=r.completion_ids.device)
    return {
        "parameters": sum(p.numel() for p in s.policy.parameters()),
        "rollouts": len(r), "prompts": len(s.prompts), "group_size": r.num_samples,
        "prompt_tokens": r.prompt_ids.shape[1], "new_tokens": r.completion_ids.shape[1],
        "image_tokens_per_rollout": int(r.mm_token_type_ids[0].sum()),
        "mean_response_tokens": float(r.completion_mask.sum(1).mean()),
        "fraction_ended_by_eos": float(torch.isin(r.completion_ids, eos).any(1).float().mean()),
        "rollouts_reproducible": result["rollouts_reproducible"],
        "phases_s": phases, "ratios_to_grpo": ratios, "memory": memory,
        "papo_g_extra_s": extra, "masked_forward_s": forward,
        "extra_over_forward": extra / forward if forward > 0 else None,
        "mask_share_of_step": phases["papo-g"]["mask"] / phases["papo-g"]["step"],
    }


def target(name: str, model: str, value, limit: float, higher_is_better: bool = False,
           passed: bool | None = None, note: str = "") -> dict:
    """One row of the targets table; `passed` overrides the plain comparison with the limit, and
    None (no value: memory not measurable here) prints as n/a."""
    if passed is None and value is not None:
        passed = value >= limit if higher_is_better else value <= limit
    return {"target": name, "model": model, "value": value, "limit": limit,
            "comparison": ">=" if higher_is_better else "<=", "pass": passed, "note": note}


def collect_targets(models: dict, logprob: dict) -> list[dict]:
    """The three targets of the issue, per model where they depend on the model."""
    rows = []
    for name, m in models.items():
        rows.append(target("1. (PAPO-G step - GRPO step) / masked forward", name,
                           m["extra_over_forward"], 1.1,
                           note=f"{m['papo_g_extra_s']:.4f} s extra vs a "
                                f"{m['masked_forward_s']:.4f} s no-gradient forward on the "
                                "masked images"))
        rows.append(target("1. masking + re-processing share of a PAPO-G step", name,
                           m["mask_share_of_step"], 0.05))
        rows.append(target("1. peak memory PAPO-G / GRPO", name,
                           m["ratios_to_grpo"]["papo-g"]["memory"], 1.10,
                           note="" if m["memory"]["grpo"]["peak_mib"] is not None
                           else "peak memory not measurable here"))
    same = logprob["max_abs_diff"] <= 1e-5
    rows.append(target("2. completion_logprobs / naive peak memory", "vocab "
                       f"{logprob['vocab']}, {logprob['completion_tokens']} tokens",
                       logprob["ratio"], 0.25,
                       passed=(None if logprob["ratio"] is None
                               else logprob["ratio"] <= 0.25 and same),
                       note=f"max |logp difference| {logprob['max_abs_diff']:.1e} (limit 1e-5)"))
    for name, m in models.items():
        g = m["generation"]
        on, off = g["checkpointing on"], g["checkpointing off"]
        control = g["checkpointing on, use_cache off"]
        rows.append(target("3. generate tokens/s, checkpointing on / off", name,
                           on["tokens_per_s"] / off["tokens_per_s"], 0.8, higher_is_better=True,
                           passed=on["tokens_per_s"] >= 0.8 * off["tokens_per_s"]
                           and on["kv_cache_used"],
                           note=f"KV cache used with checkpointing on: {on['kv_cache_used']}; "
                                f"positions per new token {on['positions_per_token']:.2f} "
                                f"(use_cache off: {control['positions_per_token']:.2f}, "
                                f"{control['tokens_per_s']:.0f} tokens/s)"))
    return rows


def format_report(report: dict) -> str:
    """The report as the table printed on stdout (the JSON holds the same numbers)."""
    dev = report["device"]
    lines = [f"PAPO cost benchmark - {report['date']} - {dev['description']}",
             f"torch {dev['torch']}, transformers {dev['transformers']}, load average "
             f"{report['load_average'][0]:.1f} -> {report['load_average'][1]:.1f} on "
             f"{dev['cpus']} CPUs", report["note"]]
    lines += [""]
    for name, m in report["models"].items():
        s = report["settings"]
        lines.append(
            f"== {name}: {m['parameters'] / 1e6:.2f}M parameters, {m['rollouts']} rollouts "
            f"({m['prompts']} prompts x G={m['group_size']}), prompt {m['prompt_tokens']} tokens "
            f"({m['image_tokens_per_rollout']} image), {m['new_tokens']} new tokens (mean "
            f"response {m['mean_response_tokens']:.1f}), {s['dtype']}, checkpointing "
            f"{'on' if s['gradient_checkpointing'] else 'off'}; medians of {s['repeats']} "
            f"repeats after {s['warmup']} warm-up")
        names = list(m["phases_s"])
        lines.append(f"{'seconds':28s}" + "".join(f"{n:>14s}" for n in names))
        labels = {"generate": "generate (shared)", "mask": "mask + re-process images",
                  "old": "old log-probs", "ref": "ref log-probs",
                  "masked": "masked log-probs (no grad)", "update": "update (fwd+bwd+AdamW)",
                  "step": "step", "step_without_generate": "step without generate"}
        for key, label in labels.items():
            lines.append(f"{label:28s}" + "".join(
                f"{m['phases_s'][n][key]:14.4f}" if m["phases_s"][n][key] else f"{'-':>14s}"
                for n in names))
        lines.append(f"{'peak memory (MiB)':28s}" + "".join(
            f"{m['memory'][n]['peak_mib']:14.1f}" if m["memory"][n]["peak_mib"] is not None
            else f"{'n/a':>14s}" for n in names))
        lines.append(f"{'  of which step allocates':28s}" + "".join(
            f"{m['memory'][n]['step_extra_mib']:14.1f}" if m["memory"][n]["step_extra_mib"]
            is not None else f"{'n/a':>14s}" for n in names))
        for key, label in (("step", "ratio to grpo: step"),
                           ("step_without_generate", "  step without generate"),
                           ("update", "  update"), ("memory", "  peak memory")):
            lines.append(f"{label:28s}{'1.000':>14s}" + "".join(
                f"{m['ratios_to_grpo'][n][key]:14.3f}" if m["ratios_to_grpo"][n][key] is not None
                else f"{'n/a':>14s}" for n in names[1:]))
        lines.append("generate, same prompts     tokens/s   positions read per new token")
        for variant, g in m["generation"].items():
            lines.append(f"  {variant:32s} {g['tokens_per_s']:8.0f}   "
                         f"{g['positions_per_token']:8.2f}")
        lines.append("")
    lp = report["logprob_memory"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f} MiB"
    lines.append(f"log-probs of {lp['completion_tokens']} completion tokens, vocabulary "
                 f"{lp['vocab']}, no gradient: naive {fmt(lp['naive_mib'])}, chunked "
                 f"(chunk_size {lp['chunk_size']}) {fmt(lp['chunked_mib'])}, max |difference| "
                 f"{lp['max_abs_diff']:.1e}")
    probe = report["memory_probe_mib"]
    lines.append(f"memory method: {report['memory_method']}; a 64 MiB probe measures "
                 f"{'n/a' if probe is None else f'{probe:.1f} MiB'}")
    lines.append("")
    lines.append("targets")
    for t in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  [{verdict}] {t['target']:50s} {t['model']:24s} {value:>7s} "
                     f"{t['comparison']} {t['limit']}" + (f"   ({t['note']})" if t["note"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 8. Command line
# ---------------------------------------------------------------------------------------------

# Defaults per kind of run. CPU: tiny + small together take about 2-3 minutes on 2 cores. 3b: the
# issue's G = 5, 8 prompts, 512 new tokens; bf16 weights because float32 master weights, their
# gradients, AdamW's two moments and the float32 reference copy of ~3.75B parameters need ~75 GB,
# all of one H100 (--dtype float32 gives train.py's fp32 + bf16 autocast where memory allows).
DEFAULTS = {
    "sizes": dict(prompts=8, group_size=4, max_new_tokens=64, repeats=9, warmup=2,
                  updates_per_step=2, micro_batch_size=8, device="cpu", dtype="float32",
                  gradient_checkpointing=False),
    "3b": dict(prompts=8, group_size=5, max_new_tokens=512, repeats=3, warmup=1,
               updates_per_step=2, micro_batch_size=4, device="cuda", dtype="bfloat16",
               gradient_checkpointing=True),
    "3b-mini": dict(prompts=2, group_size=5, max_new_tokens=16, repeats=3, warmup=1,
                    updates_per_step=2, micro_batch_size=4, device="cpu", dtype="bfloat16",
                    gradient_checkpointing=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults (sizes / 3b / 3b-mini): " + "; ".join(
                                    f"{k}: {v}" for k, v in DEFAULTS.items()))
    p.add_argument("--sizes", default="tiny,small",
                   help="offline model sizes of model.SIZES, comma-separated (default "
                        "tiny,small; ',' alone: only the log-prob memory comparison)")
    p.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="bench this shape instead of --sizes: 3b = Qwen2.5-VL-3B's architecture "
                        "(a GPU), 3b-mini = the same structure with tiny widths (runs on a CPU)")
    p.add_argument("--prompts", type=int, help="prompts per step")
    p.add_argument("--group-size", type=int, help="G, rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, help="longest response")
    p.add_argument("--repeats", type=int, help="timed repeats (medians are reported)")
    p.add_argument("--warmup", type=int, help="untimed repeats first")
    p.add_argument("--updates-per-step", type=int,
                   help="optimizer steps per batch (> 1 makes the old log-prob phase run)")
    p.add_argument("--micro-batch-size", type=int, help="rollouts per forward/backward")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="weights: float32 (bf16 autocast on a GPU, as train.py) or bfloat16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=None, help="recompute activations in the backward pass")
    p.add_argument("--cache-tokens", type=int,
                   help="new tokens per rollout in the KV-cache check (default: --max-new-tokens, "
                        "at most 64: the no-cache control costs quadratically)")
    p.add_argument("--logprob-tokens", type=int, default=1024,
                   help="completion tokens of the log-prob memory comparison (target 2)")
    chunk_default = inspect.signature(qwen.completion_logprobs).parameters["chunk_size"].default
    p.add_argument("--logprob-chunk-size", type=int, default=chunk_default,
                   help="completion_logprobs' chunk_size in target 2 (default: its own default)")
    # Tiny models gain nothing from a second thread, and next to other work OpenMP's threads
    # wait for each other at every barrier: measured on a shared 2-core machine, the same short
    # run took 40 s with 2 threads and 2 s with 1.
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: 1 on a CPU; 0 = torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the report as JSON to this file")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.shape or "sizes"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.cache_tokens is None:
        args.cache_tokens = min(args.max_new_tokens, 64)
    args.models = [args.shape] if args.shape else [s for s in args.sizes.split(",") if s]
    unknown = [m for m in args.models if m not in qwen.SIZES and m not in SHAPES]
    if unknown:
        p.error(f"--sizes: unknown size(s) {unknown}; choose from {list(qwen.SIZES)}")
    if args.shape == "3b" and not args.device.startswith("cuda"):
        p.error("--shape 3b needs a GPU (--device cuda); --shape 3b-mini runs the same code "
                "on a CPU")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        hint = "; --shape 3b-mini runs the 3B code path on a CPU" if args.shape == "3b" else ""
        p.error(f"--device {args.device}: no CUDA device here{hint}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


_START = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, with the seconds since start: stdout carries only the report."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        description = f"{name} ({total:.0f} GiB)"
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        description = f"CPU {name}, {torch.get_num_threads()} threads"
    return {"type": device.type, "name": name, "description": description,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run_bench(args, device)
    finally:
        torch.set_num_threads(threads)        # main() may run inside another program (the tests)


def run_bench(args, device: torch.device) -> dict:
    if device.type == "cpu":
        torch.set_flush_denormal(True)   # as train.py: denormals slow tiny models 10x mid-run
    load_start = os.getloadavg()[0]
    why_not = cpu_peak_unsupported() if device.type == "cpu" else None
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "note": "Random weights rarely emit an end-of-sequence token, so responses run to "
                "--max-new-tokens: intended, every step does the same known work.",
        "memory_method": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                          "resident set size, malloc_trim + clear_refs before each measurement"
                          if why_not is None else f"not available ({why_not})"),
        "memory_probe_mib": memory_probe(device),
        "models": {},
    }
    for name in args.models:
        log(f"{name}: building the model and generating the shared rollouts")
        s = prepare(name, args, device)
        result = bench_objectives(s, args)
        summary = summarise(s, result)
        log(f"{name}: generation with and without checkpointing / KV cache")
        summary["generation"] = bench_generation(s, args)
        report["models"][name] = summary
        del s, result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log("log-prob memory: naive vs chunked")
    report["logprob_memory"] = bench_logprob_memory(args, device)
    report["targets"] = collect_targets(report["models"], report["logprob_memory"])
    report["load_average"] = [load_start, os.getloadavg()[0]]
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
