"""PAPO / GRPO / DAPO training of a Qwen2.5-VL or Qwen3-VL policy with verifiable rewards.

    python train.py                               # offline default: tiny model + toy task, CPU
    torchrun --nproc_per_node 2 train.py          # the same, data-parallel over 2 processes
    torchrun --nproc_per_node 4 train.py --fsdp --model Qwen/Qwen2.5-VL-7B-Instruct ...
                                                  # sharded over 4 processes (FSDP2; see README)
    torchrun --nproc_per_node 2 train.py --preset papo-g \
        --model Qwen/Qwen2.5-VL-3B-Instruct --data train.jsonl --eval-data test.jsonl
    python train.py --tiny-family qwen3-vl-thinking   # offline, on a tiny Qwen3-VL (Thinking)

One RL step, as in the algorithm box of the paper (each phase is a function below):

    1. draw prompts          each rank takes its own shard of the step's prompts
    2. mask images           PAPO only: one patch mask per prompt, shared by its G rollouts
    3. generate              G rollouts per prompt with HF `generate`
    4. reward                rule-based: 0.9 * accuracy + 0.1 * format
    5. advantages            group-normalised rewards (GRPO); DAPO drops all-equal groups
    6. score                 old / reference / masked-image log-probs, no gradient
    7. update                mini-batches of micro-batches; the loss of papo.papo_loss is
                             normalised by the GLOBAL token count, then AdamW

Everything the paper's objective needs is in papo.py (math), model.py (transformers) and data.py
(prompts, files, rewards); this file only wires them together, plus the plumbing a real run needs:
torchrun/DDP or FSDP2 (--fsdp), gradient checkpointing, bf16 autocast, atomic checkpoints with exact resume,
metrics.jsonl, a collapse watch and a final before/after table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

import data
import eval as evaluation
import model as qwen
import papo
import rewards
import toy


# ---------------------------------------------------------------------------------------------
# Configuration: one dataclass, a docstring ("help") per field, named presets.
# Precedence: field defaults (the official 3B recipe) < offline-toy overrides (when --model is
# not given) < --preset < explicit command-line flags.
# ---------------------------------------------------------------------------------------------

def arg(default, help: str):
    """A dataclass field that carries its own documentation (shown by `--help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- what to train on --------------------------------------------------------------------
    preset: str = arg("papo-g", "grpo | papo-g | dapo | papo-d: objective settings of the paper.")
    model: str = arg("", "Qwen2.5-VL or Qwen3-VL hub id or local folder. Empty: the offline tiny "
                         "model (--tiny-family), warm-started on the toy task (cached).")
    data: str = arg("", "Training data: a JSONL file, a ShareGPT .json file, a parquet file, glob "
                        "or folder, a save_to_disk folder, or a hub dataset owner/name[:split] "
                        "(e.g. PAPOGalaxy/PAPO_ViRL39K_train). Empty: the offline toy task.")
    eval_data: str = arg("", "Held-out data (same forms as --data) for the before/after table. "
                             "Empty: the toy held-out split when training on the toy task, else "
                             "no evaluation.")
    problem_key: str = arg("problem", "Table column holding the question.")
    answer_key: str = arg("answer", "Table column holding the gold answer.")
    image_key: str = arg("images", "Table column holding the picture(s): Image features, "
                                   "{bytes, path} dicts or paths.")
    image_dir: str = arg("", "Folder that relative picture paths are relative to (default: the "
                             "data file's folder).")
    masked_image_key: str = arg("", "Pre-masked pictures (official switch; its column "
                                    "'images_aug', for semantic-aware masking): the --data "
                                    "table column, or JSONL key listing paths, whose pictures the "
                                    "masked branch uses instead of random patches - one per "
                                    "picture, each of its original's size (checked per row "
                                    "before training), resized into the same pixel budget. "
                                    "--mask-ratio/--mask-patch/--mask-mode then apply only to "
                                    "the held-out evaluation. Empty: random patches.")
    prompt_template: str = arg("", "Plain-text file with one {problem}: the user prompt. Empty: the "
                                   "official one (the trimmed question, a blank line, the "
                                   "<think>/\\boxed{} instruction; see data.INSTRUCTION).")
    min_pixels: int = arg(200_704, "Pixel budget: every raw picture is scaled up to at least this "
                                   "area BEFORE masking and processing (official: 256 image tokens).")
    max_pixels: int = arg(1_003_520, "Pixel budget: every raw picture is scaled down to at most this "
                                     "area before masking and processing (official: 1,280 tokens).")
    max_image_pixels: int = arg(50_000_000, "Largest picture (width x height, read from the file "
                                            "header) a row may have; a larger one is a bad row.")
    max_prompt_length: int = arg(4096, "Longest prompt in tokens, image tokens included. Longer rows "
                                       "stop the run before training unless --drop-long-prompts.")
    drop_long_prompts: bool = arg(False, "Drop (and count, print and log) rows longer than "
                                         "--max-prompt-length instead of stopping.")
    out: str = arg("runs/default", "Run folder: metrics.jsonl, samples, checkpoints, curves.png.")
    resume: str = arg("", "Run folder to continue from its latest checkpoint (exactly).")
    overwrite: bool = arg(False, "Start afresh in an --out folder that holds an earlier run, "
                                 "deleting that run's files (without it such a folder is refused).")
    seed: int = arg(0, "Seed of everything: model init (offline), data order, masks, sampling.")
    steps: int = arg(200, "Number of RL steps (rollout batches).")

    # --- rollouts ----------------------------------------------------------------------------
    prompts_per_step: int = arg(384, "Prompts per rollout batch, summed over all ranks.")
    group_size: int = arg(5, "G: rollouts sampled per prompt (the GRPO group).")
    max_new_tokens: int = arg(2048, "Longest response, in tokens.")
    temperature: float = arg(1.0, "Sampling temperature of rollouts (and of the log-probs).")
    top_p: float = arg(0.99, "Nucleus sampling of rollouts.")

    # --- optimisation ------------------------------------------------------------------------
    lr: float = arg(1e-6, "AdamW learning rate (constant).")
    weight_decay: float = arg(0.01, "AdamW weight decay.")
    grad_clip: float = arg(1.0, "Clip the global gradient norm to this.")
    updates_per_step: int = arg(3, "Optimizer steps per rollout batch (mini-batches, 1 epoch).")
    micro_batch_size: int = arg(8, "Rollouts per forward/backward on one rank.")
    generation_batch: int = arg(16, "Prompts per `generate` call on one rank (each with its G "
                                    "rollouts); a step's prompts are generated in such chunks, "
                                    "so that the KV cache of one call fits (3B: 80 rows x 3,072 "
                                    "tokens ~ 9 GB in bf16; all 192 prompts of a rank at once "
                                    "~ 109 GB). 0 = all at once.")

    # --- the objective (set by --preset; see papo.py and PAPO_REFERENCE section 4) -----------
    gamma: float = arg(0.02, "Weight of the Implicit Perception Loss KL_prcp (maximised).")
    eta_orig: float = arg(0.0, "Double Entropy Loss: weight of the original-image entropy.")
    eta_mask: float = arg(0.0, "Double Entropy Loss: weight of the masked-image entropy.")
    gamma_anneal: bool = arg(False, "KL_prcp annealing (official switch): gamma goes linearly "
                                    "from --gamma to --gamma-end over the first "
                                    "--gamma-anneal-fraction of --steps, then stays there; "
                                    "--eta-orig and --eta-mask are scaled by gamma_t / gamma. "
                                    "Steps count from 1: step 1 uses --gamma, step 1 + "
                                    "int(fraction x steps) and later ones --gamma-end. The schedule follows "
                                    "--steps, also when a resume changes it. Logged: gamma_t.")
    gamma_end: float = arg(0.0, "KL_prcp annealing: the final gamma.")
    gamma_anneal_fraction: float = arg(0.5, "KL_prcp annealing: the share of --steps over which "
                                            "gamma moves to --gamma-end.")
    beta: float = arg(0.01, "Weight of KL to the frozen reference policy (0 = no reference).")
    clip_low: float = arg(0.2, "PPO clip range below 1.")
    clip_high: float = arg(0.3, "PPO clip range above 1 (DAPO's clip-higher).")
    dual_clip: float = arg(3.0, "Dual-clip constant C for negative advantages (0 = off).")
    agg_mode: str = arg("token-mean", "Loss aggregation: token-mean | seq-mean-token-mean | "
                                      "seq-mean-token-sum | seq-mean-token-sum-norm (each "
                                      "normalised over the whole mini-batch, all ranks: the "
                                      "gradient does not depend on --micro-batch-size) | "
                                      "micro-token-mean (the official code exactly: the mean of "
                                      "per-micro-batch token means, which DOES depend on "
                                      "--micro-batch-size and on the number of processes).")
    kl_kind: str = arg("k3", "KL estimator for KL_ref and KL_prcp: k1 | k2 | k3.")
    kl_prcp_clip: float = arg(0.0, "Clamp each token's KL_prcp to [0, C] before aggregating it, "
                                   "so no token can raise the term past C (official switch, C = "
                                   "0.2). 0 = off.")
    kl_prcp_token_fraction: float = arg(0.0, "Token-level KL_prcp mask: per rollout, the "
                                             "tokens whose KL_prcp is below the (1 - P) quantile "
                                             "of its tokens are zeroed (selected before "
                                             "--kl-prcp-clip; official switch, P = 0.2). The "
                                             "term keeps the normaliser of every term, the count "
                                             "of ALL valid tokens, as in the official code. "
                                             "0 = off.")
    entropy: str = arg("sample", "Entropy estimate: sample (official, -log p of the sampled token) "
                                 "or exact (-sum p log p from the logits).")
    dynamic_sampling: bool = arg(False, "DAPO: keep only groups whose mean accuracy is strictly "
                                        "between 0.01 and 0.99 and draw further prompts until the "
                                        "step has --prompts-per-step kept groups (the extra ones "
                                        "are trimmed). A draw in which no group passes keeps all "
                                        "its groups (as the official code does).")
    draw_size: int = arg(128, "Dynamic sampling: prompts per draw, summed over all ranks "
                              "(official: 128, a third of the step).")
    max_draws: int = arg(20, "Dynamic sampling: most draws for one step; if the step is still "
                             "not full after them, the run stops with an error (official: 20).")
    mask_ratio: float = arg(0.6, "Fraction of 14x14-pixel squares blacked out (PAPO).")
    mask_patch: int = arg(14, "Side of a masked square, in pixels of the raw image.")
    mask_mode: str = arg("bernoulli", "bernoulli (official, per-square coin) | exact.")
    sft_coef: float = arg(0.0, "SFT loss on correct rollouts (official switch, 1e-3): adds this "
                               "times the token mean of -log pi over the tokens of the rollouts "
                               "whose accuracy is 1, normalised by their number in the whole "
                               "mini-batch (all micro-batches and ranks; per micro-batch with "
                               "--agg-mode micro-token-mean). 0 = off. Not the offline warm "
                               "start's --sft-* settings.")
    perception_grad: bool = arg(False, "Recompute the masked branch WITH gradient at every update "
                                       "(the paper's general form). Default: detached, computed "
                                       "once per rollout batch (official).")

    # --- infrastructure ----------------------------------------------------------------------
    dtype: str = arg("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16.")
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward (non-reentrant).")
    fsdp: bool = arg(False, "Under torchrun: shard parameters, gradients and AdamW state over the "
                            "processes with FSDP2 (fully_shard per decoder layer and vision "
                            "block) instead of replicating them with DDP. For models whose "
                            "replicas do not fit (7B on 80 GB GPUs, see the README).")
    save_every: int = arg(50, "Checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = arg(2, "How many step checkpoints to keep.")
    sample_every: int = arg(25, "Log a few sample completions every N steps.")
    eval_samples: int = arg(4, "Samples per held-out question in the before/after table.")
    eval_size: int = arg(256, "Held-out questions used in the before/after table (0 = all).")
    eval_every: int = arg(0, "Also score the held-out set(s) every N steps and at the last step "
                             "(0 = only before and after) and log eval_* columns and its time "
                             "t_eval in metrics.jsonl, so the curves show WHEN accuracy with and "
                             "without the picture moves. The last step's is the final evaluation.")

    # --- the offline default (used only when --model is empty) -------------------------------
    tiny_size: str = arg("small", "Size of the offline model (toy.SIZES).")
    tiny_family: str = arg("qwen2.5-vl", "Model family of the offline model (toy.TINY_FAMILIES): "
                                         "qwen2.5-vl, qwen3-vl, or qwen3-vl-thinking (Qwen3-VL "
                                         "with the Thinking models' chat template, whose prompt "
                                         "opens <think>).")
    toy_world: str = arg("plain", "The toy world (toy.TOY_WORLDS): plain, or shortcut - the "
                                  "wording of some questions usually gives the answer away, and "
                                  "a 'conflict' split, where it never does, is scored as well.")
    toy_tasks: str = arg("", "Comma-separated toy tasks (toy.TOY_TASKS) to train on instead of "
                             "the world's own.")
    toy_train_size: int = arg(8192, "Toy training split size.")
    toy_eval_size: int = arg(256, "Toy held-out split size.")
    sft_steps: int = arg(3000, "Most steps of the supervised warm start on the toy solutions "
                               "(it stops earlier, at --sft-target-acc).")
    sft_lr: float = arg(1e-3, "Learning rate of the warm start.")
    sft_batch: int = arg(32, "Batch size of the warm start.")
    sft_target_acc: float = arg(0.45, "Stop the warm start once SAMPLED accuracy on 64 training "
                                      "prompts it never trained on reaches this: RL needs a model "
                                      "mid-way through learning the task.")
    cache: str = arg("cache", "Folder for the toy datasets and warm-start checkpoints.")


# The paper's four recipes (PAPO_REFERENCE section 4). Only the objective differs.
PRESETS: dict[str, dict] = {
    "grpo":   dict(gamma=0.0, eta_orig=0.0, eta_mask=0.0, beta=0.01, clip_high=0.3,
                   dynamic_sampling=False),
    "papo-g": dict(gamma=0.02, eta_orig=0.0, eta_mask=0.0, beta=0.01, clip_high=0.3,
                   dynamic_sampling=False),
    "dapo":   dict(gamma=0.0, eta_orig=0.0, eta_mask=0.0, beta=0.0, clip_high=0.28,
                   dynamic_sampling=True),
    "papo-d": dict(gamma=0.01, eta_orig=0.03, eta_mask=0.03, beta=0.0, clip_high=0.28,
                   dynamic_sampling=True),
}

# The offline toy world (TOY_WORLD_NOTES): a model of ~1M parameters learns with a much larger
# learning rate, short responses and small batches; G = 8 keeps enough groups with mixed rewards.
# Its 112 x 112 pictures (16 image tokens) are far below the official budget's 200,704 pixels,
# which would upscale them 16x in area (256 tokens, mostly blur); the toy budget is the tiny
# processor's own range, so budget_resize leaves them untouched.
TOY_OVERRIDES = dict(prompts_per_step=16, draw_size=8, group_size=8, max_new_tokens=32, lr=1e-4,
                     updates_per_step=1, micro_batch_size=64, steps=150, save_every=50,
                     min_pixels=56 * 56, max_pixels=112 * 112)


PATH_FIELDS = ("model", "data", "eval_data", "out", "resume", "cache", "prompt_template",
               "image_dir")


def saved_config(cfg: Config) -> dict:
    """The config as config.json stores it: every local path absolute, so that --resume from
    any working directory finds the same data, cache and warm start (a relative cache would
    silently rebuild the toy data and a NEW warm start - and with it a new KL_ref reference).
    Hub ids stay as they are."""
    out = dataclasses.asdict(cfg)
    for name in PATH_FIELDS:
        out[name] = absolute_path(out[name], always=name in ("out", "cache", "resume"))
    return out


def absolute_path(value: str, always: bool = False) -> str:
    """A local path or glob made absolute (`always`: even if it does not exist yet); anything
    else - a hub id, "" - as it is."""
    if value and (always or Path(value).expanduser().exists() or any(c in value for c in "*?[")):
        return os.path.abspath(os.path.expanduser(value))
    return value


def parse_config(argv=None) -> Config:
    """Build the command line from the dataclass, then apply the precedence described above."""
    epilog = ("Defaults shown are the official Qwen2.5-VL-3B recipe. Without --model the offline "
              "toy run overrides: " + ", ".join(f"{k}={v}" for k, v in TOY_OVERRIDES.items())
              + ". Presets: " + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items())
                                          for name, p in PRESETS.items()) + ".")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"]
        if f.type in ("bool", bool):
            # --flag / --no-flag; SUPPRESS keeps "not given" distinguishable from the default.
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_ + f" (default: {f.default})")
        else:
            typ = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=typ, default=argparse.SUPPRESS,
                                help=help_ + f" (default: {f.default})")
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", Config.preset)
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if given.get("resume"):
        # Continue with the run's own settings; flags given now (e.g. --steps) still win.
        saved = Path(given["resume"]) / "config.json"
        if not saved.is_file():
            parser.error(f"--resume {given['resume']}: {saved} not found (not a run folder)")
        if "out" in given and Path(given["out"]).resolve() != Path(given["resume"]).resolve():
            parser.error(f"--resume {given['resume']} --out {given['out']}: a resumed run "
                         "continues in its own folder; drop --out (or copy the run folder first)")
        try:
            values = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"--resume: {saved} is not readable JSON ({err})")
        known = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(values) - known)
        if unknown:
            print(f"note: {saved} has settings this version does not know, ignored: "
                  f"{', '.join(unknown)}")
        values = {k: v for k, v in values.items() if k in known}
        return Config(**{**values, **given, "resume": given["resume"]})
    values = {}
    if not given.get("model"):
        values.update(TOY_OVERRIDES)
    values.update(PRESETS[preset])
    values.update(given)
    return Config(**values)


# Every flag's allowed range, checked before anything heavy. A value outside it does not fail
# loudly by itself - it runs and trains wrongly (a negative --grad-clip turns descent into
# ascent, --temperature 0 makes every group's rollouts identical and every advantage 0) or
# crashes much later with an unrelated error - so each is named here with its range.
FLAG_RULES: list[tuple[str, Callable, str]] = [
    ("steps", lambda v: v >= 1, ">= 1"),
    ("prompts_per_step", lambda v: v >= 1, ">= 1"),
    ("group_size", lambda v: v >= 2, ">= 2 (advantages compare a rollout with its group)"),
    ("max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("temperature", lambda v: 0 < v < math.inf, "> 0 (0 is greedy: a group's rollouts would "
                                                "all be equal and carry no learning signal)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("lr", lambda v: 0 < v < math.inf, "> 0"),
    ("weight_decay", lambda v: 0 <= v < math.inf, ">= 0"),
    ("grad_clip", lambda v: 0 < v < math.inf, "> 0 (the largest gradient norm allowed)"),
    ("updates_per_step", lambda v: v >= 1, ">= 1"),
    ("micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("generation_batch", lambda v: v >= 0, ">= 0 (0 = all of a step's prompts in one call)"),
    ("gamma", lambda v: 0 <= v < math.inf, ">= 0 (the sign is in the objective: KL_prcp is "
                                            "maximised)"),
    ("eta_orig", lambda v: 0 <= v < math.inf, ">= 0"),
    ("eta_mask", lambda v: 0 <= v < math.inf, ">= 0"),
    ("gamma_end", lambda v: 0 <= v < math.inf, ">= 0"),
    ("gamma_anneal_fraction", lambda v: 0 < v <= 1, "in (0, 1] (a share of --steps)"),
    ("beta", lambda v: 0 <= v < math.inf, ">= 0"),
    ("clip_low", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("clip_high", lambda v: 0 <= v < math.inf, ">= 0"),
    ("dual_clip", lambda v: v == 0 or 1 < v < math.inf, "0 (off) or > 1"),
    ("agg_mode", lambda v: v in papo.ALL_AGG_MODES, "one of " + ", ".join(papo.ALL_AGG_MODES)),
    ("kl_kind", lambda v: v in papo.KL_KINDS, "one of " + ", ".join(papo.KL_KINDS)),
    ("kl_prcp_clip", lambda v: v == 0 or 0 < v < math.inf, "0 (off) or > 0 (the largest "
                                                           "KL_prcp a token contributes)"),
    ("sft_coef", lambda v: 0 <= v < math.inf, ">= 0 (0 = off)"),
    ("kl_prcp_token_fraction", lambda v: 0 <= v <= 1, "in [0, 1] (0 = off; the share of each "
                                                      "rollout's tokens kept)"),
    ("entropy", lambda v: v in papo.ENTROPY_KINDS, "one of " + ", ".join(papo.ENTROPY_KINDS)),
    ("draw_size", lambda v: v >= 1, ">= 1"),
    ("max_draws", lambda v: v >= 1, ">= 1"),
    ("mask_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("mask_patch", lambda v: v >= 1, ">= 1 (pixels)"),
    ("mask_mode", lambda v: v in papo.MASK_MODES, "one of " + ", ".join(papo.MASK_MODES)),
    ("min_pixels", lambda v: v >= 1, ">= 1"),
    ("max_pixels", lambda v: v >= 1, ">= 1"),
    ("max_prompt_length", lambda v: v >= 1, ">= 1"),
    ("max_image_pixels", lambda v: v >= 1, ">= 1"),
    ("dtype", lambda v: v in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
    ("save_every", lambda v: v >= 1, ">= 1"),
    ("keep_checkpoints", lambda v: v >= 1, ">= 1 (the newest checkpoint is always kept)"),
    ("sample_every", lambda v: v >= 0, ">= 0 (0 = never)"),
    ("eval_samples", lambda v: v >= 1, ">= 1"),
    ("eval_size", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("eval_every", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("tiny_size", lambda v: v in toy.SIZES, "one of " + ", ".join(toy.SIZES)),
    ("tiny_family", lambda v: v in toy.TINY_FAMILIES, "one of " + ", ".join(toy.TINY_FAMILIES)),
    ("toy_world", lambda v: v in toy.TOY_WORLDS, "one of " + ", ".join(toy.TOY_WORLDS)),
    ("toy_tasks", lambda v: all(t in toy.TOY_TASKS for t in v.split(",")) if v else True,
     "comma-separated names from " + ", ".join(toy.TOY_TASKS)),
    ("toy_train_size", lambda v: v >= 4, ">= 4 (the warm start keeps a quarter apart)"),
    ("toy_eval_size", lambda v: v >= 1, ">= 1"),
    ("sft_steps", lambda v: v >= 1, ">= 1"),
    ("sft_lr", lambda v: 0 < v < math.inf, "> 0"),
    ("sft_batch", lambda v: v >= 1, ">= 1"),
    ("sft_target_acc", lambda v: 0 <= v <= 1, "in [0, 1]"),
]


def check_config(cfg: Config, world_size: int) -> None:
    """Refuse bad settings before any heavy work: one message naming every bad flag and its
    allowed range."""
    problems = [f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: must be {allowed}"
                for name, ok, allowed in FLAG_RULES if not ok(getattr(cfg, name))]
    if cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world_size:
        problems.append(f"--prompts-per-step {cfg.prompts_per_step} is not divisible by the "
                        f"{world_size} processes")
    if cfg.dynamic_sampling and cfg.draw_size >= 1 and cfg.draw_size % world_size:
        problems.append(f"--draw-size {cfg.draw_size} is not divisible by the {world_size} "
                        f"processes")
    local = cfg.prompts_per_step // max(world_size, 1)       # groups per process and step
    if cfg.updates_per_step >= 1 and local and local % cfg.updates_per_step:
        problems.append(f"--updates-per-step {cfg.updates_per_step} does not divide the "
                        f"{local} groups (prompts) each process holds per step: mini-batches "
                        f"are whole groups")
    if cfg.fsdp and not dist.is_initialized():
        problems.append("--fsdp shards the model over processes: start it with torchrun "
                        "(torchrun --nproc_per_node N train.py --fsdp ...)")
    if cfg.masked_image_key and not cfg.data:
        problems.append(f"--masked-image-key {cfg.masked_image_key}: the offline toy data has no "
                        "pre-masked pictures; give --data with that column")
    if cfg.masked_image_key and not uses_masked_branch(cfg):
        problems.append(f"--masked-image-key {cfg.masked_image_key}: this objective has no "
                        "masked branch (--gamma 0 and --eta-mask 0), so the pictures would go "
                        "unused")
    if cfg.model and not cfg.data:
        problems.append("--model is given but --data is not: a real model needs a dataset "
                        "(the toy task is only for the offline tiny model)")
    shaping = [flag for flag, on in (("--kl-prcp-clip", cfg.kl_prcp_clip),
                                     ("--kl-prcp-token-fraction", cfg.kl_prcp_token_fraction),
                                     ("--gamma-anneal", cfg.gamma_anneal))
               if on]
    if shaping and cfg.gamma == 0:
        problems.append(f"{', '.join(shaping)} shape the KL_prcp term, which --gamma 0 turns "
                        "off (--preset grpo or dapo); set --gamma or drop them")
    if 1 <= cfg.max_pixels < cfg.min_pixels:
        problems.append(f"--min-pixels {cfg.min_pixels} is over --max-pixels {cfg.max_pixels}")
    if cfg.prompt_template:
        try:
            data.read_template(cfg.prompt_template)
        except ValueError as err:
            problems.append(str(err))
    # (data sources are checked when they are loaded: a hub id or a glob is not a file)
    if cfg.model and not Path(cfg.model).exists() and cfg.model.count("/") != 1:
        problems.append(f"--model {cfg.model}: no such folder, and not a hub id (owner/name)")
    if cfg.resume and not (Path(cfg.resume) / "latest.txt").is_file():
        problems.append(f"--resume {cfg.resume}: no checkpoint there (latest.txt missing)")
    out = Path(cfg.resume or cfg.out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out}: is a file, not a run folder")
    if problems:
        raise SystemExit("train.py: bad configuration:\n  - " + "\n  - ".join(problems))


def uses_masked_branch(cfg: Config) -> bool:
    return cfg.gamma > 0 or cfg.eta_mask > 0


# ---------------------------------------------------------------------------------------------
# Distributed preamble (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is one process).
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:  # only rank 0 logs and writes files
        return self.rank == 0


def setup_distributed() -> Dist:
    if "RANK" not in os.environ:
        d = Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        d = Dist(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
                 local_rank=int(os.environ["LOCAL_RANK"]))
        if torch.cuda.is_available():
            d.device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(d.device)
        # nccl for GPUs, gloo for CPU processes (the offline default under torchrun).
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo")
    if d.device.type == "cpu":
        # Tiny models on CPU produce denormal floats that slow every op by 10x part-way through a
        # run (TOY_WORLD_NOTES); flushing them to zero costs nothing measurable.
        torch.set_flush_denormal(True)
        if d.world > 1:  # processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    return d


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) a tensor over ranks; a no-op in a single process. nccl reduces only CUDA
    tensors and gloo only CPU ones, so the value travels to the backend's device and back."""
    if not dist.is_initialized():
        return x
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    y = x.detach().to(device).clone()
    dist.all_reduce(y, op=op or dist.ReduceOp.SUM)
    return y.to(x.device)


def unwrap(m):
    """The bare model inside DDP; an FSDP2 model is its own (fully_shard wraps nothing)."""
    return m.module if isinstance(m, DDP) else m


def shard_model(net, cfg: Config, d: Dist, trainable: bool):
    """FSDP2 (--fsdp): each vision block and decoder layer becomes one unit, whose parameters
    are stored as 1/world shards (DTensors) and gathered only while it runs (forward and
    backward); then the root unit takes the rest (embeddings, final norm, lm_head, patch
    embedding, merger). Gradient checkpointing was enabled on the layers before (load_model),
    so each checkpointed layer re-gathers its weights in the backward as usual.

    Mixed precision on GPU: the shards stay fp32 (the master weights an lr of 1e-6 needs), a
    unit is gathered in bf16 and gradients are reduced in fp32. On CPU: no mixed precision,
    as without --fsdp. The frozen reference (trainable=False) is already bf16 on GPU."""
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and d.device.type == "cuda")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if use_bf16 and trainable else MixedPrecisionPolicy())
    for block in net.model.visual.blocks:
        fully_shard(block, mp_policy=mp)
    for layer in net.model.language_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    # FSDP decides which unit is the root when a unit first runs: the first one called. Our
    # first call may well be net.model(...) (a prefill) or a vision block, which would then
    # wrongly become a root of its own; so the root is settled here, on the whole model.
    net._get_fsdp_state()._lazy_init()
    return net


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(cfg: Config, step: int, rank: int, salt: int = 0) -> int:
    """A seed that is a pure function of (run seed, step, rank): masks, data order and sampling of
    step s are identical whether the run got there in one go or through a resume."""
    return (cfg.seed * 1_000_003 + step * 7919 + rank * 104_729 + salt) % 2**31


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on GPU keeps fp32 master weights (an lr of 1e-6 vanishes in bf16 weights)."""
    use = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


# ---------------------------------------------------------------------------------------------
# Data: a JSONL dataset, or the offline toy task written to the cache folder once.
# ---------------------------------------------------------------------------------------------

def toy_tasks(cfg: Config) -> tuple[str, ...]:
    """The toy tasks trained on: --toy-tasks, else the world's."""
    given = tuple(t for t in cfg.toy_tasks.split(",") if t)
    return given or toy.TOY_WORLDS[cfg.toy_world].tasks


def toy_splits(cfg: Config) -> dict[str, tuple[Path, tuple[str, ...], int, int]]:
    """Every toy split: name -> (folder, tasks, size, seed). Each split has its own seed, so no
    held-out picture is ever trained on; the folder is named by tasks and size, so a world that
    shares a split with another (the plain tasks) shares its files too."""
    def folder(tasks, name, n):
        return Path(cfg.cache) / f"toy-{'+'.join(tasks)}" / f"{name}-{n}"
    tasks = toy_tasks(cfg)
    splits = {"train": (folder(tasks, "train", cfg.toy_train_size), tasks, cfg.toy_train_size, 1),
              "held-out": (folder(tasks, "heldout", cfg.toy_eval_size), tasks, cfg.toy_eval_size, 2)}
    for k, (name, extra) in enumerate(toy.TOY_WORLDS[cfg.toy_world].extra.items()):
        splits[name] = (folder(extra, "heldout", cfg.toy_eval_size), extra, cfg.toy_eval_size, 3 + k)
    return splits


def prepare_toy_data(cfg: Config, d: Dist) -> None:
    """Write the toy splits once (rank 0), so every later run and every rank reads the same files."""
    if d.main:
        for folder, tasks, n, seed in toy_splits(cfg).values():
            if not (folder / "data.jsonl").is_file():
                tmp = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                toy.make_toy_dataset(n, seed=seed, out_dir=tmp, tasks=tasks)
                tmp.rename(folder)
    barrier()


def data_sources(cfg: Config) -> tuple[str, dict[str, str]]:
    """(training source, {held-out split name: source}): the flags, or the toy splits' files.
    --eval-data replaces the toy held-out split drawn like training; the world's other splits
    (the shortcut world's conflict split) stay as long as the training data is the toy's."""
    if cfg.data:
        return cfg.data, {"held-out": cfg.eval_data} if cfg.eval_data else {}
    splits = {name: str(folder / "data.jsonl") for name, (folder, *_) in toy_splits(cfg).items()}
    train = splits.pop("train")
    if cfg.eval_data:
        splits["held-out"] = cfg.eval_data
    return train, splits


def load_datasets(cfg: Config, d: Dist) -> tuple[data.Dataset, dict[str, data.Dataset]]:
    """Every row is checked before training starts (data.load_dataset): a bad row - including one
    without a picture, which the masked branch could not mask - stops the run naming its source
    and row, all bad rows at once. Pictures stay on disk (or in the table) until drawn."""
    train_src, eval_srcs = data_sources(cfg)
    keys = dict(problem_key=cfg.problem_key, answer_key=cfg.answer_key, image_key=cfg.image_key,
                image_dir=cfg.image_dir or None, max_image_pixels=cfg.max_image_pixels,
                progress=d.main)
    try:
        # pre-masked pictures are a training input; the held-out sets are masked at random
        train = data.load_dataset(train_src, **keys,
                                  masked_image_key=cfg.masked_image_key or None)
        heldout = {name: data.load_dataset(src, **keys)[: cfg.eval_size or None]
                   for name, src in eval_srcs.items()}
    except data.DatasetError as err:
        raise SystemExit(f"train.py: {err}") from None
    return train, heldout


@functools.lru_cache(maxsize=4)
def _template(path: str) -> str | None:
    return data.read_template(path) if path else None


def prompt_options(cfg: Config) -> dict:
    """How a dataset row becomes a prompt: the template and the pixel budget (Example.to_prompt)."""
    return dict(template=_template(cfg.prompt_template), min_pixels=cfg.min_pixels,
                max_pixels=cfg.max_pixels)


def fit_pixel_budget(cfg: Config, processor, announce: bool = True) -> Config:
    """cfg with --min-pixels lowered to the most pixels the processor keeps, where it is above
    them (model.fit_min_pixels says why; the tiny Qwen2.5-VL processor keeps 12,544, the
    official minimum is 200,704). --max-pixels is left as given."""
    low = qwen.fit_min_pixels(processor.image_processor, cfg.min_pixels)
    if low == cfg.min_pixels:
        return cfg
    if announce:
        print(f"--min-pixels {cfg.min_pixels} is above the most pixels the processor keeps "
              f"({low}): pictures would be scaled up, then back down by the processor. Using "
              f"--min-pixels {low}.")
    return dataclasses.replace(cfg, min_pixels=low)


def check_prompt_lengths(dataset: data.Dataset, processor, cfg: Config, what: str,
                         ) -> tuple[data.Dataset, int]:
    """Count the rows whose prompt (pictures' tokens included) is over --max-prompt-length.

    Computed from the text and the picture sizes recorded when the rows were checked - no
    picture is decoded. Long rows stop the run, named, unless --drop-long-prompts; then they are
    left out and their number is returned, to be printed and logged. Never a silent skip."""
    opts = prompt_options(cfg)
    rows = dataset.rows
    lengths = []
    for start in range(0, len(rows), 1024):    # batches: the tokenizer is fastest on lists
        lengths += qwen.prompt_lengths(processor, [
            (data.chat_messages(ex.prompt_text(opts["template"]), len(ex.sizes)),
             [data.budget_size(w, h, cfg.min_pixels, cfg.max_pixels) for w, h in ex.sizes])
            for ex in rows[start:start + 1024]])
    long = [i for i, n in enumerate(lengths) if n > cfg.max_prompt_length]
    if not long:
        return dataset, 0
    named = [f"{rows[i].source}: {lengths[i]} tokens" for i in long]
    if not cfg.drop_long_prompts:
        raise SystemExit(
            f"train.py: {len(long)} of {len(rows)} {what} prompts are longer than "
            f"--max-prompt-length {cfg.max_prompt_length} (pictures' tokens included); shorten "
            f"them, raise the limit, lower --max-pixels, or pass --drop-long-prompts:\n  "
            + "\n  ".join(named[:20]) + (f"\n  ... and {len(named) - 20} more" if len(named) > 20 else ""))
    keep = [i for i in range(len(rows)) if lengths[i] <= cfg.max_prompt_length]
    if not keep:
        raise SystemExit(f"train.py: every {what} prompt is over --max-prompt-length "
                         f"{cfg.max_prompt_length}: nothing left to train on")
    print(f"--drop-long-prompts: dropped {len(long)} of {len(rows)} {what} rows over "
          f"{cfg.max_prompt_length} tokens (first: {named[0]})")
    return dataset.subset(keep), len(long)


def draw_prompts(examples: list[data.Example], cfg: Config, d: Dist, cursor: int, n: int,
                 ) -> tuple[list[data.Example], int]:
    """This rank's share of the next `n` prompts (global count) after `cursor` prompts were used.

    The dataset is shuffled once per epoch with a seed shared by all ranks; the run walks through
    that order, and rank r takes every world-th prompt of each slice. The cursor is saved in
    checkpoints, so a resumed run draws exactly the prompts the uninterrupted run would have."""
    orders: dict[int, np.ndarray] = {}
    picked = []
    for k in range(cursor + d.rank, cursor + n, d.world):
        epoch, idx = divmod(k, len(examples))
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))
        picked.append(examples[orders[epoch][idx]])
    return picked, cursor + n


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# The offline warm start: a short supervised stage on the toy task's worked solutions, so that
# RL starts from a model that formats its answers and is right some of the time (a random model
# earns reward 0 on every rollout, and every advantage is 0). Cached: it runs once per setting.
# ---------------------------------------------------------------------------------------------

def warm_start_path(cfg: Config) -> Path:
    """The cache folder of the warm start for these settings. The prompt is part of the key: a
    warm start trained on other wording (and a tokenizer trained on another corpus) would start
    RL off its own distribution."""
    tasks = "+".join(toy_tasks(cfg))
    prompt = hashlib.sha1(_prompt_fingerprint(cfg).encode()).hexdigest()[:8]
    family = "" if cfg.tiny_family == "qwen2.5-vl" else f"{cfg.tiny_family}-"   # older names kept
    return (Path(cfg.cache) / f"warmstart-{family}{cfg.tiny_size}-{tasks}-seed{cfg.seed}"
            f"-steps{cfg.sft_steps}-target{cfg.sft_target_acc}-prompt{prompt}")


def _prompt_fingerprint(cfg: Config) -> str:
    """The prompt text of a fixed question: changes whenever the template or instruction does."""
    return data.format_prompt("{problem}", _template(cfg.prompt_template))


def warm_start(cfg: Config, d: Dist, train: data.Dataset) -> Path:
    """Supervised fine-tuning = maximising completion_logprobs of the worked solution: the same
    function that scores rollouts in RL, so the warm start exercises exactly the RL code path."""
    path = warm_start_path(cfg)
    if d.main and not (path / "config.json").is_file():
        seed_everything(cfg.seed)
        policy, processor = toy.build_tiny_model(seed=cfg.seed, size=cfg.tiny_size,
                                                  family=cfg.tiny_family)
        # A Thinking template's prompt already opens <think>: the target starts inside it.
        opened = qwen.prompt_opens_thinking(processor)
        target = lambda ex: ex.solution.removeprefix(qwen.THINK_OPEN) if opened else ex.solution
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
        # The stopping rule watches a slice of the TRAINING split that the warm start never
        # trains on, so the held-out numbers reported later were not used to pick the model.
        n_probe = min(64, len(train) // 4)
        train, probe = train[:-n_probe], train[-n_probe:]
        bar = tqdm(range(1, cfg.sft_steps + 1), desc="warm start", dynamic_ncols=True)
        acc = 0.0
        for step in bar:
            rng = np.random.default_rng([cfg.seed, step, 17])
            batch = [train[i] for i in rng.integers(0, len(train), cfg.sft_batch)]
            prompts = [ex.to_prompt(**prompt_options(cfg)) for ex in batch]
            targets = qwen.rollouts_from_texts(processor, prompts, [target(ex) for ex in batch])
            # A short linear warm-up keeps the first large-lr steps of a random model stable.
            for group in optimizer.param_groups:
                group["lr"] = cfg.sft_lr * min(1.0, step / 20)
            logp = qwen.completion_logprobs(policy, targets)                    # [B, T]
            loss = -papo.aggregate(logp, targets.completion_mask)               # token-mean NLL
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            if step % 25 == 0:
                acc = evaluation.evaluate(policy, processor, probe, samples=2, temperature=1.0,
                                          max_new_tokens=cfg.max_new_tokens, seed=step,
                                          mask_ratios=(), **prompt_options(cfg))["accuracy"]
                if acc >= cfg.sft_target_acc:
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
    barrier()
    return path


# ---------------------------------------------------------------------------------------------
# One RL step, phase by phase.
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One rank's rollout batch, ready for the update. B = prompts * G rollouts, group-major."""
    rollouts: qwen.Rollouts                   # token ids, masks, original-image pixels
    masked: qwen.Rollouts | None              # the same rollouts with the masked images' pixels
    rewards: torch.Tensor                     # [B]
    accuracy: torch.Tensor                    # [B]
    fmt: torch.Tensor                         # [B]
    advantages: torch.Tensor                  # [B]
    old_logp: torch.Tensor | None = None      # [B, T] policy that sampled (None: on-policy)
    ref_logp: torch.Tensor | None = None      # [B, T] frozen reference policy
    masked_logp: torch.Tensor | None = None   # [B, T] policy on the masked images, pre-update
    masked_entropy: torch.Tensor | None = None  # [B, T] exact entropy of that branch


def generate_phase(policy, processor, prompts: list[data.Example], cfg: Config, seed: int,
                   need_masked: bool) -> tuple[qwen.Rollouts, qwen.Rollouts | None]:
    """Mask (PAPO) and generate. The masked images are built here, once per prompt, so that the
    G rollouts of a group are all compared against the SAME corrupted picture: their advantages
    and their KL_prcp then differ only through the sampled text. With --masked-image-key they
    are the dataset's pre-masked pictures instead of random patches.

    The order is the official one: the patch mask blacks out 14 x 14-pixel squares of the RAW
    picture, and each branch is then resized into the pixel budget on its own, the masked copy
    exactly like the original (so a square of the raw picture becomes a 14 f-pixel square of
    the model's input, f the budget's scale factor, and both branches get the same size)."""
    fit = lambda pictures: [data.budget_resize(p, cfg.min_pixels, cfg.max_pixels)
                            for p in pictures]
    masked_images = None
    # Decoding and resizing the pictures is PIL work, which releases the GIL: one thread per
    # core (torch is idle meanwhile). Same pictures, same order as a plain loop.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        raw = list(pool.map(lambda ex: ex.load_images(), prompts))      # RGB, not resized
        pictures = list(pool.map(fit, raw))                              # in the budget
        if need_masked and cfg.masked_image_key:
            # the dataset's own corrupted pictures, through the same decoding and pixel budget
            masked_images = list(pool.map(
                lambda ex: ex.load_masked_images(cfg.min_pixels, cfg.max_pixels), prompts))
        elif need_masked:
            rng = np.random.default_rng(seed)       # drawn in prompt order, as a plain loop
            masked_raw = [papo.mask_image(p, patch_size=cfg.mask_patch, ratio=cfg.mask_ratio,
                                          rng=rng, mode=cfg.mask_mode) for p in raw]
            masked_images = list(pool.map(fit, masked_raw))
    del raw
    template = prompt_options(cfg)["template"]
    items = [ex.to_prompt(template, pictures=p) for ex, p in zip(prompts, pictures)]
    if cfg.masked_image_key and masked_images is not None:
        for ex, mine, theirs in zip(prompts, masked_images, pictures):
            # checked per row when the data was loaded; rows built in code get the same check
            if [im.size for im in mine] != [im.size for im in theirs]:
                raise ValueError(f"{ex.source}: column {cfg.masked_image_key!r}: pre-masked "
                                 f"picture sizes {[im.size for im in mine]} differ from the "
                                 f"originals' {[im.size for im in theirs]}")
    torch.manual_seed(seed)                         # sampling of this step is reproducible
    # In chunks of --generation-batch prompts: the KV cache of one call grows with rows x
    # (prompt + response). Every rank holds as many prompts, so under --fsdp all ranks make the
    # same number of calls (each decode step is a collective there). The chunks' rollouts are
    # stacked in prompt order, as one call would give them (cat_rollouts re-pads).
    chunk = cfg.generation_batch or len(items)
    parts = [qwen.generate_rollouts(policy, processor, items[start:start + chunk],
                                    num_samples=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p)
             for start in range(0, len(items), chunk)]
    rollouts = parts[0] if len(parts) == 1 else qwen.cat_rollouts(parts)
    masked = None
    if need_masked:
        # The processor treats the masked pictures exactly like the originals (same size in,
        # same grid out), so the number of image tokens is unchanged.
        pixels = qwen.encode_images(processor, masked_images)         # once per prompt
        if not torch.equal(pixels["image_grid_thw"].cpu(), rollouts.image_grid_thw.cpu()):
            raise RuntimeError("masked images produced a different image-token grid")
        masked = dataclasses.replace(
            rollouts, pixel_values=pixels["pixel_values"].to(rollouts.pixel_values.device))
    return rollouts, masked


def reward_phase(rollouts: qwen.Rollouts, prompts: list[data.Example], group_size: int,
                 thinking_open: bool = False):
    """Rule-based rewards: 0.9 * accuracy + 0.1 * format (rewards.reward_details). thinking_open:
    the chat template opened <think> in the prompt (model.prompt_opens_thinking)."""
    details = [rewards.reward_details(text, prompts[b // group_size].answer, thinking_open)
               for b, text in enumerate(rollouts.texts)]
    as_tensor = lambda key: torch.tensor([x[key] for x in details], dtype=torch.float32)
    return as_tensor("reward"), as_tensor("accuracy"), as_tensor("format")


class DynamicSamplingExhausted(RuntimeError):
    """DAPO's dynamic sampling made --max-draws draws without filling the step."""


def collect_batch(policy, processor, examples, cfg: Config, d: Dist, step: int, cursor: int,
                  need_masked: bool) -> tuple[Batch, int, dict]:
    """Phases 1-5: draw, mask, generate, reward, advantages (+ DAPO's dynamic sampling).

    Without dynamic sampling this is one draw of --prompts-per-step prompts. With it, the
    official refill: draws of --draw-size prompts, each filtered (groups whose rollouts all got
    the same accuracy carry zero advantage and no policy-gradient signal, so they are dropped;
    a draw in which NO group passes keeps all its groups, as the official code does), until the
    step holds --prompts-per-step kept groups; the extra kept groups are trimmed. After
    --max-draws draws without a full step the run stops with an error.

    Over several ranks every rank draws its share of each draw, the keep-all rule looks at the
    whole draw, and the ranks draw again until EVERY rank holds its share of the step (they run
    collectives in lockstep, and each trains on the same number of groups); then each trims its
    own extra. So the step is always full; it can take a draw more than one process would."""
    per_rank = cfg.prompts_per_step // d.world
    kept: list[tuple] = []
    stats = dict(reward=[], accuracy=[], format=[], length=[], zero_var_groups=0, groups=0)
    draws = cfg.max_draws if cfg.dynamic_sampling else 1
    for draw in range(draws):
        size = cfg.draw_size if cfg.dynamic_sampling else cfg.prompts_per_step
        prompts, cursor = draw_prompts(examples, cfg, d, cursor, size)
        seed = step_seed(cfg, step, d.rank, salt=draw)
        with autocast(cfg, d.device):
            rollouts, masked = generate_phase(policy, processor, prompts, cfg, seed, need_masked)
        rewards, acc, fmt = reward_phase(rollouts, prompts, cfg.group_size,
                                         qwen.prompt_opens_thinking(processor))
        advantages = papo.group_advantages(rewards, cfg.group_size)
        by_group = acc.view(-1, cfg.group_size)                              # [N, G]
        zero_var = (by_group == by_group[:, :1]).all(dim=1)                  # [N]
        # statistics describe every sampled rollout, before any group is dropped
        stats["reward"].append(rewards); stats["accuracy"].append(acc); stats["format"].append(fmt)
        stats["length"].append(rollouts.completion_mask.sum(-1).float().cpu())
        stats["zero_var_groups"] += int(zero_var.sum()); stats["groups"] += len(zero_var)
        keep = torch.ones(len(prompts), dtype=torch.bool)                    # [N]
        if cfg.dynamic_sampling:
            keep = papo.dynamic_sampling_keep(by_group)                      # [N]
            if int(all_reduce(keep.sum())) == 0:      # no group of the whole draw passes
                keep[:] = True
        groups = keep.nonzero().flatten()
        rows = (groups[:, None] * cfg.group_size + torch.arange(cfg.group_size)).flatten()
        take = lambda r: r if r is None or len(rows) == len(r) else r.select(rows)  # no copy if all kept
        kept.append((take(rollouts), take(masked),
                     rewards[rows], acc[rows], fmt[rows], advantages[rows]))
        n_kept = sum(len(k[0]) for k in kept) // cfg.group_size
        # every rank must agree on when to stop drawing (they run collective ops in lockstep)
        if int(all_reduce(torch.tensor(n_kept), op=dist.ReduceOp.MIN)) >= per_rank:
            break
    else:
        if cfg.dynamic_sampling:
            have = int(all_reduce(torch.tensor(min(n_kept, per_rank))))
            raise DynamicSamplingExhausted(
                f"step {step}: dynamic sampling made --max-draws {cfg.max_draws} draws of "
                f"--draw-size {cfg.draw_size} prompts and kept only {have} of the "
                f"{cfg.prompts_per_step} groups a step needs (a group is kept when its "
                f"rollouts' mean accuracy is strictly between 0.01 and 0.99). Raise "
                f"--max-draws or --draw-size, lower --prompts-per-step, or check the data: "
                f"questions the policy always or never gets right leave no signal.")
    stats["draws"] = draw + 1
    n = per_rank * cfg.group_size              # the step's share of this rank, extra trimmed

    def merge(parts):   # one draw with nothing dropped (GRPO, PAPO-G) needs no copy at all
        whole = parts[0] if len(parts) == 1 else qwen.cat_rollouts(parts)
        return whole if len(whole) == n else whole.select(range(n))
    rollouts = merge([k[0] for k in kept])
    masked = merge([k[1] for k in kept]) if need_masked else None
    tensors = [torch.cat([k[i] for k in kept])[:n] for i in range(2, 6)]
    device = rollouts.completion_ids.device
    return Batch(rollouts, masked, *[t.to(device) for t in tensors]), cursor, stats


@torch.no_grad()
def score_phase(batch: Batch, policy, ref_model, cfg: Config, d: Dist) -> None:
    """Phase 6: log-probs that the update treats as constants, with the pre-update weights.

    - old: needed only when one rollout batch feeds several optimizer steps (after the first,
      the policy has moved away from the one that sampled); with one update it equals the live
      log-prob, so the update uses that, detached, and this forward is skipped.
    - ref: the frozen starting policy, for the beta * KL_ref term.
    - masked (official PAPO): the policy on the masked images, computed ONCE here and detached.
      Its gradient would push the masked branch AWAY from the original one (raising KL by making
      the blind policy worse) - the official code does not train that branch; --perception-grad
      recomputes it with gradient at every update instead."""
    mb = cfg.micro_batch_size
    rows = [torch.arange(i, min(i + mb, len(batch.rollouts)))
            for i in range(0, len(batch.rollouts), mb)]

    def run(model, rollouts, with_entropy=False):
        outs = []
        for idx in rows:
            with autocast(cfg, d.device):
                outs.append(qwen.completion_logprobs(model, rollouts.select(idx),
                                                     temperature=cfg.temperature,
                                                     with_entropy=with_entropy))
        if with_entropy:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return torch.cat(outs)

    policy.eval()   # no dropout in Qwen2.5-VL, but be explicit: scoring is inference
    if cfg.updates_per_step > 1:
        batch.old_logp = run(policy, batch.rollouts)
    if cfg.beta > 0:
        batch.ref_logp = run(ref_model, batch.rollouts)
    if batch.masked is not None and not cfg.perception_grad:
        if cfg.entropy == "exact":
            batch.masked_logp, batch.masked_entropy = run(policy, batch.masked, with_entropy=True)
        else:
            batch.masked_logp = run(policy, batch.masked)
        # The masked pictures are not needed any more: free their patch rows before the update,
        # the step's memory peak, so that PAPO's extra memory there is one [B, T] tensor.
        batch.masked = None
    policy.train()


def update_phase(batch: Batch, policy, optimizer, cfg: Config, d: Dist, step: int) -> dict:
    """Phase 7: `updates_per_step` optimizer steps on disjoint mini-batches, each accumulated over
    micro-batches.

    Normalisation: papo.aggregate divides by the GLOBAL number of tokens (or sequences) of the
    mini-batch, summed over micro-batches AND ranks, so the accumulated gradient equals that of
    one big batch whatever the micro-batch size or the number of GPUs. DDP averages gradients
    over ranks, hence the factor world size on each rank's loss. --agg-mode micro-token-mean is
    the exception on purpose: each micro-batch's own token mean, divided by the number of
    micro-batches of the mini-batch over all ranks (the official code)."""
    B, G = len(batch.rollouts), cfg.group_size
    mask = batch.rollouts.completion_mask.float()                            # [B, T]
    # the rollouts whose answer is right: the SFT term's rows
    correct = (batch.accuracy == 1) if cfg.sft_coef else None                # [B]
    gamma, eta_orig, eta_mask = cfg.gamma, cfg.eta_orig, cfg.eta_mask
    if cfg.gamma_anneal:
        gamma, eta_orig, eta_mask = papo.annealed_coefficients(
            step, cfg.steps, cfg.gamma, cfg.eta_orig, cfg.eta_mask, gamma_end=cfg.gamma_end,
            fraction=cfg.gamma_anneal_fraction)
    # Mini-batches are random GROUPS, their G rollouts kept together and adjacent: a micro-batch
    # then holds whole groups, and completion_logprobs reads each group's prompt and picture once
    # for its G rollouts (random rows would split groups over micro-batches and read them again).
    order = torch.randperm(B // G, generator=torch.Generator().manual_seed(
        step_seed(cfg, step, d.rank, 3)))                                     # [B / G] groups
    minis = [(groups[:, None] * G + torch.arange(G)).flatten()               # rows of the groups
             for groups in order.chunk(cfg.updates_per_step)]
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    grad_norms, skipped = [], 0
    for mini in minis:
        micros = mini.split(cfg.micro_batch_size)
        if cfg.agg_mode == "token-mean":
            count = mask[mini].sum()
        elif cfg.agg_mode == papo.MICRO_TOKEN_MEAN:
            count = torch.tensor(float(len(micros)))      # K: micro-batches, summed over ranks
        else:
            count = torch.tensor(float(len(mini)))
        normalizer = all_reduce(count)
        sft_count = None
        if correct is not None and cfg.agg_mode != papo.MICRO_TOKEN_MEAN:
            # the SFT term is a token mean over the correct rollouts of the WHOLE mini-batch;
            # with none of them anywhere it is 0, and 1 keeps the division defined
            sft_count = all_reduce((mask[mini] * correct[mini, None]).sum()).clamp(min=1.0)
        for i, idx in enumerate(micros):
            # DDP: only the last micro-batch all-reduces gradients; the others accumulate
            # locally. FSDP always reduce-scatters (no no_sync there): accumulating unreduced
            # gradients would keep a full-size gradient per rank, the memory FSDP saves.
            sync = i == len(micros) - 1 or not isinstance(policy, DDP)
            with (contextlib.nullcontext() if sync else policy.no_sync()):
                micro = batch.rollouts.select(idx)
                with autocast(cfg, d.device):
                    out = qwen.completion_logprobs(policy, micro, temperature=cfg.temperature,
                                                   with_entropy=cfg.entropy == "exact")
                    logp, ent = out if cfg.entropy == "exact" else (out, None)
                    masked_logp, masked_ent = _masked_branch(batch, policy, idx, cfg)
                old = batch.old_logp[idx] if batch.old_logp is not None else logp.detach()
                loss, metrics = papo.papo_loss(
                    logp, old, batch.advantages[idx], mask[idx],
                    masked_logp=masked_logp,
                    ref_logp=batch.ref_logp[idx] if batch.ref_logp is not None else None,
                    gamma=gamma, eta_orig=eta_orig, eta_mask=eta_mask, beta=cfg.beta,
                    clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                    dual_clip=cfg.dual_clip or None, agg_mode=cfg.agg_mode, kl_kind=cfg.kl_kind,
                    entropy=cfg.entropy, entropy_orig=ent, entropy_mask=masked_ent,
                    normalizer=normalizer, max_len=cfg.max_new_tokens,
                    kl_prcp_clip=cfg.kl_prcp_clip or None,
                    kl_prcp_token_fraction=cfg.kl_prcp_token_fraction or None,
                    sft_coef=cfg.sft_coef, sft_rows=correct[idx] if correct is not None else None,
                    sft_normalizer=sft_count)
                (loss * d.world).backward()
            # token-weighted average of per-micro metrics; sft_nll is a mean over the correct
            # rollouts' tokens only, so those are its weights
            w = float(mask[idx].sum())
            own = {}
            if correct is not None:
                own["sft_nll"] = float((mask[idx] * correct[idx, None]).sum())
            for k, v in metrics.items():
                if k != "loss":
                    sums[k] = sums.get(k, 0.0) + v * own.get(k, w)
                    weights[k] = weights.get(k, 0.0) + own.get(k, w)
        # With FSDP the gradients are DTensor shards: clip_grad_norm_ computes each shard's part
        # and reduces the norm over the ranks itself, returning a DTensor (full_tensor: a value)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):   # gradients are all-reduced, so every rank agrees
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        grad_norms.append(float(grad_norm))
    # average the metrics over ranks, weighted by their token counts
    keys = sorted(sums)
    packed = all_reduce(torch.tensor([sums[k] for k in keys] + [weights[k] for k in keys],
                                     dtype=torch.float64))
    out = {k: float(packed[j] / max(packed[len(keys) + j], 1.0)) for j, k in enumerate(keys)}
    out.update(grad_norm=float(np.mean(grad_norms)), skipped_updates=skipped, gamma_t=gamma)
    if cfg.gamma_anneal:
        out.update(eta_orig_t=eta_orig, eta_mask_t=eta_mask)
    return out


def _masked_branch(batch: Batch, policy, idx, cfg: Config):
    """Masked-branch log-probs for this micro-batch: the detached ones from score_phase, or -
    with --perception-grad - a fresh forward WITH gradient (a second forward through the same
    DDP wrapper before one backward is fine: each parameter's gradient hook fires once)."""
    if cfg.perception_grad and batch.masked is not None:
        out = qwen.completion_logprobs(policy, batch.masked.select(idx),
                                       temperature=cfg.temperature,
                                       with_entropy=cfg.entropy == "exact")
        return out if cfg.entropy == "exact" else (out, None)
    if batch.masked_logp is None:
        return None, None
    ent = batch.masked_entropy[idx] if batch.masked_entropy is not None else None
    return batch.masked_logp[idx], ent


# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder and renamed, then `latest.txt` is replaced
# atomically - a crash at any moment leaves the previous checkpoint complete and pointed to.
# ---------------------------------------------------------------------------------------------

def save_checkpoint(run: Path, step: int, policy, processor, optimizer, state: dict,
                    cfg: Config, d: Dist | None = None) -> Path:
    """Called on every rank. Without --fsdp only rank 0 works (every rank holds everything).
    With --fsdp the model is gathered (a collective) into one ordinary Hugging Face folder
    written by rank 0, and the optimizer state is written SHARDED by all ranks into
    <checkpoint>/optimizer with torch.distributed.checkpoint (each rank its own part; on
    several nodes the run folder must be on a filesystem they share)."""
    d = d or Dist()
    final = run / f"checkpoint-{step:06d}"
    tmp = run / f".tmp-checkpoint-{step:06d}"
    if cfg.fsdp:
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        optimizer_shards = {"optimizer": get_optimizer_state_dict(policy, optimizer)}
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.fsdp:
            unsharded_copy(policy, full).save_pretrained(tmp)
        else:
            unwrap(policy).save_pretrained(tmp)  # loadable by model.load_model and plain transformers
    if cfg.fsdp:
        barrier()                            # the folder exists before the others write into it
        dcp.save(optimizer_shards, checkpoint_id=str(tmp / "optimizer"))
        barrier()
    if not d.main:
        return final
    qwen.save_processor(processor, tmp)      # names the stock processor classes (see there)
    torch.save({"optimizer": None if cfg.fsdp else optimizer.state_dict(), "state": state,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp / "trainer_state.pt")
    (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = run / "latest.txt.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, run / "latest.txt")   # the commit point
    write_run_info(run, checkpoint=str(final.absolute()))
    prune_checkpoints(run, cfg.keep_checkpoints, keep=final)
    return final


def unsharded_copy(policy, full_state: dict):
    """An ordinary (unsharded) model holding `full_state` - the gathered weights of a sharded
    one - for save_pretrained: the sharded model itself would save its FSDP class name as the
    architecture. Built on the meta device (no memory) and given the tensors themselves."""
    net = unwrap(policy)
    with torch.device("meta"):
        plain = qwen.family_of(net).model_class._from_config(net.config)
    plain.load_state_dict(full_state, assign=True)
    plain.tie_weights()       # a tied lm_head is one tensor with embed_tokens again
    plain.generation_config = net.generation_config
    return plain


def checkpoint_step(folder: Path) -> int | None:
    """checkpoint-000150 -> 150; None for any other name."""
    digits = folder.name.removeprefix("checkpoint-")
    return int(digits) if folder.name.startswith("checkpoint-") and digits.isdigit() else None


def prune_checkpoints(run: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the `keep_last` newest checkpoints BY STEP (a name sort breaks past step
    999,999), never `keep` - the one latest.txt names."""
    folders = sorted((f for f in run.glob("checkpoint-*") if checkpoint_step(f) is not None),
                     key=checkpoint_step)
    for folder in folders[:-keep_last]:
        if folder.resolve() != keep.resolve():
            shutil.rmtree(folder, ignore_errors=True)


def write_run_info(run: Path, **fields) -> None:
    """Merge `fields` into run.json: what a later evaluation of this run needs - the latest
    checkpoint, the held-out data, the generation length, the pixel budget and the prompt
    template. eval.py reads this file (and never imports this one). Replaced atomically."""
    path = run / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields)
    tmp = run / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


# What a run writes into its folder: --overwrite deletes exactly these, nothing else.
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "latest.txt", "latest.txt.tmp", "run.json",
             "run.json.tmp", "config.json", "final_eval.json", "final_table.txt", "curves.png")


def prepare_run_folder(cfg: Config, run: Path) -> None:
    """Make the (locked) run folder safe to write (rank 0): a fresh run refuses a folder that
    holds anything but an empty lock, unless --overwrite, which deletes the earlier run's files
    and nothing else; --resume continues the folder it names."""
    if cfg.resume:
        return
    earlier = sorted(p.name for p in run.iterdir() if p.name != ".lock")
    if not earlier:
        return
    if not cfg.overwrite:
        raise SystemExit(
            f"train.py: --out {run} is not empty ({', '.join(earlier[:5])}"
            f"{', ...' if len(earlier) > 5 else ''}). Continue that run with --resume {run}, "
            f"start afresh with --overwrite, or pick another --out.")
    ours = [n for n in earlier if n in RUN_FILES or n.startswith(("checkpoint-", ".tmp-checkpoint-"))]
    for name in ours:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    print(f"--overwrite: deleted the earlier run's {len(ours)} files in {run}")


def read_log(path: Path) -> list[dict]:
    """The rows of a JSONL log. A line that does not parse - the last one, torn by a crash in
    the middle of a write - is dropped with a note instead of stopping the resume."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: {path}:{n} is not complete JSON (a write cut short); dropped")
    return rows


def load_start(cfg: Config, d: Dist, run: Path, init_path: str):
    """(policy, processor, ref, optimizer, state) to start the loop from: fresh, or - with
    --resume - the newest checkpoint that loads. A checkpoint that fails to load (a truncated
    file, a disk error) is named and the previous intact one is used instead."""
    candidates = [None]
    if cfg.resume:
        named = latest_checkpoint(run)
        older = sorted((f for f in run.glob("checkpoint-*") if checkpoint_step(f) is not None
                        and f.resolve() != named.resolve()), key=checkpoint_step, reverse=True)
        candidates = [named, *older]
    for i, folder in enumerate(candidates):
        try:
            policy, processor, ref = build_policy(cfg, d, init_path, folder)
            # fused: one kernel over all parameters instead of a loop of small ops (0.4 ms
            # against 2 ms a step on the tiny model); the same update rule. With --fsdp the
            # parameters are DTensor shards: AdamW is elementwise, so each rank updates its own
            # shard, and fused takes DTensors (torch 2.13; a 2-rank run matches DDP bit for bit).
            optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                          lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
            state = {"step": 0, "cursor": 0, "before": None, "history": []}
            if folder is not None:
                state = load_trainer_state(folder, policy, optimizer, cfg)
        except Exception as err:   # whatever a damaged checkpoint raises, with its path named
            rest = candidates[i + 1:]
            if folder is None or not rest:
                if folder is None:
                    raise
                raise SystemExit(f"train.py: cannot resume: checkpoint {folder} does not load "
                                 f"({type(err).__name__}: {err}) and no older one is left") from None
            print(f"WARNING: checkpoint {folder} does not load ({type(err).__name__}: "
                  f"{str(err)[:200]}); falling back to {rest[0]}")
            continue
        break
    if folder is not None and d.main:
        # drop log rows written after the checkpoint (the interrupted run's unfinished work)
        for name in ("metrics.jsonl", "samples.jsonl"):
            f = run / name
            if f.is_file():
                keep = [r for r in read_log(f) if r.get("step", 0) <= state["step"]]
                f.write_text("".join(json.dumps(r) + "\n" for r in keep))
        print(f"resumed from {folder} at step {state['step']}")
    elif d.main:
        for name in ("metrics.jsonl", "samples.jsonl"):
            (run / name).unlink(missing_ok=True)
    return policy, processor, ref, optimizer, state


class RunLock:
    """A run folder's lock file: ".lock", holding the owner's host and pid.

    Two processes training into one folder would interleave their metrics and delete each
    other's checkpoints. The lock is created atomically (O_EXCL), released on exit - also after
    an exception - and a lock whose process is gone (a crash, a SIGKILL) is recognised as stale
    and taken over with a note. Only rank 0 holds it."""

    def __init__(self, run: Path):
        self.path = run / ".lock"
        self.held = False

    @staticmethod
    def _owner(run: Path) -> tuple[str, int] | None:
        try:
            host, pid = (run / ".lock").read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(owner: tuple[str, int]) -> bool:
        host, pid = owner
        if host != os.uname().nodename:
            return True                  # another machine's process: cannot tell, assume alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @classmethod
    def free(cls, run: Path) -> bool:
        owner = cls._owner(run)
        return owner is None or not cls._alive(owner)

    @classmethod
    def describe(cls, run: Path) -> str:
        owner = cls._owner(run)
        return f"{run / '.lock'}: process {owner[1]} on {owner[0]}" if owner else str(run / ".lock")

    def acquire(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner(self.path.parent)
                if owner is not None and self._alive(owner):
                    raise SystemExit(f"train.py: another training process is writing to "
                                     f"{self.path.parent} ({self.describe(self.path.parent)}); "
                                     "wait for it, or use another --out") from None
                print(f"note: removing the stale lock of a process that is gone "
                      f"({self.describe(self.path.parent)})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.uname().nodename} {os.getpid()}\n")
            self.held = True
            return self
        raise SystemExit(f"train.py: could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def latest_checkpoint(run: Path) -> Path:
    return run / (run / "latest.txt").read_text().strip()


def load_trainer_state(folder: Path, policy, optimizer, cfg: Config) -> dict:
    blob = torch.load(folder / "trainer_state.pt", weights_only=False)
    if cfg.fsdp != (folder / "optimizer").is_dir():
        # the two keep AdamW's state in different forms (one file / per-rank shards)
        raise ValueError(f"its optimizer state was written {'without' if cfg.fsdp else 'with'} "
                         f"--fsdp; resume it {'without' if cfg.fsdp else 'with'} --fsdp")
    if cfg.fsdp:
        # the sharded optimizer state (save_checkpoint): every rank reads its own shards. The
        # template comes from the live optimizer (get_optimizer_state_dict first creates its
        # AdamW state if no step was taken yet), dcp.load fills it in place.
        shards = {"optimizer": get_optimizer_state_dict(policy, optimizer)}
        dcp.load(shards, checkpoint_id=str(folder / "optimizer"))
        set_optimizer_state_dict(policy, optimizer, shards["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    rng = blob["rng"]
    torch.set_rng_state(rng["torch"]); np.random.set_state(rng["numpy"]); random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return blob["state"]


# ---------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, samples.jsonl, a tqdm bar, the collapse watch and the curves.
# ---------------------------------------------------------------------------------------------

def collapse_warning(history: list[dict], window: int = 10) -> str | None:
    """The "KL_prcp hacking" signature (PAPO_REFERENCE section 7): KL_prcp jumps while the entropy
    of BOTH branches rises - the policy raises the divergence by emitting tokens that are unlikely
    under any image, not by looking more closely. Returns a warning or None."""
    if len(history) <= window or "kl_prcp" not in history[-1]:
        return None
    past, now = history[-window - 1:-1], history[-1]
    mean = lambda k: float(np.mean([h[k] for h in past]))
    kl_jump = now["kl_prcp"] > 2.0 * mean("kl_prcp") + 1e-3
    rising = all(now[k] > 1.1 * mean(k) for k in ("entropy_orig", "entropy_mask"))
    if kl_jump and rising:
        return (f"step {now['step']}: possible KL_prcp hacking - KL_prcp {now['kl_prcp']:.4f} vs "
                f"{mean('kl_prcp'):.4f} over the last {window} steps while both entropies rise "
                f"(orig {now['entropy_orig']:.3f}, mask {now['entropy_mask']:.3f}). Consider a "
                "smaller --gamma, the Double Entropy Loss (--eta-orig/--eta-mask) or --beta > 0.")
    return None


CURVES = [("reward", "reward"), ("accuracy", "accuracy"), ("kl_prcp", "KL_prcp"),
          ("entropy_orig", "entropy (original)"), ("entropy_mask", "entropy (masked)"),
          ("kl_ref", "KL_ref"), ("response_length", "response length"),
          ("clip_high", "clip fraction (high)")]


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        ax.set_title(title); ax.set_xlabel("step"); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(out_png, dpi=90); plt.close(fig)


def eval_mask_ratios(cfg: Config) -> tuple[float, ...]:
    """Held-out accuracy is measured with the picture masked at the training ratio and fully."""
    return tuple(dict.fromkeys((cfg.mask_ratio, 1.0)))


def shortcut_decoys(examples) -> list[str | None] | None:
    """Per question, the answer its wording points to when that answer is WRONG (toy.wording_answer),
    so the evaluation can count how often the policy takes the shortcut; None when no question
    has a panel letter (every dataset but the shortcut world's)."""
    pointed = [toy.wording_answer(ex.problem) for ex in examples]
    if not any(pointed):
        return None
    return [w if w is not None and w != ex.answer else None for w, ex in zip(pointed, examples)]


def evaluate_heldout(policy, processor, heldout: dict, cfg: Config, d: Dist) -> dict | None:
    """Per held-out split: accuracy with the original picture and with it masked (eval_mask_ratios),
    format rate, and KL_prcp on the policy's own samples; rank 0 only (the other ranks wait).
    One flat dict: the split drawn like training unprefixed, another split's keys prefixed with
    its name ("conflict_accuracy"), so that metrics.jsonl columns stay flat."""
    result = None
    # A sharded model (--fsdp) runs only with all ranks taking part: every rank evaluates the
    # same questions with the same seeds (rank 0 keeps the result). Otherwise rank 0 alone.
    if heldout and (d.main or cfg.fsdp):
        start = time.perf_counter()
        result = {}
        for name, examples in heldout.items():
            with autocast(cfg, d.device):
                scores = evaluation.evaluate(unwrap(policy), processor, examples,
                                             samples=cfg.eval_samples, temperature=1.0, top_p=1.0,
                                             max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                             mask_ratios=eval_mask_ratios(cfg),
                                             kl_ratio=cfg.mask_ratio, batch_size=64,
                                             decoys=shortcut_decoys(examples),
                                             **prompt_options(cfg))
            prefix = "" if name == "held-out" else f"{name}_"
            result.update({prefix + k: v for k, v in scores.items()})
        result["seconds"] = round(time.perf_counter() - start, 1)
    if not d.main:
        result = None
    barrier()
    return result


def print_table(before: dict | None, after: dict | None, cfg: Config, splits) -> str:
    """The before/after table, one block per held-out split."""
    if not before or not after:
        return ""
    rows = [("accuracy, original image", "accuracy")]
    rows += [(f"accuracy, image masked {r}", f"accuracy_mask{r}") for r in eval_mask_ratios(cfg)]
    rows += [(f"KL_prcp on own samples (mask {cfg.mask_ratio})", "kl_prcp"), ("format rate", "format"),
             ("wrong answers the wording points to", "decoy_rate")]
    lines = []
    for split in splits:
        prefix = "" if split == "held-out" else f"{split}_"
        lines += [f"{split} ({before[prefix + 'n']} questions x {cfg.eval_samples} samples, "
                  "temperature 1.0)",
                  f"{'':38s} {'before RL':>10s} {'after RL':>10s} {'change':>8s}"]
        for name, k in rows:
            if prefix + k not in before:    # decoy_rate: only where the wording points somewhere
                continue
            b, a = before[prefix + k], after[prefix + k]
            lines.append(f"{name:38s} {b:10.3f} {a:10.3f} {a - b:+8.3f}")
    return "\n".join(lines)


def rank_fingerprints(policy) -> list[list[float]]:
    """Every rank's (sum, sum of squares, weighted sum) of its parameters in float64: a cheap
    check that data-parallel replicas are still identical (they must be: each update applies the
    same all-reduced gradient to the same weights). With --fsdp each weight exists once, in
    shards: the fingerprints are of the gathered weights, the same on every rank by
    construction."""
    full = lambda p: p.full_tensor() if isinstance(p, DTensor) else p   # FSDP: gather shards
    flat = torch.cat([full(p.detach()).double().flatten() for p in unwrap(policy).parameters()])
    ramp = torch.linspace(-1.0, 1.0, flat.numel(), dtype=torch.float64, device=flat.device)
    mine = [float(flat.sum()), float((flat ** 2).sum()), float((flat * ramp).sum())]
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def build_policy(cfg: Config, d: Dist, init_path: str, resume_from: Path | None):
    """The trainable policy (DDP-wrapped under torchrun) and, when beta > 0, a frozen reference
    copy of the STARTING policy (also after a resume)."""
    policy, processor = qwen.load_model(str(resume_from or init_path), device=d.device,
                                        gradient_checkpointing=cfg.gradient_checkpointing)
    ref = None
    if cfg.beta > 0:
        ref, _ = qwen.load_model(init_path, device=d.device) if resume_from else (copy.deepcopy(policy), None)
        ref.requires_grad_(False).eval()
        if d.device.type == "cuda":   # frozen: bf16 weights suffice and halve its memory
            ref.to(torch.bfloat16)
    policy.train()
    if cfg.fsdp:                      # (check_config made sure torchrun started us)
        policy = shard_model(policy, cfg, d, trainable=True)
        if ref is not None:
            ref = shard_model(ref, cfg, d, trainable=False)
    elif d.world > 1:
        policy = DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return policy, processor, ref


def main(argv=None) -> dict:
    hf_logging.disable_progress_bar()   # transformers' per-save/load bars would drown the log
    cfg = parse_config(argv)
    d = setup_distributed()
    check_config(cfg, d.world)
    run = Path(cfg.resume or cfg.out)
    lock = None
    try:
        if d.main:
            run.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run).acquire()      # first: nobody else may write here meanwhile
            prepare_run_folder(cfg, run)
        barrier()
        result = train_run(cfg, d, run)
        # every rank finished its last collective before any rank tears the group down: a rank
        # that destroys it while a peer's gloo/NCCL transfer is still in flight can abort the
        # process ("terminate called without an active exception")
        barrier()
        return result
    except KeyboardInterrupt:
        if d.main:
            print("\ninterrupted. " + how_to_continue(run), file=sys.stderr)
        raise SystemExit(130) from None
    except DynamicSamplingExhausted as err:    # every rank reached the same decision
        raise SystemExit(f"train.py: {err}\n" + (how_to_continue(run) if d.main else "")) from None
    finally:
        if lock:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def how_to_continue(run: Path) -> str:
    """Checkpoints are written atomically: the last complete one is intact."""
    done = latest_checkpoint(run) if (run / "latest.txt").is_file() else None
    if done:
        return f"The last complete checkpoint is {done}; continue with:\n  python train.py --resume {run}"
    return "No checkpoint was written yet; start again with --overwrite."


def train_run(cfg: Config, d: Dist, run: Path) -> dict:
    """Everything after the run folder is safe to write: data, warm start, the RL loop."""
    seed_everything(cfg.seed + d.rank)
    if not cfg.data:
        prepare_toy_data(cfg, d)
    train, heldout = load_datasets(cfg, d)
    init_path = cfg.model or str(warm_start(cfg, d, train))
    # Prompt lengths need only the tokenizer: checked before gigabytes of weights load. Every
    # rank computes the same lengths, so every rank keeps the same rows.
    processor = qwen.load_processor(init_path)
    cfg = fit_pixel_budget(cfg, processor, announce=d.main)
    dropped = {}
    train, dropped["training"] = check_prompt_lengths(train, processor, cfg, "training")
    for name in heldout:
        heldout[name], dropped[name] = check_prompt_lengths(heldout[name], processor, cfg, name)
    if d.main:
        # written once the data is known to be usable, so that a run refused for its data
        # leaves an empty folder behind, not one a fresh run would have to --overwrite
        saved = saved_config(cfg)
        (run / "config.json").write_text(json.dumps(saved, indent=2))
        eval_srcs = {name: absolute_path(src) for name, src in data_sources(cfg)[1].items()}
        write_run_info(run, eval_data=eval_srcs.pop("held-out", None),
                       other_eval_data=eval_srcs,
                       eval_size=cfg.eval_size, max_new_tokens=cfg.max_new_tokens,
                       min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                       prompt_template=saved["prompt_template"] or None,
                       problem_key=cfg.problem_key, answer_key=cfg.answer_key,
                       image_key=cfg.image_key, image_dir=saved["image_dir"] or None,
                       dropped_long_prompts=dropped)
    policy, processor, ref, optimizer, state = load_start(cfg, d, run, init_path)
    if not cfg.resume:
        state["before"] = evaluate_heldout(policy, processor, heldout, cfg, d)

    need_masked = uses_masked_branch(cfg)
    bar = tqdm(range(state["step"] + 1, cfg.steps + 1), desc=cfg.preset, disable=not d.main,
               dynamic_ncols=True, initial=state["step"], total=cfg.steps)
    held, evaluated_at = None, None
    for step in bar:
        times = {}
        t0 = time.perf_counter()
        batch, state["cursor"], stats = collect_batch(policy, processor, train, cfg, d, step,
                                                      state["cursor"], need_masked)
        times["t_rollout"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        score_phase(batch, policy, ref, cfg, d)
        times["t_score"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = update_phase(batch, policy, optimizer, cfg, d, step)
        times["t_update"] = time.perf_counter() - t0
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and heldout:
            # the same questions and sampling seeds every time, so the curve moves only with the
            # policy; it does not disturb training (each step reseeds its own sampling)
            t0 = time.perf_counter()
            held, evaluated_at = evaluate_heldout(policy, processor, heldout, cfg, d), step
            times["t_eval"] = time.perf_counter() - t0
            if held:
                metrics.update({f"eval_{k}": v for k, v in held.items()
                                if any(w in k for w in ("accuracy", "format", "pass@", "kl_prcp",
                                                        "decoy_rate"))})
        # statistics of all sampled rollouts, averaged over ranks
        means = all_reduce(torch.stack([torch.cat(stats[k]).mean() for k in
                                        ("reward", "accuracy", "format", "length")]))
        counts = all_reduce(torch.tensor([stats["zero_var_groups"], stats["groups"]], dtype=torch.float64))
        row = dict(step=step, reward=float(means[0]) / d.world, accuracy=float(means[1]) / d.world,
                   format=float(means[2]) / d.world, response_length=float(means[3]) / d.world,
                   zero_var_frac=float(counts[0] / counts[1]), draws=stats["draws"],
                   kept_rollouts=len(batch.rollouts), **metrics, **times)
        state["step"] = step
        state["history"] = (state["history"] + [row])[-50:]
        if d.main:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}",
                            kl_prcp=f"{row.get('kl_prcp', float('nan')):.4f}")
            warning = collapse_warning(state["history"])
            if warning:
                tqdm.write("WARNING " + warning)
            if cfg.sample_every and step % cfg.sample_every == 0:
                with open(run / "samples.jsonl", "a") as f:
                    for b in range(0, len(batch.rollouts), cfg.group_size)[:3]:
                        sample = dict(step=step, text=batch.rollouts.texts[b],
                                      reward=float(batch.rewards[b]))
                        f.write(json.dumps(sample) + "\n")
                tqdm.write(f"[step {step}] sample (reward {sample['reward']:.1f}): "
                           f"{sample['text'][:160]!r}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(run, step, policy, processor, optimizer, state, cfg, d)
            barrier()
    bar.close()

    # the last step's evaluation IS the final one (same policy, same questions and seeds); the
    # test is the same on every rank, so all of them skip or all call evaluate_heldout
    after = held if evaluated_at == cfg.steps else evaluate_heldout(policy, processor, heldout,
                                                                    cfg, d)
    result = {"before": state["before"], "after": after,
              "rank_fingerprints": rank_fingerprints(policy)}
    if d.main:
        (run / "final_eval.json").write_text(json.dumps(result, indent=2))
        if (run / "metrics.jsonl").is_file():
            plot_curves(run / "metrics.jsonl", run / "curves.png")
        table = print_table(state["before"], after, cfg, heldout)
        if table:
            print(table)
            (run / "final_table.txt").write_text(table + "\n")
        print(f"run folder: {run}")
    return result


if __name__ == "__main__":
    main()
