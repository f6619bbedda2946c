"""A run folder is safe to share: nothing in a checkpoint is unpickled with arbitrary code."""

import builtins
import os
import pickle
import random
import subprocess

import numpy as np
import pytest
import torch

import checkpoints
import train
from test_train import last_checkpoint, tiny_args


class _Payload:
    """An object whose unpickling calls `function(*args)` - what a crafted file would hold."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payloads(marker):
    """Pickle tricks that would leave `marker` behind if they ran."""
    return {
        "os.makedirs": _Payload(os.makedirs, str(marker)),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
        "builtins.eval": _Payload(builtins.eval, f"__import__('os').mkdir({str(marker)!r})"),
    }


@pytest.mark.parametrize("trick", ["os.makedirs", "builtins.exec", "subprocess.call",
                                   "builtins.eval"])
def test_a_crafted_trainer_state_is_refused_and_never_runs(tmp_path, trick):
    marker = tmp_path / "it-ran"
    path = tmp_path / "trainer_state.pt"
    torch.save({"state": {"step": 1, "cursor": 0, "extra": _payloads(marker)[trick]},
                "optimizer": {}, "rng": {}}, path)
    with pytest.raises(ValueError, match=r"trainer_state\.pt holds objects other than tensors"):
        checkpoints.read_trainer_state(path)
    assert not marker.exists()
    # the plain unpickler would have run it: the payload is real
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_resume_refuses_a_checkpoint_whose_state_was_replaced(tmp_path):
    train.main(tiny_args(tmp_path, "--steps", "1"))
    marker = tmp_path / "it-ran"
    state = last_checkpoint(tmp_path / "run") / "trainer_state.pt"
    blob = checkpoints.read_trainer_state(state)
    blob["state"]["extra"] = _Payload(os.makedirs, str(marker))
    torch.save(blob, state)
    with pytest.raises(SystemExit, match="holds objects other than tensors and plain values"):
        train.main(["--resume", str(tmp_path / "run"), "--steps", "2"])
    assert not marker.exists()


def test_a_checkpoints_random_states_round_trip_without_pickled_objects(tmp_path):
    """The saved generator states are tensors and plain values, and restoring them gives the
    same next draws of torch, numpy and Python's random."""
    torch.manual_seed(3); np.random.seed(4); random.seed(5)
    torch.save({"rng": checkpoints.rng_states()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)        # no allowlist needed
    checkpoints.set_rng_states(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_an_earlier_versions_state_with_numpy_arrays_still_loads(tmp_path):
    """Earlier checkpoints stored numpy's state as an array: numpy's array constructor is
    admitted, so they load safely and resume the same generator."""
    np.random.seed(9)
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "old.pt")
    expected = np.random.rand(2)
    state = checkpoints.read_trainer_state(tmp_path / "old.pt")["rng"]["numpy"]
    np.random.set_state(state)
    assert np.array_equal(np.random.rand(2), expected)
    with pytest.raises(pickle.UnpicklingError):        # the plain safe load alone refuses it
        torch.load(tmp_path / "old.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGHUP
# ---------------------------------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _wait_for_steps(metrics, n: int, proc, timeout: float = 240.0) -> None:
    import time
    start = time.time()
    while time.time() - start < timeout:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("the run did not reach its steps in time")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_the_run_after_the_step_with_a_checkpoint(tmp_path, sig):
    """What a scheduler sends before preemption: the run finishes its step, saves a checkpoint
    (here no periodic one is due), releases the lock, prints the resume command and exits with
    128 + the signal; the resumed run then continues from there."""
    import signal
    import sys
    args = tiny_args(tmp_path, "--steps", "40", "--save-every", "100", "--sample-every", "0")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    run = tmp_path / "run"
    _wait_for_steps(run / "metrics.jsonl", 2, proc)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + getattr(signal, sig), err[-2000:]
    steps = len((run / "metrics.jsonl").read_text().splitlines())
    assert 2 <= steps < 40
    assert last_checkpoint(run).name == f"checkpoint-{steps:06d}"
    assert not (run / ".lock").exists()
    assert f"stopped by {sig} after step {steps}" in err and f"--resume {run}" in err
    train.main(["--resume", str(run), "--steps", str(steps + 1)])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == steps + 1


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_under_torchrun(tmp_path):
    """SIGTERM to rank 1 alone: both ranks agree after the step, the checkpoint is written,
    and every rank exits non-zero (torchrun reports the failure)."""
    import signal
    import sys
    import time
    args = tiny_args(tmp_path, "--steps", "40", "--save-every", "100", "--sample-every", "0")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--master_port", str(port), str(REPO / "train.py"), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    run = tmp_path / "run"
    _wait_for_steps(run / "metrics.jsonl", 2, proc, timeout=300)
    workers = []
    for _ in range(50):
        found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        workers = [int(p) for p in found.stdout.split()]
        if len(workers) == 2:
            break
        time.sleep(0.1)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGTERM)          # one worker only (the later-started one)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    steps = len((run / "metrics.jsonl").read_text().splitlines())
    assert last_checkpoint(run).name == f"checkpoint-{steps:06d}" and steps < 40
    assert not (run / ".lock").exists()
    assert "stopped by SIGTERM" in err


def test_a_lock_held_on_another_machine_is_reported_as_possibly_stale(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("some-other-node 4242\n")
    with pytest.raises(SystemExit, match=r"locked by process 4242 on another machine, "
                                         r"some-other-node, since 0\.\d hours ago.*--force-unlock"):
        train.main(tiny_args(tmp_path))
    assert (run / ".lock").read_text() == "some-other-node 4242\n"       # not taken
    train.main(tiny_args(tmp_path, "--force-unlock"))
    assert not (run / ".lock").exists() and (run / "metrics.jsonl").is_file()


# ---------------------------------------------------------------------------------------------
# Resume cannot change a run silently
# ---------------------------------------------------------------------------------------------

def test_resume_refuses_flags_that_change_the_training_unless_allowed_and_records_them(
        tmp_path, capsys, monkeypatch):
    import json
    import config
    train.main(tiny_args(tmp_path, "--steps", "1"))
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        config.parse_config(["--resume", str(run), "--steps", "2", "--preset", "grpo",
                             "--seed", "3"])
    err = capsys.readouterr().err
    assert "would change how the run trains" in err
    for line in ("--preset: 'papo-g' -> 'grpo'", "--gamma: 0.02 -> 0.0", "--seed: 0 -> 3"):
        assert line in err, line
    # data given again as a relative path to the same file is no change
    saved = json.loads((run / "config.json").read_text())
    monkeypatch.chdir(tmp_path)
    same = os.path.relpath(saved["cache"], tmp_path)
    assert config.parse_config(["--resume", str(run), "--steps", "2", "--cache", same]).cache
    # allowed: applied, printed, and recorded beside config.json
    cfg = config.parse_config(["--resume", str(run), "--steps", "2", "--preset", "grpo",
                               "--allow-changes"])
    assert (cfg.preset, cfg.gamma) == ("grpo", 0.0)
    assert "--allow-changes: gamma: 0.02 -> 0.0" in capsys.readouterr().out
    train.main(["--resume", str(run), "--steps", "2", "--preset", "grpo", "--allow-changes"])
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"]["gamma"] == [0.02, 0.0]
    assert history[-1]["changed"]["preset"] == ["papo-g", "grpo"]
    assert json.loads((run / "config.json").read_text())["gamma"] == 0.0


def test_resume_with_no_steps_left_and_eval_every_without_data_are_errors(tmp_path):
    import config
    train.main(tiny_args(tmp_path, "--steps", "2"))
    cfg = config.parse_config(["--resume", str(tmp_path / "run"), "--steps", "2"])
    with pytest.raises(SystemExit, match="--steps 2: the run already reached step 2"):
        config.check_config(cfg, 1)
    (tmp_path / "d.jsonl").write_text("")
    cfg = config.parse_config(tiny_args(tmp_path, "--data", str(tmp_path / "d.jsonl"),
                                        "--eval-every", "5"))
    with pytest.raises(SystemExit, match="--eval-every 5: there is no held-out data"):
        config.check_config(cfg, 1)


# ---------------------------------------------------------------------------------------------
# Late failures made early and named
# ---------------------------------------------------------------------------------------------

def test_a_diverging_learning_rate_stops_the_run_at_the_step_naming_the_lr(tmp_path, capsys):
    """--lr 1e6: AdamW moves every weight by about 1e6 and the policy's next generation would
    die on NaN probabilities deep in transformers; instead the run stops after that update,
    naming the step and the learning rate, and points to the last good checkpoint."""
    train.main(tiny_args(tmp_path, "--steps", "1"))
    with pytest.raises(SystemExit, match=r"step 2: the update took the weights' norm from "
                                         r"[\d.e+]+ to [\d.e+]+ \(--lr 1e\+06\).*diverged"):
        train.main(["--resume", str(tmp_path / "run"), "--steps", "3", "--lr", "1e6",
                    "--allow-changes"])
    assert last_checkpoint(tmp_path / "run").name == "checkpoint-000001"   # the good one


def test_a_seed_out_of_range_is_refused_before_any_work(tmp_path):
    import config
    for seed in ("-1", str(2 ** 31)):
        with pytest.raises(SystemExit, match=rf"--seed {seed}: must be in \[0, 2\^31\)"):
            config.check_config(config.parse_config(tiny_args(tmp_path, "--seed", seed)), 1)


def test_a_full_disk_during_a_save_names_the_folder_and_the_space_needed(tmp_path, monkeypatch):
    """torch.save on a full disk says only "unexpected pos ..."; the run says what is wrong, the
    half-written folder goes, and the previous checkpoint stays the one latest.txt names."""
    from collections import namedtuple
    train.main(tiny_args(tmp_path, "--steps", "1"))
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("trainer_state.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                               "626240 vs 626132")
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SystemExit, match=r"writing checkpoint-000002 into .*run failed \(.*"
                                         r"unexpected pos.*\): that disk has 0.00 GB free and a "
                                         r"checkpoint needs about 0\.\d+ GB"):
        train.main(["--resume", str(tmp_path / "run"), "--steps", "2"])
    run = tmp_path / "run"
    assert last_checkpoint(run).name == "checkpoint-000001"
    assert not list(run.glob(".tmp-checkpoint-*"))


def test_a_damaged_parquet_file_or_dataset_folder_is_named(tmp_path):
    import data
    from test_train import _toy_parquet
    good = _toy_parquet(tmp_path / "good.parquet", 4)
    bad = tmp_path / "tables" / "broken.parquet"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])      # truncated
    (tmp_path / "tables" / "fine.parquet").write_bytes(good.read_bytes())
    with pytest.raises(data.DatasetError, match=r"broken\.parquet: not a readable parquet file"):
        data.load_dataset(str(tmp_path / "tables"))
    folder = tmp_path / "saved"
    import datasets
    datasets.Dataset.from_parquet(str(good)).save_to_disk(str(folder))
    arrow = next(folder.glob("*.arrow"))
    arrow.write_bytes(b"not an arrow file")
    with pytest.raises(data.DatasetError, match=rf"{folder}: a Dataset.save_to_disk folder that "
                                                r"does not load"):
        data.load_dataset(str(folder))


def test_without_latest_txt_resume_uses_the_newest_checkpoint(tmp_path, capsys):
    train.main(tiny_args(tmp_path, "--steps", "2"))
    run = tmp_path / "run"
    (run / "latest.txt").unlink()
    train.main(["--resume", str(run), "--steps", "3"])
    assert "latest.txt is missing; using the newest checkpoint, checkpoint-000002" in \
        capsys.readouterr().out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------
# Pictures: EXIF orientation, several frames
# ---------------------------------------------------------------------------------------------

def test_a_phone_photo_is_turned_as_a_viewer_shows_it(tmp_path):
    """A 40 x 20 JPEG whose EXIF orientation 6 says "turn 90 degrees clockwise": the checked
    size, the prompt's size and the pixels are those of the upright 20 x 40 picture."""
    import data
    from PIL import Image
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (250, 0, 0)                 # stored: red on the left half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    data.write_jsonl([{"problem": "What is red?", "answer": "top", "images": ["photo.jpg"]}],
                     tmp_path / "q.jsonl")
    [ex] = data.load_dataset(str(tmp_path / "q.jsonl"))
    assert ex.sizes == [(20, 40)]
    [picture] = ex.load_images()
    shown = np.asarray(picture).astype(int)
    assert picture.size == (20, 40)
    assert shown[:18, :, 0].min() > 200 and shown[22:, :, 0].max() < 60   # red on top now


def test_an_animated_or_multi_page_picture_is_refused_naming_the_row(tmp_path):
    import data
    from PIL import Image
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "pages.tiff", save_all=True, append_images=frames[1:])
    data.write_jsonl([{"problem": "p", "answer": "1", "images": ["moving.gif"]},
                      {"problem": "p", "answer": "1", "images": ["pages.tiff"]}],
                     tmp_path / "q.jsonl")
    with pytest.raises(data.DatasetError) as err:
        data.load_dataset(str(tmp_path / "q.jsonl"))
    message = str(err.value)
    assert "q.jsonl:1: " in message and "q.jsonl:2: " in message
    assert message.count("a picture of 2 frames (an animation or a multi-page file)") == 2
