"""One rank of a PAPO-G step at the REAL widths under --fsdp, for
tests/test_real_widths.py::test_two_process_fsdp_step_at_real_widths.

    torchrun --nproc_per_node 2 tests/_real_width_fsdp.py OUT_FOLDER

Every rank builds the same random Qwen2.5-VL-3B-wide model (one decoder layer, a windowed and a
full-attention vision block; the offline tokenizer's vocabulary), turns gradient checkpointing
on and shards it as train.py does (processes.shard_model), then runs train.py's phases on its own
prompt, one picture at the recipe's minimum budget: collect_batch (generate with
synced_gpus, mask, re-process), score_phase (the masked log-probs) and update_phase with AdamW.
It saves how many trainable tensors moved and the step's gradient norm to
OUT_FOLDER/rank{r}.pt."""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import architectures  # noqa: E402
import config  # noqa: E402
import processes  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402
import model as qwen  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    cfg = config.parse_config([
        "--preset", "papo-g", "--fsdp", "--gradient-checkpointing", "--beta", "0",
        "--group-size", "2", "--max-new-tokens", "2", "--prompts-per-step", "2",
        "--micro-batch-size", "2", "--updates-per-step", "1", "--lr", "1e-3",
        f"--min-pixels={architectures.OFFICIAL_MIN_PIXELS}",
        f"--max-pixels={architectures.OFFICIAL_MAX_PIXELS}"])
    d = processes.setup_distributed()
    try:
        config.check_config(cfg, d.world)
        arch = architectures.reduced("qwen2.5-vl-3b", text_layers=1, vision_blocks=2)
        net, processor = architectures.build(arch, seed=0, vocab="tokenizer")
        qwen._enable_gradient_checkpointing(net)
        net.train()
        policy = processes.shard_model(net, cfg, d, trainable=True)
        trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        before = {n: p.full_tensor().clone() for n, p in trainable.items()}
        rng = np.random.default_rng(0)
        examples = [toy.toy_example(rng, image_size=448) for _ in range(2)]
        batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                          need_masked=True)
        grid = batch.rollouts.image_grid_thw.tolist()
        assert grid == [[1, 32, 32]], grid              # 448 x 448 px: the budget's minimum
        # a random model earns no reward: advantages of its own, so the clipped term acts too
        batch.advantages = torch.tensor([1.0, -1.0])
        train.score_phase(batch, policy, None, cfg, d)
        assert batch.masked_logp is not None
        # no weight decay: a tensor moves only if a gradient reached it
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=0.0)
        metrics = train.update_phase(batch, policy, optimizer, cfg, d, step=1)
        moved = sum(not torch.equal(p.full_tensor(), before[n]) for n, p in trainable.items())
        torch.save({"grad_norm": metrics["grad_norm"], "moved": moved,
                    "trainable": len(trainable)}, out / f"rank{d.rank}.pt")
        processes.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
