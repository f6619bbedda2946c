"""bench_fsdp.py - what bench.py needs to run a shape sharded over several processes (--fsdp).

    torchrun --nproc_per_node 4 bench.py --shape 7b --fsdp     # the 7B recipe's layout: 4 GPUs

Every rank builds the same random model (the same seed), shards it with processes.shard_model
exactly as train.py --fsdp does (runtime.build_policy: policy and frozen reference, each decoder
layer and vision block a unit; on a GPU fp32 shards gathered in bf16, a bf16 reference), and runs
--prompts prompts of its own: the per-GPU work of a step. Ranks run every phase together (each
layer's weights are gathered collectively), so rank 0's clocks are the step's; peak memory is
taken on every rank and the largest is reported. On a CPU the same path runs with gloo (tests).

bench.py imports this module; it imports only processes.py of this project.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import processes

# The official 7B recipe: 384 prompts a step over 4 GPUs (docs/reproducing.md); with another
# world size each GPU takes 384 / world of them.
RECIPE_PROMPTS_PER_STEP = 384


def refusal(args) -> str | None:
    """Why --fsdp cannot run as asked (None: it can). Checked before anything is built."""
    if not args.fsdp:
        return None
    if not args.shape:
        return ("--fsdp shards a --shape (a released architecture); the offline --sizes models "
                "are tiny and never sharded: add --shape 7b (or 3b, qwen3-2b)")
    if "WORLD_SIZE" not in os.environ:
        return (f"--fsdp shards the model over processes: start it with torchrun "
                f"(torchrun --nproc_per_node 4 bench.py --shape {args.shape} --fsdp)")
    if args.lora_rank:
        return "--fsdp with --lora-rank: train.py does not run LoRA sharded (drop one of them)"
    return None


def start(args) -> processes.Dist:
    """This rank (torchrun's environment): nccl on cuda:LOCAL_RANK where GPUs exist, gloo on the
    CPU otherwise - train.py's own setup_distributed."""
    d = processes.setup_distributed()
    if d.device.type != torch.device(args.device).type:
        dist.destroy_process_group()
        raise SystemExit(f"bench.py: --fsdp --device {args.device}: under torchrun each rank "
                         f"takes {d.device.type} here (train.py's choice), not {args.device}")
    return d


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a sharded parameter's local shard, any other tensor whole."""
    return t.to_local() if isinstance(t, DTensor) else t


def max_over_ranks(values: dict) -> dict:
    """{key: the largest value over ranks} (None where any rank could not measure it)."""
    keys = list(values)
    raw = torch.tensor([-1.0 if values[k] is None else float(values[k]) for k in keys],
                       dtype=torch.float64)
    low = processes.all_reduce(raw, op=dist.ReduceOp.MIN)       # -1 anywhere: not measured
    high = processes.all_reduce(raw, op=dist.ReduceOp.MAX)
    return {k: None if low[i] < 0 else float(high[i]) for i, k in enumerate(keys)}


def formula_gb(parameters: int, beta: float, world: int) -> float:
    """docs/performance.md's computed table, per GPU before activations: fp32 weights (4 B),
    gradients (4 B), AdamW's two moments (8 B) and a bf16 reference (2 B, beta > 0), over N."""
    return parameters * (16 + (2 if beta > 0 else 0)) / world / 1e9


def report_lines(m: dict, world: int, on_gpu: bool) -> list[str]:
    """What bench.format_report adds for a sharded shape: the layout, the largest peak of any
    rank against the computed state per rank, and the recipe's step on each GPU."""
    gb = lambda mib: f"{mib * 2 ** 20 / 1e9:.2f} GB"
    lines = [f"--fsdp over {world} processes: each holds 1/{world} of the weights, gradients "
             f"and AdamW state and runs {m['prompts']} prompts of its own; times and tokens/s "
             "are rank 0's (the ranks gather every layer together), memory the largest rank's",
             "  peak memory per rank, largest over ranks: " + ", ".join(
                 f"{k} {'n/a' if v is None else gb(v)}" for k, v in m["peak_mib"].items()),
             f"  computed per rank, before activations: {gb(m['computed_state_mib'])} (this "
             "rank's shards); docs/performance.md's formula (fp32 weights, gradients, AdamW, "
             f"a bf16 reference, over {world}): {m['formula_gb']:.2f} GB"]
    per_gpu = RECIPE_PROMPTS_PER_STEP // world
    if on_gpu:
        scale = per_gpu / m["prompts"]
        lines.append(f"  the recipe's step ({RECIPE_PROMPTS_PER_STEP} prompts, {per_gpu} on each "
                     f"of {world} GPUs, x {scale:g}, scaled): " + ", ".join(
                         f"{k} ~{p['step'] * scale:.0f} s" for k, p in m["phases_s"].items()))
    return lines


def finish() -> None:
    """Every rank waits for the others (rank 0 may still print and write), then leaves."""
    if dist.is_initialized():
        processes.barrier()
        dist.destroy_process_group()
