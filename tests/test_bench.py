"""Tests of bench.py: smoke tests (the benchmark runs and reports every field, on the tiny model and
on the 3B code path with tiny widths) and checks of the 3B shape against Qwen2.5-VL-3B itself.
Timings are not checked: they depend on the machine."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import bench
import model as qwen

# as small as a run can be: 2 prompts x G = 2, a handful of tokens, no warm-up, one repeat
QUICK = ["--repeats", "1", "--warmup", "0", "--prompts", "2", "--group-size", "2",
         "--max-new-tokens", "4", "--logprob-tokens", "64"]


def test_smoke_bench_tiny_reports_every_field(tmp_path, capsys):
    """Smoke test: bench.main on the tiny model writes every field of the report, and the
    log-prob memory comparison's two methods agree to 1e-5."""
    out = tmp_path / "bench.json"
    returned = bench.main(["--sizes", "tiny", *QUICK, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))           # the file is what main returns

    for key in ("date", "device", "settings", "note", "memory_method", "memory_probe_mib",
                "models", "logprob_memory", "targets", "load_average"):
        assert key in report, key
    for key in ("type", "name", "threads", "torch", "transformers"):
        assert key in report["device"], key
    assert report["settings"]["models"] == ["tiny"]

    m = report["models"]["tiny"]
    objectives = ["grpo", "papo-g", "papo-g+grad"]
    for key in ("parameters", "rollouts", "prompt_tokens", "new_tokens", "mean_response_tokens",
                "phases_s", "ratios_to_grpo", "memory", "papo_g_extra_s", "masked_forward_s",
                "extra_over_forward", "mask_share_of_step", "generation"):
        assert key in m, key
    assert m["rollouts"] == 4 and m["new_tokens"] == 4 and m["rollouts_reproducible"]
    for name in objectives:
        for phase in (*bench.PHASES, "step", "step_without_generate"):
            assert m["phases_s"][name][phase] >= 0.0, (name, phase)
        for key in ("peak_mib", "resident_mib", "step_extra_mib"):
            assert m["memory"][name][key] > 0, (name, key)
    # which phases each objective has is a fact, not a timing
    assert m["phases_s"]["grpo"]["mask"] == m["phases_s"]["grpo"]["masked"] == 0.0
    assert m["phases_s"]["papo-g"]["mask"] > 0 and m["phases_s"]["papo-g"]["masked"] > 0
    assert m["phases_s"]["papo-g+grad"]["masked"] == 0.0      # computed inside the update instead
    for name in objectives[1:]:
        assert set(m["ratios_to_grpo"][name]) == {"step", "step_without_generate", "update",
                                                  "memory"}
    generation = m["generation"]
    assert set(generation) == set(bench.GENERATION_VARIANTS)
    assert generation["checkpointing on"]["kv_cache_used"]
    assert generation["checkpointing off"]["kv_cache_used"]
    assert not generation["checkpointing on, use_cache off"]["kv_cache_used"]

    lp = report["logprob_memory"]
    for key in ("naive_mib", "chunked_mib", "ratio", "vocab", "completion_tokens", "chunk_size"):
        assert key in lp, key
    assert lp["vocab"] == 151_936 and lp["completion_tokens"] == 64
    assert lp["max_abs_diff"] <= 1e-5                          # the same log-probs
    assert 0 < lp["chunked_mib"] < lp["naive_mib"]
    assert abs(report["memory_probe_mib"] - 64) < 6            # the memory method measures right

    assert len(report["targets"]) == 5                         # 3 x target 1, 2, 3 for one model
    for row in report["targets"]:
        assert set(row) == {"target", "model", "value", "limit", "comparison", "pass", "note"}
        assert row["pass"] in (True, False)
    printed = capsys.readouterr().out
    assert printed.count("[PASS]") + printed.count("[FAIL]") == 5
    assert "papo-g+grad" in printed and "peak memory" in printed


@pytest.mark.slow
def test_smoke_3b_code_path_runs_on_cpu_with_tiny_widths():
    """Smoke test: --shape 3b-mini runs the exact code of --shape 3b (bf16 weights, gradient
    checkpointing, the 151,936-token vocabulary with the tiny tokenizer) on a CPU."""
    report = bench.main(["--shape", "3b-mini", *QUICK[:-2], "--prompts", "1",
                         "--max-new-tokens", "2", "--logprob-tokens", "8",
                         "--updates-per-step", "1"])      # 36 + 32 blocks: one backward each
    assert report["settings"]["dtype"] == "bfloat16"
    assert report["settings"]["gradient_checkpointing"]
    m = report["models"]["3b-mini"]
    assert m["parameters"] > 151_936 * 128                     # the real vocabulary is there
    assert m["generation"]["checkpointing on"]["kv_cache_used"]


def test_3b_shape_is_qwen2_5_vl_3b():
    """The 3B config has Qwen2.5-VL-3B-Instruct's exact parameter count (built on the meta
    device: no memory), and 3b-mini differs from it only in widths."""
    tokenizer = qwen.build_tokenizer(400)
    config = bench.shaped_config(bench.SHAPES["3b"], tokenizer)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976
    assert sum(p.numel() for p in model.model.visual.parameters()) == 668_684_288
    assert config.tie_word_embeddings and config.text_config.vocab_size == 151_936

    big, mini = bench.SHAPES["3b"], bench.SHAPES["3b-mini"]
    structure = ("layers", "vocab", "vision_depth", "fullatt_blocks", "window", "patch", "merge",
                 "temporal_patch", "tie_embeddings", "rope_theta")
    assert all(big[k] == mini[k] for k in structure)
    assert big["heads"] // big["kv_heads"] == mini["heads"] // mini["kv_heads"]
    # the mrope split keeps its proportions: time 1/4, height 3/8, width 3/8 of head_dim / 2
    halves = [s / sum(shape["mrope_section"]) for shape in (big, mini)
              for s in shape["mrope_section"]]
    assert halves[:3] == halves[3:]
