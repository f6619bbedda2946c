"""The plumbing of a training run - everything train.py needs that is not the algorithm.

    1. processes     Dist, setup_distributed, all_reduce, barrier, shard_model (FSDP2),
                     seeds, autocast
    2. data          the training and held-out sets, every row checked before training;
                     prompts over the length limit
    3. checkpoints   atomic plain transformers folders + trainer state, exact resume, the run
                     folder and its lock
    4. logs          the collapse watch, curves.png, the held-out evaluation and the
                     before/after table
    5. models        the policy (DDP or FSDP2) and its frozen reference, fresh or resumed

It sits below train.py and imports nothing from it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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

import custom_reward
import data
import eval as evaluation
import imaging
import integrity
import lora
import model as qwen
import toy
from trackers import Trackers
from config import (RUN_CONTROL, Config, absolute_path, fit_pixel_budget, prompt_options,
                    saved_config)


# =============================================================================================
# 1. Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is one process
# =============================================================================================

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
        # Tiny models on CPU produce denormal floats that slowed training steps from 0.08 s to
        # over 1 s part-way through a run (docs/toy.md); flushing them to zero costs nothing.
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


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


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


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGHUP (what a cluster scheduler sends before it takes the machine) end
# the run after the current step, with a checkpoint, the lock released and the resume command.
# ---------------------------------------------------------------------------------------------

class Preempted(Exception):
    """The run was asked to stop (a signal) and stopped cleanly after a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, step)
        self.signum, self.step = signum, step


_STOP_SIGNAL = {"signum": 0, "at_once": True}


def catch_stop_signals() -> dict:
    """SIGTERM and SIGHUP set a flag the loop reads after each step, instead of killing the
    process mid-write (the main thread only: signals are delivered there). Before the first
    step starts (the data check, the warm start, the evaluation before RL: minutes, with no
    step to finish and nothing to checkpoint) they stop the run at once instead, through the
    same exception, so the lock is released as after any stop. The files written until then
    are written atomically or are rewritten by the next start."""
    def note(signum, frame):
        _STOP_SIGNAL["signum"] = signum
        if _STOP_SIGNAL["at_once"]:
            raise Preempted(signum, 0)
        print(f"\ntrain.py: received {signal.Signals(signum).name}; stopping after this step "
              "with a checkpoint", file=sys.stderr, flush=True)
    if threading.current_thread() is not threading.main_thread():
        return {}
    _STOP_SIGNAL.update(signum=0, at_once=True)
    return {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGHUP)}


def steps_begin() -> None:
    """From here on a stop signal waits for the end of the current step (catch_stop_signals)."""
    _STOP_SIGNAL["at_once"] = False


def restore_signal_handlers(handlers: dict) -> None:
    """Put back what catch_stop_signals replaced (train.main may run inside another program)."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def stop_requested() -> int:
    """The stop signal any rank received (0: none), agreed on by every rank."""
    return int(all_reduce(torch.tensor(_STOP_SIGNAL["signum"]), op=dist.ReduceOp.MAX))


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


# =============================================================================================
# 2. The run's data: every row checked before training starts
# =============================================================================================

def data_sources(cfg: Config) -> tuple[str, dict[str, str]]:
    """(training source, {held-out split name: source}): the flags, or the toy splits' files.
    --eval-data replaces the toy held-out split drawn like training; the world's other splits
    (the shortcut world's conflict split) stay as long as the training data is the toy's."""
    if cfg.data:
        return cfg.data, {"held-out": cfg.eval_data} if cfg.eval_data else {}
    splits = {name: str(folder / "data.jsonl") for name, (folder, *_) in toy.toy_splits(cfg).items()}
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


def write_run_record(run: Path, cfg: Config, dropped: dict[str, int]) -> None:
    """config.json (every setting) and run.json (what eval.py needs to evaluate the run), written
    once the data is known to be usable and the model (or the checkpoint resumed) has loaded:
    a run refused for its data leaves an empty folder behind, not one a fresh run would have
    to --overwrite, and a refused resume leaves the run's config.json as it was."""
    saved = saved_config(cfg)
    earlier = run / "config.json"
    if earlier.is_file():             # a resumed run: what changed, kept, never overwritten
        before = json.loads(earlier.read_text())
        changed = {k: [before.get(k), v] for k, v in saved.items()
                   if before.get(k) != v and k not in RUN_CONTROL}
        if changed:
            with open(run / "config_history.jsonl", "a") as f:
                f.write(json.dumps({"resumed_from": saved["resume"], "changed": changed}) + "\n")
    earlier.write_text(json.dumps(saved, indent=2))
    eval_srcs = {name: absolute_path(src) for name, src in data_sources(cfg)[1].items()}
    write_run_info(run, eval_data=eval_srcs.pop("held-out", None),
                   other_eval_data=eval_srcs,
                   eval_size=cfg.eval_size, max_new_tokens=cfg.max_new_tokens,
                   min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                   prompt_template=saved["prompt_template"] or None,
                   problem_key=cfg.problem_key, answer_key=cfg.answer_key,
                   image_key=cfg.image_key, image_dir=saved["image_dir"] or None,
                   dropped_long_prompts=dropped, reward=absolute_reward(cfg.reward) or None,
                   reward_time_limit=cfg.reward_time_limit)


def absolute_reward(spec: str) -> str:
    """--reward with its file made absolute ("FILE.py:function"), so that eval.py finds it from
    any folder; "module:function" as it is."""
    where, sep, name = spec.rpartition(":")
    return f"{os.path.abspath(where)}:{name}" if where.endswith(".py") else spec


# =============================================================================================
# 3. Checkpoints: written to a temporary folder and renamed, then `latest.txt` is replaced
# atomically - a crash at any moment leaves the previous checkpoint complete and pointed to.
# =============================================================================================

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
        with disk_errors_named(run, final, tmp, policy, optimizer):
            if cfg.fsdp:
                unsharded_copy(policy, full).save_pretrained(tmp)
            elif lora.has_adapters(policy):  # the merged weights, and the adapters beside them
                unsharded_copy(policy, lora.merged_state_dict(policy)).save_pretrained(tmp)
                lora.save_adapters(policy, tmp / lora.ADAPTER_FOLDER)
            else:
                unwrap(policy).save_pretrained(tmp)  # loadable by load_model and transformers
    if cfg.fsdp:
        barrier()                            # the folder exists before the others write into it
        dcp.save(optimizer_shards, checkpoint_id=str(tmp / "optimizer"))
        barrier()
    if not d.main:
        return final
    with disk_errors_named(run, final, tmp, policy, optimizer):
        qwen.save_processor(processor, tmp)  # names the stock processor classes (see there)
        torch.save({"optimizer": None if cfg.fsdp else optimizer.state_dict(), "state": state,
                    "rng": rng_states()}, tmp / "trainer_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        integrity.write_fingerprint(tmp, run_data_sources(cfg))     # verified by --resume
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = run / "latest.txt.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, run / "latest.txt")   # the commit point
    write_run_info(run, checkpoint=str(final.absolute()))
    prune_checkpoints(run, cfg.keep_checkpoints, keep=final)
    return final


@contextlib.contextmanager
def disk_errors_named(run: Path, final: Path, tmp: Path, policy, optimizer):
    """A write that fails while the disk is short of space (torch.save says only "unexpected
    pos ...") becomes an error naming the folder, the space free and the space a checkpoint
    needs; the half-written folder is removed and the previous checkpoint stays intact."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        free = shutil.disk_usage(run).free
        tensors = [*unwrap(policy).parameters(), *(v for state in optimizer.state.values()
                                                   for v in state.values() if torch.is_tensor(v))]
        needed = sum(t.numel() * t.element_size() for t in tensors)
        if getattr(err, "errno", None) != errno.ENOSPC and free >= needed:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"train.py: writing {final.name} into {run} failed ({err}): that disk "
                         f"has {free / 1e9:.2f} GB free and a checkpoint needs about "
                         f"{needed / 1e9:.2f} GB. Free some space (or --keep-checkpoints 1) and "
                         f"resume; the previous checkpoint is intact.") from None


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
    """checkpoint-000150 -> 150; None for any other name (checkpoint-best, checkpoint-1)."""
    if not CHECKPOINT_NAME.fullmatch(folder.name) or folder.name.startswith("."):
        return None
    return int(folder.name.removeprefix("checkpoint-"))


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
             "run.json.tmp", "config.json", "config_history.jsonl", "final_eval.json",
             "final_table.txt", "curves.png", "tensorboard", "wandb", ".wandb_id")


# ... and its checkpoints, by their exact names: checkpoint-000150 (six digits or more, the
# step), never checkpoint-best/ or checkpoint-notes.txt, which a user made.
CHECKPOINT_NAME = re.compile(r"(\.tmp-)?checkpoint-\d{6,}")


def is_run_entry(name: str) -> bool:
    return name in RUN_FILES or CHECKPOINT_NAME.fullmatch(name) is not None


def run_inputs(cfg: Config) -> list[tuple[str, Path]]:
    """(flag, local path) of everything this run reads: the starting model, the data, the
    reward file, the prompt template, the picture folder. Hub ids and "" are left out; a glob
    counts as the folder it starts in."""
    paths = [("--model", cfg.model), ("--data", cfg.data), ("--eval-data", cfg.eval_data),
             ("--prompt-template", cfg.prompt_template), ("--image-dir", cfg.image_dir),
             ("--reward", cfg.reward.rsplit(":", 1)[0] if cfg.reward.count(":") else "")]
    found = []
    for flag, value in paths:
        if not value:
            continue
        head = value.split("*")[0].split("?")[0].split("[")[0]   # a glob: where it starts
        path = Path(head if head != value else value).expanduser()
        if head != value or path.exists():
            found.append((flag, path.resolve()))
    return found


def inputs_inside(cfg: Config, folder: Path) -> list[str]:
    """The inputs of this run (run_inputs) that lie in `folder` or are it, as "--flag path"."""
    folder = folder.resolve()
    return [f"{flag} {path}" for flag, path in run_inputs(cfg)
            if path == folder or folder in path.parents]


def prepare_run_folder(cfg: Config, run: Path) -> None:
    """Make the (locked) run folder safe to write (rank 0): a fresh run refuses a folder that
    holds anything but an empty lock, unless --overwrite - which deletes an earlier run's files
    and is refused for any folder that holds something no run wrote (a model, data, notes):
    nothing but a run is ever deleted. --resume continues the folder it names."""
    if cfg.resume:
        return
    earlier = sorted(p.name for p in run.iterdir() if p.name != ".lock")
    if not earlier:
        return
    listing = f"{', '.join(earlier[:5])}{', ...' if len(earlier) > 5 else ''}"
    if not cfg.overwrite:
        raise SystemExit(
            f"train.py: --out {run} is not empty ({listing}). Continue that run with --resume "
            f"{run}, start afresh with --overwrite, or pick another --out.")
    inputs = inputs_inside(cfg, run)
    if inputs:             # e.g. --model D/checkpoint-000002 --out D: it would delete its start
        raise SystemExit(f"train.py: --overwrite refused for --out {run}: it holds an input of "
                         f"this run ({'; '.join(inputs)}). Copy that out of the folder first, "
                         "or pick another --out.")
    foreign = [n for n in earlier if not is_run_entry(n)]
    if foreign or not (run / "run.json").is_file():
        why = (f"it holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which "
               "no run of train.py wrote" if foreign else
               "it has no run.json, so no run of train.py wrote it (a model folder?)")
        raise SystemExit(f"train.py: --overwrite refused for --out {run}: {why}. --overwrite "
                         "deletes only an earlier run's files; pick another --out, or move what "
                         "you want to keep out of the folder first.")
    for name in earlier:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    print(f"--overwrite: deleted the earlier run's {len(earlier)} files in {run}")


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


def run_data_sources(cfg: Config) -> list[str]:
    """Every data source of the run, training and held-out (what a checkpoint fingerprints)."""
    train, heldout = data_sources(cfg)
    return [train, *heldout.values()]


def verify_weights(folder: Path) -> None:
    """Refuse a checkpoint whose weight files are not the ones it was written with (its
    fingerprint.json): a resume would silently continue another model. Not a damaged file to
    fall back from - something changed it - so the run stops, naming the files."""
    record = integrity.read_fingerprint(folder)
    if record is None:
        print(f"note: {folder} has no {integrity.FINGERPRINT} (an earlier version wrote it); "
              "its weights are not verified")
        return
    problems = integrity.weight_mismatches(folder, record)
    if problems:
        raise SystemExit("train.py: cannot resume: the checkpoint's weights are not the ones "
                         "the run saved:\n  " + "\n  ".join(problems) + "\nRestore them, or "
                         "resume from a copy of the run without that checkpoint.")


def check_resume_data(checkpoint: Path, cfg: Config) -> dict[str, str]:
    """The data files the run trained on that changed since `checkpoint` was written: refused,
    by name, unless --allow-changes (then returned, to be printed and recorded)."""
    try:
        record = integrity.read_fingerprint(checkpoint)
    except ValueError:
        return {}                      # verify_weights names the damaged fingerprint
    changed = integrity.data_changes(record, run_data_sources(cfg)) if record else {}
    if changed and not cfg.allow_changes:
        raise SystemExit("train.py: --resume: data the run trained on changed since its last "
                         "checkpoint:\n  " + "\n  ".join(f"{k}: {v}" for k, v in changed.items())
                         + "\nPut it back to continue the run as it was, or pass --allow-changes "
                         "to continue on the new data (recorded in config_history.jsonl).")
    for path, what in changed.items():
        print(f"--allow-changes: data {path}: {what}")
    return changed


def refuse_non_finite(policy, source) -> None:
    """A model holding NaN or inf weights would train on garbage (every loss NaN from step 1);
    it is refused here, naming where it came from and the first such tensor."""
    problem = integrity.non_finite_weights(unwrap(policy))
    if problem:
        raise ValueError(f"{source} holds non-finite weights ({problem})")


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

    def acquire(self, force: bool = False) -> "RunLock":
        """Take the lock; force (--force-unlock): take it over from whoever holds it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner(self.path.parent)
                if force:
                    print(f"--force-unlock: taking over {self.describe(self.path.parent)}")
                    self.path.unlink(missing_ok=True)
                    continue
                if owner is not None and owner[0] != os.uname().nodename:
                    age = (time.time() - self.path.stat().st_mtime) / 3600
                    raise SystemExit(
                        f"train.py: {self.path.parent} is locked by process {owner[1]} on "
                        f"another machine, {owner[0]}, since {age:.1f} hours ago. It may be "
                        f"stale (a job preempted there): if no training runs on {owner[0]} "
                        "any more, pass --force-unlock to take it over.") from None
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
    """The checkpoint latest.txt names; without latest.txt (deleted, lost in a copy), the newest
    checkpoint folder, with a note (load_start falls back further if it does not load)."""
    pointer = run / "latest.txt"
    if pointer.is_file():
        return run / pointer.read_text().strip()
    folders = checkpoint_folders(run)
    if not folders:
        raise FileNotFoundError(f"{run}: no checkpoint there (no latest.txt, no checkpoint-*)")
    print(f"note: {pointer} is missing; using the newest checkpoint, {folders[-1].name}")
    return folders[-1]


def checkpoint_folders(run: Path) -> list[Path]:
    """The run's checkpoint folders, oldest step first."""
    return sorted((f for f in run.glob("checkpoint-*") if f.is_dir() and checkpoint_step(f)
                   is not None), key=checkpoint_step)


def rng_states() -> dict:
    """Every random generator's state as tensors and plain values, so that trainer_state.pt
    loads with torch.load(weights_only=True): nothing in it is an arbitrary object."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(rng: dict) -> None:
    numpy_state = rng["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                       numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"])
    torch.set_rng_state(rng["torch"]); np.random.set_state(numpy_state)
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def read_trainer_state(path: Path) -> dict:
    """trainer_state.pt, loaded without running any code it might hold: torch.load with
    weights_only=True admits tensors and plain values only. Checkpoints of earlier versions kept
    numpy's generator state as a numpy array; numpy's array constructor is admitted too (it
    builds arrays and nothing else). Anything else is refused, naming the file."""
    from numpy.core.multiarray import _reconstruct
    arrays = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(arrays):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:200]
        raise ValueError(f"{path} holds objects other than tensors and plain values ({first}); "
                         "it is refused, because loading such objects can run code. A "
                         "checkpoint written by train.py never holds any: this file was written "
                         "or changed by something else") from None


def load_trainer_state(folder: Path, policy, optimizer, cfg: Config) -> dict:
    blob = read_trainer_state(folder / "trainer_state.pt")
    if cfg.fsdp != (folder / "optimizer").is_dir():
        # the two keep AdamW's state in different forms (one file / per-rank shards)
        raise ValueError(f"its optimizer state was written {'without' if cfg.fsdp else 'with'} "
                         f"--fsdp; resume it {'without' if cfg.fsdp else 'with'} --fsdp")
    if cfg.fsdp:
        # the sharded optimizer state (save_checkpoint): every rank reads its own shards. The
        # template comes from the live optimizer (get_optimizer_state_dict first creates its
        # AdamW state if no step was taken yet), dcp.load fills it in place.
        shards = {"optimizer": get_optimizer_state_dict(policy, optimizer)}
        dcp.load(shards, checkpoint_id=str(folder / "optimizer"),
                 storage_reader=integrity.SafeCheckpointReader(folder / "optimizer"))
        set_optimizer_state_dict(policy, optimizer, shards["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    set_rng_states(blob["rng"])
    return blob["state"]


# =============================================================================================
# 4. Logs: the collapse watch, the curves, the held-out evaluation and its before/after table
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



# =============================================================================================
# 5. The models a run trains: fresh or resumed
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
        policy = shard_model(policy, cfg, d, trainable=True)
        if ref is not None:
            ref = shard_model(ref, cfg, d, trainable=False)
    elif d.world > 1:
        policy = DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return policy, processor, ref


def how_to_continue(run: Path) -> str:
    """Checkpoints are written atomically: the last complete one is intact."""
    done = latest_checkpoint(run) if (run / "latest.txt").is_file() else None
    if done:
        return f"The last complete checkpoint is {done}; continue with:\n  python train.py --resume {run}"
    if not run.is_dir() or not any(p.name != ".lock" for p in run.iterdir()):
        return "Nothing was written into the run folder; start it again with the same command."
    return "No checkpoint was written yet; start again with --overwrite."
