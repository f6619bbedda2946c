"""Settings and data that used to run silently wrong, or fail late: each is now a clear early
error naming the file, row or flag, or a warning within a step.

Before these checks: JSONL data ignored --answer-key and the other key flags; a parquet NaN
answer became the gold string "nan"; a truncated JPEG passed the data check and killed a random
step; a 1x199 picture passed it and the processor threw after the budget resize; `--gamma 1e300`
skipped every update and exited 0; `--weight-decay 10000` erased the weights and exited 0;
`--mask-truncated` with every completion truncated trained nothing and logged 0.0 losses;
`--preset grpo --perception-grad` was silently ignored; data.JSONL was "not a table".
"""

import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import config
import data
import imaging
import runtime
import train
from test_train import GradientRecorder, _tiny_batch, tiny_args


def _picture(path, size=(32, 32)):
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path.name


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def test_jsonl_reads_the_rows_under_the_key_flags(tmp_path):
    """--problem-key / --answer-key / --image-key apply to JSONL as to tables; a row that lacks
    the named key is a bad row naming it (the default key is no fallback)."""
    name = _picture(tmp_path / "a.png")
    rows = [{"question": "How many?", "gt": "3", "pics": [name], "answer": "WRONG"},
            {"question": "Which?", "gt": "B", "pics": name}]       # one path, as tables allow
    src = data.write_jsonl(rows, tmp_path / "d.jsonl")
    keys = dict(problem_key="question", answer_key="gt", image_key="pics")
    ds = data.load_dataset(src, **keys)
    assert [(ex.problem, ex.answer) for ex in ds.rows] == [("How many?", "3"), ("Which?", "B")]
    assert [ex.images for ex in ds.rows] == [[tmp_path / name]] * 2
    data.write_jsonl([{"problem": "How many?", "answer": "3", "images": [name]}], src)
    with pytest.raises(data.DatasetError) as info:
        data.load_dataset(src, **keys)
    assert f"{src}:1" in str(info.value)
    assert all(f'missing "{k}"' in str(info.value) for k in ("question", "gt", "pics"))


def test_a_jsonl_file_is_recognised_in_capitals(tmp_path):
    src = data.write_jsonl([{"problem": "How many?", "answer": "3",
                             "images": [_picture(tmp_path / "a.png")]}], tmp_path / "D.JSONL")
    assert [ex.answer for ex in data.load_dataset(src).rows] == ["3"]


def test_nan_and_infinite_answers_of_a_table_are_bad_rows_named(tmp_path):
    """A float answer column: 1.5 is read as "1.5"; NaN and inf are refused with file and row,
    not turned into the gold answers "nan" and "inf"."""
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    picture = [{"bytes": png.getvalue(), "path": None}]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"problem": ["a", "b", "c"], "answer": [1.5, math.nan, math.inf],
                             "images": [picture] * 3}), path)
    with pytest.raises(data.DatasetError) as info:
        data.load_dataset(str(path))
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}:1: ") and '"answer" is nan' in problems[0]
    assert problems[1].startswith(f"{path}:2: ") and '"answer" is inf' in problems[1]
    pq.write_table(pa.table({"problem": ["a"], "answer": [1.5], "images": [picture]}), path)
    assert [ex.answer for ex in data.load_dataset(str(path)).rows] == ["1.5"]


def test_a_truncated_jpeg_is_a_bad_row_at_check_time(tmp_path):
    """Its header and structure pass PIL's verify(); only decoding the pixels finds the cut."""
    full = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(full, format="JPEG")
    cut = full.getvalue()[: len(full.getvalue()) * 2 // 3]
    (tmp_path / "cut.jpg").write_bytes(cut)
    Image.open(tmp_path / "cut.jpg").verify()              # what the check relied on alone
    fine = {"problem": "q", "answer": "1", "images": [_picture(tmp_path / "a.png")]}
    src = data.write_jsonl([fine,
                            {"problem": "q", "answer": "1", "images": ["cut.jpg"]}],
                           tmp_path / "d.jsonl")
    with pytest.raises(data.DatasetError) as info:
        data.load_dataset(src)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{src}:2: not a readable image")


def test_the_aspect_limit_is_checked_after_the_budget_resize(tmp_path):
    """1 x 199 px is under the processor's limit of 200; scaled up into the toy budget
    (3,136 to 12,544 pixels) it becomes 3 x 789 (int() rounds 3.97 down), over it."""
    fine = {"problem": "q", "answer": "1", "images": [_picture(tmp_path / "a.png")]}
    src = data.write_jsonl([fine,
                            {"problem": "q", "answer": "1",
                             "images": [_picture(tmp_path / "thin.png", (1, 199))]}],
                           tmp_path / "d.jsonl")
    rows = data.load_dataset(src).rows                     # the raw sizes pass
    assert imaging.budget_size(1, 199, 3136, 12544) == (3, 789)
    problems = data.budget_problems(rows, 3136, 12544)
    assert problems == [f"{src}:2: picture 1 of 1x199 px becomes 3x789 px in the pixel budget "
                        "(--min-pixels 3136, --max-pixels 12544): an aspect ratio over 200, "
                        "which Qwen2.5-VL's processor refuses"]
    assert data.budget_problems(rows, None, None) == []    # no budget: 1 x 199 is fine


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

ABSURD_FLAGS = [("--gamma", "1e300"), ("--beta", "1e300"), ("--eta-orig", "1e300"),
                ("--eta-mask", "11"), ("--gamma-end", "1e300"), ("--sft-coef", "1e300"),
                ("--weight-decay", "10000"), ("--weight-decay", "1.5"), ("--temperature", "1e-6"),
                ("--temperature", "0.05"), ("--temperature", "1e300"), ("--lora-alpha", "1e300")]


@pytest.mark.parametrize("flag,value", ABSURD_FLAGS)
def test_absurd_values_are_refused_with_the_range(flag, value, tmp_path):
    cfg = config.parse_config(["--out", str(tmp_path / "run"), flag, value])
    with pytest.raises(SystemExit) as info:
        config.check_config(cfg, world_size=1)
    line = next(l for l in str(info.value).splitlines() if flag + " " in l)
    assert "must be in [" in line
    assert float(line.split(flag + " ")[1].split(":")[0]) == float(value)


def test_the_edges_of_the_ranges_pass(tmp_path):
    config.check_config(config.parse_config(
        ["--out", str(tmp_path / "run"), "--gamma", "10", "--beta", "10", "--temperature", "0.1",
         "--weight-decay", "1", "--lora-alpha", "4096"]), world_size=1)


@pytest.mark.parametrize("flags,named", [
    (["--preset", "grpo", "--perception-grad"], "--perception-grad"),
    (["--preset", "dapo", "--perception-grad"], "--perception-grad"),
    (["--preset", "papo-g", "--gamma", "0", "--perception-grad"], "--perception-grad"),
    (["--gamma-end", "0.01"], "--gamma-end 0.01"),
    (["--gamma-anneal-fraction", "0.3"], "--gamma-anneal-fraction 0.3"),
])
def test_flags_that_cannot_act_are_refused(flags, named, tmp_path):
    cfg = config.parse_config(["--out", str(tmp_path / "run"), *flags])
    with pytest.raises(SystemExit) as info:
        config.check_config(cfg, world_size=1)
    assert named in str(info.value)


def test_flags_that_act_pass(tmp_path):
    for flags in (["--preset", "papo-g", "--perception-grad"],
                  ["--preset", "grpo", "--eta-mask", "0.05", "--perception-grad"],
                  ["--gamma-anneal", "--gamma-end", "0.01", "--gamma-anneal-fraction", "0.3"]):
        config.check_config(config.parse_config(["--out", str(tmp_path / "run"), *flags]),
                            world_size=1)


# ---------------------------------------------------------------------------------------------
# Runs that cannot learn
# ---------------------------------------------------------------------------------------------

def test_an_update_with_every_completion_left_out_is_skipped_and_logs_no_loss(tmp_path, capsys):
    """--mask-truncated, every rollout truncated: no forward, no optimizer step, no loss metric
    logged as if measured (it used to log pg_loss 0.0 ...), a warning at once; and the third
    such update in a row stops the run naming the flags."""
    cfg, d, examples, policy, processor = _tiny_batch(tmp_path, "--preset", "grpo", "--beta",
                                                      "0", "--mask-truncated")
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=False)
    nothing = train.leave_out_truncated(batch, torch.ones(len(batch.rollouts), dtype=torch.bool))
    guard = {}
    for step in (1, 2):
        recorder = GradientRecorder(policy)
        out = train.update_phase(nothing, policy, recorder, cfg, d, step=step, guard=guard)
        assert recorder.grads == []
        assert out["skipped_updates"] == 1
        assert not {"pg_loss", "entropy_orig", "grad_norm", "clip_high"} & set(out)
        err = capsys.readouterr().err
        assert f"WARNING step {step}: every completion hit --max-new-tokens" in err
    with pytest.raises(train.Diverged, match="--mask-truncated") as info:
        train.update_phase(nothing, policy, GradientRecorder(policy), cfg, d, step=3, guard=guard)
    assert "step 3: the last 3 updates had not one completion token" in str(info.value)
    # one update with tokens resets the count
    guard = {"skipped_in_a_row": 2}
    out = train.update_phase(batch, policy, GradientRecorder(policy), cfg, d, step=4, guard=guard)
    assert guard["skipped_in_a_row"] == 0 and "pg_loss" in out


def test_updates_with_a_nan_gradient_stop_the_run_after_three_in_a_row(tmp_path):
    """--gamma 1e300 (past check_config) overflows the loss: each update is skipped; the third
    in a row stops the run naming --gamma."""
    cfg, d, examples, policy, processor = _tiny_batch(tmp_path, "--preset", "papo-g",
                                                      "--gamma", "1e300")
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=True)
    train.score_phase(batch, policy, policy, cfg, d)
    guard = {}
    for step in (1, 2):
        recorder = GradientRecorder(policy)
        out = train.update_phase(batch, policy, recorder, cfg, d, step=step, guard=guard)
        assert out["skipped_updates"] == 1 and recorder.grads == []
    with pytest.raises(train.Diverged) as info:
        train.update_phase(batch, policy, GradientRecorder(policy), cfg, d, step=3, guard=guard)
    assert "the last 3 updates were skipped: the gradient was not finite" in str(info.value)
    assert "(--gamma 1e+300)" in str(info.value)


def _linear_with_gradient_zero():
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    return net


def test_weight_decay_that_shrinks_the_weights_stops_the_run_naming_it():
    """With zero gradients AdamW only decays: the norm after k updates is (1 - lr wd)^k times
    its start. 1 - 1e-4 x 1000 = 0.9: 0.9^6 = 0.53 passes, 0.9^7 = 0.48 is under half the start
    and stops the run at the 7th update, naming --lr and --weight-decay."""
    net = _linear_with_gradient_zero()
    cfg = config.Config(lr=1e-4, weight_decay=1000.0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = float(torch.nn.utils.get_total_norm(list(net.parameters())))
    guard = {}
    for k in range(1, 7):
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        train.optimizer_step(net, optimizer, cfg, guard)
        norm = float(torch.nn.utils.get_total_norm(list(net.parameters())))
        assert norm == pytest.approx(0.9 ** k * start, rel=1e-5)
    assert guard["weight_norm_start"] == pytest.approx(start)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(train.Diverged) as info:
        train.optimizer_step(net, optimizer, cfg, guard)
    assert "--lr 0.0001, --weight-decay 1000" in str(info.value)
    assert "collapsed" in str(info.value)


def test_one_update_that_erases_the_weights_stops_the_run():
    """--lr 1e-4 --weight-decay 10000 (past check_config): 1 - lr wd = 0, every weight is zeroed
    at the first update."""
    net = _linear_with_gradient_zero()
    cfg = config.Config(lr=1e-4, weight_decay=10000.0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    with pytest.raises(train.Diverged, match="--weight-decay 10000"):
        train.optimizer_step(net, optimizer, cfg, {})


def test_identical_groups_are_counted_and_warned_about(tmp_path, capsys):
    """--top-p 1e-6 is greedy: every group's rollouts are the same tokens; identical_frac is 1,
    and the run warns at the first step (nothing is learned); plain sampling gives 0."""
    args = tiny_args(tmp_path, "--preset", "grpo", "--top-p", "1e-6", "--steps", "2",
                     "--sample-every", "0")
    train.main(args)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["identical_frac"] for r in rows] == [1.0, 1.0]
    err = capsys.readouterr().err
    assert err.count("WARNING step 1: in every group the 4 rollouts are the same tokens") == 1
    assert "WARNING step 2" not in err
    cfg, d, examples, policy, processor = _tiny_batch(tmp_path / "b", "--preset", "grpo")
    _, _, stats = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=False)
    stats["draws"] = 1
    assert train.rollout_statistics(stats, d)["identical_frac"] == 0.0


def test_the_collapse_watch_skips_a_window_with_a_step_that_trained_nothing():
    row = lambda s, kl: dict(step=s, kl_prcp=kl, entropy_orig=1.0, entropy_mask=1.0)
    history = [row(s, 0.01) for s in range(10)] + [dict(step=10)] + [row(11, 0.1)]
    assert runtime.collapse_warning(history) is None
    assert runtime.collapse_warning(history[:10] + [row(11, 0.1) | dict(entropy_orig=2.0,
                                                                         entropy_mask=2.0)])


def test_eval_checks_the_aspect_after_its_own_budget(tmp_path):
    """eval.py's budget (1,024 .. 589,824 pixels) scales 1 x 199 px up to 2 x 451: refused,
    naming the row, before any question is scored."""
    import eval as evaluation
    import model as qwen
    import toy
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    policy.save_pretrained(tmp_path / "ckpt")
    qwen.save_processor(processor, tmp_path / "ckpt")
    fine = {"problem": "q", "answer": "1", "images": [_picture(tmp_path / "a.png")]}
    src = data.write_jsonl([fine, {"problem": "q", "answer": "1",
                                   "images": [_picture(tmp_path / "thin.png", (1, 199))]}],
                           tmp_path / "d.jsonl")
    assert imaging.budget_size(1, 199, 1024, 589_824) == (2, 451)
    with pytest.raises(SystemExit) as info:
        evaluation.main(["--model", str(tmp_path / "ckpt"), "--data", str(src),
                         "--out", str(tmp_path / "results.json")])
    assert f"{src}:2: picture 1 of 1x199 px becomes 2x451 px" in str(info.value)
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# A starting model that does not use the picture
# ---------------------------------------------------------------------------------------------

BLIND = {"accuracy": 0.209, "accuracy_mask0.6": 0.209, "accuracy_mask1.0": 0.209,
         "kl_prcp": 5.5e-10, "format": 0.999}


def test_a_starting_model_that_ignores_the_picture_is_named():
    """Accuracy equal under every mask and KL_prcp ~0: the perception term is zero, so the run
    says so (a toy warm start on the dark canvas ended like this on 3 of 5 seeds)."""
    warning = runtime.blind_warning(BLIND)
    assert warning.startswith("WARNING") and "0.6, 1.0" in warning and "5.5e-10" in warning
    # one masked accuracy apart, or a KL_prcp that is not ~0: the model looks - no warning
    assert runtime.blind_warning({**BLIND, "accuracy_mask1.0": 0.205}) is None
    assert runtime.blind_warning({**BLIND, "kl_prcp": 1e-3}) is None
    assert runtime.blind_warning(None) is None                    # no held-out set
    assert runtime.blind_warning({"accuracy": 0.5, "kl_prcp": 0.0}) is None   # no masked score


def test_the_run_prints_it_after_the_held_out_evaluation(tmp_path, monkeypatch, capsys):
    real = runtime.evaluate_heldout

    def blind(*args, **kwargs):            # the real evaluation, its scores made a blind model's
        result = real(*args, **kwargs)
        return result and {**result, **BLIND}

    monkeypatch.setattr(runtime, "evaluate_heldout", blind)
    train.main(tiny_args(tmp_path))
    assert runtime.blind_warning(BLIND) in capsys.readouterr().out
