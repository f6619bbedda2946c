"""bench.py - what PAPO costs on top of GRPO, phase by phase, on the same rollouts.

    python bench.py                      # CPU: the tiny and small offline models (1-3 min)
    python bench.py --out bench.json     # the same, and every number as JSON
    python bench.py --shape 3b           # GPU: Qwen2.5-VL-3B's architecture, random weights, at
                                         # the 3B recipe's per-GPU shapes (G = 5, 2,048 tokens)
    python bench.py --shape qwen3-2b     # GPU: Qwen3-VL-2B's (7b: Qwen2.5-VL-7B's, bf16)
    torchrun --nproc_per_node 4 bench.py --shape 7b --fsdp    # 4 GPUs: the 7B recipe's layout,
                                         # sharded as train.py --fsdp (bench_fsdp.py)
    python bench.py --shape 3b --device cpu --text-layers 2 --vision-blocks 2 --prompts 1 \
        --group-size 2 --max-new-tokens 4   # the same code on a CPU, real widths, shallower

Three objectives train on the SAME rollouts from the SAME initial weights: grpo; papo-g (+ the
Implicit Perception Loss, masked branch detached as officially: one more no-gradient forward, on
the masked images); papo-g+grad (--perception-grad: the masked branch recomputed WITH gradient
in every update). Each phase runs train.py's own function: generate (generate_phase, shared),
mask (its masking alone), old / ref / masked (score_phase, one kind of log-probs at a time),
update (update_phase). Times: medians over --repeats after --warmup, in rotating order.

Next to each time stands the phase's WORK, which no machine changes: patch rows entering the
vision tower and language-model tokens (rows x positions, summed over its calls); and, for
scale, one plain forward per rollout: each rollout's own copy of its pictures, B x (P + T)
tokens (B rollouts, P prompt and T completion positions). model.py reads each distinct prompt
and picture once per call; an update with gradient checkpointing reads prompt + completion per
row (checkpointed layers keep no KV cache), each picture still once.

Targets (PASS / FAIL):
  1. PAPO-G step - GRPO step <= 1.1 x its no-gradient forward on the masked images; masking +
     re-processing < 5% of a PAPO-G step; peak memory PAPO-G / GRPO <= 1.10.
  2. completion_logprobs' peak memory <= 25% of naive_completion_logprobs' (full logits, then
     log_softmax) at the real 151,936-token vocabulary, same log-probs to 1e-5.
  3. Generation keeps the KV cache with gradient checkpointing on: tokens/s on >= 0.8 x off,
     and after the prompt pass the language model reads one position per generated token.
  4. Every pass reads each distinct picture once: vision patch rows per pass x G / the
     rollouts' patch rows <= 1 (the G rollouts of a group share one picture).

Random weights rarely sample an end-of-sequence token, so responses run to --max-new-tokens:
intended, every step does the same known work. Memory is the peak, in scoring and in the update,
of the tensors training holds (policy, reference, batch) plus what the phase allocates.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from itertools import groupby
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import transformers

import architectures
import bench_fsdp
import lora
import model as qwen
import speedups
import toy
import config
import processes
import train

MIB = 2 ** 20


# ---------------------------------------------------------------------------------------------
# 1. The models: toy.py's offline sizes, and the released architectures (architectures.py)
# ---------------------------------------------------------------------------------------------

# --shape: a released architecture (architectures.py: every width, depth and index of its
# published config.json, random weights - a forward's work does not depend on what they know -
# and the real vocabulary), at the official recipe's pixel budget. --text-layers and
# --vision-blocks reduce its depth, every width kept: the same code on a CPU (tests).
SHAPES = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b", "qwen3-2b": "qwen3-vl-2b"}
# The shapes' raw pictures, in turn: 448, 672 and 896 px square, 256, 576 and 1,024 image tokens
# in Qwen2.5-VL's 28-px tokens (196, 441, 784 in Qwen3-VL's 32-px ones): ~620 on average, near
# the ~600 that docs/performance.md's memory estimates assume; many 112-px windows each.
PICTURE_SIDES = (448, 672, 896)
# Target 2: tiny widths and Qwen's vocabulary, so that logits dominate memory as in the real
# model (1,024 positions x 151,936 x 4 bytes = 594 MiB per copy).
LOGPROB_SHAPE = {**toy.SIZES["tiny"], "vocab": 151_936, "fullatt_blocks": [1], "image_size": 112}
# The official 3B recipe's work on one of its 2 GPUs: 384 prompts a step over 2 ranks
PROMPTS_PER_GPU = 192


def build_shaped_model(shape: dict, *, seed: int, dtype: torch.dtype, device: torch.device):
    """A random Qwen2.5-VL of toy.SIZES-style knobs `shape` (target 2's) and a processor: the
    tiny tokenizer and an image processor that keeps pictures of up to shape["image_size"] px
    square unscaled."""
    name = shape.get("family", "qwen2.5-vl")
    tokenizer = toy.build_tokenizer(toy.SIZES["tiny"]["vocab"])
    config = toy.model_config(shape, tokenizer, name, vocab_size=shape["vocab"], rms_norm_eps=1e-6,
                              max_position_embeddings=128_000)
    torch.manual_seed(seed)
    with torch.device(device):   # built in place, in its dtype: not 15 GB of float32 on a CPU
        model = toy.family_classes(name).model_class._from_config(config, dtype=dtype)
    qwen.fill_generation_config(model, tokenizer)      # the end-of-turn ids generate stops at
    speedups.patch_embed_as_matmul(model)                  # as load_model does
    side = shape["image_size"]
    template = toy.QWEN3_CHAT_TEMPLATE if name == "qwen3-vl" else toy.CHAT_TEMPLATE
    return model, toy.family_classes(name).processor_class(
        image_processor=toy.image_processor(shape, name, 56 * 56, side * side),
        tokenizer=tokenizer, chat_template=template)


def shape_architecture(name: str, args) -> architectures.Architecture:
    """--shape's architecture at --text-layers / --vision-blocks (None: the real depth)."""
    return architectures.reduced(SHAPES[name], args.text_layers, args.vision_blocks)


def build_model(name: str, args, *, dtype: torch.dtype, device: torch.device):
    """(model, processor, raw picture sides in px, taken in turn): the toy sizes' pictures as
    large as their processor keeps; the shapes' at the recipe's budget (PICTURE_SIDES)."""
    if name in SHAPES:
        return (*architectures.build(shape_architecture(name, args), seed=args.seed, dtype=dtype,
                                     device=device), PICTURE_SIDES)
    model, processor = toy.build_tiny_model(seed=args.seed, size=name)
    return (model.to(device=device, dtype=dtype), processor,
            (int(toy.SIZES[name]["max_pixels"] ** 0.5),))


def set_checkpointing(net, on: bool) -> None:
    """Gradient checkpointing on (model.py's own switch, the one load_model uses) or off."""
    if on:
        qwen._enable_gradient_checkpointing(net)
    else:
        net.activation_checkpointing_disable()


# ---------------------------------------------------------------------------------------------
# 2. Measuring: clocks, peak memory, work
# ---------------------------------------------------------------------------------------------

def clock(fn, device: torch.device):
    """(fn(), seconds). CUDA runs asynchronously: unsynchronised, a clock times kernel launches."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


class PeakMemory:
    """`.extra`: peak bytes in use during the block above its start (None: not measurable).

    GPU: torch.cuda.max_memory_allocated - memory_allocated at the start (tensors only).
    CPU: peak resident set size (VmHWM) - resident size at the start. Two steps keep that honest
    in a long-lived process: malloc_trim(0) hands memory that earlier work freed back to the
    kernel (else the block could reuse it unseen), then writing 5 to /proc/self/clear_refs
    resets the high-water mark (Linux >= 4.0), so an earlier, larger peak cannot hide this one.
    Needs glibc and Linux; about 1 MiB of resolution (the report's 64 MiB probe reads ~65)."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.extra = device, None, None

    def __enter__(self):
        gc.collect()                                    # tensors in reference cycles go now
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError, AttributeError, StopIteration):   # not glibc/Linux
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                Path("/proc/self/clear_refs").write_text("5")
                self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.extra = _status_bytes("VmHWM") - self.start


def memory_probe(device: torch.device) -> float | None:
    """MiB that PeakMemory reports for a block allocating exactly 64 MiB: the method's check."""
    with PeakMemory(device) as mem:
        block = torch.ones(16 * MIB, device=device)     # float32, every page written
        del block
    return None if mem.extra is None else mem.extra / MIB


def tensor_bytes(*things) -> int:
    """Bytes of the distinct tensor storages in modules and (nested) dataclasses: the rollouts
    and their masked copy share all but the pixels, counted once."""
    storages, todo = {}, list(things)
    while todo:
        x = todo.pop()
        if torch.is_tensor(x):
            x = bench_fsdp.local(x)              # --fsdp: this rank's shard
            storages[x.device, x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, torch.nn.Module):
            todo += [*x.parameters(), *x.buffers()]
        elif dataclasses.is_dataclass(x):
            todo += [getattr(x, f.name) for f in dataclasses.fields(x)]
    return sum(storages.values())


class Work:
    """Counts what models process in the block: patch rows of each vision-tower call (its patch
    embedding's input) and (rows, positions) of each language-model call (its inputs_embeds).
    The hooks only append to lists: they cost nothing measurable."""

    def __init__(self, *nets):
        self.nets, self.patch_rows, self.lm_calls = nets, [], []

    def __enter__(self):
        self.hooks = [h for net in self.nets for h in (
            net.model.visual.patch_embed.register_forward_hook(
                lambda m, args, out: self.patch_rows.append(args[0].shape[0])),
            net.model.language_model.register_forward_pre_hook(
                lambda m, args, kw: self.lm_calls.append(tuple(kw["inputs_embeds"].shape[:2])),
                with_kwargs=True))]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def counts(self, passes: int = 1) -> dict:
        """Totals; the calls run-length encoded as [rows, positions, repeats] (a generation:
        [[N, P - 1, 1], [B, 1, T]]); `passes`: how often the phase read the whole batch."""
        return {"vision_rows": sum(self.patch_rows),
                "lm_tokens": sum(rows * positions for rows, positions in self.lm_calls),
                "lm_calls": [[*call, len(list(run))] for call, run in groupby(self.lm_calls)],
                "passes": passes}


def rotations(names: list, repeats: int):
    """(repeat, names in its order): each name takes every place in turn, so a machine that
    gets busier slows them alike."""
    for r in range(repeats):
        yield r, names[r % len(names):] + names[:r % len(names)]


# Medians, not means: a repeat slowed by another job on the machine should not count.
median = lambda values: float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# 3. One model: policy, reference copy, the three configurations, ONE rollout batch
# ---------------------------------------------------------------------------------------------

OBJECTIVES = {"grpo": ["--preset", "grpo"], "papo-g": ["--preset", "papo-g"],
              "papo-g+grad": ["--preset", "papo-g", "--perception-grad"]}
# The official 7B script's PAPO-G has the Double Entropy Loss on (docs/reproducing.md's EXTRA)
PAPO_EXTRA = {"7b": ["--eta-orig=0.05", "--eta-mask=0.05"]}
PHASES = ("generate", "mask", "old", "ref", "masked", "update")
STEP = 1   # the step handed to train.py: it seeds sampling and the update's row order


@dataclasses.dataclass
class Setup:
    name: str
    policy: torch.nn.Module
    ref: torch.nn.Module | None   # frozen copy (beta > 0 in both presets, as
                                  # runtime.build_policy); None with LoRA: the adapters off
    processor: object
    prompts: list              # the step's data.Examples, in collect_batch's order
    cfgs: dict                 # objective -> config.Config
    d: processes.Dist
    initial: dict              # the policy's initial TRAINABLE weights, on the CPU (the frozen
                               # ones never change): not in GPU memory
    batch: train.Batch         # the shared rollouts, masked images included
    seed: int                  # the step's sampling seed
    generate_work: dict        # Work.counts() of generating them
    collect_s: float           # seconds of that train.collect_batch (generation and masking)

    @property
    def nets(self) -> list:
        return [net for net in (self.policy, self.ref) if net is not None]


def prepare(name: str, args, device: torch.device, d: processes.Dist | None = None) -> Setup:
    """Build the model and generate the step's rollouts ONCE, masked images included, with
    train.collect_batch itself; every objective is then scored and updated on them. d: this
    rank under --fsdp (the model sharded, --prompts prompts of its own), else one process."""
    d = d or processes.Dist(device=device)
    policy, processor, sides = build_model(name, args, dtype=getattr(torch, args.dtype),
                                           device=device)
    set_checkpointing(policy, args.gradient_checkpointing)
    if args.lora_rank:      # as runtime.build_policy: adapters on, every other weight frozen
        lora.add_adapters(policy, args.lora_rank, 0.0, config.Config().lora_targets.split(","))
    if args.freeze_vision_tower:
        policy.model.visual.requires_grad_(False)
    ref = None
    if not args.lora_rank:
        ref = copy.deepcopy(policy).requires_grad_(False).eval()
        if device.type == "cuda":         # as runtime.build_policy: a bf16 reference on a GPU
            ref.to(torch.bfloat16)
    policy.train()
    common = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("group_size", "max_new_tokens", "updates_per_step", "micro_batch_size", "seed")]
    common += [f"--prompts-per-step={args.prompts * d.world}", *["--fsdp"] * args.fsdp,
               # train.py's "auto": float32 master weights, bf16 autocast on a GPU
               f"--dtype={'bfloat16' if args.dtype == 'bfloat16' else 'auto'}",
               f"--{'' if args.gradient_checkpointing else 'no-'}gradient-checkpointing",
               f"--lora-rank={args.lora_rank}",
               f"--{'' if args.freeze_vision_tower else 'no-'}freeze-vision-tower"]
    if name in SHAPES:      # the recipe's budget (without --model, parse_config takes the toy's)
        common += [f"--min-pixels={architectures.OFFICIAL_MIN_PIXELS}",
                   f"--max-pixels={architectures.OFFICIAL_MAX_PIXELS}"]
    cfgs = {k: config.parse_config(flags + common + PAPO_EXTRA.get(name, []) * (k != "grpo"))
            for k, flags in OBJECTIVES.items()}
    for cfg in cfgs.values():
        config.check_config(cfg, world_size=d.world)
    if args.fsdp:                        # as runtime.build_policy, after checkpointing is set
        policy, ref = processes.shard_policy_and_reference(policy, ref, cfgs["papo-g"], d)
    rng = np.random.default_rng(args.seed)       # the same on every rank: each draws its share
    examples = [toy.toy_example(rng, image_size=sides[i % len(sides)])
                for i in range(args.prompts * d.world)]
    with Work(policy) as work:
        (batch, _, _), collect_s = clock(lambda: train.collect_batch(
            policy, processor, examples, cfgs["papo-g"], d, STEP, 0, need_masked=True), device)
    prompts, _ = train.draw_prompts(examples, cfgs["papo-g"], d, 0, len(examples))  # its draw
    return Setup(name, policy, ref, processor, prompts, cfgs, d,
                 {k: bench_fsdp.local(v).detach().to("cpu", copy=True)
                  for k, v in policy.named_parameters() if v.requires_grad},
                 batch, processes.step_seed(cfgs["papo-g"], STEP, d.rank), work.counts(), collect_s)


# ---------------------------------------------------------------------------------------------
# 4. The phases of a step, timed and counted
# ---------------------------------------------------------------------------------------------

def time_generate(s: Setup, cfg=None):
    """One generation of the step's rollouts, without masking -> (rollouts, seconds)."""
    (rollouts, _), seconds = clock(lambda: train.generate_phase(
        s.policy, s.processor, s.prompts, cfg or s.cfgs["grpo"], s.seed, need_masked=False),
        s.d.device)
    return rollouts, seconds


def time_mask(s: Setup, cfg) -> float:
    """Seconds train.generate_phase spends masking, re-processing and checking the pictures:
    with model.generate_rollouts replaced by one that returns the step's rollouts at once, the
    phase with need_masked minus without (what both share, GRPO pays too, in generate)."""
    phase = lambda need: clock(lambda: train.generate_phase(
        s.policy, s.processor, s.prompts, cfg, s.seed, need_masked=need), s.d.device)
    with mock.patch.object(qwen, "generate_rollouts", lambda *a, **k: s.batch.rollouts):
        ((_, masked), with_mask), (_, without) = phase(True), phase(False)
    if not torch.equal(masked.pixel_values, s.batch.masked.pixel_values):
        raise RuntimeError("bench: the replayed masking made different masked images")
    return max(with_mask - without, 0.0)


# train.score_phase makes three kinds of no-gradient log-probs, each under its own condition:
# old if updates_per_step > 1, ref if beta > 0, masked if the batch carries masked images and
# --perception-grad is off. Called once per kind with the other conditions off (ONLY), it is
# timed and counted kind by kind and still runs its own code.
SCORE_FIELDS = {"old": "old_logp", "ref": "ref_logp", "masked": "masked_logp"}
ONLY = {"old": dict(beta=0.0), "ref": dict(updates_per_step=1),
        "masked": dict(updates_per_step=1, beta=0.0)}


def run_step(s: Setup, objective: str, measure: bool = False) -> dict:
    """Score and update one objective on the shared batch, from the initial weights.

    -> seconds per phase (0.0 where the objective has none); with measure=True, untimed (it
    hands freed pages back to the kernel, which would slow a timed step), {"peak_mib", "work":
    Work.counts() per phase}. Peak = the larger of (tensors held + what scoring
    allocates) and the same for the update: score_phase drops the masked pictures in between."""
    cfg = s.cfgs[objective]
    uses_mask = config.uses_masked_branch(cfg)
    times, work = dict.fromkeys(PHASES, 0.0), {"generate": s.generate_work}
    if uses_mask and not measure:
        times["mask"] = time_mask(s, cfg)
    with torch.no_grad():                                  # the trainable weights (shards)
        for k, v in s.policy.named_parameters():
            if k in s.initial:
                bench_fsdp.local(v).copy_(s.initial[k])
    # a fresh optimizer, as in train.main: its state is allocated in the first update (counted)
    optimizer = torch.optim.AdamW([p for p in s.policy.parameters() if p.requires_grad],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    # a shallow copy, whose fields score_phase fills; GRPO never sees the masked images
    batch = dataclasses.replace(s.batch, masked=s.batch.masked if uses_mask else None)
    expected = {"old": cfg.updates_per_step > 1, "ref": cfg.beta > 0,
                "masked": uses_mask and not cfg.perception_grad}
    watching = lambda: PeakMemory(s.d.device) if measure else contextlib.nullcontext()
    held = [tensor_bytes(s.policy, s.ref, batch)]
    with watching() as mem_score:
        for part, field in SCORE_FIELDS.items():
            part_batch = dataclasses.replace(   # without log-probs: what the call made shows
                batch, old_logp=None, ref_logp=None, masked_logp=None, masked_entropy=None,
                masked=batch.masked if part == "masked" else None)
            with Work(*s.nets) as w:   # its hooks only append to a list: always on
                _, seconds = clock(lambda: train.score_phase(
                    part_batch, s.policy, s.ref, dataclasses.replace(cfg, **ONLY[part]), s.d),
                    s.d.device)
            made = {p for p, f in SCORE_FIELDS.items() if getattr(part_batch, f) is not None}
            if made != ({part} if expected[part] else set()):   # score_phase's rules changed
                raise RuntimeError(f"bench: score_phase made {sorted(made)} for {part!r} of "
                                   f"{objective}: update bench.ONLY")
            work[part] = w.counts(passes=int(expected[part]))
            if expected[part]:
                times[part] = seconds
                if seconds > 10:        # a large model: say where it is
                    log(f"{s.name}: {objective}: {part} log-probs {seconds:.1f} s")
                for f in (field, "masked_entropy", "masked") if part == "masked" else (field,):
                    setattr(batch, f, getattr(part_batch, f))
    held.append(tensor_bytes(s.policy, s.ref, batch))
    with watching() as mem_update, Work(*s.nets) as w:
        _, times["update"] = clock(lambda: train.update_phase(batch, s.policy, optimizer, cfg,
                                                              s.d, STEP), s.d.device)
    if times["update"] > 10:
        log(f"{s.name}: {objective}: update {times['update']:.1f} s")
    # --perception-grad reads the batch twice per update: original and masked pictures
    work["update"] = w.counts(passes=2 if uses_mask and cfg.perception_grad else 1)
    if not measure:
        return times
    extra = [mem_score.extra, mem_update.extra]
    return {"peak_mib": None if None in extra else max(map(sum, zip(held, extra))) / MIB,
            "work": work, "seconds": times}


def bench_objectives(s: Setup, args):
    """The timed repeats, then the measuring passes -> (objective -> [seconds per phase, per
    repeat], objective -> [run_step(measure=True), per pass]). A CPU's resident size varies by
    a few MiB between identical steps (the allocator), hence --repeats passes there and their
    median; a GPU's allocator counts tensors exactly: one pass."""
    if args.single_pass:
        return single_pass(s, args)
    runs = {name: [] for name in args.objectives}
    for r, order in rotations(list(args.objectives), args.warmup + args.repeats):
        _, generate_s = time_generate(s)        # shared: one generation serves every objective
        for name in order:
            times = {**run_step(s, name), "generate": generate_s}
            if r >= args.warmup:
                runs[name].append({**times, "step": sum(times.values())})
        log(f"{s.name}: repeat {r + 1}/{args.warmup + args.repeats}")
    measured = {name: [] for name in args.objectives}
    for _, order in rotations(list(args.objectives),
                              1 if s.d.device.type == "cuda" else args.repeats):
        for name in order:
            measured[name].append(run_step(s, name, measure=True))
    return runs, measured


def single_pass(s: Setup, args):
    """--single-pass: ONE measuring pass per objective whose clocks are also the times (and the
    masking timed apart) - for a model too large to step twice, as the full 3B on a CPU. The
    generation is prepare's own (its collect_batch: generation, and masking of a few pictures),
    not repeated. The times include what measuring costs (handing freed memory back to the
    kernel between phases): no medians, no warm-up."""
    generate_s = s.collect_s
    log(f"{s.name}: generated the rollouts in {generate_s:.1f} s")
    runs, measured = {}, {}
    for name in args.objectives:
        m = run_step(s, name, measure=True)
        mask_s = time_mask(s, s.cfgs[name]) if config.uses_masked_branch(s.cfgs[name]) else 0.0
        times = {**m["seconds"], "generate": generate_s, "mask": mask_s}
        runs[name], measured[name] = [{**times, "step": sum(times.values())}], [m]
        log(f"{s.name}: {name} stepped once")
    return runs, measured


# ---------------------------------------------------------------------------------------------
# 5. Target 3: generation keeps the KV cache with gradient checkpointing on
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def kv_cache_forced_off():
    """The control: generation without any KV cache. generate_rollouts' shared prefill is a
    cache too, so it goes as well: model.py's plain path (model.FAST_PATHS off: one generate
    over the B rows), with use_cache=False in its generation config."""
    plain = qwen._generate_plain

    def without_cache(net, once, num_samples, config):
        config = copy.deepcopy(config)
        config.use_cache = False
        return plain(net, once, num_samples, config)
    with (mock.patch.object(qwen, "FAST_PATHS", False),
          mock.patch.object(qwen, "_generate_plain", without_cache)):
        yield


VARIANTS = {"checkpointing on": (True, True), "checkpointing off": (False, True),
            "checkpointing on, use_cache off": (True, False)}   # (checkpointing, KV cache)


def bench_generation(s: Setup, args) -> dict:
    """Tokens/s of train.generate_phase on the step's prompts, policy in train mode as in
    training, and the language model's calls: with the cache (N, P - 1) for the N prompts
    (generate_rollouts' prefill), then (B, 1) per new token; without, (B, P + t) for token t,
    the whole sequence again (the control: the count sees it). At most 64 new tokens, and the
    control once: it costs quadratically."""
    cfg = dataclasses.replace(s.cfgs["grpo"], max_new_tokens=min(args.max_new_tokens, 64))
    runs, seen = {name: [] for name in VARIANTS}, {}
    try:
        for r, order in rotations(list(VARIANTS), args.warmup + args.repeats):
            for name in order:
                if not VARIANTS[name][1] and r < args.warmup + args.repeats - 1:
                    continue                            # the control: in the last repeat only
                set_checkpointing(s.policy, VARIANTS[name][0])
                s.policy.train()
                with Work(s.policy) as w, (contextlib.nullcontext() if VARIANTS[name][1]
                                           else kv_cache_forced_off()):
                    rollouts, seconds = time_generate(s, cfg)
                if r >= args.warmup:
                    runs[name].append(rollouts.completion_ids.numel() / seconds)
                seen[name] = w, rollouts
    finally:
        set_checkpointing(s.policy, args.gradient_checkpointing)
        s.policy.train()
    out = {}
    for name, (w, r) in seen.items():
        N, B, P, T = len(s.prompts), len(r), r.prompt_ids.shape[1], r.completion_ids.shape[1]
        out[name] = {"tokens_per_s": median(runs[name]), "new_tokens": T,
                     # positions each row reads per new token, after the first call
                     "positions_per_token": sum(p for _, p in w.lm_calls[1:]) / T,
                     "kv_cache_used": w.lm_calls == [(N, P - 1)] + [(B, 1)] * T, **w.counts()}
    return out


# ---------------------------------------------------------------------------------------------
# 6. Target 2: memory of completion_logprobs against the naive full log_softmax
# ---------------------------------------------------------------------------------------------

def bench_logprob_memory(args, device: torch.device) -> dict:
    """Peak memory of completion_logprobs and naive_completion_logprobs, no gradient, on ONE
    rollout of --logprob-tokens completion tokens, and their largest log-prob difference. One
    row has no prompt to share, so completion_logprobs takes its one-pass path, the forward the
    oracle makes too (lm_calls [[1, P + T, 1]] both): only the logits differ. float32 without
    autocast: bf16 products of different shapes round differently."""
    model, processor = build_shaped_model(LOGPROB_SHAPE, seed=args.seed, dtype=torch.float32,
                                          device=device)
    model.eval()
    T = args.logprob_tokens
    base = qwen.rollouts_from_texts(    # a prompt encoded as in RL, then T ordinary tokens
        processor, [toy.toy_example(np.random.default_rng(args.seed)).to_prompt()], [""])
    ids = torch.randint(len(qwen.SPECIAL_TOKENS), len(processor.tokenizer), (1, T),
                        generator=torch.Generator().manual_seed(args.seed))
    rollouts = dataclasses.replace(base, completion_ids=ids, completion_mask=torch.ones(1, T),
                                   texts=[""]).to(device)
    out, logps = {"rows": 1, "completion_tokens": T, "vocab": LOGPROB_SHAPE["vocab"]}, {}
    for name, fn in (("naive", qwen.naive_completion_logprobs),
                     ("chunked", qwen.completion_logprobs)):
        with torch.no_grad(), PeakMemory(device) as mem, Work(model) as w:
            logps[name] = fn(model, rollouts)                                   # [1, T]
        out[f"{name}_mib"] = None if mem.extra is None else mem.extra / MIB
        out[f"{name}_lm_calls"] = w.counts()["lm_calls"]
    out["ratio"] = None if out["naive_mib"] is None else out["chunked_mib"] / out["naive_mib"]
    out["max_abs_diff"] = float((logps["naive"] - logps["chunked"]).abs().max())
    return out


# ---------------------------------------------------------------------------------------------
# 7. Summary, targets, the printed table
# ---------------------------------------------------------------------------------------------

def paired_extra(runs: list[dict], base: list[dict]) -> float:
    """Seconds a step of `runs` takes over one of `base`, paired by repeat AND by phase: per
    phase, the median over repeats of the difference; summed over the phases.

    The median of whole-step differences would add every phase's noise up first: old, ref and
    update do the same ~0.4 s of work in GRPO and PAPO-G, and their jitter alone moved target 1
    between 0.95 and 1.21 from run to run. Per phase, the phases of equal work add about 0."""
    return sum(median([r[phase] - b[phase] for r, b in zip(runs, base)]) for phase in PHASES)


def summarise(s: Setup, runs: dict, measured: dict) -> dict:
    """One model's medians, ratios to GRPO, work, and what targets 1 and 4 compare."""
    phases = {k: {p: median([t[p] for t in ts]) for p in (*PHASES, "step")}
              for k, ts in runs.items()}
    peaks = {k: [m["peak_mib"] for m in ms] for k, ms in measured.items()}
    peak = {k: None if None in v else median(v) for k, v in peaks.items()}
    if s.d.world > 1:                      # --fsdp: the rank that needed the most
        peak = bench_fsdp.max_over_ranks(peak)
    work = {k: ms[0]["work"] for k, ms in measured.items()}
    if any(m["work"] != work[k] for k, ms in measured.items() for m in ms):
        raise RuntimeError("bench: the same step did different work twice")
    r = s.batch.rollouts
    B, P, T, G = len(r), r.prompt_ids.shape[1], r.completion_ids.shape[1], r.num_samples
    rows = int(r.row_pictures()[1].prod(-1).sum())     # patch rows of a plain forward: B copies
    # target 1 compares PAPO-G with GRPO; --objectives may leave either out (then n/a)
    both = "grpo" in runs and "papo-g" in runs
    extra = paired_extra(runs["papo-g"], runs["grpo"]) if both else None
    forward = phases["papo-g"]["masked"] if "papo-g" in runs else 0.0
    ratio = lambda a, b: a / b if b else None
    # docs/performance.md's computed table, from the tensors themselves: every weight, and per
    # trainable one a gradient and AdamW's two moments of its size, plus the reference copy;
    # under --fsdp this rank's shards
    trainable = sum(bench_fsdp.local(p).numel() * p.element_size()
                    for p in s.policy.parameters() if p.requires_grad)
    computed = tensor_bytes(s.policy) + 3 * trainable + (tensor_bytes(s.ref) if s.ref else 0)
    return {
        "parameters": sum(p.numel() for p in s.policy.parameters()), "rollouts": B,
        "prompts": len(s.prompts), "group_size": G, "prompt_tokens": P, "new_tokens": T,
        "image_tokens_per_rollout": int(r.mm_token_type_ids[0].sum()),
        "rollouts_patch_rows": rows,
        "mean_response_tokens": float(r.completion_mask.sum(1).mean()),
        "trainable_parameters": sum(p.numel() for p in s.policy.parameters() if p.requires_grad),
        "generated_tokens_per_s": float(r.completion_mask.sum()) / median(
            [t["generate"] for ts in runs.values() for t in ts]),
        "computed_state_mib": computed / MIB, "world_size": s.d.world,
        "formula_gb": None if s.d.world == 1 else bench_fsdp.formula_gb(
            sum(p.numel() for p in s.policy.parameters()), s.cfgs["papo-g"].beta, s.d.world),
        "phases_s": phases, "peak_mib": peak,
        "ratios_to_grpo": {k: {"step": ratio(phases[k]["step"], grpo and grpo["step"]),
                               "update": ratio(phases[k]["update"], grpo and grpo["update"]),
                               "memory": ratio(peak[k], peak.get("grpo"))}
                           for k in runs for grpo in [phases.get("grpo")]},
        "work": work,
        # [vision rows, LM tokens] of one plain forward per rollout, per pass (generation: a
        # plain generate, B x P positions then B x 1 per new token but the last)
        "per_rollout_pass": {"generate": [rows, B * (P + T - 1)], "scoring": [rows, B * (P + T)]},
        # target 4: 1 = each distinct picture once per pass; G = once per rollout
        "vision_rows_ratio": {k: {p: w["vision_rows"] / w["passes"] * G / rows
                                  for p, w in work[k].items() if w["passes"]} for k in work},
        "papo_g_extra_s": extra, "masked_forward_s": forward,
        "extra_over_forward": extra / forward if both and forward > 0 else None,
        "mask_share_of_step": (phases["papo-g"]["mask"] / phases["papo-g"]["step"]
                               if "papo-g" in runs else None)}


def target(name, model, value, limit, higher=False, passed=None, note="") -> dict:
    """A row of the targets table; `passed` overrides the comparison; None prints as n/a."""
    if passed is None and value is not None:
        passed = value >= limit if higher else value <= limit
    return {"target": name, "model": model, "value": value, "limit": limit,
            "comparison": ">=" if higher else "<=", "pass": passed, "note": note}


def collect_targets(models: dict, lp: dict | None) -> list[dict]:
    rows = [] if lp is None else [target("2. completion_logprobs / naive peak memory",
                   f"vocab {lp['vocab']}, {lp['completion_tokens']} tokens", lp["ratio"], 0.25,
                   passed=None if lp["ratio"] is None
                   else lp["ratio"] <= 0.25 and lp["max_abs_diff"] <= 1e-5,
                   note=f"max |logp difference| {lp['max_abs_diff']:.1e} (limit 1e-5); "
                        "one rollout, one pass")]
    for name, m in models.items():
        if m["papo_g_extra_s"] is not None:           # --objectives kept GRPO and PAPO-G
            rows += [
                target("1. (PAPO-G step - GRPO step) / masked forward", name,
                       m["extra_over_forward"], 1.1,
                       note=f"{m['papo_g_extra_s']:.4f} s extra vs a "
                            f"{m['masked_forward_s']:.4f} s no-gradient forward on the masked "
                            "images"),
                target("1. masking + re-processing share of a PAPO-G step", name,
                       m["mask_share_of_step"], 0.05),
                target("1. peak memory PAPO-G / GRPO", name,
                       m["ratios_to_grpo"]["papo-g"]["memory"], 1.10)]
        if "generation" in m:                         # unless --no-generation-variants
            on, off = (m["generation"][f"checkpointing {v}"] for v in ("on", "off"))
            control = m["generation"]["checkpointing on, use_cache off"]
            rows.append(target(
                "3. generate tokens/s, checkpointing on / off", name,
                on["tokens_per_s"] / off["tokens_per_s"], 0.8, higher=True,
                passed=on["tokens_per_s"] >= 0.8 * off["tokens_per_s"] and on["kv_cache_used"],
                note=f"KV cache used with checkpointing on: {on['kv_cache_used']}; positions "
                     f"per new token {on['positions_per_token']:.2f} (use_cache off: "
                     f"{control['positions_per_token']:.2f})"))
        vision = m["vision_rows_ratio"]
        for what, phases in (("generate, scoring", ("generate", "old", "ref", "masked")),
                             ("update", ("update",))):
            values = {f"{k} {p}": v for k in vision for p, v in vision[k].items() if p in phases}
            worst = max(values, key=values.get)
            why = ("; --fsdp: the checkpointed update encodes each row's pictures (model.py's "
                   "_states_one_pass says why)" if m["world_size"] > 1 else
                   "; update micro-batches are random rows: a group split over k of them has "
                   "its picture read k times")
            rows.append(target(
                f"4. vision rows per pass x G / rollouts': {what}", name, values[worst], 1.0,
                note=f"largest: {worst}" + (why if what == "update" and values[worst] > 1
                                            else "")))
    return sorted(rows, key=lambda row: row["target"][0])     # by target, then model


LABELS = {"generate": "generate (shared)", "mask": "mask + re-process images",
          "old": "old log-probs", "ref": "ref log-probs", "masked": "masked log-probs (no grad)",
          "update": "update (fwd+bwd+AdamW)", "step": "step"}


def format_report(report: dict) -> str:
    """The report as the table printed on stdout (the JSON holds the same numbers)."""
    dev, s = report["device"], report["settings"]
    num = lambda v, spec: f"{'n/a':>14s}" if v is None else format(v, spec)
    lines = [f"PAPO cost benchmark - {report['date']} - {dev['description']}",
             f"torch {dev['torch']}, transformers {dev['transformers']}, load average "
             f"{report['load_average'][0]:.1f} -> {report['load_average'][1]:.1f} on "
             f"{dev['cpus']} CPUs", ""]
    for name, m in report["models"].items():
        objectives = list(m["phases_s"])
        table = lambda label, cell: lines.append(f"{label:30s}" + "".join(map(cell, objectives)))
        lines.append(
            f"== {name}: {m['parameters'] / 1e6:.2f}M parameters, {m['rollouts']} rollouts "
            f"({m['prompts']} prompts x G={m['group_size']}), prompt {m['prompt_tokens']} tokens "
            f"({m['image_tokens_per_rollout']} image), {m['new_tokens']} new tokens (mean "
            f"response {m['mean_response_tokens']:.1f}), {s['dtype']}, checkpointing "
            f"{'on' if s['gradient_checkpointing'] else 'off'}; " +
            ("one pass, timed and measured (--single-pass)" if s["single_pass"] else
             f"medians of {s['repeats']} repeats after {s['warmup']} warm-up"))
        table("seconds", lambda k: f"{k:>14s}")
        for p, label in LABELS.items():
            table(f"  {label}", lambda k: f"{m['phases_s'][k][p]:14.4f}" if m["phases_s"][k][p]
                  else f"{'-':>14s}")
        for key in ("step", "update", "memory"):
            table(f"  ratio to grpo: {key}", lambda k: num(m["ratios_to_grpo"][k][key], "14.3f"))
        table("peak memory (MiB)", lambda k: num(m["peak_mib"][k], "14.1f"))
        lines.append(f"{'  computed, before activations':30s}{m['computed_state_mib']:14.1f}   "
                     f"(weights, and gradients + AdamW for {m['trainable_parameters']:,d} "
                     "trainable parameters, + the reference: docs/performance.md's table)")
        lines.append(f"generated tokens/s: {m['generated_tokens_per_s']:.1f} (generate phase, "
                     f"{m['rollouts']} rows)")
        if m["world_size"] > 1:
            lines += bench_fsdp.report_lines(m, m["world_size"], dev["type"] == "cuda")
        elif name in SHAPES and dev["type"] == "cuda":
            scale = PROMPTS_PER_GPU / m["prompts"]
            lines.append(f"the 3B recipe's step on one of its 2 GPUs ({PROMPTS_PER_GPU} prompts, "
                         f"x {scale:g}, scaled): " + ", ".join(
                             f"{k} ~{m['phases_s'][k]['step'] * scale:.0f} s" for k in objectives))
        lines.append(f"{'work: vision rows | LM tokens':30s}" + "".join(
            f"{k:>20s}" for k in objectives) + f"{'one per-rollout pass':>24s}")
        for p in ("generate", "old", "ref", "masked", "update"):
            cells = [(m["work"][k][p]["vision_rows"], m["work"][k][p]["lm_tokens"])
                     for k in objectives]
            base = m["per_rollout_pass"]["generate" if p == "generate" else "scoring"]
            lines.append(f"  {LABELS[p]:28s}" + "".join(
                f"{v:>9,d} |{t:>9,d}" for v, t in cells) + f"    {base[0]:>9,d} |{base[1]:>9,d}")
        if "generation" in m:
            lines.append(f"{'generate, same prompts':34s}tokens/s  positions per new token  "
                         "language-model calls [rows, positions, repeats]")
        for variant, g in m.get("generation", {}).items():
            c = g["lm_calls"]     # the control's calls all differ: first two and last
            lines.append(f"  {variant:32s}{g['tokens_per_s']:8.0f}  "
                         f"{g['positions_per_token']:23.2f}  " +
                         (str(c) if len(c) < 4 else f"[{c[0]}, {c[1]}, ..., {c[-1]}]"))
        lines.append("")
    lp = report["logprob_memory"]
    mib = lambda v: "n/a" if v is None else f"{v:.1f} MiB"
    if lp:
        lines.append(f"log-probs of one rollout, {lp['completion_tokens']} completion tokens, "
                     f"vocabulary {lp['vocab']}, no gradient: naive {mib(lp['naive_mib'])}, "
                     f"completion_logprobs {mib(lp['chunked_mib'])}, max |difference| "
                     f"{lp['max_abs_diff']:.1e}")
    lines += [f"memory: {report['memory_method']}; a 64 MiB probe measures "
              f"{mib(report['memory_probe_mib'])}", "", "targets"]
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  [{ {True: 'PASS', False: 'FAIL', None: 'n/a '}[t['pass']]}] "
                     f"{t['target']:57s} {t['model']:24s} {value:>7s} {t['comparison']} "
                     f"{t['limit']}" + (f"   ({t['note']})" if t["note"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 8. Command line
# ---------------------------------------------------------------------------------------------

# Defaults per kind of run. CPU sizes: tiny + small take 2-3 minutes on 2 cores; 15 repeats,
# because target 1 is a difference of medians (9 gave 0.95-1.21 for one code, 25 gave 1.065).
# The shapes, on a GPU: the official 3B recipe's work per GPU in its own shapes - G = 5, up to
# 2,048 new tokens, float32 master weights with bf16 autocast and a bf16 reference (train.py on a
# GPU: docs/performance.md's computed table), gradient checkpointing - for 16 prompts, one
# --generation-batch (80 rollouts), a twelfth of a GPU's 192 prompts a step; the report scales
# the step to those 192. Micro-batches of 10 rows, two whole groups: score_phase cuts the batch
# into consecutive micro-batches, and only whole groups let each read every picture once
# (target 4). One timed repeat after one warm-up: a repeat generates 80 x 2,048 tokens.
# 7b: bf16 weights on one GPU (8.29B x 10 bytes: one 141 GB GPU); with --fsdp under torchrun
# (bench_fsdp.py) the recipe's layout: float32 master weights sharded over the GPUs.
GPU_SHAPE = dict(prompts=16, group_size=5, max_new_tokens=2048, repeats=1, warmup=1,
                 updates_per_step=2, micro_batch_size=10, device="cuda", dtype="float32",
                 gradient_checkpointing=True)
DEFAULTS = {
    "sizes": dict(prompts=8, group_size=4, max_new_tokens=64, repeats=15, warmup=2,
                  updates_per_step=2, micro_batch_size=8, device="cpu", dtype="float32",
                  gradient_checkpointing=False),
    "3b": GPU_SHAPE, "qwen3-2b": GPU_SHAPE, "7b": dict(GPU_SHAPE, dtype="bfloat16")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="defaults: " +
                                "; ".join(f"{k}: {v}" for k, v in DEFAULTS.items()))
    p.add_argument("--sizes", default="tiny,small", help="offline sizes (toy.SIZES): a,b")
    p.add_argument("--shape", choices=list(SHAPES), help="instead of --sizes: the architecture of "
                   "Qwen2.5-VL-3B (3b), -7B (7b) or Qwen3-VL-2B (qwen3-2b), random weights, at "
                   "the 3B recipe's per-GPU shapes (a GPU; on a CPU with --device cpu)")
    for flag, what in (("prompts", "prompts per step"), ("group-size", "G, rollouts per prompt"),
                       ("max-new-tokens", "longest response"),
                       ("repeats", "timed repeats (medians are reported)"),
                       ("warmup", "untimed repeats first"),
                       ("updates-per-step", "optimizer steps per batch (> 1: old log-probs)"),
                       ("micro-batch-size", "rollouts per forward/backward"),
                       # 1 on a CPU: tiny models gain nothing from a second thread, and beside
                       # other work OpenMP's threads wait at every barrier (a short run on a
                       # shared 2-core machine: 40 s with 2 threads, 2 s with 1)
                       ("threads", "torch CPU threads (default: 1 on a CPU; 0: torch's choice)"),
                       ("logprob-tokens", "completion tokens of target 2 (default 1024; "
                                          "0: skip it)"),
                       ("text-layers", "--shape at this many decoder layers (default: all)"),
                       ("vision-blocks", "--shape at this many vision blocks (default: all; "
                                         "the last always attends over the whole picture)"),
                       ("lora-rank", "LoRA adapters of this rank, as train.py (default 0: off)"),
                       ("seed", "weights, pictures, sampling (default 0)")):
        p.add_argument(f"--{flag}", type=int, help=what)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="weights: float32 (bf16 autocast on a GPU, as train.py) or bfloat16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: --shape sharded over "
                   "the processes as train.py --fsdp, --prompts per process (bench_fsdp.py)")
    p.add_argument("--freeze-vision-tower", action="store_true",
                   help="the vision tower gets no gradient and no optimizer state (train.py's)")
    p.add_argument("--generation-variants", action=argparse.BooleanOptionalAction, default=True,
                   help="target 3: generation with and without checkpointing / KV cache")
    p.add_argument("--single-pass", action="store_true",
                   help="one pass per objective, timed and measured at once (no repeats): for "
                        "a model too large to step twice, as the full 3B on a CPU")
    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help=f"which of {', '.join(OBJECTIVES)} to run (target 1 needs grpo and papo-g)")
    p.add_argument("--out", default="", help="also write the report as JSON to this file")
    args = p.parse_args(argv)
    if why := bench_fsdp.refusal(args):
        p.error(why)
    for key, value in {"logprob_tokens": 1024, "seed": 0, "lora_rank": 0,
                       **DEFAULTS[args.shape or "sizes"],
                       **(dict(dtype="float32") if args.fsdp else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    args.models = [args.shape] if args.shape else [m for m in args.sizes.split(",") if m]
    given = [k for k in args.objectives.split(",") if k]
    if not given or [k for k in given if k not in OBJECTIVES]:
        p.error(f"--objectives {args.objectives!r}: a comma-separated choice of {list(OBJECTIVES)}")
    args.objectives = [k for k in OBJECTIVES if k in given]
    if unknown := [m for m in args.models if m not in {*toy.SIZES, *SHAPES}]:
        p.error(f"--sizes: unknown {unknown}; choose from {list(toy.SIZES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here (--device cpu runs the same code "
                "on a CPU; with --shape, --text-layers and --vision-blocks make it shallower)")
    if (args.text_layers or args.vision_blocks) and not args.shape:
        p.error("--text-layers and --vision-blocks reduce a --shape")
    if args.shape:
        try:
            shape_architecture(args.shape, args)
        except ValueError as err:
            p.error(f"--text-layers / --vision-blocks: {err}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


_START = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, with the seconds since start: stdout carries only the report.
    Under --fsdp rank 0 speaks for all."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        description = f"{name} ({gib:.0f} GiB)"
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        description = f"CPU {name}, {torch.get_num_threads()} threads"
    return {"type": device.type, "name": name, "description": description,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    d = bench_fsdp.start(args) if args.fsdp else None       # torchrun's rank, its device
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run_bench(args, d.device if d else torch.device(args.device), d)
    finally:
        torch.set_num_threads(threads)        # main() may run inside another program (tests)
        if d:
            bench_fsdp.finish()


def run_bench(args, device: torch.device, d: processes.Dist | None = None) -> dict:
    if device.type == "cpu":
        torch.set_flush_denormal(True)   # as train.py: denormals slow tiny models 10x mid-run
    load_start, probe = os.getloadavg()[0], memory_probe(device)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                         "not available (needs glibc and Linux)" if probe is None else
                         "resident set size (malloc_trim + clear_refs before each block), "
                         "median of --repeats passes",
        "memory_probe_mib": probe, "models": {}}
    for name in args.models:
        if name in SHAPES and device.type == "cpu":
            arch = shape_architecture(name, args)
            log(f"{name}: {arch.name} on a CPU - at every layer, minutes per phase (a PAPO-G step "
                "of the full 3B with LoRA: docs/performance.md)")
        log(f"{name}: building the model and generating the shared rollouts")
        s = prepare(name, args, device, d)
        report["models"][name] = summarise(s, *bench_objectives(s, args))
        if args.generation_variants:
            log(f"{name}: generation with and without checkpointing / KV cache")
            report["models"][name]["generation"] = bench_generation(s, args)
        del s
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["logprob_memory"] = None
    if args.logprob_tokens and (d is None or d.main):    # no model of its own to shard
        log("log-prob memory: naive vs completion_logprobs")
        report["logprob_memory"] = bench_logprob_memory(args, device)
    report["targets"] = collect_targets(report["models"], report["logprob_memory"])
    report["load_average"] = [load_start, os.getloadavg()[0]]
    if d is not None and not d.main:     # --fsdp: rank 0 reports for all
        return report
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
