"""The processes of a run: one, or several under torchrun, and how they agree.

    Dist, setup_distributed     which process this is (torchrun sets RANK / WORLD_SIZE /
                                LOCAL_RANK; plain python is one process)
    all_reduce, barrier         what the ranks share, and where they wait for each other
    shard_model, ...reference   FSDP2 (--fsdp): each layer's weights stored in 1/world shards
    Preempted, ...signals       SIGTERM / SIGHUP end the run after a step, with a checkpoint
    seeds, autocast             seeds that depend on (run, step, rank) only; bf16 on GPU

It imports only config.py of this project; runtime.py, checkpoints.py and train.py sit above it.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from config import Config


# =============================================================================================
# Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is one process
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


def shard_policy_and_reference(policy, ref, cfg: Config, d: Dist):
    """--fsdp: the policy sharded with its mixed precision, the frozen reference (if any) as is."""
    policy = shard_model(policy, cfg, d, trainable=True)
    if ref is not None:
        ref = shard_model(ref, cfg, d, trainable=False)
    return policy, ref


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


# ---------------------------------------------------------------------------------------------
# Seeds and precision
# ---------------------------------------------------------------------------------------------

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
