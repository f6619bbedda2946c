"""PAPO / GRPO / DAPO training of a Qwen2.5-VL or Qwen3-VL policy with verifiable rewards.

    python train.py                               # offline default: tiny model + toy task, CPU
    torchrun --nproc_per_node 2 train.py          # the same, data-parallel over 2 processes
    torchrun --nproc_per_node 4 train.py --fsdp --model Qwen/Qwen2.5-VL-7B-Instruct ...
                                                  # sharded over 4 processes (FSDP2)
    torchrun --nproc_per_node 2 train.py --preset papo-g \
        --model Qwen/Qwen2.5-VL-3B-Instruct --data train.jsonl --eval-data test.jsonl
    python train.py --tiny-family qwen3-vl-thinking   # offline, on a tiny Qwen3-VL (Thinking)

One RL step (rl_step), as in the algorithm box of the paper; each phase is a function below:

    1. draw        draw_prompts     each rank takes its share of the step's prompts
    2. mask        load_pictures    PAPO: one patch mask per prompt, on the raw picture, shared
                                    by the prompt's G rollouts; new every step
    3. generate    generate_phase   G rollouts per prompt with HF `generate`
    4. reward      reward_phase     rule-based: 0.9 * accuracy + 0.1 * format
    5. advantages  group_advantages group-normalised rewards (papo.py)
       (DAPO)      refill           keeps the groups with a signal and repeats phases 1-5 on
                                    more prompts until the step is full
    6. score       score_phase      old / reference / masked-image log-probs, no gradient
    7. update      update_phase     mini-batches of micro-batches: papo.papo_loss, normalised by
                                    the GLOBAL token count, then AdamW

This file is the algorithm. The math is papo.py; transformers is model.py; prompts, files and
rewards are data.py and rewards.py; the settings are config.py; the processes (ranks, seeds,
stop signals) are processes.py; the run folder, its checkpoints and resume are checkpoints.py; the
data check, the policy and the logs are runtime.py; the offline toy world and its warm start are
toy.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

import custom_reward
import data
import imaging
import lora
import model as qwen
import papo
import rewards
import checkpoints
import processes
import runtime
from config import Config, check_config, parse_config, prompt_options, uses_masked_branch
from processes import Dist, all_reduce, autocast, barrier, step_seed


# =============================================================================================
# One RL step
# =============================================================================================

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
    pictures: list | None = None              # [N] (pictures, masked pictures) per group, kept
                                              # only on steps that report samples to trackers

    def select(self, rows: torch.Tensor) -> "Batch":
        """The batch of these rows (whole groups), every field kept; itself when that is every
        row (no copy)."""
        if len(rows) == len(self.rollouts):
            return self
        take = lambda r: None if r is None else r.select(rows)             # Rollouts
        row = lambda t: None if t is None else t[rows.to(t.device)]         # [B, ...] tensors
        G = self.rollouts.num_samples
        pictures = None if self.pictures is None else [self.pictures[int(r) // G]
                                                       for r in rows[::G]]
        return Batch(take(self.rollouts), take(self.masked), row(self.rewards),
                     row(self.accuracy), row(self.fmt), row(self.advantages),
                     old_logp=row(self.old_logp), ref_logp=row(self.ref_logp),
                     masked_logp=row(self.masked_logp), masked_entropy=row(self.masked_entropy),
                     pictures=pictures)


def rl_step(policy, ref, optimizer, processor, examples, cfg: Config, d: Dist, step: int,
            state: dict) -> tuple[Batch, dict]:
    """One RL step, as the paper's algorithm box draws it -> (the trained batch, the step's
    metrics and phase times). Phases 1-5 make one draw of rollouts; DAPO's refill repeats them
    until the step holds enough groups with a signal (without dynamic sampling: one draw).

    optimizer None stops after phase 5 (collect_batch: the rollouts alone, for tests)."""
    need_masked = state.get("need_masked", uses_masked_branch(cfg))
    keep_pictures = state.get("keep_pictures", runtime.reports_samples(cfg, step))
    thinking_open = qwen.prompt_opens_thinking(processor)     # the template opened <think>

    def phases_1_to_5(draw: int, size: int) -> Batch:
        """One draw: `size` prompts (global count) -> their rollouts, rewards and advantages."""
        prompts, state["cursor"] = draw_prompts(examples, cfg, d, state["cursor"], size)  # 1
        seed = step_seed(cfg, step, d.rank, salt=draw)
        pictures, masked_pictures = load_pictures(prompts, cfg, seed, need_masked)      # 2
        with autocast(cfg, d.device):
            rollouts, masked = generate_phase(policy, processor, prompts, cfg, seed,     # 3
                                              need_masked, (pictures, masked_pictures))
        rewards, acc, fmt = reward_phase(rollouts, prompts, cfg.group_size,              # 4
                                         thinking_open, **user_reward(cfg))
        advantages = papo.group_advantages(rewards, cfg.group_size,                      # 5
                                           scale_by_std=cfg.scale_rewards == "group")
        kept = list(zip(pictures, masked_pictures or [None] * len(prompts)))
        return Batch(rollouts, masked, rewards, acc, fmt, advantages,
                     pictures=kept if keep_pictures else None)

    times = {}
    t0 = time.perf_counter()
    batch, stats = refill(phases_1_to_5, policy, cfg, d, step)          # 1-5, DAPO: repeated
    times["t_rollout"] = time.perf_counter() - t0
    if optimizer is None:
        return batch, stats
    t0 = time.perf_counter()
    score_phase(batch, policy, ref, cfg, d)                              # 6
    times["t_score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = update_phase(batch, policy, optimizer, cfg, d, step, guard=state)  # 7
    times["t_update"] = time.perf_counter() - t0
    return batch, {"step": step, **rollout_statistics(stats, d),
                   "kept_rollouts": len(batch.rollouts), **metrics, **times}


def collect_batch(policy, processor, examples, cfg: Config, d: Dist, step: int, cursor: int,
                  need_masked: bool, keep_pictures: bool = False) -> tuple[Batch, int, dict]:
    """Phases 1-5 of rl_step alone, from `cursor` -> (batch, the new cursor, statistics): the
    rollout batch as the update would receive it, for tests and bench.py to inspect."""
    state = {"cursor": cursor, "need_masked": need_masked, "keep_pictures": keep_pictures}
    batch, stats = rl_step(policy, None, None, processor, examples, cfg, d, step, state)
    return batch, state["cursor"], stats


# --- phase 1: draw ----------------------------------------------------------------------------

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


# --- phase 2: mask ----------------------------------------------------------------------------

def load_pictures(prompts: list[data.Example], cfg: Config, seed: int, need_masked: bool,
                  ) -> tuple[list[list], list[list] | None]:
    """Each prompt's pictures in the pixel budget, and (need_masked) their masked copies.

    The masked copies are made once per PROMPT, so that the G rollouts of a group are compared
    against the SAME corrupted picture: their advantages and their KL_prcp then differ only
    through the sampled text. The order is the official one: 14 x 14-pixel squares of the RAW
    picture are blacked out, then each copy is resized into the pixel budget exactly like the
    original (a masked square becomes 14 f pixels wide, f the budget's scale factor; both get
    the same size, hence the same image-token grid). With --masked-image-key the masked copies
    are the dataset's pre-masked pictures, resized alike."""
    fit = lambda pictures: [imaging.budget_resize(p, cfg.min_pixels, cfg.max_pixels)
                            for p in pictures]
    masked = None
    # Decoding and resizing are PIL work, which releases the GIL: one thread per core (torch is
    # idle meanwhile). Same pictures, same order as a plain loop.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        raw = list(pool.map(lambda ex: ex.load_images(), prompts))      # RGB, not resized
        pictures = list(pool.map(fit, raw))                              # in the budget
        if need_masked and cfg.masked_image_key:
            masked = list(pool.map(
                lambda ex: ex.load_masked_images(cfg.min_pixels, cfg.max_pixels), prompts))
        elif need_masked:
            rng = np.random.default_rng(seed)       # drawn in prompt order, as a plain loop
            masked_raw = [papo.mask_image(p, patch_size=cfg.mask_patch, ratio=cfg.mask_ratio,
                                          rng=rng, mode=cfg.mask_mode) for p in raw]
            masked = list(pool.map(fit, masked_raw))
    if cfg.masked_image_key and masked is not None:
        for ex, mine, theirs in zip(prompts, masked, pictures):
            # checked per row when the data was loaded; rows built in code get the same check
            if [im.size for im in mine] != [im.size for im in theirs]:
                raise ValueError(f"{ex.source}: column {cfg.masked_image_key!r}: pre-masked "
                                 f"picture sizes {[im.size for im in mine]} differ from the "
                                 f"originals' {[im.size for im in theirs]}")
    return pictures, masked


# --- phase 3: generate ------------------------------------------------------------------------

def generate_phase(policy, processor, prompts: list[data.Example], cfg: Config, seed: int,
                   need_masked: bool, pictures: tuple | None = None,
                   ) -> tuple[qwen.Rollouts, qwen.Rollouts | None]:
    """Phases 2-3: the pictures (load_pictures, unless the caller already has them), then G
    rollouts per prompt; with the masked branch, the same rollouts carrying the masked pictures'
    patches (only pixel_values differ)."""
    pictures, masked_pictures = pictures or load_pictures(prompts, cfg, seed, need_masked)
    template = prompt_options(cfg)["template"]
    items = [ex.to_prompt(template, pictures=p) for ex, p in zip(prompts, pictures)]
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
    if not need_masked:
        return rollouts, None
    # The processor treats the masked pictures exactly like the originals (same size in, same
    # grid out), so the rollouts' image tokens line up with the masked patches.
    pixels = qwen.encode_images(processor, masked_pictures)             # once per prompt
    if not torch.equal(pixels["image_grid_thw"].cpu(), rollouts.image_grid_thw.cpu()):
        raise RuntimeError("masked images produced a different image-token grid")
    return rollouts, dataclasses.replace(
        rollouts, pixel_values=pixels["pixel_values"].to(rollouts.pixel_values.device))


# --- phase 4: reward --------------------------------------------------------------------------

def reward_phase(rollouts: qwen.Rollouts, prompts: list[data.Example], group_size: int,
                 thinking_open: bool = False, user_reward: custom_reward.UserReward | None = None):
    """Rule-based rewards: 0.9 * accuracy + 0.1 * format (rewards.reward_details, or the
    user's --reward; an EasyR1-style one pays its own "overall"). Rollout b answers prompt
    b // G (group-major). thinking_open: the chat template opened <think> in the prompt
    (model.prompt_opens_thinking)."""
    asked = [prompts[b // group_size] for b in range(len(rollouts.texts))]
    if user_reward is not None:            # one request for the whole phase (EasyR1's batch form)
        details = user_reward.score(rollouts.texts, asked,
                                    rollouts.completion_mask.sum(-1).int().tolist())
    else:
        details = [rewards.reward_details(text, example.answer, thinking_open)
                   for text, example in zip(rollouts.texts, asked)]
    as_tensor = lambda key: torch.tensor([x[key] for x in details], dtype=torch.float32)
    return as_tensor("reward"), as_tensor("accuracy"), as_tensor("format")


# --- phase 5: advantages, and DAPO's dynamic sampling -----------------------------------------

class DynamicSamplingExhausted(RuntimeError):
    """DAPO's dynamic sampling made --max-draws draws without filling the step."""


def refill(phases_1_to_5, policy, cfg: Config, d: Dist, step: int) -> tuple[Batch, dict]:
    """The step's rollout batch from draws of phases 1-5 -> (batch, statistics of every sampled
    rollout). phases_1_to_5(draw, size) rolls out one draw of `size` prompts (global count).

    Without dynamic sampling this is one draw of --prompts-per-step prompts. With it, the
    official refill: draws of --draw-size prompts, each filtered (groups_to_keep), until the
    step holds --prompts-per-step kept groups; the extra kept groups are trimmed. After
    --max-draws draws without a full step the run stops with an error.

    Over several ranks every rank draws its share of each draw, and the ranks draw again until
    EVERY rank holds its share of the step (they run collectives in lockstep, and each trains
    on the same number of groups); then each trims its own extra. So the step is always full;
    it can take a draw more than one process would."""
    per_rank = cfg.prompts_per_step // d.world
    size = cfg.draw_size if cfg.dynamic_sampling else cfg.prompts_per_step
    eos = qwen.eos_ids(policy)
    kept: list[Batch] = []
    stats = dict(reward=[], accuracy=[], format=[], length=[], truncated=[], zero_var_groups=0,
                 identical_groups=0, groups=0)
    for draw in range(cfg.max_draws if cfg.dynamic_sampling else 1):
        drawn = phases_1_to_5(draw, size)
        truncated = qwen.truncated_rows(drawn.rollouts, cfg.max_new_tokens, eos)   # [B]
        _tally(stats, drawn, cfg.group_size, truncated)
        if cfg.mask_truncated:
            drawn = leave_out_truncated(drawn, truncated)
        kept.append(drawn.select(groups_to_keep(drawn.accuracy, cfg)))
        n_kept = sum(len(k.rollouts) for k in kept) // cfg.group_size
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
    return _first_rows(kept, per_rank * cfg.group_size), stats


def user_reward(cfg: Config) -> dict:
    """{"user_reward": the runner of --reward} ({} for the built-in reward): one runner, and
    one child process, per spec for the whole run."""
    if not cfg.reward:
        return {}
    return {"user_reward": custom_reward.user_reward_runner(cfg.reward, cfg.reward_time_limit)}


def leave_out_truncated(batch: Batch, truncated: torch.Tensor) -> Batch:
    """--mask-truncated: the batch with the completion masks of truncated rows zeroed, so they
    enter no loss term and no normaliser (and are not even scored). Their rewards and
    advantages stay: they still count in their group's baseline, as in TRL's option."""
    keep = (~truncated).to(batch.rollouts.completion_mask.dtype)[:, None]       # [B, 1]
    hide = lambda r: None if r is None else dataclasses.replace(
        r, completion_mask=r.completion_mask * keep.to(r.completion_mask.device))
    return dataclasses.replace(batch, rollouts=hide(batch.rollouts), masked=hide(batch.masked))


def groups_to_keep(accuracy: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The rows of the groups a step keeps (whole groups, in order), from accuracies [B].

    DAPO (--dynamic-sampling): groups whose rollouts all got the same accuracy carry zero
    advantage and no policy-gradient signal, so only groups with 0.01 < mean accuracy < 0.99
    are kept - unless no group of the whole draw (all ranks) passes: then the official code
    keeps every group of the draw, and so does this. Otherwise every group is kept."""
    G = cfg.group_size
    by_group = accuracy.view(-1, G)                                          # [N, G]
    keep = torch.ones(len(by_group), dtype=torch.bool)                       # [N]
    if cfg.dynamic_sampling:
        keep = papo.dynamic_sampling_keep(by_group)                          # [N]
        if int(all_reduce(keep.sum())) == 0:
            keep[:] = True
    groups = keep.nonzero().flatten()
    return (groups[:, None] * G + torch.arange(G)).flatten()                 # [kept rows]


def _tally(stats: dict, drawn: Batch, G: int, truncated: torch.Tensor) -> None:
    """Statistics describe every sampled rollout, before any group is dropped."""
    by_group = drawn.accuracy.view(-1, G)                                    # [N, G]
    zero_var = (by_group == by_group[:, :1]).all(dim=1)                      # [N]
    stats["reward"].append(drawn.rewards); stats["accuracy"].append(drawn.accuracy)
    stats["format"].append(drawn.fmt)
    stats["length"].append(drawn.rollouts.completion_mask.sum(-1).float().cpu())
    stats["truncated"].append(truncated.float().cpu())
    stats["zero_var_groups"] += int(zero_var.sum()); stats["groups"] += len(zero_var)
    # groups whose G completions are the very same tokens: sampling that is all but greedy
    # (--temperature or --top-p near 0) gives nothing but these, and they teach nothing
    mask = drawn.rollouts.completion_mask.long().cpu()                        # [B, T]
    ids = (drawn.rollouts.completion_ids.cpu() * mask).view(len(zero_var), G, -1)  # [N, G, T]
    mask = mask.view(len(zero_var), G, -1)                                    # [N, G, T]
    same = ((ids == ids[:, :1]).all(dim=2) & (mask == mask[:, :1]).all(dim=2)).all(dim=1)  # [N]
    stats["identical_groups"] += int(same.sum())


def _first_rows(parts: list[Batch], n: int) -> Batch:
    """The first n rows of the kept draws, as one batch (one whole draw: itself, no copy)."""
    def merge(rollouts):
        whole = rollouts[0] if len(rollouts) == 1 else qwen.cat_rollouts(rollouts)
        return whole if len(whole) == n else whole.select(range(n))
    rollouts = merge([p.rollouts for p in parts])
    masked = merge([p.masked for p in parts]) if parts[0].masked is not None else None
    device = rollouts.completion_ids.device
    tensors = [torch.cat([getattr(p, f) for p in parts])[:n].to(device)
               for f in ("rewards", "accuracy", "fmt", "advantages")]
    pictures = None if parts[0].pictures is None else [
        g for p in parts for g in p.pictures][:n // rollouts.num_samples]
    return Batch(rollouts, masked, *tensors, pictures=pictures)


def rollout_statistics(stats: dict, d: Dist) -> dict:
    """The step's rollout statistics (every sampled rollout), averaged over ranks."""
    means = all_reduce(torch.stack([torch.cat(stats[k]).mean() for k in
                                    ("reward", "accuracy", "format", "length", "truncated")]))
    counts = all_reduce(torch.tensor([stats["zero_var_groups"], stats["groups"],
                                      stats["identical_groups"]], dtype=torch.float64))
    return dict(reward=float(means[0]) / d.world, accuracy=float(means[1]) / d.world,
                format=float(means[2]) / d.world, response_length=float(means[3]) / d.world,
                truncated_frac=float(means[4]) / d.world,
                zero_var_frac=float(counts[0] / counts[1]),
                identical_frac=float(counts[2] / counts[1]), draws=stats["draws"])


# --- phase 6: score ---------------------------------------------------------------------------

@torch.no_grad()
def score_phase(batch: Batch, policy, ref_model, cfg: Config, d: Dist) -> None:
    """Phase 6: log-probs that the update treats as constants, with the pre-update weights, at
    the sampling temperature (the distribution the tokens were drawn from).

    - old: needed only when one rollout batch feeds several optimizer steps (after the first,
      the policy has moved away from the one that sampled); with one update it equals the live
      log-prob, so the update uses that, detached, and this forward is skipped.
    - ref: the frozen starting policy, for the beta * KL_ref term.
    - masked (official PAPO): the policy on the masked images, computed ONCE here and detached
      (docs/objective.md says why); --perception-grad recomputes it with gradient at every
      update instead."""
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
        with lora.reference(policy, ref_model) as ref:   # LoRA: the policy, adapters off
            batch.ref_logp = run(ref, batch.rollouts)
    if batch.masked is not None and not cfg.perception_grad:
        if cfg.entropy == "exact":
            batch.masked_logp, batch.masked_entropy = run(policy, batch.masked, with_entropy=True)
        else:
            batch.masked_logp = run(policy, batch.masked)
        # The masked pictures are not needed any more: free their patch rows before the update,
        # the step's memory peak, so that PAPO's extra memory there is one [B, T] tensor.
        batch.masked = None
    policy.train()


# --- phase 7: update --------------------------------------------------------------------------

def update_phase(batch: Batch, policy, optimizer, cfg: Config, d: Dist, step: int,
                 guard: dict | None = None) -> dict:
    """Phase 7: --updates-per-step optimizer steps on disjoint mini-batches of whole groups,
    each accumulated over micro-batches -> the step's loss metrics.

    Every micro-batch's loss divides by what its mini-batch computes once (loss_normalizers:
    the GLOBAL count over all micro-batches and ranks), so the accumulated gradient is that of
    one big batch whatever the micro-batch size or the number of GPUs.

    A mini-batch without a single completion token (every rollout left out by --mask-truncated)
    is not an update: it is skipped, without a forward. `guard` (the run's state) carries what
    the run's watches need across steps (guard_update): the weights' starting norm and the
    number of updates skipped in a row. A metric no token measured is not logged."""
    gamma, eta_orig, eta_mask = loss_coefficients(cfg, step)
    options = loss_options(cfg)                                  # the run's switches
    mask = batch.rollouts.completion_mask.float()                            # [B, T]
    correct = right_rollouts(batch, cfg)                                     # [B] or None
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    grad_norms, skipped = [], 0
    for mini in minibatches(batch, cfg, d, step):
        if float(all_reduce(mask[mini].sum())) == 0:          # the same decision on every rank
            skipped += 1
            guard_update(guard, cfg, step, stepped=False, why="no tokens")
            continue
        micros = mini.split(cfg.micro_batch_size)
        normalizers = loss_normalizers(mask, correct, mini, len(micros), cfg, d)
        for i, idx in enumerate(micros):
            # DDP: only the last micro-batch all-reduces gradients; the others accumulate
            # locally. FSDP always reduce-scatters (no no_sync there): accumulating unreduced
            # gradients would keep a full-size gradient per rank, the memory FSDP saves.
            sync = i == len(micros) - 1 or not isinstance(policy, DDP)
            with (contextlib.nullcontext() if sync else policy.no_sync()):
                loss, metrics = micro_batch_loss(batch, idx, policy, cfg, d, options,
                                                 normalizers, gamma=gamma, eta_orig=eta_orig,
                                                 eta_mask=eta_mask)
                loss.backward()
            add_weighted(sums, weights, metrics, mask[idx],
                         None if correct is None else correct[idx])
        try:
            grad_norm, stepped = optimizer_step(policy, optimizer, cfg, guard)
        except Diverged as err:
            raise Diverged(f"step {step}: {err}") from None
        guard_update(guard, cfg, step, stepped, why="not finite")
        grad_norms.append(grad_norm)
        skipped += not stepped
    if not grad_norms and d.main:
        # nothing was trained this step: say so now, not only when the watch stops the run
        tqdm.write(f"WARNING step {step}: every completion hit --max-new-tokens "
                   f"{cfg.max_new_tokens} and --mask-truncated left them all out of the loss: "
                   "nothing was trained. Raise --max-new-tokens or drop --mask-truncated.",
                   file=sys.stderr)
    out = weighted_means_over_ranks(sums, weights)
    if grad_norms:
        out["grad_norm"] = float(np.mean(grad_norms))
    out.update(skipped_updates=skipped, gamma_t=gamma)
    if cfg.gamma_anneal:
        out.update(eta_orig_t=eta_orig, eta_mask_t=eta_mask)
    return out


def loss_coefficients(cfg: Config, step: int) -> tuple[float, float, float]:
    """(gamma, eta_orig, eta_mask) of this step: the flags, or KL_prcp annealing's (papo)."""
    if not cfg.gamma_anneal:
        return cfg.gamma, cfg.eta_orig, cfg.eta_mask
    return papo.annealed_coefficients(step, cfg.steps, cfg.gamma, cfg.eta_orig, cfg.eta_mask,
                                      gamma_end=cfg.gamma_end, fraction=cfg.gamma_anneal_fraction)


def minibatches(batch: Batch, cfg: Config, d: Dist, step: int) -> list[torch.Tensor]:
    """The rows of each mini-batch: random GROUPS, their G rollouts kept together and adjacent.
    A micro-batch (consecutive rows of its mini-batch) then holds whole groups when
    --micro-batch-size is a multiple of G; otherwise a group can straddle two micro-batches (the
    defaults, 8 and G = 5), and each reads the group's prompt and picture once for its rows
    (completion_logprobs finds shared prompts from the rows, not from G)."""
    B, G = len(batch.rollouts), cfg.group_size
    order = torch.randperm(B // G, generator=torch.Generator().manual_seed(
        step_seed(cfg, step, d.rank, 3)))                                     # [B / G] groups
    return [(groups[:, None] * G + torch.arange(G)).flatten()                # rows of the groups
            for groups in order.chunk(cfg.updates_per_step)]


def loss_options(cfg: Config) -> papo.Options:
    """The official switches of the objective, as the run's flags set them (0 = off)."""
    return papo.Options(kl_prcp_clip=cfg.kl_prcp_clip or None,
                        kl_prcp_token_fraction=cfg.kl_prcp_token_fraction or None,
                        sft_coef=cfg.sft_coef, entropy=cfg.entropy)


def loss_normalizers(mask, correct, mini, n_micro: int, cfg: Config, d: Dist) -> dict:
    """What every micro-batch loss of the mini-batch `mini` divides by, as papo_loss's keywords:
    normalizer, its count by --agg-mode - tokens (token-mean), rollouts (the seq-* modes) or
    micro-batches K (micro-token-mean) - and sft_normalizer, the tokens of its right rollouts
    (the SFT term). Each is the GLOBAL count, summed over all ranks, divided by the world size:
    DDP (and FSDP) AVERAGE the ranks' gradients, so a rank whose loss is its rows' sum / (global
    count / world) contributes, once averaged, exactly its share of the gradient of (sum over
    all ranks' rows) / (global count) - one big batch's."""
    if cfg.agg_mode == "token-mean":
        count = mask[mini].sum()
    elif cfg.agg_mode == papo.MICRO_TOKEN_MEAN:
        count = torch.tensor(float(n_micro))
    else:
        count = torch.tensor(float(len(mini)))
    sft_count = None
    if correct is not None and cfg.agg_mode != papo.MICRO_TOKEN_MEAN:
        # with no right rollout anywhere the term is 0, and 1 keeps the division defined
        sft_count = all_reduce((mask[mini] * correct[mini, None]).sum()).clamp(min=1.0) / d.world
    return dict(normalizer=all_reduce(count) / d.world, sft_normalizer=sft_count)


def right_rollouts(batch: Batch, cfg: Config) -> torch.Tensor | None:
    """[B] bool: the rollouts the SFT term trains on; None without --sft-coef. The official
    threshold, accuracy above 0.1: the built-in accuracy is 0 or 1, so that is "right"; a
    reward of your own with partial credit counts 0.2 as right too (docs/paper.md)."""
    return (batch.accuracy > 0.1) if cfg.sft_coef else None


def micro_batch_loss(batch: Batch, idx, policy, cfg: Config, d: Dist, options: papo.Options,
                     normalizers: dict, **coefficients) -> tuple[torch.Tensor, dict]:
    """papo.papo_loss of the rows idx: the policy's log-probs now (with gradient, at the
    sampling temperature) against the constants of phase 6."""
    micro = batch.rollouts.select(idx)
    with autocast(cfg, d.device):
        out = qwen.completion_logprobs(policy, micro, temperature=cfg.temperature,
                                       with_entropy=cfg.entropy == "exact")
        logp, entropy = out if cfg.entropy == "exact" else (out, None)         # [b, T]
        masked_logp, masked_entropy = _masked_branch(batch, policy, idx, cfg)  # [b, T]
    old = batch.old_logp[idx] if batch.old_logp is not None else logp.detach()
    correct = right_rollouts(batch, cfg)
    return papo.papo_loss(
        logp, old, batch.advantages[idx], micro.completion_mask.float(),
        masked_logp=masked_logp,
        ref_logp=batch.ref_logp[idx] if batch.ref_logp is not None else None,
        entropy_orig=entropy, entropy_mask=masked_entropy,
        sft_rows=correct[idx] if correct is not None else None,
        beta=cfg.beta, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip or None, agg_mode=cfg.agg_mode, kl_kind=cfg.kl_kind,
        max_len=cfg.max_new_tokens, options=options, **normalizers, **coefficients)


def add_weighted(sums: dict, weights: dict, metrics: dict, mask, correct) -> None:
    """Add one micro-batch's metrics to the step's running sums, weighted by its tokens (mask
    [b, T]): the step logs token-weighted means over every micro-batch and rank
    (weighted_means_over_ranks). sft_nll is a mean over the right rollouts' tokens only
    (correct [b], or None without the SFT term), so those are its weights."""
    w = float(mask.sum())
    own = {} if correct is None else {"sft_nll": float((mask * correct[:, None]).sum())}
    for k, v in metrics.items():
        if k != "loss":
            sums[k] = sums.get(k, 0.0) + v * own.get(k, w)
            weights[k] = weights.get(k, 0.0) + own.get(k, w)


def _masked_branch(batch: Batch, policy, idx, cfg: Config):
    """Masked-branch log-probs (and exact entropies) for these rows: the detached ones from
    score_phase, or - with --perception-grad - a fresh forward WITH gradient (a second forward
    through the same DDP wrapper before one backward is fine: each parameter's gradient hook
    fires once)."""
    if cfg.perception_grad and batch.masked is not None:
        out = qwen.completion_logprobs(policy, batch.masked.select(idx),
                                       temperature=cfg.temperature,
                                       with_entropy=cfg.entropy == "exact")
        return out if cfg.entropy == "exact" else (out, None)
    if batch.masked_logp is None:
        return None, None
    entropy = batch.masked_entropy[idx] if batch.masked_entropy is not None else None
    return batch.masked_logp[idx], entropy


class Diverged(RuntimeError):
    """An update made the weights non-finite, blew their norm up or shrank it towards zero, or
    every update of a while was skipped: the run cannot go on."""


# The run's watches on its updates (guard_update, optimizer_step). An update with a non-finite
# gradient is skipped, which is right for a rare overflow; but when every update is skipped the
# run learns nothing while it looks healthy, so a few in a row stop it. The weights' norm may
# not fall under a fraction of its start either: weight decay that large (AdamW multiplies each
# weight by 1 - lr x weight decay at every update) erases the policy.
MAX_SKIPPED_IN_A_ROW = 3
COLLAPSE_FRACTION = 0.5


def guard_update(guard: dict | None, cfg: Config, step: int, stepped: bool, why: str) -> None:
    """Count updates skipped in a row in guard["skipped_in_a_row"]; at MAX_SKIPPED_IN_A_ROW stop
    the run (Diverged) naming the likely cause: `why` is "no tokens" (--mask-truncated left
    nothing to train on) or "not finite" (the gradient was NaN or inf)."""
    if guard is None:
        return
    guard["skipped_in_a_row"] = 0 if stepped else guard.get("skipped_in_a_row", 0) + 1
    n = guard["skipped_in_a_row"]
    if n < MAX_SKIPPED_IN_A_ROW:
        return
    if why == "no tokens":
        raise Diverged(f"step {step}: the last {n} updates had not one completion token to "
                       f"train on: every completion hit --max-new-tokens {cfg.max_new_tokens} "
                       "without an end token and --mask-truncated leaves such completions out "
                       "of the loss. Raise --max-new-tokens or drop --mask-truncated")
    weights = {flag: getattr(cfg, flag.removeprefix("--").replace("-", "_"))
               for flag in ("--gamma", "--beta", "--eta-orig", "--eta-mask", "--sft-coef")}
    large = [f"{flag} {v:g}" for flag, v in sorted(weights.items(), key=lambda kv: -kv[1])
             if v > 1] or [f"{flag} {v:g}" for flag, v in weights.items() if v]
    named = ", ".join(large) or "none set"
    raise Diverged(f"step {step}: the last {n} updates were skipped: the gradient was not "
                   "finite (NaN or inf), so the policy cannot learn. The likely cause is a "
                   f"loss weight too large for the loss to stay finite ({named}); "
                   f"otherwise --temperature {cfg.temperature:g} or --dtype {cfg.dtype}")


def optimizer_step(policy, optimizer, cfg: Config, guard: dict | None = None,
                   ) -> tuple[float, bool]:
    """Clip the global gradient norm and step: (the norm, whether the step was taken). A
    non-finite norm skips the step (gradients are all-reduced, so every rank agrees). An update
    that leaves the weights non-finite, or more than doubles their norm (a learning rate far
    too large: AdamW moves every weight by about lr), stops the run (Diverged) before the broken
    policy generates again; so does one that leaves the norm under COLLAPSE_FRACTION of its
    start, guard["weight_norm_start"] (the norm before the run's first update; kept in
    checkpoints, so a resumed run compares with the same start)."""
    # With FSDP the gradients are DTensor shards: clip_grad_norm_ computes each shard's part
    # and reduces the norm over the ranks itself, returning a DTensor (full_tensor: a value)
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip))
    stepped = bool(torch.isfinite(grad_norm))
    if stepped:
        trained = [p for p in policy.parameters() if p.requires_grad]
        before = _full(torch.nn.utils.get_total_norm(trained))
        if guard is not None:
            guard.setdefault("weight_norm_start", float(before))
        optimizer.step()
        after = _full(torch.nn.utils.get_total_norm(trained))
        if not torch.isfinite(after) or after > 2 * before:
            raise Diverged(f"the update took the weights' norm from {float(before):.4g} to "
                           f"{float(after):.4g} (--lr {cfg.lr:g}): the policy diverged; resume "
                           "from the last checkpoint with a smaller --lr")
        start = guard["weight_norm_start"] if guard is not None else None
        if start is not None and after < COLLAPSE_FRACTION * start:
            raise Diverged(f"the update took the weights' norm to {float(after):.4g}, under "
                           f"{COLLAPSE_FRACTION:g} x its start {start:.4g} (--lr {cfg.lr:g}, "
                           f"--weight-decay {cfg.weight_decay:g}: each update multiplies every "
                           f"weight by 1 - lr x weight decay = {1 - cfg.lr * cfg.weight_decay:.4g}"
                           "): the policy collapsed; resume from the last checkpoint with a "
                           "smaller --weight-decay or --lr")
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), stepped


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def weighted_means_over_ranks(sums: dict, weights: dict) -> dict[str, float]:
    """Each metric's weighted mean over every rank's micro-batches (one all-reduce)."""
    keys = sorted(sums)
    packed = all_reduce(torch.tensor([sums[k] for k in keys] + [weights[k] for k in keys],
                                     dtype=torch.float64))
    # a metric that no token (or no right rollout, for sft_nll) measured is left out: logged
    # as 0.0 it would read as measured
    return {k: float(packed[j] / packed[len(keys) + j]) for j, k in enumerate(keys)
            if packed[len(keys) + j] > 0}


# =============================================================================================
# The run
# =============================================================================================

def main(argv=None) -> dict:
    hf_logging.disable_progress_bar()   # transformers' per-save/load bars would drown the log
    cfg = parse_config(argv)
    d = processes.setup_distributed()
    check_config(cfg, d.world)
    run = Path(cfg.resume or cfg.out)
    lock = None
    created = d.main and not run.exists()       # a refused new run leaves no empty folder
    handlers = processes.catch_stop_signals()
    try:
        if d.main:
            run.mkdir(parents=True, exist_ok=True)
            # first: nobody else may write here meanwhile
            lock = checkpoints.RunLock(run).acquire(force=cfg.force_unlock)
            checkpoints.prepare_run_folder(cfg, run)
        barrier()
        result = train_run(cfg, d, run)
        # every rank finished its last collective before any rank tears the group down: a rank
        # that destroys it while a peer's gloo/NCCL transfer is still in flight can abort the
        # process ("terminate called without an active exception")
        barrier()
        return result
    except KeyboardInterrupt:
        if d.main:
            print("\ninterrupted. " + checkpoints.how_to_continue(run), file=sys.stderr)
        raise SystemExit(130) from None
    except DynamicSamplingExhausted as err:    # every rank reached the same decision
        raise SystemExit(f"train.py: {err}\n"
                         + (checkpoints.how_to_continue(run) if d.main else "")) from None
    except Diverged as err:                      # every rank holds the same weights
        raise SystemExit(f"train.py: {err}.\n" + (checkpoints.how_to_continue(run) if d.main
                                                    else "")) from None
    except processes.Preempted as stop:         # likewise (stop_requested)
        if d.main:
            when = f"after step {stop.step}" if stop.step else "before the first step"
            print(f"train.py: stopped by {signal.Signals(stop.signum).name} {when}. "
                  + checkpoints.how_to_continue(run), file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    finally:
        processes.restore_signal_handlers(handlers)
        if lock:
            lock.release()
        if created and run.is_dir() and not any(run.iterdir()):
            run.rmdir()                 # refused before writing anything: as if never started
        if dist.is_initialized():
            dist.destroy_process_group()


def train_run(cfg: Config, d: Dist, run: Path) -> dict:
    """Everything after the run folder is safe to write: data, models, the RL loop, the table."""
    cfg, examples, heldout, init_path, dropped = runtime.prepare_data(cfg, d, run)
    policy, processor, ref, optimizer, state = runtime.load_start(cfg, d, run, init_path)
    if d.main:       # only now: a resume that does not load leaves config.json as it was
        checkpoints.write_run_record(run, cfg, dropped)
    trackers = runtime.start_trackers(cfg, run, d)
    try:
        return train_loop(cfg, d, run, policy, processor, ref, optimizer, state, examples,
                          heldout, trackers)
    finally:
        if trackers is not None:
            trackers.finish()


def train_loop(cfg: Config, d: Dist, run: Path, policy, processor, ref, optimizer, state: dict,
               examples, heldout: dict, trackers) -> dict:
    """The RL steps, each followed by its logs and (every --save-every) a checkpoint; then the
    final held-out evaluation and the before/after table."""
    if not cfg.resume:
        state["before"] = runtime.evaluate_heldout(policy, processor, heldout, cfg, d)
        if trackers is not None and state["before"]:
            trackers.log(runtime.eval_columns(state["before"]), 0)    # step 0: before RL
        if d.main and (warning := runtime.blind_warning(state["before"])):
            print(warning, flush=True)
    processes.steps_begin()               # a stop signal now waits for the step's checkpoint
    bar = tqdm(range(state["step"] + 1, cfg.steps + 1), desc=cfg.preset, disable=not d.main,
               dynamic_ncols=True, initial=state["step"], total=cfg.steps)
    held, evaluated_at = None, None
    warned_identical = False
    for step in bar:
        batch, row = rl_step(policy, ref, optimizer, processor, examples, cfg, d, step, state)
        if row["identical_frac"] == 1 and d.main and not warned_identical:
            warned_identical = True        # once: the column identical_frac tells the rest
            tqdm.write(f"WARNING step {step}: in every group the {cfg.group_size} rollouts are "
                       f"the same tokens, so every advantage is 0 and nothing is learned: "
                       f"sampling is all but greedy (--temperature {cfg.temperature:g}, --top-p "
                       f"{cfg.top_p:g}); raise them", file=sys.stderr)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and heldout:
            # the same questions and sampling seeds every time, so the curve moves only with the
            # policy; it does not disturb training (each step reseeds its own sampling)
            t0 = time.perf_counter()
            held, evaluated_at = runtime.evaluate_heldout(policy, processor, heldout, cfg, d), step
            row.update(runtime.eval_columns(held), t_eval=time.perf_counter() - t0)
        state["step"] = step
        state["history"] = (state["history"] + [row])[-50:]
        if d.main:
            runtime.log_step(run, row, batch, state["history"], cfg, bar, trackers)
        saved = step % cfg.save_every == 0 or step == cfg.steps
        if saved:
            checkpoints.save_checkpoint(run, step, policy, processor, optimizer, state, cfg, d)
            barrier()
        signum = processes.stop_requested()      # SIGTERM / SIGHUP on any rank: all stop here
        if signum:
            if not saved:
                checkpoints.save_checkpoint(run, step, policy, processor, optimizer, state, cfg, d)
                barrier()
            raise processes.Preempted(signum, step)
    bar.close()
    # the last step's evaluation IS the final one (same policy, same questions and seeds); the
    # test is the same on every rank, so all of them skip or all call evaluate_heldout
    after = held if evaluated_at == cfg.steps else runtime.evaluate_heldout(policy, processor,
                                                                            heldout, cfg, d)
    if trackers is not None and after and evaluated_at != cfg.steps:
        trackers.log(runtime.eval_columns(after), cfg.steps)
    return runtime.finish_run(run, cfg, d, policy, state["before"], after, heldout)


if __name__ == "__main__":
    main()
