"""A run's folder on disk: what it reads, what it writes, and how it continues.

    1. inputs        the data files a run reads (what its checkpoints fingerprint) and every
                     local input (which --overwrite must never delete)
    2. checkpoints   atomic plain transformers folders + trainer state; pruning; the latest
    3. the folder    config.json / run.json, the fresh run's folder checks, the lock
    4. resume        the checks a checkpoint passes before it is continued, the trainer state
                     read without running code, how to continue a stopped run

integrity.py holds the fingerprints and the safe reader these checks use. It sits below
runtime.py and train.py and imports neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import integrity
import lora
import model as qwen
import toy
from config import RUN_CONTROL, Config, absolute_path, saved_config, saved_settings
from model import unwrap
from processes import Dist, barrier


# =============================================================================================
# 1. What a run reads
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


def run_data_sources(cfg: Config) -> list[str]:
    """Every data source of the run, training and held-out (what a checkpoint fingerprints)."""
    train, heldout = data_sources(cfg)
    return [train, *heldout.values()]


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


# =============================================================================================
# 2. Checkpoints: written to a temporary folder and renamed, then `latest.txt` is replaced
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


def checkpoint_folders(run: Path) -> list[Path]:
    """The run's checkpoint folders, oldest step first."""
    return sorted((f for f in run.glob("checkpoint-*") if f.is_dir() and checkpoint_step(f)
                   is not None), key=checkpoint_step)


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


# =============================================================================================
# 3. The run folder: its record, the checks before a fresh run writes into it, its lock
# =============================================================================================

def write_run_record(run: Path, cfg: Config, dropped: dict[str, int]) -> None:
    """config.json (every setting) and run.json (what eval.py needs to evaluate the run), written
    once the data is known to be usable and the model (or the checkpoint resumed) has loaded:
    a run refused for its data leaves an empty folder behind, not one a fresh run would have
    to --overwrite, and a refused resume leaves the run's config.json as it was."""
    saved = saved_config(cfg)
    earlier = run / "config.json"
    if earlier.is_file():             # a resumed run: what changed, kept, never overwritten
        before = saved_settings(json.loads(earlier.read_text()))  # an earlier version's
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


# =============================================================================================
# 4. Resume: what a checkpoint must pass before a run continues from it
# =============================================================================================

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


def how_to_continue(run: Path) -> str:
    """Checkpoints are written atomically: the last complete one is intact."""
    done = latest_checkpoint(run) if (run / "latest.txt").is_file() else None
    if done:
        return f"The last complete checkpoint is {done}; continue with:\n  python train.py --resume {run}"
    if not run.is_dir() or not any(p.name != ".lock" for p in run.iterdir()):
        return "Nothing was written into the run folder; start it again with the same command."
    return "No checkpoint was written yet; start again with --overwrite."
