"""Tests of `bench.py --shape 7b --fsdp` (bench_fsdp.py): the refusals, named by flag, and the
sharded GPU check's code path on 2 gloo processes under torchrun, at reduced depth and narrow
widths (tests/_bench_fsdp.py), its report against what every rank saw and against an unsharded
model built alone from the same seed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

REPO = Path(__file__).resolve().parents[1]


def test_fsdp_is_refused_without_torchrun_with_sizes_or_lora(capsys, monkeypatch):
    """--fsdp needs torchrun's processes (WORLD_SIZE) and a --shape; train.py has no sharded
    LoRA. Each refusal names the flag before anything is built."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for argv, needles in (
            (["--shape", "7b", "--device", "cpu", "--fsdp"], ["--fsdp", "torchrun"]),
            (["--sizes", "tiny", "--fsdp"], ["--fsdp", "--shape"]),
            (["--fsdp"], ["--fsdp", "--shape"])):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        err = capsys.readouterr().err
        assert all(n in err for n in needles), (argv, err)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        bench.parse_args(["--shape", "7b", "--device", "cpu", "--fsdp", "--lora-rank", "8"])
    assert "--fsdp with --lora-rank" in capsys.readouterr().err
    # the recipe's layout: float32 master weights (train.py --fsdp on a GPU), not the one-GPU
    # check's bf16 weights
    assert bench.parse_args(["--shape", "7b", "--device", "cpu", "--fsdp"]).dtype == "float32"
    assert bench.parse_args(["--shape", "7b", "--device", "cpu"]).dtype == "bfloat16"


@pytest.mark.slow
def test_fsdp_bench_on_two_processes(tmp_path):
    """torchrun, 2 gloo processes, `bench.py --shape 7b --fsdp --device cpu` at one decoder layer
    and two vision blocks (narrow widths): rank 0 alone prints the report - GRPO beside PAPO-G
    per phase, tokens/s, the world size, the peak memory - and writes the JSON. Oracles: each
    rank's ref log-probs from the sharded reference equal those of the whole model built alone
    from the seed, and so do the tokens it generated (so every rank built the same weights, and
    sharding changed nothing computed); the ranks ran prompts of their own; the reported peak is
    the larger of the two ranks' own; the computed state per rank is half the whole model's."""
    argv = ["--shape", "7b", "--fsdp", "--device", "cpu", "--text-layers", "1",
            "--vision-blocks", "2", "--prompts", "2", "--group-size", "2", "--max-new-tokens",
            "4", "--micro-batch-size", "2", "--repeats", "1", "--warmup", "0",
            "--logprob-tokens", "64", "--no-generation-variants",
            "--out", str(tmp_path / "bench.json")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29591", str(REPO / "tests" / "_bench_fsdp.py"), str(tmp_path), *argv]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert printed.count("PAPO cost benchmark") == 1              # rank 0 alone reports
    assert "--fsdp over 2 processes" in printed and "peak memory per rank" in printed
    assert "generated tokens/s" in printed and "grpo" in printed and "papo-g" in printed

    report = json.loads((tmp_path / "bench.json").read_text())
    m = report["models"]["7b"]
    assert m["world_size"] == 2 and (m["prompts"], m["group_size"], m["rollouts"]) == (2, 2, 4)
    assert set(m["phases_s"]) == {"grpo", "papo-g", "papo-g+grad"}
    assert m["phases_s"]["papo-g"]["masked"] > 0 == m["phases_s"]["grpo"]["masked"]
    assert m["generated_tokens_per_s"] > 0
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    for r in ranks:
        assert r["ref_sharded"].shape == (4, 4)
        torch.testing.assert_close(r["ref_sharded"], r["ref_alone"], rtol=0, atol=1e-5)
        assert torch.equal(r["tokens_sharded"], r["tokens_alone"])
    assert not torch.equal(ranks[0]["tokens_sharded"], ranks[1]["tokens_sharded"])
    assert all(r["reduced"] == {"a": 1.0, "b": None} for r in ranks)
    for k, peak in m["peak_mib"].items():
        assert peak == max(r["peak_mib"][k] for r in ranks), k
    # half of the whole model's weights, gradients + AdamW and reference (float32 on a CPU)
    whole = m["parameters"] * 4 * (1 + 3 + 1) / 2 ** 20
    assert m["trainable_parameters"] == m["parameters"]
    assert whole / 2 <= m["computed_state_mib"] <= whole / 2 * 1.01
    assert m["formula_gb"] == pytest.approx(m["parameters"] * 18 / 2 / 1e9)
