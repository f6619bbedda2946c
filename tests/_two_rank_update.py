"""One rank's share of a data-parallel PAPO-G update with the SFT term, for
tests/test_wiring.py::test_two_ranks_update_as_one_process_on_the_union_of_their_rollouts.

    torchrun --nproc_per_node 2 tests/_two_rank_update.py MODEL_FOLDER OUT_FOLDER TRAIN_FLAGS...

Every rank sets up torch.distributed as train.py does, builds the policy from MODEL_FOLDER with
runtime.build_policy (DDP-wrapped), collects its own batch (its own prompts and sampling seed),
sets its own response lengths, accuracies (the SFT term's rows) and advantages - so that the
ranks' token counts differ - then runs score_phase and update_phase with an optimizer that only
records the gradient, and saves its Batch pieces, the gradient and the returned metrics to
OUT_FOLDER/rank{r}.pt, for the test to redo the update in one process on both ranks' rows."""

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
import processes  # noqa: E402
import runtime  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402
from test_train import GradientRecorder  # noqa: E402  (this folder is the script's own)


# Per rank, over its 2 prompts x G = 4 rows: at most this many response tokens (as if EOS had
# come earlier), which rollouts count as right (the SFT term's rows) and the advantages.
CAPS = {0: [8, 8, 7, 8, 6, 8, 8, 8], 1: [2, 3, 4, 5, 6, 2, 3, 4]}
ACCURACY = {0: [1, 0, 0, 0, 0, 0, 1, 0], 1: [1, 1, 0, 1, 1, 1, 1, 0]}
ADVANTAGES = {0: [1.5, -0.5, -0.5, -0.5, 0.5, 0.5, -0.5, -0.5],
              1: [-1.0, 1.0, -1.0, 1.0, -1.5, 0.5, 0.5, 0.5]}


def main() -> None:
    base, out, flags = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    cfg = config.parse_config(flags)
    d = processes.setup_distributed()
    try:
        config.check_config(cfg, d.world)
        toy.prepare_toy_data(cfg)
        examples, _ = runtime.load_datasets(cfg, d)
        policy, processor, ref = runtime.build_policy(cfg, d, base, None)
        assert isinstance(policy, DDP) and ref is None
        batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                          need_masked=config.uses_masked_branch(cfg))
        assert len(batch.rollouts) == 8 and batch.masked is not None
        T = batch.rollouts.completion_mask.shape[1]
        keep = torch.arange(T)[None, :] < torch.tensor(CAPS[d.rank])[:, None]      # [8, T]
        batch.rollouts = dataclasses.replace(
            batch.rollouts, completion_mask=batch.rollouts.completion_mask * keep)
        batch.masked = dataclasses.replace(batch.masked,
                                           completion_mask=batch.rollouts.completion_mask)
        batch.accuracy = torch.tensor(ACCURACY[d.rank], dtype=torch.float32)
        batch.advantages = torch.tensor(ADVANTAGES[d.rank])
        train.score_phase(batch, policy, ref, cfg, d)
        recorder = GradientRecorder(policy)
        metrics = train.update_phase(batch, policy, recorder, cfg, d, step=1)
        torch.save({"rollouts": batch.rollouts, "masked_logp": batch.masked_logp,
                    "rewards": batch.rewards, "accuracy": batch.accuracy, "fmt": batch.fmt,
                    "advantages": batch.advantages, "grads": recorder.grads,
                    "metrics": metrics, "tokens": float(batch.rollouts.completion_mask.sum())},
                   out / f"rank{d.rank}.pt")
        processes.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
