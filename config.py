"""The settings of a training run: one dataclass with a help text per field, the paper's four
recipes as presets, every flag's allowed range, and the command line built from them.

    cfg = parse_config(["--preset", "papo-d", "--steps", "100"])   # what train.py does
    check_config(cfg, world_size=1)                                  # refuses bad settings early

Precedence: field defaults (the official Qwen2.5-VL-3B recipe) < the offline toy run's overrides
(when --model is not given) < the preset < a --config file < a --preset given on the command
line < the other flags given there. A resumed run starts from its own saved config.json
instead, and flags given now still win. The settings that act on the file system or on other
processes (RUN_CONTROL: --out, --overwrite, --force-unlock, ...) come from the command line only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.distributed as dist

import custom_reward
import data
import integrity
import model as qwen
import papo
import toy

DESCRIPTION = "PAPO / GRPO / DAPO training of a Qwen2.5-VL or Qwen3-VL policy with verifiable rewards."


def arg(default, help: str, check: tuple[Callable, str] | None = None):
    """A dataclass field that carries its own documentation (shown by `--help`) and, with
    `check`, its allowed range: (a predicate on the value, the range in words for the error
    message). check_config refuses a value outside it (FLAG_RULES)."""
    metadata = {"help": help} if check is None else {"help": help, "check": check}
    return field(default=default, metadata=metadata)


def at_least(low: int, why: str = "") -> tuple[Callable, str]:
    """The check of a flag that must be at least `low` (arg's check)."""
    return (lambda v: v >= low), f">= {low}" + (f" ({why})" if why else "")


def one_of(choices) -> tuple[Callable, str]:
    """The check of a flag that names one of `choices` (arg's check)."""
    return (lambda v: v in choices), "one of " + ", ".join(choices)


# The objective's weights (gamma, the etas, beta, the SFT term) are at most this. The paper's are
# 0.01-0.03; a weight of 10 already lets its term drown the policy gradient, and one of 1e300
# overflows the loss to inf and every gradient to NaN, so that every update is skipped.
MAX_COEF = 10
COEF_WHY = "the paper's weights are 0.01-0.03; huge ones overflow the loss"


def a_weight(note: str = "") -> tuple[Callable, str]:
    """The check of one of the objective's weights: in [0, MAX_COEF]."""
    return (lambda v: 0 <= v <= MAX_COEF), f"in [0, {MAX_COEF}] ({note}{COEF_WHY})"

# --report-to's choices: the trackers (an optional install each; the import that tells
# whether it is there, and the pip package).
REPORTERS = {"none": None, "tensorboard": ("tensorboard", "tensorboard"),
             "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}


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
    problem_key: str = arg("problem", "Table column (or JSONL key) holding the question.")
    answer_key: str = arg("answer", "Table column (or JSONL key) holding the gold answer.")
    image_key: str = arg("images", "Table column (or JSONL key) holding the picture(s): Image "
                                   "features, {bytes, path} dicts or paths.")
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
    min_pixels: int = arg(200_704, "Pixel budget: every picture, and its copy masked at raw size, "
                                   "is scaled up to at least this area before processing "
                                   "(official: 256 image tokens).",
                          check=at_least(1))
    max_pixels: int = arg(1_003_520, "Pixel budget: every picture, and its copy masked at raw "
                                     "size, is scaled down to at most this area before processing "
                                     "(official: 1,280 tokens).",
                          check=at_least(1))
    max_image_pixels: int = arg(50_000_000, "Largest picture (width x height, read from the file "
                                            "header) a row may have; a larger one is a bad row.",
                                check=at_least(1))
    max_prompt_length: int = arg(4096, "Longest prompt in tokens, image tokens included. Longer rows "
                                       "stop the run before training unless --drop-long-prompts.",
                                 check=at_least(1))
    drop_long_prompts: bool = arg(False, "Drop (and count, print and log) rows longer than "
                                         "--max-prompt-length instead of stopping.")
    out: str = arg("runs/default", "Run folder: metrics.jsonl, samples, checkpoints, curves.png.")
    resume: str = arg("", "Run folder to continue from its latest checkpoint (exactly).")
    allow_changes: bool = arg(False, "With --resume: accept flags that change how the run "
                                     "trains from here on (preset, coefficients, data, model, "
                                     "seed, batch shape...); each change is printed and recorded "
                                     "in config_history.jsonl. Without it they are refused.")
    force_unlock: bool = arg(False, "Take over the run folder's lock even when a process (maybe "
                                    "on another machine) holds it: for the lock a preempted job "
                                    "left behind.")
    overwrite: bool = arg(False, "Start afresh in an --out folder that holds an earlier run, "
                                 "deleting that run's files (without it such a folder is refused).")
    seed: int = arg(0, "Seed of everything: model init (offline), data order, masks, sampling.",
                    check=(lambda v: 0 <= v < 2 ** 31,
                           "in [0, 2^31) (numpy's and torch's generators)"))
    steps: int = arg(200, "Number of RL steps (rollout batches).",
                     check=at_least(1))

    # --- rollouts ----------------------------------------------------------------------------
    prompts_per_step: int = arg(384, "Prompts per rollout batch, summed over all ranks.",
                                check=at_least(1))
    group_size: int = arg(5, "G: rollouts sampled per prompt (the GRPO group).",
                          check=at_least(2, "advantages compare a rollout with its group"))
    max_new_tokens: int = arg(2048, "Longest response, in tokens.",
                              check=at_least(1))
    temperature: float = arg(1.0, "Sampling temperature of rollouts (and of the log-probs).",
                             check=(lambda v: 0.1 <= v <= 10,
                                    "in [0.1, 10] (below 0.1 sampling is all but "
                                    "greedy: a group's rollouts come out identical "
                                    "and carry no learning signal; above 10 it is "
                                    "all but uniform noise)"))
    top_p: float = arg(0.99, "Nucleus sampling of rollouts.",
                       check=(lambda v: 0 < v <= 1, "in (0, 1]"))

    # --- optimisation ------------------------------------------------------------------------
    lr: float = arg(1e-6, "AdamW learning rate (constant).",
                    check=(lambda v: 0 < v < math.inf, "> 0"))
    weight_decay: float = arg(0.01, "AdamW weight decay. A run whose weights' norm falls under "
                                    "half its start stops.",
                              check=(lambda v: 0 <= v <= 1,
                                     "in [0, 1] (AdamW multiplies every weight by "
                                     "1 - lr x weight decay at each update)"))
    grad_clip: float = arg(1.0, "Clip the global gradient norm to this.",
                           check=(lambda v: 0 < v < math.inf,
                                  "> 0 (the largest gradient norm allowed)"))
    updates_per_step: int = arg(3, "Optimizer steps per rollout batch (mini-batches, 1 epoch).",
                                check=at_least(1))
    micro_batch_size: int = arg(8, "Rollouts per forward/backward on one rank.",
                                check=at_least(1))
    generation_batch: int = arg(16, "Prompts per `generate` call on one rank (each with its G "
                                    "rollouts); a step's prompts are generated in such chunks, "
                                    "so that the KV cache of one call fits (3B: 80 rows x 3,072 "
                                    "tokens ~ 9 GB in bf16; all 192 prompts of a rank at once "
                                    "~ 109 GB). 0 = all at once.",
                                check=at_least(0, "0 = all of a step's prompts in one call"))

    # --- the objective (set by --preset; see papo.py and docs/paper.md section 5) ------------
    gamma: float = arg(0.02, "Weight of the Implicit Perception Loss KL_prcp (maximised).",
                       check=a_weight("the sign is in the objective: KL_prcp is maximised; "))
    eta_orig: float = arg(0.0, "Double Entropy Loss: weight of the original-image entropy.",
                          check=a_weight())
    eta_mask: float = arg(0.0, "Double Entropy Loss: weight of the masked-image entropy.",
                          check=a_weight())
    gamma_anneal: bool = arg(False, "KL_prcp annealing (official switch): gamma goes linearly "
                                    "from --gamma to --gamma-end over the first "
                                    "--gamma-anneal-fraction of --steps, then stays there; "
                                    "--eta-orig and --eta-mask are scaled by gamma_t / gamma. "
                                    "Steps count from 1: step 1 uses --gamma, step 1 + "
                                    "int(fraction x steps) and later ones --gamma-end. The schedule follows "
                                    "--steps, also when a resume changes it. Logged: gamma_t.")
    gamma_end: float = arg(0.0, "KL_prcp annealing: the final gamma.",
                           check=a_weight())
    gamma_anneal_fraction: float = arg(0.5, "KL_prcp annealing: the share of --steps over which "
                                            "gamma moves to --gamma-end.",
                                       check=(lambda v: 0 < v <= 1,
                                              "in (0, 1] (a share of --steps)"))
    beta: float = arg(0.01, "Weight of KL to the frozen reference policy (0 = no reference).",
                      check=a_weight())
    clip_low: float = arg(0.2, "PPO clip range below 1.",
                          check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    clip_high: float = arg(0.3, "PPO clip range above 1 (DAPO's clip-higher).",
                           check=(lambda v: 0 <= v < math.inf, ">= 0"))
    dual_clip: float = arg(3.0, "Dual-clip constant C for negative advantages (0 = off).",
                           check=(lambda v: v == 0 or 1 < v < math.inf, "0 (off) or > 1"))
    agg_mode: str = arg("token-mean", "Loss aggregation: token-mean | seq-mean-token-mean | "
                                      "seq-mean-token-sum | seq-mean-token-sum-norm (each "
                                      "normalised over the whole mini-batch, all ranks: the "
                                      "gradient does not depend on --micro-batch-size) | "
                                      "micro-token-mean (the official code exactly: the mean of "
                                      "per-micro-batch token means, which DOES depend on "
                                      "--micro-batch-size and on the number of processes).",
                        check=one_of(papo.ALL_AGG_MODES))
    kl_kind: str = arg("k3", "KL estimator for KL_ref and KL_prcp: k1 | k2 | k3.",
                       check=one_of(papo.KL_KINDS))
    kl_prcp_clip: float = arg(0.0, "Clamp each token's KL_prcp to [0, C] before aggregating it, "
                                   "so no token can raise the term past C (official switch, C = "
                                   "0.2). 0 = off.",
                              check=(lambda v: v == 0 or 0 < v < math.inf,
                                     "0 (off) or > 0 (the largest "
                                     "KL_prcp a token contributes)"))
    kl_prcp_token_fraction: float = arg(0.0, "Token-level KL_prcp mask: per rollout, the "
                                             "tokens whose KL_prcp is below the (1 - P) quantile "
                                             "of its tokens are zeroed (selected before "
                                             "--kl-prcp-clip; official switch, P = 0.2). The "
                                             "term keeps the normaliser of every term, the count "
                                             "of ALL valid tokens, as in the official code. "
                                             "0 = off.",
                                        check=(lambda v: 0 <= v <= 1,
                                               "in [0, 1] (0 = off; the share of each "
                                               "rollout's tokens kept)"))
    entropy: str = arg("sample", "Entropy estimate: sample (official, -log p of the sampled token) "
                                 "or exact (-sum p log p from the logits).",
                       check=one_of(papo.ENTROPY_KINDS))
    dynamic_sampling: bool = arg(False, "DAPO: keep only groups whose mean accuracy is strictly "
                                        "between 0.01 and 0.99 and draw further prompts until the "
                                        "step has --prompts-per-step kept groups (the extra ones "
                                        "are trimmed). A draw in which no group passes keeps all "
                                        "its groups (as the official code does).")
    draw_size: int = arg(128, "Dynamic sampling: prompts per draw, summed over all ranks "
                              "(official: 128, a third of the step).",
                         check=at_least(1))
    max_draws: int = arg(20, "Dynamic sampling: most draws for one step; if the step is still "
                             "not full after them, the run stops with an error (official: 20).",
                         check=at_least(1))
    mask_ratio: float = arg(0.6, "Fraction of 14x14-pixel squares blacked out (PAPO).",
                            check=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    mask_patch: int = arg(14, "Side of a masked square, in pixels of the raw image.",
                          check=at_least(1, "pixels"))
    mask_mode: str = arg("bernoulli", "bernoulli (official, per-square coin) | exact.",
                         check=one_of(papo.MASK_MODES))
    sft_coef: float = arg(0.0, "SFT loss on correct rollouts (official switch, 1e-3): adds this "
                               "times the token mean of -log pi over the tokens of the rollouts "
                               "whose accuracy is above 0.1 (official), normalised by their "
                               "number in the whole mini-batch (all micro-batches and ranks; "
                               "per micro-batch with "
                               "--agg-mode micro-token-mean). 0 = off. Not the offline warm "
                               "start (--warm-start-*).",
                          check=a_weight("0 = off; "))
    perception_grad: bool = arg(False, "Recompute the masked branch WITH gradient at every update "
                                       "(the paper's general form). Default: detached, computed "
                                       "once per rollout batch (official).")
    scale_rewards: str = arg("group", "group (the paper's GRPO: each group's advantages divided "
                                      "by its rewards' std) | none (Dr. GRPO: the group mean "
                                      "subtracted only).",
                             check=(lambda v: v in ("group", "none"), "group or none"))
    mask_truncated: bool = arg(False, "Leave completions that hit --max-new-tokens without an end "
                                      "token out of every loss term (their advantages still "
                                      "count in their group). truncated_frac is logged either "
                                      "way. An update left without a token is skipped (with a "
                                      "warning); 3 in a row stop the run.")
    reward: str = arg("", "Your own reward: FILE.py:function or module:function, called as "
                          "function(response, gold_answer, example) -> (accuracy, format), each "
                          "in [0, 1]; reward = 0.9 accuracy + 0.1 format. Empty: rewards.py "
                          "(the official math reward). EasyR1's reward functions (a dict "
                          "with overall/accuracy/format, one at a time or in a batch) work as "
                          "they are. docs/rewards.md has examples.")
    reward_time_limit: float = arg(10.0, "Seconds one call of --reward may take; it runs in a "
                                         "child process, and a call past the limit scores 0 "
                                         "(reported). At most 3600.",
                                   check=(lambda v: 0 < v <= custom_reward.MAX_REWARD_TIME_LIMIT,
                                          f"in (0, {custom_reward.MAX_REWARD_TIME_LIMIT:g}] (seconds)"))

    # --- parameter-efficient and partial training ---------------------------------------------
    lora_rank: int = arg(0, "LoRA (through PEFT, an optional install): the adapters' rank; 0 = "
                            "train every weight. The reference log-probs come from the same "
                            "model with its adapters switched off (no second copy).",
                         check=at_least(0, "0 = off"))
    lora_alpha: float = arg(0.0, "LoRA scale numerator (0 = 2 x --lora-rank).",
                            check=(lambda v: 0 <= v <= 4096,
                                   "in [0, 4096] (0 = 2 x --lora-rank; the adapters "
                                   "are scaled by alpha / rank, usually 1 or 2)"))
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "Comma-separated names of the language model's linear layers that "
                            "get adapters (the vision tower never does).",
                            check=(lambda v: all(t.strip().isidentifier() for t in v.split(",")),
                                   "comma-separated layer names such as q_proj,v_proj"))
    freeze_vision_tower: bool = arg(False, "Never change the vision tower: its weights get no "
                                           "gradient and no optimizer state.")

    # --- infrastructure ----------------------------------------------------------------------
    dtype: str = arg("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16.",
                     check=(lambda v: v in ("auto", "float32", "bfloat16"),
                            "auto, float32 or bfloat16"))
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward (non-reentrant).")
    fsdp: bool = arg(False, "Under torchrun: shard parameters, gradients and AdamW state over the "
                            "processes with FSDP2 (fully_shard per decoder layer and vision "
                            "block) instead of replicating them with DDP. For models whose "
                            "replicas do not fit (7B on 80 GB GPUs, docs/performance.md).")
    save_every: int = arg(50, "Checkpoint every N steps (and always at the end).",
                          check=at_least(1))
    keep_checkpoints: int = arg(2, "How many step checkpoints to keep.",
                                check=at_least(1, "the newest checkpoint is always kept"))
    sample_every: int = arg(25, "Log a few sample completions every N steps (samples.jsonl, and "
                                "with pictures to the trackers of --report-to).",
                            check=at_least(0, "0 = never"))
    report_to: str = arg("none", "Where to send the metrics besides metrics.jsonl, "
                                 "comma-separated: none | tensorboard | wandb | trackio (each "
                                 "an optional install; wandb works offline with "
                                 "WANDB_MODE=offline).",
                         check=(lambda v: all(t in REPORTERS for t in v.split(",")),
                                "comma-separated names from " + ", ".join(REPORTERS)))
    project: str = arg("papo", "Project name for wandb / trackio.")
    config: str = arg("", "A JSON file (a run's config.json) or YAML file of settings to start "
                          "from; flags given on the command line override it.")
    eval_samples: int = arg(4, "Samples per held-out question in the before/after table.",
                            check=at_least(1))
    eval_size: int = arg(256, "Held-out questions used in the before/after table (0 = all).",
                         check=at_least(0, "0 = all"))
    eval_every: int = arg(0, "Also score the held-out set(s) every N steps and at the last step "
                             "(0 = only before and after) and log eval_* columns and its time "
                             "t_eval in metrics.jsonl, so the curves show WHEN accuracy with and "
                             "without the picture moves. The last step's is the final evaluation.",
                          check=at_least(0, "0 = off"))

    # --- the offline default (used only when --model is empty) -------------------------------
    tiny_size: str = arg("small", "Size of the offline model (toy.SIZES).",
                         check=one_of(toy.SIZES))
    tiny_family: str = arg("qwen2.5-vl", "Model family of the offline model (toy.TINY_FAMILIES): "
                                         "qwen2.5-vl, qwen3-vl, or qwen3-vl-thinking (Qwen3-VL "
                                         "with the Thinking models' chat template, whose prompt "
                                         "opens <think>).",
                           check=one_of(toy.TINY_FAMILIES))
    toy_world: str = arg("plain", "The toy world (toy.TOY_WORLDS): plain, or shortcut - the "
                                  "wording of some questions usually gives the answer away, and "
                                  "a 'conflict' split, where it never does, is scored as well.",
                         check=one_of(toy.TOY_WORLDS))
    toy_tasks: str = arg("", "Comma-separated toy tasks (toy.TOY_TASKS) to train on instead of "
                             "the world's own.",
                         check=(lambda v: not v or all(t in toy.TOY_TASKS for t in v.split(",")),
                                "comma-separated names from " + ", ".join(toy.TOY_TASKS)))
    toy_canvas: str = arg("light", "The toy pictures' background (toy.CANVASES): light, where "
                                   "PAPO's black squares add dark blobs, or dark, the mask's own "
                                   "black, where masking only hides.",
                          check=one_of(toy.CANVASES))
    toy_train_size: int = arg(8192, "Toy training split size.",
                              check=at_least(4, "the warm start keeps a quarter apart"))
    toy_eval_size: int = arg(256, "Toy held-out split size.",
                             check=at_least(1))
    warm_start_steps: int = arg(3000, "Most steps of the supervised warm start on the toy "
                                      "solutions (it stops earlier, at "
                                      "--warm-start-target-acc).",
                                check=at_least(1))
    warm_start_lr: float = arg(1e-3, "Learning rate of the warm start.",
                               check=(lambda v: 0 < v < math.inf, "> 0"))
    # 16, not 32: about half the cost per step. The steps to the target vary more with the seed
    # than with the batch (beta2 0.999; seed 0: 2,550 against 2,300 for batch 32; seed 2: 2,425
    # against 900; seed 1: 2,550 against none in 3,000): faster on two of three seeds
    # (docs/results.md)
    warm_start_batch: int = arg(16, "Batch size of the warm start.",
                                check=at_least(1))
    # 0.99, not PyTorch's 0.999: a shorter memory of the gradient's scale lets the step size
    # follow it as it shrinks on the long plateau before the model starts counting; it reached
    # the target in fewer steps on each of four seeds (docs/results.md). Saved configs from
    # before this setting ran with 0.999 (SAVED_BEFORE).
    warm_start_beta2: float = arg(0.99, "Adam's beta2 (second-moment decay) in the warm start.",
                                  check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    # The stopping rule's test costs about a tenth of the warm start at every 25 steps; every 50
    # halves that and changes nothing else (the training steps are the same; it may stop up to
    # 25 steps later). Saved configs from before this setting ran with 25 (SAVED_BEFORE).
    warm_start_probe_every: int = arg(50, "Test the warm start's sampled accuracy (its "
                                          "stopping rule) every this many steps.",
                                      check=at_least(1))
    warm_start_target_acc: float = arg(0.45, "Stop the warm start once SAMPLED accuracy on 64 "
                                             "training prompts it never trained on reaches "
                                             "this: RL needs a model mid-way through learning "
                                             "the task.",
                                       check=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    cache: str = arg("cache", "Folder for the toy datasets and warm-start checkpoints.")


# The paper's four recipes (docs/paper.md section 5). Only the objective differs.
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

# The offline toy world (docs/toy.md): a model of ~1M parameters learns with a much larger
# learning rate, short responses and small batches; G = 8 keeps enough groups with mixed rewards.
# Its 112 x 112 pictures (16 image tokens) are far below the official budget's 200,704 pixels,
# which would upscale them 16x in area (256 tokens, mostly blur); the toy budget is the tiny
# processor's own range, so budget_resize leaves them untouched.
TOY_OVERRIDES = dict(prompts_per_step=16, draw_size=8, group_size=8, max_new_tokens=32, lr=1e-4,
                     updates_per_step=1, micro_batch_size=64, steps=150, save_every=50,
                     min_pixels=56 * 56, max_pixels=112 * 112)


# Settings that act on the file system or on other processes: which folder is written, whether an
# earlier run there is deleted, whether a live process's lock is taken over, whether a resumed
# run may change. They are taken from the command line of THIS invocation only: never read back
# from a --config file or from a resumed run's config.json (a run once started with --overwrite
# would otherwise delete its folder again on every re-run of its configuration).
RUN_CONTROL = ("out", "overwrite", "force_unlock", "allow_changes", "resume", "config")

# Settings renamed since earlier versions, old name -> new: the warm start's were --sft-*, which
# read as the SFT term's (--sft-coef). The old flags still parse (hidden from --help), and a
# saved config.json or a --config file that uses an old name still reads, so earlier runs resume.
RENAMED = {"sft_steps": "warm_start_steps", "sft_lr": "warm_start_lr",
           "sft_batch": "warm_start_batch", "sft_target_acc": "warm_start_target_acc"}


def current_names(values: dict) -> dict:
    """Saved settings with the RENAMED ones under their current names."""
    return {RENAMED.get(k, k): v for k, v in values.items()}


# Settings added after runs were saved, with the value those runs used (not today's default):
# a config.json without them is read as it ran.
SAVED_BEFORE = {"warm_start_probe_every": 25, "warm_start_beta2": 0.999}


def saved_settings(values: dict) -> dict:
    """A run's config.json as this version reads it: current names, and the values of settings
    it predates (SAVED_BEFORE). Not for --config files, whose missing settings take defaults."""
    return {**SAVED_BEFORE, **current_names(values)}


PATH_FIELDS = ("model", "data", "eval_data", "out", "resume", "cache", "prompt_template",
               "image_dir", "config")

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
    parser = build_parser()
    given = vars(parser.parse_args(argv))      # only the flags given: each defaults to SUPPRESS
    if given.get("preset", Config.preset) not in PRESETS:
        parser.error(f"--preset {given['preset']!r}: choose one of {', '.join(PRESETS)}")
    if given.get("resume"):
        return resumed_config(given, parser)
    return new_run_config(given, parser)


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field (--flag / --no-flag for a switch), with the field's help; the
    RENAMED fields' old flags as hidden aliases."""
    epilog = ("Defaults shown are the official Qwen2.5-VL-3B recipe. Without --model the offline "
              "toy run overrides: " + ", ".join(f"{k}={v}" for k, v in TOY_OVERRIDES.items())
              + ". Presets: " + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items())
                                          for name, p in PRESETS.items()) + ".")
    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=epilog)
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
        for old in (old for old, new in RENAMED.items() if new == f.name):
            parser.add_argument("--" + old.replace("_", "-"), dest=f.name, type=typ,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def resumed_config(given: dict, parser) -> Config:
    """--resume: the run's own config.json, the flags given now on top - refused where they
    would change how the run trains (unless --allow-changes) or cannot apply to its
    checkpoints at all."""
    values = read_run_config(given, parser)
    if "preset" in given:          # a preset is its coefficients, not only its name
        given = {**PRESETS[given["preset"]], **given}
    changes = resume_changes(values, given)
    cannot = unhonourable_changes(changes, values, Path(given["resume"]))
    if cannot:      # refused even with --allow-changes: nothing of the run would load
        parser.error(f"--resume {given['resume']}: these changes cannot be applied to the "
                     "run's checkpoints (nothing was changed):\n  " + "\n  ".join(cannot))
    if changes and not given.get("allow_changes"):
        parser.error(f"--resume {given['resume']}: these flags would change how the run "
                     "trains from here on:\n  " + "\n  ".join(
                         f"--{k.replace('_', '-')}: {old!r} -> {new!r}"
                         for k, (old, new) in changes.items())
                     + "\nDrop them to continue the run as it was, or pass --allow-changes to "
                     "continue with them (each change is printed and recorded in "
                     "config_history.jsonl).")
    for k, (old, new) in changes.items():
        print(f"--allow-changes: {k}: {old!r} -> {new!r}")
    return Config(**{**values, **given, "resume": given["resume"]})


def read_run_config(given: dict, parser) -> dict:
    """The settings in --resume's config.json, once the folder is known to be a run's (not one
    of its checkpoints, not with another --out or a --config): RENAMED keys under their new
    names, unknown ones dropped with a note, RUN_CONTROL's never read back."""
    if given.get("config"):
        parser.error("--config starts a new run from a file of settings and --resume "
                     "continues a run with its own: give one of them")
    # Continue with the run's own settings; flags given now (e.g. --steps) still win.
    saved = Path(given["resume"]) / "config.json"
    folder = Path(given["resume"]).absolute()
    if (re.fullmatch(r"checkpoint-\d{6,}", folder.name)
            and (folder.parent / "config.json").is_file()):
        parser.error(f"--resume {given['resume']}: is a checkpoint of the run "
                     f"{folder.parent}; give the run folder: --resume {folder.parent} "
                     "(it continues from the run's latest checkpoint)")
    if not saved.is_file():
        parser.error(f"--resume {given['resume']}: {saved} not found (not a run folder)")
    if "out" in given and Path(given["out"]).resolve() != Path(given["resume"]).resolve():
        parser.error(f"--resume {given['resume']} --out {given['out']}: a resumed run "
                     "continues in its own folder; drop --out (or copy the run folder first)")
    try:
        values = saved_settings(json.loads(saved.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"--resume: {saved} is not readable JSON ({err})")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        print(f"note: {saved} has settings this version does not know, ignored: "
              f"{', '.join(unknown)}")
    # never the run's own out / overwrite / force_unlock / ... (RUN_CONTROL): its defaults
    return {k: v for k, v in values.items() if k in known and k not in RUN_CONTROL}


def new_run_config(given: dict, parser) -> Config:
    """A new run: the layers of the precedence above, lowest first - the toy run's overrides
    (without --model), the preset, the --config file, a --preset given now, the other flags."""
    from_file = read_config_file(given["config"], parser) if given.get("config") else {}
    if from_file.pop("out", None) and "out" not in given:
        parser.error(f"--config {given['config']}: give --out for the new run. The file's own "
                     "out (the run it was written for) is never reused: a run folder is only "
                     "ever named on the command line")
    preset = given.get("preset", from_file.get("preset", Config.preset))
    if preset not in PRESETS:
        parser.error(f"--config {given['config']}: preset {preset!r}: choose one of "
                     f"{', '.join(PRESETS)}")
    values = {}
    if not given.get("model", from_file.get("model")):
        values.update(TOY_OVERRIDES)
    values.update(PRESETS[preset])
    values.update(from_file)              # a run's config.json holds every coefficient
    if "preset" in given:                 # ... which a preset named on the command line replaces
        values.update(PRESETS[preset])
    values.update(given)
    return Config(**values)


# What a resumed run may change without changing how it trains: how long it goes on, how often
# it saves, logs and evaluates, where it reports, how generation is chunked (same rollouts).
RESUME_NEUTRAL = {"resume", "steps", "save_every", "keep_checkpoints", "sample_every",
                  "eval_every", "eval_samples", "eval_size", "report_to", "project",
                  "force_unlock", "overwrite", "allow_changes", "generation_batch",
                  "reward_time_limit", "out"}


def resume_changes(saved: dict, given: dict) -> dict[str, tuple]:
    """{field: (the run's value, the new one)} for the flags given with --resume that differ
    from the run's config.json and would change its training (paths compared absolute)."""
    changes = {}
    for k, new in given.items():
        if k in RESUME_NEUTRAL or k not in saved:
            continue
        if k in PATH_FIELDS:
            new = absolute_path(new, always=k == "cache")
        if new != saved[k]:
            changes[k] = (saved[k], new)
    return changes


def unhonourable_changes(changes: dict[str, tuple], saved: dict, run: Path) -> list[str]:
    """The changes of resume_changes that a resumed run could not load its checkpoint under -
    each "--flag: old -> new: why". --allow-changes accepts changes of HOW the run trains on;
    these change WHAT the checkpoint must hold (its adapters, its optimizer state's shape, its
    architecture), so every checkpoint would fail to load. They are refused before anything is
    written."""
    why = {}
    if "lora_rank" in changes:
        old, new = changes["lora_rank"]
        why["lora_rank"] = (f"its checkpoints hold LoRA adapters of rank {old}" if old else
                            "it trained every weight: its checkpoints hold no adapters")
    if "lora_targets" in changes and saved.get("lora_rank"):
        why["lora_targets"] = "its checkpoints' adapters sit on the layers it names"
    if "freeze_vision_tower" in changes:
        why["freeze_vision_tower"] = ("its optimizer state covers "
                                      + ("only the unfrozen weights" if saved.get(
                                          "freeze_vision_tower") else "the vision tower too"))
    if "fsdp" in changes:
        how = "with" if saved.get("fsdp") else "without"
        why["fsdp"] = (f"its optimizer state was written {how} --fsdp (sharded and whole state "
                       "are different forms)")
    for name in ("tiny_family", "tiny_size"):
        if name in changes and not saved.get("model"):
            why[name] = "the run started from another offline model (its reference and processor)"
    if "model" in changes:
        checkpoint = resume_checkpoint(run)
        new = changes["model"][1]
        if checkpoint is not None and new and Path(new).is_dir():
            have, want = _architecture(checkpoint), _architecture(Path(new))
            if have != want:
                why["model"] = (f"its checkpoints are {have}, --model {new} is {want} (another "
                                "model family or size)")
        elif checkpoint is not None and new == "":
            why["model"] = "the offline tiny model is not the model the run trains"
    return [f"--{k.replace('_', '-')}: {changes[k][0]!r} -> {changes[k][1]!r}: {reason}"
            for k, reason in why.items()]


def _architecture(folder: Path) -> str:
    """A model folder's family and shape, "qwen2_5_vl (hidden 64, 2 layers, vocab 5000)", from
    its config.json ("unreadable" where there is none)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return f"unreadable ({folder / 'config.json'})"
    text = cfg.get("text_config") or cfg
    return (f"{cfg.get('model_type')} (hidden {text.get('hidden_size')}, "
            f"{text.get('num_hidden_layers')} layers, vocab {text.get('vocab_size')})")


def resume_checkpoint(run: Path) -> Path | None:
    """The checkpoint folder a --resume of `run` starts from: the one latest.txt names, else the
    newest checkpoint-NNNNNN; None if there is none (check_config says so)."""
    pointer = run / "latest.txt"
    if pointer.is_file():
        folder = run / pointer.read_text().strip()
        return folder if folder.is_dir() else None
    steps = sorted((int(p.name.removeprefix("checkpoint-")), p)
                   for p in run.glob("checkpoint-*")
                   if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit())
    return steps[-1][1] if steps else None


def read_config_file(path: str, parser) -> dict:
    """The settings of a JSON file (a run's config.json) or a YAML file (.yaml / .yml), with
    the keys of Config; an unknown key is an error naming it. The RUN_CONTROL entries are
    dropped (with a note for those that would act): a config file starts a new run, in a folder
    named on the command line (--resume continues one)."""
    import yaml                                  # pyyaml comes with transformers
    try:
        text = Path(path).read_text()
        if path.lower().endswith((".yaml", ".yml")):
            with open(path) as stream:                # (its errors then name the file)
                values = yaml.load(stream, Loader=_yaml_loader())  # safe_load's, no duplicates
        else:
            values = json.loads(text, object_pairs_hook=_unique_keys)
    except (OSError, ValueError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: cannot read it ({' '.join(str(err).split())})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: holds no settings (expected a mapping of flag names)")
    values = current_names(values)
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown settings {', '.join(unknown)} (the names are "
                     "python train.py --help's flags with _ for -)")
    # out, overwrite, force_unlock, ... (RUN_CONTROL) come from the command line only
    ignored = {k: values.pop(k) for k in RUN_CONTROL if k in values}
    acting = [k for k, v in ignored.items() if v and k not in ("out", "resume", "config")]
    if acting:
        print(f"note: --config {path}: {', '.join(acting)} ignored (settings that delete, take "
              "over or change a run are taken from the command line only)")
    if ignored.get("out"):
        values["out"] = ignored["out"]       # only to say so in parse_config (then dropped)
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for k, v in values.items():      # YAML 1.1 reads `lr: 1e-4` (no dot) as the string "1e-4"
        if types[k] == "float" and isinstance(v, str) and NUMBER.fullmatch(v.strip()):
            values[k] = float(v)
    wrong = [f"{k} = {v!r} (expected {types[k]})" for k, v in values.items()
             if not _fits(v, types[k])]
    if wrong:
        parser.error(f"--config {path}: wrong types: {'; '.join(wrong)}")
    return values


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _unique_keys(pairs: list[tuple]) -> dict:
    """json's object hook: a key given twice is an error (json keeps the last one silently)."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} given more than once")
    return dict(pairs)


def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """yaml's safe loader, except that a key given twice is an error naming it and its
        line (the plain loader keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key} given more than once", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)
    return UniqueKeyLoader


def _fits(value, type_name: str) -> bool:
    """Whether a value read from a config file has its field's type (an int is a fine float)."""
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


# Every flag's allowed range, checked before anything heavy. A value outside it does not fail
# loudly by itself - it runs and trains wrongly (a negative --grad-clip turns descent into
# ascent, --temperature 0 makes every group's rollouts identical and every advantage 0) or
# crashes much later with an unrelated error - so each field names its range beside it
# (arg's check), and this list gathers them in the fields' order.
FLAG_RULES: list[tuple[str, Callable, str]] = [
    (f.name, *f.metadata["check"]) for f in dataclasses.fields(Config) if "check" in f.metadata]


def check_config(cfg: Config, world_size: int) -> None:
    """Refuse bad settings before any heavy work: one message naming every bad flag and its
    allowed range."""
    problems = (range_problems(cfg) + batch_shape_problems(cfg, world_size)
                + combination_problems(cfg) + input_problems(cfg) + resume_problems(cfg)
                + output_problems(cfg) + optional_install_problems(cfg) + reward_problems(cfg))
    if problems:
        raise SystemExit("train.py: bad configuration:\n  - " + "\n  - ".join(problems))


def range_problems(cfg: Config) -> list[str]:
    """Each flag outside its allowed range (FLAG_RULES), "--flag value: must be ..."."""
    return [f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: must be {allowed}"
            for name, ok, allowed in FLAG_RULES if not ok(getattr(cfg, name))]


def batch_shape_problems(cfg: Config, world_size: int) -> list[str]:
    """A step's prompts, DAPO's draws and the mini-batches must split evenly over the processes
    and updates."""
    problems = []
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
    return problems


def combination_problems(cfg: Config) -> list[str]:
    """Flags that do not go together, or that would be silently ignored in this configuration."""
    problems = []
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
    # Flags that act only on the masked branch, or only on KL_prcp annealing, are refused
    # where that is off, like the ones above: silently ignored, they would make a GRPO run
    # look like a PAPO ablation in its config.json.
    if cfg.perception_grad and not uses_masked_branch(cfg):
        problems.append("--perception-grad gives the masked branch a gradient, but this "
                        "objective has no masked branch (--gamma 0 and --eta-mask 0: --preset "
                        "grpo or dapo); set --gamma or drop it")
    idle = [f"{flag} {value:g}" for flag, value, default in (
                ("--gamma-end", cfg.gamma_end, Config.gamma_end),
                ("--gamma-anneal-fraction", cfg.gamma_anneal_fraction,
                 Config.gamma_anneal_fraction)) if value != default]
    if idle and not cfg.gamma_anneal:
        problems.append(f"{', '.join(idle)}: settings of KL_prcp annealing, which is off; "
                        "add --gamma-anneal or drop them")
    if 1 <= cfg.max_pixels < cfg.min_pixels:
        problems.append(f"--min-pixels {cfg.min_pixels} is over --max-pixels {cfg.max_pixels}")
    return problems


def input_problems(cfg: Config) -> list[str]:
    """The prompt template, the starting model and the run folder's name, checked before anything
    loads."""
    problems = []
    if cfg.prompt_template:
        try:
            data.read_template(cfg.prompt_template)
        except ValueError as err:
            problems.append(str(err))
    # (data sources are checked when they are loaded: a hub id or a glob is not a file)
    if cfg.model and not Path(cfg.model).exists() and cfg.model.count("/") != 1:
        problems.append(f"--model {cfg.model}: no such folder, and not a hub id (owner/name)")
    if cfg.model and not cfg.resume:      # (a resume loads its checkpoint, verified there)
        problems += [f"--model {p}" for p in integrity.weight_file_problems(Path(cfg.model))]
    if not cfg.resume and not cfg.out.strip():
        problems.append("--out '': give a run folder (an empty one would write the run into "
                        "the current folder)")
    return problems


def resume_problems(cfg: Config) -> list[str]:
    """--resume: the run folder must hold a checkpoint to continue from, and --steps must go
    past it."""
    if not cfg.resume:
        return []
    problems = []
    pointer = Path(cfg.resume) / "latest.txt"
    found = sorted(p.name for p in Path(cfg.resume).glob("checkpoint-*")
                   if p.is_dir() and re.fullmatch(r"checkpoint-\d{6,}", p.name))
    names = [pointer.read_text().strip()] if pointer.is_file() else found
    done = [int(n.removeprefix("checkpoint-")) for n in names
            if re.fullmatch(r"checkpoint-\d{6,}", n) and (Path(cfg.resume) / n).is_dir()]
    if pointer.is_file() and not done:
        problems.append(f"--resume {cfg.resume}: {pointer} holds {names[0][:60]!r}, not the "
                        "name of a checkpoint folder there"
                        + (f" (the newest is {found[-1]}); write that name into it, or "
                           "delete it to resume from the newest" if found else ""))
    elif not done:
        problems.append(f"--resume {cfg.resume}: no checkpoint there (no latest.txt, no "
                        "checkpoint-* folder)")
    elif cfg.steps <= max(done):
        problems.append(f"--steps {cfg.steps}: the run already reached step {max(done)}; "
                        f"give more steps to continue it")
    return problems


def output_problems(cfg: Config) -> list[str]:
    """What the run would evaluate or write into: held-out data for --eval-every, --out a folder."""
    problems = []
    if cfg.eval_every and cfg.data and not cfg.eval_data:
        problems.append(f"--eval-every {cfg.eval_every}: there is no held-out data to evaluate "
                        "(give --eval-data)")
    out = Path(cfg.resume or cfg.out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out}: is a file, not a run folder")
    return problems


def reward_problems(cfg: Config) -> list[str]:
    """--reward must name a function that loads (it is tried on a few rows later, prepare_data)."""
    problems = []
    if cfg.reward:
        try:
            custom_reward.load_reward(cfg.reward)
        except custom_reward.RewardError as err:
            problems.append(str(err))
    return problems


def optional_install_problems(cfg: Config) -> list[str]:
    """What the chosen trackers and LoRA need that is not installed, with the pip command (they
    are optional installs: requirements.txt does not pull them in)."""
    problems = []
    for name in dict.fromkeys(cfg.report_to.split(",")):
        needs = REPORTERS.get(name)
        if needs and importlib.util.find_spec(needs[0]) is None:
            problems.append(f"--report-to {name}: {needs[1]} is not installed; "
                            f"pip install {needs[1]}")
    if ("wandb" in cfg.report_to.split(",") and importlib.util.find_spec("wandb") is not None
            and not wandb_credentials()):
        problems.append("--report-to wandb: no W&B API key (WANDB_API_KEY, or `wandb login`); "
                        "set WANDB_MODE=offline to keep the run on the disk (wandb sync later)")
    if cfg.lora_rank:
        if importlib.util.find_spec("peft") is None:
            problems.append("--lora-rank: PEFT is not installed; pip install peft")
        if cfg.fsdp:
            problems.append("--lora-rank with --fsdp: not supported (LoRA's trainable state is "
                            "small enough for DDP: drop --fsdp)")
    return problems


def wandb_credentials() -> bool:
    """Whether wandb can start without asking for a key: offline or disabled, a key in the
    environment or an identity token file, or a .netrc entry for its host (what `wandb login`
    writes). Checked up front: wandb.init without one fails after the run folder was written."""
    import netrc
    from urllib.parse import urlparse
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def uses_masked_branch(cfg: Config) -> bool:
    return cfg.gamma > 0 or cfg.eta_mask > 0


def prompt_options(cfg: Config) -> dict:
    """How a dataset row becomes a prompt: the template and the pixel budget (Example.to_prompt)."""
    return dict(template=data.template_text(cfg.prompt_template), min_pixels=cfg.min_pixels,
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
