"""Tests of bench.py: a smoke test of the whole report on the tiny model, closed-form checks of
its work counts (vision patch rows, language-model calls) on the tiny model and on the 3B code
path with tiny widths, and checks of the 3B shape against Qwen2.5-VL-3B itself. Timings are not
checked: they depend on the machine."""

import json

import pytest
import torch

import bench

# 2 prompts x G = 2, 4 new tokens, two updates (so old log-probs are computed), micro-batches of
# G rows (so score_phase's consecutive micro-batches hold one whole group each)
QUICK = ["--repeats", "1", "--warmup", "0", "--prompts", "2", "--group-size", "2",
         "--max-new-tokens", "4", "--micro-batch-size", "2", "--logprob-tokens", "64"]
OBJECTIVES = ["grpo", "papo-g", "papo-g+grad"]


def calls(*runs):
    """Language-model calls as Work.counts() writes them: [rows, positions, repeats] per run of
    equal calls."""
    return [list(run) for run in runs]


def test_smoke_bench_tiny_reports_every_field_and_its_work_in_closed_form(tmp_path, capsys):
    """bench.main on the tiny model: every field of the report, the JSON file equal to what main
    returns, which phases each objective has, and the work of each phase as the formulas of
    model.py's read-once paths give it."""
    out = tmp_path / "bench.json"
    returned = bench.main(["--sizes", "tiny", *QUICK, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    for key in ("date", "device", "settings", "memory_method", "memory_probe_mib", "models",
                "logprob_memory", "targets", "load_average"):
        assert key in report, key
    for key in ("type", "name", "threads", "cpus", "torch", "transformers"):
        assert key in report["device"], key
    assert report["settings"]["models"] == ["tiny"] and report["settings"]["updates_per_step"] == 2
    assert abs(report["memory_probe_mib"] - 64) < 6            # the memory method measures right

    m = report["models"]["tiny"]
    N, G, B, P, T = m["prompts"], m["group_size"], m["rollouts"], m["prompt_tokens"], m["new_tokens"]
    rows = m["rollouts_patch_rows"]                             # B copies of the pictures
    assert (N, G, B) == (2, 2, 4) and T == 4 and rows % B == 0
    phases = m["phases_s"]
    for name in OBJECTIVES:
        assert all(phases[name][p] >= 0 for p in (*bench.PHASES, "step")), name
        assert m["peak_mib"][name] > 0
    # which phases each objective has is a fact, not a timing
    assert phases["grpo"]["mask"] == phases["grpo"]["masked"] == 0.0
    # (PAPO-G's masking time is a difference of two timings, clamped at 0: on a busy machine it
    # can read 0, so that it happened is checked by its work below, not by its time)
    assert phases["papo-g"]["masked"] > 0
    assert phases["papo-g+grad"]["masked"] == 0.0               # inside the update instead
    assert m["ratios_to_grpo"]["grpo"] == {"step": 1.0, "update": 1.0, "memory": 1.0}

    work = m["work"]
    # generation: one prefill over the N prompts without their last token, their N pictures,
    # then B rows x 1 position per new token
    for name in OBJECTIVES:
        assert work[name]["generate"] == {"vision_rows": rows // G, "passes": 1,
                                          "lm_tokens": N * (P - 1) + B * T,
                                          "lm_calls": calls([N, P - 1, 1], [B, 1, T])}
    # scoring, one group per micro-batch: its prompt and picture once, then its G completions
    scored = {"vision_rows": rows // G, "lm_tokens": N * P + B * T, "passes": 1,
              "lm_calls": calls(*[[1, P, 1], [G, T, 1]] * N)}
    none = {"vision_rows": 0, "lm_tokens": 0, "lm_calls": [], "passes": 0}
    for name in OBJECTIVES:
        assert work[name]["old"] == work[name]["ref"] == scored
    assert work["papo-g"]["masked"] == scored                   # the masked pictures, once each
    assert work["grpo"]["masked"] == work["papo-g+grad"]["masked"] == none
    # the update's micro-batches are random rows: between each picture once and once per row;
    # --perception-grad does all of it twice (same rows, original and masked pictures)
    update = work["grpo"]["update"]
    assert rows // G <= update["vision_rows"] <= rows
    assert N * P + B * T <= update["lm_tokens"] <= B * (P + T)
    assert work["papo-g"]["update"] == update
    grad = work["papo-g+grad"]["update"]
    assert grad["passes"] == 2 and grad["vision_rows"] == 2 * update["vision_rows"]
    assert grad["lm_tokens"] == 2 * update["lm_tokens"]
    assert m["per_rollout_pass"] == {"generate": [rows, B * (P + T - 1)],
                                     "scoring": [rows, B * (P + T)]}
    for name in OBJECTIVES:
        ratio = m["vision_rows_ratio"][name]
        assert ratio["generate"] == ratio["ref"] == ratio["old"] == 1.0
        assert ratio["update"] == update["vision_rows"] * G / rows

    generation = m["generation"]
    assert set(generation) == set(bench.VARIANTS)
    for variant in ("checkpointing on", "checkpointing off"):
        g = generation[variant]
        assert g["kv_cache_used"] and g["positions_per_token"] == 1.0
        assert g["lm_calls"] == calls([N, P - 1, 1], [B, 1, g["new_tokens"]])
    # the control, no cache at all: every row's prompt and picture, then the whole sequence
    # again for each new token
    control = generation["checkpointing on, use_cache off"]
    assert not control["kv_cache_used"] and control["positions_per_token"] > P / 2
    assert control["lm_calls"] == calls(*[[B, P + t, 1] for t in range(control["new_tokens"])])
    assert control["vision_rows"] == rows

    lp = report["logprob_memory"]
    assert lp["vocab"] == 151_936 and lp["completion_tokens"] == 64 and lp["rows"] == 1
    assert lp["max_abs_diff"] <= 1e-5                           # the same log-probs
    assert 0 < lp["chunked_mib"] < lp["naive_mib"]
    # one row, one pass: both read the same positions, only the logits differ
    assert lp["chunked_lm_calls"] == lp["naive_lm_calls"] and len(lp["naive_lm_calls"]) == 1
    assert lp["naive_lm_calls"][0][0] == 1 and lp["naive_lm_calls"][0][1] > 64

    targets = report["targets"]
    assert [t["target"][0] for t in targets] == list("1112344")
    for row in targets:
        assert set(row) == {"target", "model", "value", "limit", "comparison", "pass", "note"}
        # the verdict the row's own numbers imply (bench.collect_targets' rules)
        implied = (row["value"] >= row["limit"] if row["comparison"] == ">="
                   else row["value"] <= row["limit"])
        if row["target"].startswith("2."):           # ... and the log-probs agree
            implied = implied and lp["max_abs_diff"] <= 1e-5
        if row["target"].startswith("3."):           # on >= 0.8 x off, and the cache is used
            generation = report["models"][row["model"]]["generation"]
            on, off = (generation[f"checkpointing {v}"] for v in ("on", "off"))
            implied = on["tokens_per_s"] >= 0.8 * off["tokens_per_s"] and on["kv_cache_used"]
        assert isinstance(row["pass"], bool) and row["pass"] == implied, row
    assert targets[5]["value"] == 1.0 and targets[5]["pass"]   # generate + scoring: 1 exactly
    printed = capsys.readouterr().out
    assert printed.count("[PASS]") + printed.count("[FAIL]") == len(targets) == 7
    assert "papo-g+grad" in printed and "peak memory" in printed and "one per-rollout" in printed


def test_single_pass_with_chosen_objectives_reports_what_it_ran():
    """--single-pass --objectives papo-g --no-generation-variants (how the full 3B runs on a
    CPU): one pass, timed and measured; no GRPO, so target 1 and the ratios are left out, and no
    target 3 without the generation variants; the work is what the full run counts."""
    report = bench.main(["--sizes", "tiny", *QUICK, "--objectives", "papo-g", "--single-pass",
                         "--no-generation-variants"])
    m = report["models"]["tiny"]
    assert list(m["phases_s"]) == list(m["peak_mib"]) == ["papo-g"]
    assert m["phases_s"]["papo-g"]["masked"] > 0 and m["peak_mib"]["papo-g"] > 0
    assert m["ratios_to_grpo"]["papo-g"] == {"step": None, "update": None, "memory": None}
    assert "generation" not in m and m["extra_over_forward"] is None
    assert [t["target"][0] for t in report["targets"]] == list("244")
    assert m["generated_tokens_per_s"] > 0 and m["computed_state_mib"] > 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--objectives", "grpo,ppo"])


def test_target_1_pairs_each_phase_before_summing():
    # Three repeats. The masking (0.005 s) and the masked forward (0.08 s) are PAPO-G's own; its
    # old log-probs and update jitter around GRPO's (+0.03, 0, -0.01 s and 0, +0.02, 0 s). Per
    # phase, the medians of the differences are 0.005, 0.08, 0 and 0: 0.085 s. The median of
    # the whole steps' differences (0.115, 0.105, 0.075) would say 0.105: the jitter of two
    # phases added up before the median could remove it.
    zero = dict.fromkeys(bench.PHASES, 0.0)
    grpo = [dict(zero, generate=0.3, old=0.1, update=0.2) for _ in range(3)]
    papo = [dict(zero, generate=0.3, mask=0.005, old=o, masked=0.08, update=u)
            for o, u in ((0.13, 0.2), (0.1, 0.22), (0.09, 0.2))]
    assert bench.paired_extra(papo, grpo) == pytest.approx(0.085, abs=1e-12)
    assert bench.paired_extra(grpo, grpo) == 0.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_work_of_one_micro_batch_in_closed_form(checkpointing):
    """The whole batch in one micro-batch and one update: every pass reads each picture once.
    Scoring (no gradient) reads each prompt once, then the completions; the update does too
    without checkpointing, and with it reads prompt + completion per row (checkpointed layers
    drop the KV cache) while still encoding each picture once."""
    args = bench.parse_args(["--sizes", "tiny", *QUICK, "--micro-batch-size", "4",
                             "--updates-per-step", "1",
                             "--gradient-checkpointing" if checkpointing
                             else "--no-gradient-checkpointing"])
    s = bench.prepare("tiny", args, torch.device("cpu"))
    r = s.batch.rollouts
    N, G, B, P, T = 2, 2, len(r), r.prompt_ids.shape[1], r.completion_ids.shape[1]
    once = int(r.image_grid_thw.prod(-1).sum())          # the rollouts hold each picture once
    assert B == N * G and once * G == int(r.row_pictures()[1].prod(-1).sum())   # a row's copies
    work = {name: bench.run_step(s, name, measure=True)["work"] for name in OBJECTIVES}

    assert work["grpo"]["generate"]["lm_calls"] == calls([N, P - 1, 1], [B, 1, T])
    prompt_once = calls([N, P, 1], [B, T, 1])
    assert work["grpo"]["ref"] == {"vision_rows": once, "lm_tokens": N * P + B * T,
                                   "lm_calls": prompt_once, "passes": 1}
    assert work["papo-g"]["masked"] == work["grpo"]["ref"]
    assert work["grpo"]["old"]["passes"] == 0                     # one update: on-policy
    update = calls([B, P + T, 1]) if checkpointing else prompt_once
    assert work["grpo"]["update"]["lm_calls"] == work["papo-g"]["update"]["lm_calls"] == update
    assert work["grpo"]["update"]["vision_rows"] == once
    # --perception-grad: the same again on the masked pictures
    assert work["papo-g+grad"]["update"]["lm_calls"] == (calls([B, P + T, 2]) if checkpointing
                                                         else prompt_once * 2)
    assert work["papo-g+grad"]["update"]["vision_rows"] == 2 * once


@pytest.mark.slow
@pytest.mark.parametrize("shape, grid", [("3b", [1, 32, 32]), ("qwen3-2b", [1, 28, 28])])
def test_shapes_gpu_code_path_runs_on_cpu_at_reduced_depth(shape, grid):
    """--shape 3b / qwen3-2b, the GPU check's code (float32 master weights, gradient
    checkpointing), on a CPU at one decoder layer and two vision blocks, every width real (the
    151,936-token vocabulary too; DeepStack on Qwen3-VL): the picture reaches the model at the
    recipe's budget (448 x 448 px = 200,704, its minimum: 256 tokens of 28 px, 196 of 32 px),
    and the work formulas hold - generation keeps its cache with checkpointing on; scoring reads
    the prompt once; the checkpointed update one pass per row, each picture once."""
    args = bench.parse_args(["--shape", shape, "--device", "cpu", "--text-layers", "1",
                             "--vision-blocks", "2", "--prompts", "1", "--group-size", "2",
                             "--max-new-tokens", "2", "--updates-per-step", "1",
                             "--micro-batch-size", "2"])
    assert args.gradient_checkpointing and args.dtype == "float32"
    s = bench.prepare(shape, args, torch.device("cpu"))
    text = s.policy.config.text_config
    assert (text.hidden_size, text.vocab_size, text.num_hidden_layers) == (2048, 151_936, 1)
    r = s.batch.rollouts
    assert r.image_grid_thw.tolist() == [grid]
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    rows = int(r.row_pictures()[1].prod(-1).sum())                 # a plain forward's copies
    measured = bench.run_step(s, "papo-g", measure=True)
    assert measured["peak_mib"] > 0
    work = measured["work"]
    assert work["generate"]["lm_calls"] == calls([1, P - 1, 1], [2, 1, T])
    assert work["ref"]["lm_calls"] == work["masked"]["lm_calls"] == calls([1, P, 1], [2, T, 1])
    assert work["update"]["lm_calls"] == calls([2, P + T, 1])
    assert work["update"]["vision_rows"] == rows // 2           # G = 2: each picture once


def test_shapes_default_to_the_recipes_per_gpu_work_and_name_their_errors(capsys):
    """--shape's defaults: G = 5, up to 2,048 new tokens, 16 prompts (one --generation-batch),
    micro-batches of two whole groups, float32 master weights (train.py on a GPU) with
    checkpointing; depth flags reduce a shape only, within its real depth."""
    args = bench.parse_args(["--shape", "3b", "--device", "cpu"])
    assert (args.group_size, args.max_new_tokens, args.prompts, args.micro_batch_size,
            args.dtype, args.gradient_checkpointing) == (5, 2048, 16, 10, "float32", True)
    assert bench.shape_architecture("3b", args).text_layers == 36
    assert bench.parse_args(["--shape", "7b", "--device", "cpu"]).dtype == "bfloat16"
    for argv, message in ((["--sizes", "tiny", "--text-layers", "1"], "reduce a --shape"),
                          (["--shape", "3b", "--device", "cpu", "--vision-blocks", "33"],
                           "vision blocks 1..32")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--shape", "3b"])              # a GPU by default
        assert "--device cpu" in capsys.readouterr().err
