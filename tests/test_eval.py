"""eval.py: metrics on hand-made cases with known answers."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import toy


def test_avg_and_pass_at_k_closed_form():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert evaluation.avg_at_k(correct) == pytest.approx(5 / 12)
    assert evaluation.pass_at_k(correct) == pytest.approx(2 / 3)


@pytest.fixture
def two_questions(tmp_path):
    Image.new("RGB", (56, 56), (200, 10, 10)).save(tmp_path / "a.png")
    rows = [{"problem": "How many?", "answer": "3", "images": ["a.png"]},
            {"problem": "Which colour?", "answer": "red", "images": ["a.png"]}]
    path = data.write_jsonl(rows, tmp_path / "q.jsonl")
    return data.load_jsonl(path)


def test_evaluate_with_a_stub_policy_gives_exact_metrics(two_questions, monkeypatch):
    """A stub whose k = 4 completions are fixed: question 1 right 1/4 times (always formatted),
    question 2 right 2/4 (one unformatted); with the image masked, nothing is right."""
    fixed = {
        "How many?": ["<think>x</think> \\boxed{3}", "<think>x</think> \\boxed{4}",
                      "<think>x</think> \\boxed{2}", "<think>x</think> \\boxed{5}"],
        "Which colour?": ["<think>x</think> \\boxed{red}", "\\boxed{Red}",
                          "<think>x</think> \\boxed{blue}", "no answer"],
    }

    def fake_generate(policy, processor, prompts, *, num_samples, max_new_tokens, temperature,
                      top_p, top_k):
        assert top_k == 0                                      # evaluate's default: off
        texts, masked = [], []
        for p in prompts:
            question = p["messages"][0]["content"][-1]["text"].split("\n")[0]
            blind = np.asarray(p["images"][0]).max() == 0      # fully masked picture
            texts += ["\\boxed{0}"] * num_samples if blind else responses[question]
        mask = torch.ones(len(texts), 5)
        return SimpleNamespace(texts=texts, completion_mask=mask)

    # the processors only decide the format check (their chat template)
    plain = toy.build_tiny_model(size="tiny")[1]
    thinking = toy.build_tiny_model(size="tiny", family="qwen3-vl-thinking")[1]
    monkeypatch.setattr(evaluation.qwen, "generate_rollouts", fake_generate)
    responses = fixed
    out = evaluation.evaluate(None, plain, two_questions, samples=4, mask_ratios=(1.0,),
                              kl_ratio=None)
    assert out["accuracy"] == pytest.approx(3 / 8)
    assert out["pass@4"] == pytest.approx(1.0)
    assert out["format"] == pytest.approx(6 / 8)
    assert out["accuracy_mask1.0"] == 0.0
    assert out["response_length"] == 5.0
    assert out["n"] == 2 and out["samples"] == 4
    assert "decoy_rate" not in out                              # no decoys given: no column
    # decoys: question 1's shortcut says 4 (1 of its 4 samples gives it); question 2 has none, so
    # only question 1's samples count. A masked sample (\boxed{0}) never counts.
    out = evaluation.evaluate(None, plain, two_questions, samples=4, mask_ratios=(1.0,),
                              kl_ratio=None, decoys=["4", None])
    assert out["decoy_rate"] == pytest.approx(1 / 4)
    out = evaluation.evaluate(None, plain, two_questions, samples=4, mask_ratios=(1.0,),
                              kl_ratio=None, decoys=["5", "blue"])
    assert out["decoy_rate"] == pytest.approx(2 / 8)
    # a Thinking template opened <think> in the prompt: the same answers without the opening
    # tag are well formed for it, and for no other model
    responses = {q: [t.removeprefix("<think>") for t in texts] for q, texts in fixed.items()}
    for processor, expected in ((thinking, 6 / 8), (plain, 0.0)):
        out = evaluation.evaluate(None, processor, two_questions, samples=4, mask_ratios=(1.0,),
                                  kl_ratio=None)
        assert out["format"] == pytest.approx(expected) and out["accuracy"] == pytest.approx(3 / 8)


def test_eval_cli_writes_every_field_for_a_real_tiny_checkpoint(two_questions, tmp_path):
    """Smoke test of the command line on a saved tiny model: the JSON has every field."""
    import model as qwen
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    policy.save_pretrained(tmp_path / "ckpt"); qwen.save_processor(processor, tmp_path / "ckpt")
    out = tmp_path / "res.json"
    evaluation.main(["--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "q.jsonl"),
                     "--samples", "2", "--max-new-tokens", "4", "--out", str(out)])
    res = json.loads(out.read_text())[str(tmp_path / "q.jsonl")][str(tmp_path / "ckpt")]
    for key in ("n", "samples", "accuracy", "pass@2", "format", "response_length",
                "accuracy_mask0.6", "accuracy_mask1.0", "kl_prcp"):
        assert key in res, key
    assert res["kl_prcp"] > 0.0                    # the masked branch saw another picture
    # the control: a picture "masked" at ratio 0 is the original, and KL_prcp is exactly 0
    evaluation.main(["--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "q.jsonl"),
                     "--samples", "2", "--max-new-tokens", "4", "--mask-ratios", "--kl-ratio",
                     "0", "--out", str(tmp_path / "res0.json")])
    same = json.loads((tmp_path / "res0.json").read_text())[str(tmp_path / "q.jsonl")]
    assert same[str(tmp_path / "ckpt")]["kl_prcp"] == 0.0


def test_eval_never_scales_a_picture_past_what_the_processor_keeps(two_questions, tmp_path,
                                                                  capsys):
    # The tiny processor keeps at most 12,544 pixels. Asked for 200,704, eval.py lowers the
    # budget to that, as train.py does, and scores exactly as if 12,544 had been given.
    import model as qwen
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    policy.save_pretrained(tmp_path / "ckpt"); qwen.save_processor(processor, tmp_path / "ckpt")

    def run(low: str, out: str) -> dict:
        evaluation.main(["--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "q.jsonl"),
                         "--samples", "2", "--max-new-tokens", "4", "--min-pixels", low,
                         "--out", str(tmp_path / out)])
        return json.loads((tmp_path / out).read_text())
    high = run("200704", "high.json")
    assert "--min-pixels 200704 is above the most pixels its processor keeps (12544)" in \
        capsys.readouterr().out
    assert high == run("12544", "low.json")
    assert "is above" not in capsys.readouterr().out


def test_side_by_side_columns_are_told_apart_by_their_shortest_distinct_tail():
    models = ["runs/exp-grpo-seed0/checkpoint-000150", "runs/exp-papo-g-seed0/checkpoint-000150",
              "Qwen/Qwen2.5-VL-3B-Instruct"]
    assert evaluation.column_names(models) == [
        "exp-grpo-seed0/checkpoint-000150", "exp-papo-g-seed0/checkpoint-000150",
        "Qwen/Qwen2.5-VL-3B-Instruct"]
    assert evaluation.column_names(["a/x", "b/y"]) == ["x", "y"]
    metrics = {"accuracy": 0.5, "n": 2}
    table = evaluation.format_table({"d.jsonl": {m: metrics for m in models}}, models)
    header = table.splitlines()[2]
    assert "exp-grpo-seed0/checkpoint-000150" in header and "exp-papo-g-seed0/checkpoint-000150" in header


def test_mean_of_seed_files_gives_mean_and_sample_std_column_by_column(tmp_path, capsys):
    files = []
    for seed, (a, b) in enumerate([(0.2, 0.5), (0.4, 0.5), (0.6, 0.8)]):
        result = {"d.jsonl": {f"runs/grpo-seed{seed}/ckpt": {"n": 4, "accuracy": a},
                              f"runs/papo-seed{seed}/ckpt": {"n": 4, "accuracy": b}}}
        files.append(str(tmp_path / f"seed{seed}.json"))
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(result))
    evaluation.main(["--mean-of", *files])
    out = capsys.readouterr().out
    header, row = [line for line in out.splitlines() if "seed*" in line or "accuracy" in line]
    assert header.split() == ["grpo-seed*/ckpt", "papo-seed*/ckpt"]
    # grpo: mean 0.4, std sqrt(((-.2)^2 + 0 + .2^2) / 2) = 0.2; papo: mean 0.6, std 0.1732
    assert row.split() == ["accuracy", "0.400", "+-", "0.200", "0.600", "+-", "0.173"]
    assert "n " not in out.split("d.jsonl")[1]          # counts are not averaged

    (tmp_path / "short.json").write_text(json.dumps({"d.jsonl": {"runs/grpo-seed3/ckpt": {"accuracy": 1.0}}}))
    with pytest.raises(SystemExit, match="short.json does not have 2 models on d.jsonl"):
        evaluation.main(["--mean-of", files[0], str(tmp_path / "short.json")])

    (tmp_path / "nokey.json").write_text(json.dumps(
        {"d.jsonl": {"runs/grpo-seed4/ckpt": {"n": 4}, "runs/papo-seed4/ckpt": {"n": 4}}}))
    with pytest.raises(SystemExit, match="nokey.json has no 'accuracy' for model 1 on d.jsonl"):
        evaluation.main(["--mean-of", files[0], str(tmp_path / "nokey.json")])


# ---------------------------------------------------------------------------------------------
# The paper's suite table. Oracle: Table 1 of the paper (docs/paper.md section 7), in percent,
# columns in SUITE order (5 General, then 4 Vision-dependent), then the printed averages
# (General, Vision-dependent, Overall) and, for PAPO rows, the printed gains.
# ---------------------------------------------------------------------------------------------

TABLE1 = {
    "GRPO-3B": ([28.72, 59.34, 58.90, 57.24, 55.25, 38.14, 55.81, 25.66, 52.26],
                (51.89, 42.97, 47.92), None),
    "PAPO-G-3B": ([30.95, 61.38, 60.09, 57.39, 57.14, 38.67, 62.56, 27.11, 53.95],
                  (53.39, 45.57, 49.92), (3.38, 5.60, 4.36)),
    "GRPO-7B": ([40.18, 65.48, 68.12, 72.26, 66.51, 45.62, 73.94, 35.17, 61.71],
                (62.51, 54.11, 58.78), None),
    "PAPO-G-7B": ([40.25, 69.53, 66.79, 72.52, 68.43, 46.07, 89.81, 36.63, 64.97],
                  (63.50, 59.37, 61.66), (1.53, 7.96, 4.39)),
    "DAPO-3B": ([31.20, 60.89, 59.95, 66.83, 56.25, 40.69, 74.25, 28.42, 53.09],
                (55.02, 49.11, 52.40), None),
    "PAPO-D-3B": ([35.65, 62.53, 62.67, 64.09, 60.51, 41.67, 83.56, 28.76, 57.72],
                  (57.09, 52.93, 55.24), (5.00, 5.97, 5.54)),
    "DAPO-7B": ([35.92, 61.91, 58.51, 75.93, 55.64, 37.05, 90.05, 29.02, 51.04],
                (57.58, 51.79, 55.01), None),
    "PAPO-D-7B": ([44.11, 67.53, 68.30, 80.61, 68.58, 46.70, 91.38, 36.34, 64.87],
                  (65.83, 59.82, 63.16), (15.61, 19.09, 17.54)),
}
GROUPS = (evaluation.GENERAL, evaluation.VISION, evaluation.OVERALL)
# Why these tolerances: the paper prints every number to 2 decimals, so each per-benchmark
# input is off the paper's own value by at most 0.005, and each printed average or gain is off
# its exact value by at most 0.005.
#  - an average of rounded inputs is off by <= 0.005, plus 0.005 for the printed rounding:
AVG_TOL = 0.01 + 1e-9
#  - a relative gain 100 (n - b) / b of rounded inputs is off by at most
#    100 * 0.005 * (b + n) / (b (b - 0.005)) (worst case: n rounded up, b rounded down), and a mean
#    of gains by the mean of those; plus 0.005 for the printed rounding. About 0.02-0.03 here.
#    Observed: every gain that reproduces does so within 0.011 (PAPO-G-7B Vision: 7.971 vs 7.96).


def _gain_tol(base: list[float], new: list[float]) -> float:
    return sum(0.5 * (b + n) / (b * (b - 0.005)) for b, n in zip(base, new)) / len(base) + 0.005


def _table1_scores(*rows):
    return {r: dict(zip(evaluation.SUITE_FILES, TABLE1[r][0])) for r in rows}


def _slices(group):
    return {evaluation.GENERAL: slice(0, 5), evaluation.VISION: slice(5, 9),
            evaluation.OVERALL: slice(0, 9)}[group]


def test_relative_gain_closed_form_and_a_zero_baseline_raises():
    assert evaluation.relative_gain(50.0, 55.0) == pytest.approx(10.0)
    assert evaluation.relative_gain(40.0, 30.0) == pytest.approx(-25.0)
    assert evaluation.relative_gain(28.72, 30.95) == pytest.approx(2.23 / 28.72 * 100)
    with pytest.raises(ValueError, match="positive baseline"):
        evaluation.relative_gain(0.0, 0.3)


def test_suite_lists_the_nine_files_in_the_papers_column_order_and_groups():
    assert [c for _, c, _ in evaluation.SUITE] == [
        "Geo3k", "MathVista", "We-Math", "MMK12", "MathVerse",
        "LogicVista", "Counting", "MMMU-Pro", "MathVerse-V"]
    assert evaluation.SUITE_GROUPS[evaluation.GENERAL] == [
        "hiyouga_geometry3k.json", "AI4Math_MathVista.json", "We-Math_We-Math.json",
        "PAPO_MMK12.json", "AI4Math_MathVerse.json"]
    assert evaluation.SUITE_GROUPS[evaluation.VISION] == [
        "lscpku_LogicVista.json", "BUAADreamer_clevr_count_70k.json", "MMMU_MMMU_Pro.json",
        "AI4Math_MathVerse-vision-dependent.json"]
    assert evaluation.SUITE_GROUPS[evaluation.OVERALL] == evaluation.SUITE_FILES


@pytest.mark.parametrize("row", list(TABLE1))
def test_suite_summary_reproduces_every_table1_average(row):
    """All 24 printed averages reproduce within the rounding bound; 23 of them to the printed
    digit, PAPO-G-7B Overall is 61.667 where the paper prints 61.66. Overall is the mean over all
    nine benchmarks (GRPO-3B: 47.92), not the mean of the two group averages (47.43)."""
    summary = evaluation.suite_summary(_table1_scores(row), [row], percent=True)[row]
    assert summary["missing"] == [] and summary["gain"] is None
    for group, printed in zip(GROUPS, TABLE1[row][1]):
        assert abs(summary["avg"][group] - printed) <= AVG_TOL, (row, group)


@pytest.mark.parametrize("base,new", [("GRPO-3B", "PAPO-G-3B"), ("GRPO-7B", "PAPO-G-7B"),
                                      ("DAPO-3B", "PAPO-D-3B"), ("DAPO-7B", "PAPO-D-7B")])
def test_suite_summary_gain_is_the_papers_mean_of_per_benchmark_gains(base, new):
    """GRPO-3B -> PAPO-G-3B: +3.38 / +5.60 / +4.36; DAPO-7B -> PAPO-D-7B: General +15.61 and
    Overall +17.54. For the DAPO pairs the printed Vision gain does not reproduce (next test), so
    it is left out here; the gain of the averages (e.g. +2.89 for PAPO-G-3B General) would fail."""
    summary = evaluation.suite_summary(_table1_scores(base, new), [base, new], percent=True)
    gain = summary[new]["gain"]
    for group, printed in zip(GROUPS, TABLE1[new][2]):
        if base.startswith("DAPO") and group == evaluation.VISION:
            continue
        cols = _slices(group)
        tol = _gain_tol(TABLE1[base][0][cols], TABLE1[new][0][cols])
        assert abs(gain[group] - printed) <= tol, (new, group, gain[group], printed, tol)


@pytest.mark.parametrize("base,new", [("DAPO-3B", "PAPO-D-3B"), ("DAPO-7B", "PAPO-D-7B")])
def test_table1_dapo_vision_gains_follow_the_papers_own_overall_not_its_printed_vision_gain(base,
                                                                                          new):
    """Paper defect, not ours: PAPO-D-3B prints Vision +5.97 and PAPO-D-7B +19.09 (the abstract's
    "19.1%"), but their per-benchmark scores give +6.22 and +19.96. The paper's own General and
    Overall gains agree with ours: Overall is the mean of nine gains, so Overall = (5 General +
    4 Vision) / 9 and the printed pair implies Vision = (9 Overall - 5 General) / 4 = 6.22 and
    19.95, each uncertain by (9 + 5) * 0.005 / 4 from the printed rounding."""
    summary = evaluation.suite_summary(_table1_scores(base, new), [base, new], percent=True)
    gain = summary[new]["gain"]
    general, printed_vision, overall = TABLE1[new][2]
    tol = _gain_tol(TABLE1[base][0][5:], TABLE1[new][0][5:])
    assert abs(gain[evaluation.VISION] - printed_vision) > 0.2     # far outside any rounding
    implied = (9 * overall - 5 * general) / 4
    assert abs(gain[evaluation.VISION] - implied) <= tol + 14 * 0.005 / 4
    # the identity itself holds exactly for our gains
    assert gain[evaluation.OVERALL] == pytest.approx(
        (5 * gain[evaluation.GENERAL] + 4 * gain[evaluation.VISION]) / 9)


def test_suite_summary_mean_of_gains_differs_from_gain_of_means_hand_computed():
    """Two benchmarks move, the other seven are equal (gain 0): Geo3k 10% -> 20% (+100%),
    MathVista 50% -> 45% (-10%). Given as fractions, like evaluate() returns them.
    General gain = (100 - 10 + 0 + 0 + 0) / 5 = +18; Vision 0; Overall = (100 - 10) / 9 = +10.
    The gain of the General averages would be (37 - 36) / 36 = +2.78."""
    files = evaluation.SUITE_FILES
    base = {f: 0.40 for f in files} | {files[0]: 0.10, files[1]: 0.50}
    new = {f: 0.40 for f in files} | {files[0]: 0.20, files[1]: 0.45}
    s = evaluation.suite_summary({"base": base, "new": new}, ["base", "new"])
    assert s["base"]["avg"][evaluation.GENERAL] == pytest.approx(36.0)
    assert s["new"]["avg"][evaluation.GENERAL] == pytest.approx(37.0)
    assert s["new"]["scores"][files[0]] == pytest.approx(20.0)          # reported in percent
    assert s["new"]["gain"][evaluation.GENERAL] == pytest.approx(18.0)
    assert s["new"]["gain"][evaluation.VISION] == pytest.approx(0.0)
    assert s["new"]["gain"][evaluation.OVERALL] == pytest.approx(10.0)
    assert evaluation.relative_gain(36.0, 37.0) == pytest.approx(2.777777, abs=1e-5)


def test_suite_summary_refuses_percentages_given_as_fractions_and_unknown_models():
    scores = _table1_scores("GRPO-3B")
    with pytest.raises(ValueError, match="percent=True"):
        evaluation.suite_summary(scores, ["GRPO-3B"])
    with pytest.raises(ValueError, match="no scores"):
        evaluation.suite_summary(scores, ["GRPO-3B", "PAPO-G-3B"], percent=True)


def test_suite_summary_matches_benchmarks_given_as_paths():
    scores = _table1_scores("GRPO-3B")
    by_path = {"GRPO-3B": {f"/data/suite/{f}": v for f, v in scores["GRPO-3B"].items()}}
    a = evaluation.suite_summary(scores, ["GRPO-3B"], percent=True)
    b = evaluation.suite_summary(by_path, ["GRPO-3B"], percent=True)
    assert a == b


def test_a_missing_benchmark_makes_its_averages_none_and_is_named_in_the_table():
    scores = _table1_scores("GRPO-3B", "PAPO-G-3B")
    del scores["PAPO-G-3B"]["MMMU_MMMU_Pro.json"]
    models = ["runs/grpo/ckpt", "runs/papo-g/ckpt"]
    scores = dict(zip(models, scores.values()))
    s = evaluation.suite_summary(scores, models, percent=True)
    papo = s["runs/papo-g/ckpt"]
    assert papo["missing"] == ["MMMU_MMMU_Pro.json"]
    assert papo["scores"]["MMMU_MMMU_Pro.json"] is None
    assert papo["avg"][evaluation.VISION] is None and papo["avg"][evaluation.OVERALL] is None
    assert papo["gain"][evaluation.VISION] is None and papo["gain"][evaluation.OVERALL] is None
    assert papo["avg"][evaluation.GENERAL] == pytest.approx(53.39)      # its group is complete
    assert papo["gain"][evaluation.GENERAL] == pytest.approx(3.3811, abs=1e-4)

    table = evaluation.format_suite_table(s, models)
    header, grpo_row, papo_row = table.splitlines()[:3]
    assert header.split()[:7] == ["model", "Geo3k", "MathVista", "We-Math", "MMK12", "MathVerse",
                                  "|"]
    assert header.index("LogicVista") < header.index("Vision-dependent AVG") < header.index(
        "Overall AVG")
    assert grpo_row.startswith("grpo/ckpt") and "51.89 |" in grpo_row and "(+" not in grpo_row
    assert "53.39 (+3.38)" in papo_row and "missing" in papo_row
    assert papo_row.rsplit("|", 1)[1].strip() == "n/a"             # Overall AVG
    assert papo_row.count("n/a") == 2
    assert table.splitlines()[-1] == "missing benchmark files - papo-g/ckpt: MMMU_MMMU_Pro.json"

    # a benchmark the BASELINE lacks: the other model's average stands, its gain cannot
    scores["runs/papo-g/ckpt"]["MMMU_MMMU_Pro.json"] = 27.11
    del scores["runs/grpo/ckpt"]["PAPO_MMK12.json"]
    s = evaluation.suite_summary(scores, models, percent=True)
    assert s["runs/papo-g/ckpt"]["avg"][evaluation.GENERAL] == pytest.approx(53.39)
    assert s["runs/papo-g/ckpt"]["gain"][evaluation.GENERAL] is None
    assert s["runs/papo-g/ckpt"]["gain"][evaluation.VISION] == pytest.approx(5.5922, abs=1e-4)
    assert "53.39 (n/a)" in evaluation.format_suite_table(s, models)


def test_full_table_prints_each_average_with_its_gain():
    models = ["GRPO-3B", "PAPO-G-3B"]
    s = evaluation.suite_summary(_table1_scores(*models), models, percent=True)
    table = evaluation.format_suite_table(s, models)
    papo_row = table.splitlines()[2]
    # 5.5922 prints +5.59 where the paper has +5.60 (computed from its unrounded scores)
    for cell in ("30.95", "53.39 (+3.38)", "45.57 (+5.59)", "49.92 (+4.36)"):
        assert cell in papo_row
    assert "missing benchmark files" not in table


def test_suite_files_splits_a_folder_into_present_and_missing(tmp_path):
    for name in ("PAPO_MMK12.json", "lscpku_LogicVista.json", "unrelated.json"):
        (tmp_path / name).write_text("[]")
    (tmp_path / "MMMU_MMMU_Pro.json").mkdir()                 # a folder is not a benchmark file
    present, missing = evaluation.suite_files(tmp_path)
    assert present == {"PAPO_MMK12.json": tmp_path / "PAPO_MMK12.json",
                       "lscpku_LogicVista.json": tmp_path / "lscpku_LogicVista.json"}
    assert missing == [f for f in evaluation.SUITE_FILES
                       if f not in ("PAPO_MMK12.json", "lscpku_LogicVista.json")]


def test_suite_cli_scores_sharegpt_files_and_reports_the_missing_ones(tmp_path, capsys):
    """eval.py --suite on a folder holding 3 of the 9 benchmark files (ShareGPT JSON with an
    image folder beside them): each present file is scored for each model, the table names the
    6 missing files, and no average is computed over an incomplete group."""
    import model as qwen
    (tmp_path / "suite" / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), (10, 200, 10)).save(tmp_path / "suite" / "images" / "g.png")
    rows = [{"messages": [{"role": "user", "content": "<image>How many shapes? Answer in \\boxed{}."},
                          {"role": "assistant", "content": "2"}], "images": ["images/g.png"]}]
    present = ["hiyouga_geometry3k.json", "PAPO_MMK12.json", "lscpku_LogicVista.json"]
    for name in present:
        (tmp_path / "suite" / name).write_text(json.dumps(rows))
    models = []
    for seed in (0, 1):
        policy, processor = toy.build_tiny_model(seed=seed, size="tiny")
        policy.save_pretrained(tmp_path / f"m{seed}"); qwen.save_processor(processor, tmp_path / f"m{seed}")
        models += ["--model", str(tmp_path / f"m{seed}")]
    out = tmp_path / "suite.json"
    results = evaluation.main(["--suite", str(tmp_path / "suite"), *models, "--samples", "2",
                               "--max-new-tokens", "4", "--out", str(out)])
    assert sorted(Path(k).name for k in results) == sorted(present)
    assert json.loads(out.read_text()) == results
    for per_model in results.values():
        assert sorted(per_model) == sorted([str(tmp_path / "m0"), str(tmp_path / "m1")])
        assert all(set(m) >= {"accuracy", "pass@2", "format"} for m in per_model.values())
        assert all("accuracy_mask0.6" not in m for m in per_model.values())   # avg@k alone
    text = capsys.readouterr().out
    table = text[text.index("Geo3k"):]
    assert table.count("missing") >= 6 and "n/a" in table
    named = [line for line in table.splitlines() if line.startswith("missing benchmark files")]
    for name in set(evaluation.SUITE_FILES) - set(present):
        assert name in named[0]


def test_a_zero_baseline_score_leaves_that_groups_gain_undefined_not_a_crash():
    """A baseline that scores 0 on one benchmark has no relative gain there: the group's gain
    (and Overall's) is n/a and the table says why; the other group keeps its gain."""
    base = {f: 0.5 for f in evaluation.SUITE_FILES}
    base["hiyouga_geometry3k.json"] = 0.0
    new = {f: 0.6 for f in evaluation.SUITE_FILES}
    summary = evaluation.suite_summary({"a": base, "b": new}, ["a", "b"])
    gain = summary["b"]["gain"]
    assert gain["General"] is None and gain["Overall"] is None
    assert gain["Vision-dependent"] == pytest.approx(20.0)       # (0.6 - 0.5) / 0.5
    assert summary["a"]["avg"]["General"] == pytest.approx(40.0)  # averages are still defined
    table = evaluation.format_suite_table(summary, ["a", "b"])
    assert "(n/a)" in table and "a scores 0 on hiyouga_geometry3k.json" in table
