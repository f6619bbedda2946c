"""The rest of a training run's plumbing - everything train.py needs that is not the algorithm,
not the processes (processes.py) and not the run folder (checkpoints.py).

    1. data          the training and held-out sets, every row checked before training;
                     prompts over the length limit
    2. models        the policy (DDP or FSDP2) and its frozen reference, fresh or resumed
    3. logs          the collapse watch, curves.png, the held-out evaluation and the
                     before/after table, the run's result

It sits below train.py and imports nothing from it.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import custom_reward
import data
import eval as evaluation
import imaging
import lora
import model as qwen
import toy
from trackers import Trackers
from checkpoints import (checkpoint_folders, check_resume_data, data_sources, latest_checkpoint,
                         load_trainer_state, read_log, refuse_non_finite, verify_weights)
from config import Config, fit_pixel_budget, prompt_options, saved_config
from model import unwrap
from processes import Dist, autocast, barrier, seed_everything, shard_policy_and_reference


# =============================================================================================
# 1. The run's data: every row checked before training starts
# =============================================================================================

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
             [imaging.budget_size(w, h, cfg.min_pixels, cfg.max_pixels) for w, h in ex.sizes])
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


def prepare_data(cfg: Config, d: Dist, run: Path
                 ) -> tuple[Config, data.Dataset, dict, str, dict[str, int]]:
    """(cfg, training set, held-out sets, the starting model's folder or hub id, the rows left
    out as too long per split), everything checked. Nothing of the run is written here:
    write_run_record follows once the starting model (or checkpoint) has loaded.

    Without --model: the toy splits are written once and the tiny model is warm-started on them
    (both cached, rank 0 while the others wait). Prompt lengths need only the tokenizer: checked
    before gigabytes of weights load; every rank computes the same lengths and keeps the same
    rows. --min-pixels above what the processor keeps is lowered to it (config.fit_pixel_budget)."""
    seed_everything(cfg.seed + d.rank)
    if not cfg.data:
        if d.main:
            toy.prepare_toy_data(cfg)
        barrier()
    train, heldout = load_datasets(cfg, d)
    if cfg.reward:       # --reward tried on a few rows now: a broken one stops the run here
        try:
            custom_reward.check_user_reward(
                custom_reward.user_reward_runner(cfg.reward, cfg.reward_time_limit), train)
        except custom_reward.RewardError as err:
            raise SystemExit(f"train.py: {err}") from None
    if not cfg.model and d.main:
        toy.warm_start(cfg, train)
    barrier()
    init_path = cfg.model or str(toy.warm_start_path(cfg))
    processor = qwen.load_processor(init_path)
    cfg = fit_pixel_budget(cfg, processor, announce=d.main)
    # the processor's aspect limit applies to the pictures as the budget resizes them
    bad = [p for ds in (train, *heldout.values())
           for p in data.budget_problems(ds.rows, cfg.min_pixels, cfg.max_pixels)]
    if bad:
        raise SystemExit(f"train.py: pictures that the processor would refuse in the pixel "
                         f"budget ({len(bad)}):\n  " + "\n  ".join(bad[:20])
                         + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))
    dropped = {}
    train, dropped["training"] = check_prompt_lengths(train, processor, cfg, "training")
    for name in heldout:
        heldout[name], dropped[name] = check_prompt_lengths(heldout[name], processor, cfg, name)
    return cfg, train, heldout, init_path, dropped


# =============================================================================================
# 2. The models a run trains: fresh or resumed
# =============================================================================================

def build_policy(cfg: Config, d: Dist, init_path: str, resume_from: Path | None):
    """The trainable policy (DDP-wrapped under torchrun) and, when beta > 0, a frozen reference
    copy of the STARTING policy (also after a resume). With LoRA there is no copy: the
    reference is the policy with its adapters off (lora.reference), so ref is None."""
    lora_run = cfg.lora_rank > 0
    # a LoRA checkpoint's folder holds the MERGED weights; resuming starts from the base model
    # and puts the saved adapters back instead
    policy, processor = qwen.load_model(str(init_path if lora_run else resume_from or init_path),
                                        device=d.device,
                                        gradient_checkpointing=cfg.gradient_checkpointing)
    ref = None
    if cfg.beta > 0 and not lora_run:
        ref, _ = qwen.load_model(init_path, device=d.device) if resume_from else (copy.deepcopy(policy), None)
        ref.requires_grad_(False).eval()
        if d.device.type == "cuda":   # frozen: bf16 weights suffice and halve its memory
            ref.to(torch.bfloat16)
    if lora_run:
        lora.add_adapters(policy, cfg.lora_rank, cfg.lora_alpha,
                          [t.strip() for t in cfg.lora_targets.split(",")])
        if resume_from is not None:
            lora.load_adapters(policy, resume_from / lora.ADAPTER_FOLDER)
        if d.main:
            print(lora.describe(policy))
    if cfg.freeze_vision_tower:       # no gradient, hence no optimizer state (load_start)
        policy.model.visual.requires_grad_(False)
    policy.train()
    if cfg.fsdp:                      # (check_config made sure torchrun started us)
        policy, ref = shard_policy_and_reference(policy, ref, cfg, d)
    elif d.world > 1:
        policy = DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return policy, processor, ref


def load_start(cfg: Config, d: Dist, run: Path, init_path: str):
    """(policy, processor, ref, optimizer, state) to start the loop from: fresh, or - with
    --resume - the newest checkpoint that loads. A checkpoint that fails to load (a truncated
    file, a disk error) is named and the previous intact one is used instead."""
    candidates, data_changed = [None], {}
    if cfg.resume:
        named = latest_checkpoint(run)
        older = [f for f in reversed(checkpoint_folders(run)) if f.resolve() != named.resolve()]
        candidates = [named, *older]
        data_changed = check_resume_data(named, cfg)
    for i, folder in enumerate(candidates):
        try:
            if folder is not None:
                verify_weights(folder)
            policy, processor, ref = build_policy(cfg, d, init_path, folder)
            refuse_non_finite(policy, folder or init_path)
            # fused: one kernel over all parameters instead of a loop of small ops (0.4 ms
            # against 2 ms a step on the tiny model); the same update rule. With --fsdp the
            # parameters are DTensor shards: AdamW is elementwise, so each rank updates its own
            # shard, and fused takes DTensors (torch 2.13; a 2-rank run matches DDP bit for bit).
            optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                          lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
            state = {"step": 0, "cursor": 0, "before": None, "history": []}
            if folder is not None:
                state = load_trainer_state(folder, policy, optimizer, cfg)
                for group in optimizer.param_groups:    # the saved state carries the old ones;
                    group["lr"] = cfg.lr                # --allow-changes may have set new ones
                    group["weight_decay"] = cfg.weight_decay
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
        if data_changed:              # accepted with --allow-changes: kept beside config.json
            with open(run / "config_history.jsonl", "a") as f:
                f.write(json.dumps({"resumed_from": str(run.absolute()),
                                    "data_changed": data_changed}) + "\n")
    elif d.main:
        for name in ("metrics.jsonl", "samples.jsonl"):
            (run / name).unlink(missing_ok=True)
    return policy, processor, ref, optimizer, state


# =============================================================================================
# 3. Logs: the collapse watch, the curves, the held-out evaluation and its before/after table
# =============================================================================================

def collapse_warning(history: list[dict], window: int = 10) -> str | None:
    """The "KL_prcp hacking" signature (docs/paper.md section 8): KL_prcp jumps while the entropy
    of BOTH branches rises - the policy raises the divergence by emitting tokens that are unlikely
    under any image, not by looking more closely. Returns a warning or None."""
    keys = ("kl_prcp", "entropy_orig", "entropy_mask")
    # a step that trained nothing logs none of them (train.update_phase): no comparison then
    if len(history) <= window or any(k not in h for h in history[-window - 1:] for k in keys):
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


def user_reward(cfg: Config):
    """--reward's runner (shared with the reward phase), None for the built-in math reward: the
    held-out scores and the before/after table use the reward the run trains on."""
    return (custom_reward.user_reward_runner(cfg.reward, cfg.reward_time_limit) if cfg.reward
            else None)


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
                                             decoys=toy.shortcut_decoys(examples),
                                             user_reward=user_reward(cfg),
                                             **prompt_options(cfg))
            prefix = "" if name == "held-out" else f"{name}_"
            result.update({prefix + k: v for k, v in scores.items()})
        result["seconds"] = round(time.perf_counter() - start, 1)
    if not d.main:
        result = None
    barrier()
    return result


def blind_warning(before: dict | None) -> str | None:
    """A warning when the starting model does not use the picture at all: on the held-out split
    its accuracy is the same with every masked picture, and KL_prcp on its own samples is ~0.
    Then PAPO's perception term is zero and RL can only learn from the text - a real VLM never
    looks like this, but a toy warm start can (docs/toy.md)."""
    if not before or "kl_prcp" not in before:
        return None
    masked = {k: v for k, v in before.items() if k.startswith("accuracy_mask")}
    if before["kl_prcp"] >= 1e-4 or not masked or any(v != before["accuracy"]
                                                       for v in masked.values()):
        return None
    ratios = ", ".join(k.removeprefix("accuracy_mask") for k in masked)
    return (f"WARNING: the starting model does not use the picture: its held-out accuracy "
            f"({before['accuracy']:.3f}) is the same with the picture masked at {ratios}, and "
            f"KL_prcp on its own samples is {before['kl_prcp']:.1e}. The perception term has "
            f"nothing to work with, and RL can learn only from the question's text. With the "
            f"offline toy, try another --seed or more --warm-start-steps (on the dark canvas "
            f"this is common: docs/toy.md).")


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


def eval_columns(held: dict | None) -> dict:
    """The held-out scores a metrics.jsonl row carries (rank 0; {} on the others)."""
    return {f"eval_{k}": v for k, v in (held or {}).items()
            if any(w in k for w in ("accuracy", "format", "pass@", "kl_prcp", "decoy_rate"))}


def reports_samples(cfg: Config, step: int) -> bool:
    """Whether this step sends sample completions with their pictures to the trackers."""
    trackers = [t for t in cfg.report_to.split(",") if t and t != "none"]
    return bool(trackers) and bool(cfg.sample_every) and step % cfg.sample_every == 0


def start_trackers(cfg: Config, run: Path, d: Dist) -> Trackers | None:
    """The trackers of --report-to on rank 0 (None elsewhere), given every setting."""
    if not d.main:
        return None
    return Trackers(cfg.report_to, run, saved_config(cfg), cfg.project)


def log_step(run: Path, row: dict, batch, history: list[dict], cfg: Config, bar,
             trackers: Trackers | None = None) -> None:
    """Rank 0, after each step: the row to metrics.jsonl and the trackers, the progress bar,
    the collapse watch, and every --sample-every steps the first rollout of three groups to
    samples.jsonl (and, with their pictures, to the trackers)."""
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if trackers is not None:
        trackers.log(row, row["step"])
    bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}",
                    kl_prcp=f"{row.get('kl_prcp', float('nan')):.4f}")
    warning = collapse_warning(history)
    if warning:
        tqdm.write("WARNING " + warning)
    step = row["step"]
    if cfg.sample_every and step % cfg.sample_every == 0:
        with open(run / "samples.jsonl", "a") as f:
            for b in range(0, len(batch.rollouts), cfg.group_size)[:3]:
                sample = dict(step=step, text=batch.rollouts.texts[b],
                              reward=float(batch.rewards[b]))
                f.write(json.dumps(sample) + "\n")
        tqdm.write(f"[step {step}] sample (reward {sample['reward']:.1f}): "
                   f"{sample['text'][:160]!r}")
    if trackers is not None and batch.pictures is not None:
        G = cfg.group_size
        trackers.log_samples([dict(text=batch.rollouts.texts[g * G], reward=float(batch.rewards[g * G]),
                                   accuracy=float(batch.accuracy[g * G]),
                                   picture=(pictures or [None])[0],
                                   masked_picture=(masked or [None])[0])
                              for g, (pictures, masked) in enumerate(batch.pictures[:3])], step)


def finish_run(run: Path, cfg: Config, d: Dist, policy, before, after, heldout) -> dict:
    """The run's result: final_eval.json, curves.png and the before/after table (rank 0)."""
    result = {"before": before, "after": after, "rank_fingerprints": rank_fingerprints(policy)}
    if d.main:
        (run / "final_eval.json").write_text(json.dumps(result, indent=2))
        if (run / "metrics.jsonl").is_file():
            plot_curves(run / "metrics.jsonl", run / "curves.png")
        table = print_table(before, after, cfg, heldout)
        if table:
            print(table)
            (run / "final_table.txt").write_text(table + "\n")
        print(f"run folder: {run}")
    return result


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
