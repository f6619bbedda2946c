"""Misuse of train.py and eval.py: every bad flag is refused up front, by name and range; run
folders are never clobbered, shared or left half-written; a damaged run still resumes.

Each case here is one a user hit: before these checks, `--grad-clip -1` trained by gradient
ASCENT, `--temperature 0` silently learned nothing, a second `python train.py` into the same
folder wiped the first run's metrics, and a torn metrics.jsonl line made --resume fail with a
bare JSONDecodeError.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import data
import eval as evaluation
import model as qwen
import toy
import config
import checkpoints
import train
from test_train import tiny_args

# ---------------------------------------------------------------------------------------------
# Flags: one table, one row per flag value that used to run wrongly or crash late
# ---------------------------------------------------------------------------------------------

BAD_TRAIN_FLAGS = [
    ("--grad-clip", "-1"), ("--grad-clip", "0"), ("--temperature", "0"), ("--top-p", "0"),
    ("--top-p", "1.5"), ("--dtype", "foo"), ("--steps", "0"), ("--steps", "-5"),
    ("--save-every", "-1"), ("--save-every", "0"), ("--keep-checkpoints", "0"),
    ("--keep-checkpoints", "-1"), ("--prompts-per-step", "0"), ("--max-draws", "0"),
    ("--eval-samples", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--max-new-tokens", "0"),
    ("--kl-kind", "k9"), ("--mask-mode", "foo"), ("--mask-patch", "0"), ("--mask-ratio", "1.5"),
    ("--group-size", "1"), ("--micro-batch-size", "0"), ("--gamma", "-0.02"),
    ("--dual-clip", "0.5"), ("--clip-low", "1"), ("--tiny-size", "huge"),
    ("--tiny-family", "llama"), ("--toy-tasks", "count,nope"), ("--eval-size", "-1"),
    ("--min-pixels", "0"), ("--generation-batch", "-1"),
    ("--max-prompt-length", "0"), ("--entropy", "maybe"), ("--agg-mode", "mean"),
    ("--max-image-pixels", "0"), ("--kl-prcp-clip", "-0.2"), ("--agg-mode", "micro-mean"),
    ("--kl-prcp-token-fraction", "1.5"), ("--kl-prcp-token-fraction", "-0.2"),
    ("--sft-coef", "-0.001"), ("--gamma-end", "-0.01"), ("--gamma-anneal-fraction", "0"),
    ("--gamma-anneal-fraction", "1.5"),
]


@pytest.mark.parametrize("flag,value", BAD_TRAIN_FLAGS)
def test_every_bad_train_flag_is_refused_by_name_before_any_work(flag, value, tmp_path):
    cfg = config.parse_config(["--out", str(tmp_path / "run"), flag, value])
    with pytest.raises(SystemExit) as info:
        config.check_config(cfg, world_size=1)
    message = str(info.value)
    assert f"{flag} {value}" in message.replace("'", "") and "must be" in message
    assert not (tmp_path / "run").exists()          # nothing was created


def test_all_bad_flags_are_listed_in_one_message(tmp_path):
    cfg = config.parse_config(["--out", str(tmp_path / "run"), "--steps", "0", "--lr", "-1",
                              "--top-p", "2"])
    with pytest.raises(SystemExit) as info:
        config.check_config(cfg, world_size=1)
    assert all(f in str(info.value) for f in ("--steps 0", "--lr -1.0", "--top-p 2.0"))


def test_the_defaults_and_the_presets_pass(tmp_path):
    for preset in config.PRESETS:
        for extra in ([], ["--model", str(tmp_path), "--data", "x.jsonl"]):
            config.check_config(config.parse_config(["--preset", preset, *extra]), world_size=1)


@pytest.mark.parametrize("flags", [["--kl-prcp-clip", "0.2"], ["--kl-prcp-token-fraction", "0.2"],
                                   ["--gamma-anneal"]])
def test_kl_prcp_switches_without_the_kl_prcp_term_are_refused(flags, tmp_path):
    """They would do nothing: GRPO and DAPO have no KL_prcp term (gamma 0)."""
    for preset in ("grpo", "dapo"):
        cfg = config.parse_config(["--out", str(tmp_path / "run"), "--preset", preset, *flags])
        with pytest.raises(SystemExit, match=f"{flags[0]}.*--gamma 0"):
            config.check_config(cfg, world_size=1)
    config.check_config(config.parse_config(["--out", str(tmp_path / "run"), *flags]), 1)


def test_masked_image_key_needs_a_dataset_and_a_masked_branch(tmp_path):
    out = ["--out", str(tmp_path / "run"), "--masked-image-key", "images_aug"]
    with pytest.raises(SystemExit, match="--masked-image-key images_aug: the offline toy data"):
        config.check_config(config.parse_config(out), 1)
    with pytest.raises(SystemExit, match="--masked-image-key images_aug: this objective has no "
                                         "masked branch"):
        config.check_config(config.parse_config([*out, "--data", "t.jsonl", "--preset", "grpo"]), 1)
    config.check_config(config.parse_config([*out, "--data", "t.jsonl"]), 1)


def test_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a run folder"):
        config.check_config(config.parse_config(["--out", str(tmp_path / "afile")]), 1)


def test_resume_with_a_different_out_is_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(SystemExit):
        config.parse_config(["--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert "a resumed run continues in its own folder" in capsys.readouterr().err
    # the same folder spelled differently is fine
    cfg = config.parse_config(["--resume", str(tmp_path / "a"), "--out", str(tmp_path / "a" / ".")])
    assert cfg.steps == 3


@pytest.fixture
def checkpoint_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evalmisuse")
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    policy.save_pretrained(folder / "ckpt")
    qwen.save_processor(processor, folder / "ckpt")
    Image.new("RGB", (56, 56), (200, 10, 10)).save(folder / "a.png")
    data.write_jsonl([{"problem": "How many?", "answer": "3", "images": ["a.png"]}],
                     folder / "q.jsonl")
    return folder


@pytest.mark.parametrize("flag,value", [
    ("--samples", "0"), ("--batch-size", "0"), ("--limit", "-1"), ("--top-p", "0"),
    ("--top-k", "-1"), ("--max-new-tokens", "0"), ("--mask-ratios", "1.5"), ("--kl-ratio", "2"),
    ("--temperature", "-1"), ("--min-pixels", "0"), ("--max-image-pixels", "0"),
])
def test_every_bad_eval_flag_is_refused_before_any_model_loads(flag, value, checkpoint_and_data,
                                                               capsys, monkeypatch):
    folder = checkpoint_and_data
    monkeypatch.setattr(qwen, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        evaluation.main(["--model", str(folder / "ckpt"), "--data", str(folder / "q.jsonl"),
                         "--out", str(folder / "r.json"), flag, value])
    # the flag's own complaint ("  --samples 0: must be >= 1"), not its name in the usage line
    complaints = [line.strip() for line in capsys.readouterr().err.splitlines()
                  if ": must be " in line]
    assert exit_.value.code == 2 and any(c.startswith(f"{flag} ") for c in complaints)
    assert not (folder / "r.json").exists()


@pytest.mark.parametrize("out", ["missing_folder/r.json", "."])
def test_eval_checks_out_and_every_model_before_generating(out, checkpoint_and_data, capsys,
                                                           monkeypatch):
    folder = checkpoint_and_data
    monkeypatch.chdir(folder)
    monkeypatch.setattr(qwen, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        evaluation.main(["--model", "ckpt", "--model", "no_such_ckpt", "--data", "q.jsonl",
                         "--out", out])
    err = capsys.readouterr().err
    # both complaints, not the flags' names in argparse's usage line
    assert exit_.value.code == 2 and "no such model folder: no_such_ckpt" in err
    assert f"--out {out}: " in err


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------

def test_a_fresh_run_refuses_a_folder_that_holds_a_run_and_overwrite_clears_only_run_files(
        tmp_path, capsys):
    args = tiny_args(tmp_path)
    train.main(args)
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()
    (run / "my_notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="is not empty.*--resume.*--overwrite"):
        train.main(args)
    assert (run / "metrics.jsonl").read_text() == before          # nothing was touched
    assert not (run / ".lock").exists()                           # and the lock is released

    # a file no run wrote: --overwrite refuses the folder, deleting nothing
    with pytest.raises(SystemExit, match="--overwrite refused.*my_notes.txt, which no run"):
        train.main(args + ["--overwrite"])
    assert (run / "my_notes.txt").read_text() == "keep me"
    assert (run / "metrics.jsonl").read_text() == before
    (run / "my_notes.txt").unlink()
    train.main(args + ["--overwrite"])
    assert "--overwrite: deleted" in capsys.readouterr().out
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_overwrite_never_deletes_a_model_folder(tmp_path, capsys):
    """--out MODEL_FOLDER --overwrite: the folder holds a model (config.json and weights), not
    a run; it is refused and stays loadable."""
    import toy
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    folder = tmp_path / "model"
    policy.save_pretrained(folder)
    qwen.save_processor(processor, folder)
    files = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit, match="--overwrite refused for --out .*model: it holds "):
        train.main(tiny_args(tmp_path, "--out", str(folder), "--overwrite"))
    assert sorted(p.name for p in folder.iterdir()) == files
    qwen.load_model(folder)
    # a lone config.json (no weights beside it) is not a run's either: no run.json
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="has no run.json"):
        train.main(tiny_args(tmp_path, "--out", str(lone), "--overwrite"))
    assert (lone / "config.json").is_file()


def test_a_second_process_cannot_write_into_a_locked_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{os.uname().nodename} {alive.pid}\n")
        with pytest.raises(SystemExit, match="another training process is writing"):
            train.main(tiny_args(tmp_path))
        assert (run / ".lock").read_text().split()[1] == str(alive.pid)   # not stolen
    finally:
        alive.kill()
        alive.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(f"{os.uname().nodename} {dead.pid}\n")
    train.main(tiny_args(tmp_path))
    assert "stale lock" in capsys.readouterr().out
    assert not (run / ".lock").exists() and (run / "metrics.jsonl").is_file()


def test_the_lock_is_released_after_a_crash(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the update")
    monkeypatch.setattr(train, "update_phase", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(tiny_args(tmp_path))
    assert not (tmp_path / "run" / ".lock").exists()


def test_pruning_keeps_the_newest_by_step_and_never_the_latest(tmp_path):
    for step in (5, 999_999, 1_000_000, 1_000_001):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    # by name, "checkpoint-1000000" sorts before "checkpoint-999999"
    checkpoints.prune_checkpoints(tmp_path, keep_last=2, keep=tmp_path / "checkpoint-000005")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-000005", "checkpoint-1000000", "checkpoint-1000001"]


# ---------------------------------------------------------------------------------------------
# Resume after damage, and Ctrl-C
# ---------------------------------------------------------------------------------------------

def test_resume_drops_a_torn_log_line_with_a_note(tmp_path, capsys):
    train.main(tiny_args(tmp_path, "--steps", "2"))
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward": 0.')                      # a write cut short
    with open(run / "samples.jsonl", "a") as f:
        f.write('{"step": 3, "te')
    train.main(["--resume", str(run), "--steps", "3"])
    out = capsys.readouterr().out
    assert "metrics.jsonl:3 is not complete JSON" in out
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_checkpoint_that_does_not_load_is_named_and_the_previous_one_used(tmp_path, capsys):
    train.main(tiny_args(tmp_path, "--steps", "2", "--keep-checkpoints", "2"))
    run = tmp_path / "run"
    broken = run / "checkpoint-000002" / "trainer_state.pt"
    broken.write_bytes(broken.read_bytes()[:100])                # truncated by a full disk
    train.main(["--resume", str(run), "--steps", "3"])
    out = capsys.readouterr().out
    assert f"checkpoint {run / 'checkpoint-000002'} does not load" in out
    assert f"resumed from {run / 'checkpoint-000001'} at step 1" in out
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]                  # step 2 was redone after the fallback


def test_config_paths_are_absolute_so_resume_works_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = tiny_args(Path("."), "--steps", "1")                 # relative --cache and --out
    train.main(args)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["cache"] == str(tmp_path / "cache") and saved["out"] == str(tmp_path / "run")
    warm_starts = sorted((tmp_path / "cache").glob("warmstart-*"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train.main(["--resume", str(tmp_path / "run"), "--steps", "2"])
    assert sorted((tmp_path / "cache").glob("warmstart-*")) == warm_starts   # no new warm start
    assert not (elsewhere / "cache").exists()


def test_ctrl_c_leaves_the_last_checkpoint_intact_and_says_how_to_resume(tmp_path, monkeypatch,
                                                                         capsys):
    real = train.refill

    def interrupted(phases, policy, cfg, d, step):          # Ctrl-C while step 2 rolls out
        if step == 2:
            raise KeyboardInterrupt
        return real(phases, policy, cfg, d, step)
    monkeypatch.setattr(train, "refill", interrupted)
    with pytest.raises(SystemExit) as info:
        train.main(tiny_args(tmp_path, "--steps", "3"))
    assert info.value.code == 130
    run = tmp_path / "run"
    err = capsys.readouterr().err
    assert f"python train.py --resume {run}" in err and "checkpoint-000001" in err
    assert not (run / ".lock").exists()
    assert checkpoints.latest_checkpoint(run).name == "checkpoint-000001"
    monkeypatch.setattr(train, "refill", real)
    train.main(["--resume", str(run), "--steps", "3"])
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_eval_refuses_to_overwrite_an_earlier_results_file_unless_told(checkpoint_and_data,
                                                                       capsys):
    folder = checkpoint_and_data
    out = folder / "results.json"
    out.write_text('{"earlier": "results"}')
    args = ["--model", str(folder / "ckpt"), "--data", str(folder / "q.jsonl"), "--samples", "1",
            "--max-new-tokens", "2", "--mask-ratios", "--kl-ratio", "-1", "--out", str(out)]
    with pytest.raises(SystemExit):
        evaluation.main(args)
    assert "exists (an earlier evaluation's results); pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == '{"earlier": "results"}'
    evaluation.main(args + ["--overwrite"])
    assert "earlier" not in json.loads(out.read_text())
