"""--reward, the user's own reward (custom_reward.UserReward): a run with it ends; a broken one is
refused before any model loads, naming the row and the function; only numbers are accepted
(never a string or a dict read as a tuple); EasyR1's dict and batch forms work unchanged; and
the held-out evaluation, run.json and eval.py score with it."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import config
import custom_reward
import data
import eval as evaluation
from test_train import tiny_args

REPO = Path(__file__).resolve().parents[1]

USER_REWARDS = '''
import sys
from typing import Any

def last_line(response, gold, example):
    """always formatted; right when the last line is the gold answer"""
    lines = [l.strip() for l in response.strip().splitlines() if l.strip()]
    return float(bool(lines) and lines[-1] == gold), 1.0

def as_string(response, gold, example):
    return "10"

def as_dict(response, gold, example):
    return {"1": 0, "0": 1}

def exits(response, gold, example):
    sys.exit(3)

def raises(response, gold, example):
    return int(response), 1.0

def only_on_garbage(response, gold, example):
    return (2.0 if "#" in response else 1.0), 1.0

def one_arg(reward_input):
    return {"overall": 1.0, "accuracy": 1.0}

def easyr1_batch(reward_inputs: list[dict[str, Any]], format_weight: float = 0.1) -> list[dict]:
    if not isinstance(reward_inputs, list):
        raise ValueError("use the batch form")
    out = []
    for r in reward_inputs:
        acc = float(r["response"].strip().endswith(r["ground_truth"]))
        fmt = float(r["response"].startswith("<think>"))
        out.append({"overall": (1 - format_weight) * acc + format_weight * fmt,
                    "format": fmt, "accuracy": acc})
    return out

def easyr1_one(reward_input: dict[str, Any]) -> dict[str, float]:
    acc = float(reward_input["response"] == reward_input["ground_truth"])
    return {"overall": 0.5 * acc + 0.5 * (reward_input["response_length"] == 2),
            "accuracy": acc}

def easyr1_extra_key(reward_input: dict) -> dict:
    return {"overall": 1.0, "accuracy": 1.0, "acuracy": 1.0}
'''


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_REWARDS)
    return lambda name: f"{path}:{name}"


def rows(n=3):
    return [data.Example(problem="how many?", answer="3", images=[], source=f"my.jsonl:{i + 1}")
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# A run with --reward ends
# ---------------------------------------------------------------------------------------------

def test_an_interpreter_with_the_trainers_stop_handler_exits_after_a_user_reward(spec):
    """The reward's child process is forked from the trainer, whose SIGTERM handler only sets a
    flag; at exit multiprocessing stops the child with SIGTERM and waits. Kept, that handler
    made every run with --reward hang after its last step."""
    script = ("import processes, custom_reward, data\n"
              "processes.catch_stop_signals()\n"
              f"scorer = custom_reward.UserReward({spec('last_line')!r})\n"
              "ex = data.Example(problem='p', answer='3', images=[], source='x:1')\n"
              "print(scorer('so\\n3', ex)['accuracy'])\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter did not exit: the reward process ignored SIGTERM")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1.0"


def test_a_training_run_with_a_user_reward_ends_and_evaluates_with_it(spec, tmp_path):
    """End to end in a fresh process: the run exits by itself; its before/after table and
    final_eval.json score with the user's reward (format 1 on every sample, which the math
    reward's format check never gives this tiny model), and run.json records the reward."""
    argv = tiny_args(tmp_path, "--steps", "2", "--reward", spec("last_line"))
    try:
        done = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("train.py with --reward did not exit")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"format rate\s+1\.000\s+1\.000", done.stdout), done.stdout[-2000:]
    run = tmp_path / "run"
    assert json.loads((run / "final_eval.json").read_text())["after"]["format"] == 1.0
    assert json.loads((run / "run.json").read_text())["reward"] == spec("last_line")


# ---------------------------------------------------------------------------------------------
# A broken reward is refused before any model loads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,message", [
    ("as_string", r"as_string returned a str '10' on my.jsonl:1: expected \(accuracy, format\)"),
    ("as_dict", r"as_dict returned a dict with keys \['0', '1'\] on my.jsonl:1"),
    ("exits", r"exits failed on my.jsonl:1: it called sys.exit\(3\)"),
    ("raises", r"raises failed on my.jsonl:1: ValueError"),
    ("only_on_garbage", r"only_on_garbage returned accuracy 2.0 on my.jsonl:1: expected a finite"),
    ("easyr1_extra_key", r"returned a dict with keys \['accuracy', 'acuracy', 'overall'\]"),
])
def test_a_broken_reward_is_refused_by_the_check_naming_row_and_function(spec, name, message):
    with pytest.raises(custom_reward.RewardError,
                       match="checked before loading any model: .*" + message):
        custom_reward.check_user_reward(custom_reward.UserReward(spec(name), 5.0), rows())


def test_a_string_or_a_mapping_is_never_read_as_accuracy_and_format(spec):
    """float("1"), float("0") made "10" a perfect (1.0, 0.0); iterating {"1": 0, "0": 1} its
    keys did the same."""
    for name in ("as_string", "as_dict"):
        with pytest.raises(custom_reward.RewardError, match=f"{name} returned a (str|dict)"):
            custom_reward.UserReward(spec(name))("x", rows(1)[0])


def test_a_one_argument_reward_must_say_which_easyr1_form_it_is(spec):
    with pytest.raises(custom_reward.RewardError, match="annotate it as list\\[dict\\]"):
        custom_reward.UserReward(spec("one_arg"))


def test_train_py_refuses_a_broken_reward_before_any_model_loads(spec, tmp_path):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *tiny_args(tmp_path, "--reward",
                                                                  spec("raises"))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert re.search(r"train.py: checked before loading any model: --reward .*raises failed on "
                     r".*data.jsonl:\d+: ValueError", done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "cache").glob("warmstart-*"))   # no model was trained or loaded
    assert not (tmp_path / "run").exists()       # a refused new run leaves no (empty) folder
    assert time.perf_counter() - started < 120


@pytest.mark.parametrize("value", ["1e300", "inf", "0", "-1", "3601"])
def test_a_reward_time_limit_out_of_range_is_refused(spec, tmp_path, value, capsys):
    """1e300 seconds overflowed the wait for the reward process (OverflowError mid-run)."""
    cfg = config.parse_config(tiny_args(tmp_path, "--reward", spec("last_line"),
                                        "--reward-time-limit", value))
    with pytest.raises(SystemExit, match=r"--reward-time-limit .*in \(0, 3600\]"):
        config.check_config(cfg, 1)
    with pytest.raises(SystemExit):
        evaluation.main(["--model", str(tmp_path), "--data", "d.jsonl", "--reward-time-limit",
                         value, "--out", str(tmp_path / "e.json")])
    assert re.search(r"--reward-time-limit .*must be in \(0, 3600\]", capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# EasyR1's forms, unchanged
# ---------------------------------------------------------------------------------------------

def test_an_easyr1_batch_reward_scores_every_response_in_one_call(spec):
    scorer = custom_reward.UserReward(spec("easyr1_batch"))
    got = scorer.score(["<think>so</think> 3", "<think>so</think> 4", "3"], rows(), [5, 5, 1])
    assert got == [{"reward": 1.0, "accuracy": 1.0, "format": 1.0},
                   {"reward": pytest.approx(0.1), "accuracy": 0.0, "format": 1.0},
                   {"reward": pytest.approx(0.9), "accuracy": 1.0, "format": 0.0}]
    custom_reward.check_user_reward(scorer, rows())             # passes the check too
    scorer.stop()


def test_an_easyr1_one_response_reward_gets_the_token_count_and_pays_its_overall(spec):
    """"overall" is the reward paid (not 0.9 acc + 0.1 format); no "format": logged 0."""
    scorer = custom_reward.UserReward(spec("easyr1_one"))
    got = scorer.score(["3", "3", "4"], rows(), [2, 7, 2])
    assert got == [{"reward": 1.0, "accuracy": 1.0, "format": 0.0},
                   {"reward": 0.5, "accuracy": 1.0, "format": 0.0},
                   {"reward": 0.5, "accuracy": 0.0, "format": 0.0}]
    scorer.stop()


# ---------------------------------------------------------------------------------------------
# eval.py scores a run with the reward it trained on
# ---------------------------------------------------------------------------------------------

def test_eval_uses_the_reward_recorded_in_the_runs_run_json(tmp_path):
    for name, reward in (("a", "/r.py:f"), ("b", "/r.py:f"), ("c", None)):
        (tmp_path / name / "checkpoint-000001").mkdir(parents=True)
        (tmp_path / name / "run.json").write_text(json.dumps({"reward": reward}))
    ckpt = lambda name: str(tmp_path / name / "checkpoint-000001")
    bad = []
    assert evaluation.recorded_reward([ckpt("a"), ckpt("b"), "Qwen/base"], bad) == "/r.py:f"
    assert evaluation.recorded_reward([ckpt("c"), "Qwen/base"], bad) == "" and not bad
    evaluation.recorded_reward([ckpt("a"), ckpt("c")], bad)
    assert "trained on different rewards" in bad[0] and "give --reward" in bad[0]
    (tmp_path / "c" / "run.json").write_text("{not json")
    evaluation.recorded_reward([ckpt("c")], bad)
    assert "cannot read its run's" in bad[1]


def test_eval_py_checks_the_runs_recorded_reward_before_loading_the_model(spec, tmp_path,
                                                                         monkeypatch):
    """eval.py given a run's checkpoint takes the run's --reward from run.json and tries it on
    the data before any model loads: a broken one is refused naming the row and the function."""
    from PIL import Image
    import model as qwen
    Image.new("RGB", (56, 56), (200, 10, 10)).save(tmp_path / "a.png")
    questions = data.write_jsonl([{"problem": "How many?", "answer": "3", "images": ["a.png"]}],
                                 tmp_path / "q.jsonl")
    checkpoint = tmp_path / "run" / "checkpoint-000001"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"reward": spec("raises")}))
    monkeypatch.setattr(qwen, "model_source", lambda name: (name, None))
    monkeypatch.setattr(qwen, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=r"eval.py: checked before loading any model: --reward "
                                         r".*raises failed on .*q.jsonl:1: ValueError"):
        evaluation.main(["--model", str(checkpoint), "--data", str(questions),
                         "--out", str(tmp_path / "e.json")])
