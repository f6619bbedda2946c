"""The settings of a training run: one dataclass with a help text per field, the paper's four
recipes as presets, every flag's allowed range, and the command line built from them.

    cfg = parse_config(["--preset", "papo-d", "--steps", "100"])   # what train.py does
    check_config(cfg, world_size=1)                                  # refuses bad settings early

Precedence: field defaults (the official Qwen2.5-VL-3B recipe) < the offline toy run's overrides
(when --model is not given) < the preset < a --config file < a --preset given on the command
line < the other flags given there. A resumed run starts from its own saved config.json
instead, and flags given now still win.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.distributed as dist

import data
import model as qwen
import papo
import rewards
import toy

DESCRIPTION = "PAPO / GRPO / DAPO training of a Qwen2.5-VL or Qwen3-VL policy with verifiable rewards."


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
    allow_changes: bool = arg(False, "With --resume: accept flags that change how the run "
                                     "trains from here on (preset, coefficients, data, model, "
                                     "seed, batch shape...); each change is printed and recorded "
                                     "in config_history.jsonl. Without it they are refused.")
    force_unlock: bool = arg(False, "Take over the run folder's lock even when a process (maybe "
                                    "on another machine) holds it: for the lock a preempted job "
                                    "left behind.")
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

    # --- the objective (set by --preset; see papo.py and docs/paper.md section 5) ------------
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
    scale_rewards: str = arg("group", "group (the paper's GRPO: each group's advantages divided "
                                      "by its rewards' std) | none (Dr. GRPO: the group mean "
                                      "subtracted only).")
    mask_truncated: bool = arg(False, "Leave completions that hit --max-new-tokens without an end "
                                      "token out of every loss term (their advantages still "
                                      "count in their group). truncated_frac is logged either "
                                      "way.")
    reward: str = arg("", "Your own reward: FILE.py:function or module:function, called as "
                          "function(response, gold_answer, example) -> (accuracy, format), each "
                          "in [0, 1]; reward = 0.9 accuracy + 0.1 format. Empty: rewards.py "
                          "(the official math reward). docs/rewards.md has an example.")
    reward_time_limit: float = arg(10.0, "Seconds one call of --reward may take; it runs in a "
                                         "child process, and a call past the limit scores 0 "
                                         "(reported).")

    # --- parameter-efficient and partial training ---------------------------------------------
    lora_rank: int = arg(0, "LoRA (through PEFT, an optional install): the adapters' rank; 0 = "
                            "train every weight. The reference log-probs come from the same "
                            "model with its adapters switched off (no second copy).")
    lora_alpha: float = arg(0.0, "LoRA scale numerator (0 = 2 x --lora-rank).")
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "Comma-separated names of the language model's linear layers that "
                            "get adapters (the vision tower never does).")
    freeze_vision_tower: bool = arg(False, "Never change the vision tower: its weights get no "
                                           "gradient and no optimizer state.")

    # --- infrastructure ----------------------------------------------------------------------
    dtype: str = arg("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16.")
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward (non-reentrant).")
    fsdp: bool = arg(False, "Under torchrun: shard parameters, gradients and AdamW state over the "
                            "processes with FSDP2 (fully_shard per decoder layer and vision "
                            "block) instead of replicating them with DDP. For models whose "
                            "replicas do not fit (7B on 80 GB GPUs, docs/performance.md).")
    save_every: int = arg(50, "Checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = arg(2, "How many step checkpoints to keep.")
    sample_every: int = arg(25, "Log a few sample completions every N steps (samples.jsonl, and "
                                "with pictures to the trackers of --report-to).")
    report_to: str = arg("none", "Where to send the metrics besides metrics.jsonl, "
                                 "comma-separated: none | tensorboard | wandb | trackio (each "
                                 "an optional install; wandb works offline with "
                                 "WANDB_MODE=offline).")
    project: str = arg("papo", "Project name for wandb / trackio.")
    config: str = arg("", "A JSON file (a run's config.json) or YAML file of settings to start "
                          "from; flags given on the command line override it.")
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
    toy_canvas: str = arg("light", "The toy pictures' background (toy.CANVASES): light, where "
                                   "PAPO's black squares add dark blobs, or dark, the mask's own "
                                   "black, where masking only hides.")
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


PATH_FIELDS = ("model", "data", "eval_data", "out", "resume", "cache", "prompt_template",
               "image_dir", "config")

# --report-to's choices: the trackers (an optional install each; the import that tells
# whether it is there, and the pip package).
REPORTERS = {"none": None, "tensorboard": ("tensorboard", "tensorboard"),
             "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}


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
    given = vars(parser.parse_args(argv))
    if given.get("preset", Config.preset) not in PRESETS:
        parser.error(f"--preset {given['preset']!r}: choose one of {', '.join(PRESETS)}")
    if given.get("resume"):
        if given.get("config"):
            parser.error("--config starts a new run from a file of settings and --resume "
                         "continues a run with its own: give one of them")
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
        if "preset" in given:          # a preset is its coefficients, not only its name
            given = {**PRESETS[given["preset"]], **given}
        changes = resume_changes(values, given)
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
    from_file = read_config_file(given["config"], parser) if given.get("config") else {}
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


def read_config_file(path: str, parser) -> dict:
    """The settings of a JSON file (a run's config.json) or a YAML file (.yaml / .yml), with
    the keys of Config; an unknown key is an error naming it. A resumed run's `resume` entry is
    dropped: a config file starts a new run (--resume continues one)."""
    try:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml                          # pyyaml comes with transformers
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except (OSError, ValueError) as err:         # yaml's and json's errors are ValueErrors
        parser.error(f"--config {path}: cannot read it ({err})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: holds no settings (expected a mapping of flag names)")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown settings {', '.join(unknown)} (the names are "
                     "python train.py --help's flags with _ for -)")
    values.pop("resume", None)
    values.pop("config", None)
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    wrong = [f"{k} = {v!r} (expected {types[k]})" for k, v in values.items()
             if not _fits(v, types[k])]
    if wrong:
        parser.error(f"--config {path}: wrong types: {'; '.join(wrong)}")
    return values


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
# crashes much later with an unrelated error - so each is named here with its range.
FLAG_RULES: list[tuple[str, Callable, str]] = [
    ("seed", lambda v: 0 <= v < 2 ** 31, "in [0, 2^31) (numpy's and torch's generators)"),
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
    ("report_to", lambda v: all(t in REPORTERS for t in v.split(",")),
     "comma-separated names from " + ", ".join(REPORTERS)),
    ("scale_rewards", lambda v: v in ("group", "none"), "group or none"),
    ("reward_time_limit", lambda v: 0 < v < math.inf, "> 0 (seconds)"),
    ("lora_rank", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("lora_alpha", lambda v: 0 <= v < math.inf, ">= 0 (0 = 2 x --lora-rank)"),
    ("lora_targets", lambda v: all(t.strip().isidentifier() for t in v.split(",")),
     "comma-separated layer names such as q_proj,v_proj"),
    ("eval_samples", lambda v: v >= 1, ">= 1"),
    ("eval_size", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("eval_every", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("tiny_size", lambda v: v in toy.SIZES, "one of " + ", ".join(toy.SIZES)),
    ("tiny_family", lambda v: v in toy.TINY_FAMILIES, "one of " + ", ".join(toy.TINY_FAMILIES)),
    ("toy_world", lambda v: v in toy.TOY_WORLDS, "one of " + ", ".join(toy.TOY_WORLDS)),
    ("toy_canvas", lambda v: v in toy.CANVASES, "one of " + ", ".join(toy.CANVASES)),
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
    if cfg.resume:
        pointer = Path(cfg.resume) / "latest.txt"
        names = ([pointer.read_text().strip()] if pointer.is_file() else
                 [p.name for p in Path(cfg.resume).glob("checkpoint-*") if p.is_dir()])
        done = [int(n.removeprefix("checkpoint-")) for n in names
                if n.removeprefix("checkpoint-").isdigit()]
        if not done:
            problems.append(f"--resume {cfg.resume}: no checkpoint there (no latest.txt, no "
                            "checkpoint-* folder)")
        elif cfg.steps <= max(done):
            problems.append(f"--steps {cfg.steps}: the run already reached step {max(done)}; "
                            f"give more steps to continue it")
    if cfg.eval_every and cfg.data and not cfg.eval_data:
        problems.append(f"--eval-every {cfg.eval_every}: there is no held-out data to evaluate "
                        "(give --eval-data)")
    out = Path(cfg.resume or cfg.out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out}: is a file, not a run folder")
    problems += optional_install_problems(cfg)
    if cfg.reward:
        try:
            rewards.load_reward(cfg.reward)
        except rewards.RewardError as err:
            problems.append(str(err))
    if problems:
        raise SystemExit("train.py: bad configuration:\n  - " + "\n  - ".join(problems))


def optional_install_problems(cfg: Config) -> list[str]:
    """What the chosen trackers and LoRA need that is not installed, with the pip command (they
    are optional installs: requirements.txt does not pull them in)."""
    problems = []
    for name in dict.fromkeys(cfg.report_to.split(",")):
        needs = REPORTERS.get(name)
        if needs and importlib.util.find_spec(needs[0]) is None:
            problems.append(f"--report-to {name}: {needs[1]} is not installed; "
                            f"pip install {needs[1]}")
    if cfg.lora_rank:
        if importlib.util.find_spec("peft") is None:
            problems.append("--lora-rank: PEFT is not installed; pip install peft")
        if cfg.fsdp:
            problems.append("--lora-rank with --fsdp: not supported (LoRA's trainable state is "
                            "small enough for DDP: drop --fsdp)")
    return problems


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
