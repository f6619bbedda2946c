"""One rank of `bench.py --shape 7b --fsdp` at narrow widths, for
tests/test_bench_fsdp.py::test_fsdp_bench_on_two_processes.

    torchrun --nproc_per_node 2 tests/_bench_fsdp.py OUT_FOLDER BENCH_ARGS...

bench.main runs as the command line would, with Qwen2.5-VL-7B's architecture narrowed (NARROW: its
structure - untied embeddings, head_dim 128 with M-RoPE, grouped key/value heads, windowed and
full-attention vision blocks - at widths a CPU test can afford: at the real widths, even at one
layer and a 512-token vocabulary (BENCH_FSDP_REAL_WIDTHS=1), a rank holds 4-5 GB and one scoring
pass took 34 s on a 2-core machine). While the ranks are still together (bench.summarise, after
every objective ran), each rank also saves OUT_FOLDER/rank{r}.pt: for its own rollouts, the ref
log-probs of the SHARDED reference and of an unsharded model built alone from the same seed, and
the tokens that the unsharded model generates from the rank's prompts with the rank's seed beside
the ones bench generated sharded. Equal, they show that every rank built the same weights and that
the sharded model computes what the whole one does."""

import dataclasses
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import architectures  # noqa: E402
import bench  # noqa: E402
import bench_fsdp  # noqa: E402
import processes  # noqa: E402
import train  # noqa: E402

REAL = architectures.ARCHITECTURES["qwen2.5-vl-7b"]
NARROW = dataclasses.replace(
    REAL, text=dict(REAL.text, hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=512, vocab_size=512),
    vision=dict(REAL.vision, hidden_size=128, num_heads=2, intermediate_size=256))
if os.environ.get("BENCH_FSDP_REAL_WIDTHS"):   # to time the real widths: only the vocabulary cut
    NARROW = dataclasses.replace(REAL, text=dict(REAL.text, vocab_size=512))


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    summarise = bench.summarise

    def summarise_and_check(s, runs, measured):
        args = bench.parse_args(argv)
        whole, _ = architectures.build(bench.shape_architecture("7b", args), seed=args.seed)
        whole.eval()
        cfg = dataclasses.replace(s.cfgs["grpo"], updates_per_step=1)   # ref log-probs only
        one = processes.Dist(device=s.d.device)
        sharded, alone = [dataclasses.replace(s.batch, masked=None) for _ in range(2)]
        train.score_phase(sharded, s.policy, s.ref, cfg, s.d)           # all ranks together
        train.score_phase(alone, whole, whole, cfg, one)
        generated, _ = train.generate_phase(whole, s.processor, s.prompts, cfg, s.seed,
                                            need_masked=False)
        torch.save({"rank": s.d.rank, "world": s.d.world,
                    "ref_sharded": sharded.ref_logp, "ref_alone": alone.ref_logp,
                    "tokens_sharded": s.batch.rollouts.completion_ids,
                    "tokens_alone": generated.completion_ids,
                    # the reduction itself, on values known per rank: rank r has r, and
                    # rank 1 could not measure "b"
                    "reduced": bench_fsdp.max_over_ranks(
                        {"a": float(s.d.rank), "b": None if s.d.rank == 1 else 5.0}),
                    # this rank's own peak (bench reports the largest over ranks)
                    "peak_mib": {k: statistics.median(m["peak_mib"] for m in ms)
                                 for k, ms in measured.items()}}, out / f"rank{s.d.rank}.pt")
        return summarise(s, runs, measured)

    with (mock.patch.dict(architectures.ARCHITECTURES, {"qwen2.5-vl-7b": NARROW}),
          mock.patch.object(bench, "summarise", summarise_and_check)):
        bench.main(argv)


if __name__ == "__main__":
    main()
