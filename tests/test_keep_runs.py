"""Runs are never lost: a setting that deletes, takes over or changes a run is never read back
from a file, --overwrite deletes only what a run wrote, a refused --resume changes nothing, and a
checkpoint is checked before it is trusted.

Each case here is one a user hit: `--config A/config.json` of a run started with --overwrite
deleted run A; a run once started with --force-unlock took over a live process's lock on every
later --resume; `--out D --overwrite` deleted D/checkpoint-best/ and the --model it started from.
"""

import json
import os
from pathlib import Path

import pytest

import config
import integrity
import checkpoints
import runtime
import train
from test_train import last_checkpoint, tiny_args
from test_misuse import checkpoint_and_data  # noqa: F401  (a fixture: a tiny model folder and q.jsonl)


def _tree(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size: what "nothing was deleted or changed" compares."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. --out, --overwrite, --force-unlock, ... come from the command line only
# ---------------------------------------------------------------------------------------------

def test_rerunning_a_runs_config_never_deletes_that_run_or_another(tmp_path, capsys):
    """Run A was started with --overwrite: its config.json says so. Re-running that
    configuration with another seed must not delete A (its out) nor B (a finished run given as
    --out without --overwrite)."""
    train.main(tiny_args(tmp_path, "--steps", "1"))
    train.main(tiny_args(tmp_path, "--steps", "1", "--overwrite"))     # A: started with it
    run_a = tmp_path / "run"
    assert json.loads((run_a / "config.json").read_text())["overwrite"] is True
    before_a = _tree(run_a)
    with pytest.raises(SystemExit):
        train.main(["--config", str(run_a / "config.json"), "--seed", "3"])
    assert "give --out for the new run" in capsys.readouterr().err
    assert _tree(run_a) == before_a
    run_b = tmp_path / "b"
    train.main(tiny_args(tmp_path, "--steps", "1", "--out", str(run_b)))
    before_b = _tree(run_b)
    with pytest.raises(SystemExit, match=r"--out .*b is not empty"):
        train.main(["--config", str(run_a / "config.json"), "--seed", "3", "--out", str(run_b)])
    assert "overwrite ignored" in capsys.readouterr().out
    assert _tree(run_b) == before_b and _tree(run_a) == before_a
    # a new folder named on the command line: the configuration runs there
    train.main(["--config", str(run_a / "config.json"), "--out", str(tmp_path / "c")])
    assert last_checkpoint(tmp_path / "c").name == "checkpoint-000001"


def test_a_run_started_with_force_unlock_does_not_take_over_a_live_lock_on_resume(tmp_path):
    train.main(tiny_args(tmp_path, "--steps", "1", "--force-unlock"))
    run = tmp_path / "run"
    assert config.parse_config(["--resume", str(run), "--steps", "2"]).force_unlock is False
    (run / ".lock").write_text(f"{os.uname().nodename} {os.getpid()}\n")   # a live process
    with pytest.raises(SystemExit, match="another training process is writing"):
        train.main(["--resume", str(run), "--steps", "2"])
    assert (run / ".lock").read_text() == f"{os.uname().nodename} {os.getpid()}\n"
    assert last_checkpoint(run).name == "checkpoint-000001"


def test_a_config_file_never_sets_the_run_control_settings(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("steps: 3\noverwrite: true\nforce_unlock: true\n"
                                     "allow_changes: true\n")
    cfg = config.parse_config(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.steps, cfg.overwrite, cfg.force_unlock, cfg.allow_changes) == (3, False, False,
                                                                                False)
    assert "overwrite, force_unlock, allow_changes ignored" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 2. --overwrite deletes exactly what a run wrote; an evaluation never replaces its inputs
# ---------------------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_holding_this_runs_own_starting_model(tmp_path):
    """--model D/checkpoint-000002 --out D --overwrite deleted its own starting model, then
    crashed loading it."""
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "2"))
    (tmp_path / "d.jsonl").write_text("")
    before = _tree(run)
    with pytest.raises(SystemExit, match=r"--overwrite refused for --out .*run: it holds an "
                                         r"input of this run \(--model .*checkpoint-000002\)"):
        train.main(tiny_args(tmp_path, "--model", str(run / "checkpoint-000002"), "--data",
                             str(tmp_path / "d.jsonl"), "--updates-per-step", "1", "--overwrite"))
    assert _tree(run) == before


def test_overwrite_deletes_checkpoints_by_their_exact_names_only(tmp_path):
    """A user's checkpoint-best/ and checkpoint-notes.txt are not a run's checkpoints."""
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    (run / "checkpoint-best").mkdir()
    (run / "checkpoint-best" / "model.safetensors").write_text("mine")
    (run / "checkpoint-notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--overwrite refused.*checkpoint-best, "
                                         "checkpoint-notes.txt, which no run"):
        train.main(tiny_args(tmp_path, "--steps", "1", "--overwrite"))
    assert (run / "checkpoint-best" / "model.safetensors").read_text() == "mine"
    assert (run / "checkpoint-notes.txt").read_text() == "mine"
    assert checkpoints.checkpoint_step(run / "checkpoint-000001") == 1
    assert checkpoints.checkpoint_step(run / "checkpoint-1") is None


def test_eval_never_writes_its_results_over_an_input(checkpoint_and_data, capsys, monkeypatch):
    import eval as evaluation
    folder = checkpoint_and_data
    monkeypatch.chdir(folder)
    rows = (folder / "q.jsonl").read_text()
    for out, clash in (("q.jsonl", "is --data q.jsonl"),
                       ("ckpt/config.json", "lies inside --model ckpt")):
        with pytest.raises(SystemExit):
            evaluation.main(["--model", "ckpt", "--data", "q.jsonl", "--out", out,
                             "--overwrite"])
        assert f"--out {out}: {clash}, an input of this evaluation" in capsys.readouterr().err
    assert (folder / "q.jsonl").read_text() == rows


def test_a_plain_eval_rerun_writes_a_new_results_file(checkpoint_and_data, capsys, monkeypatch):
    import eval as evaluation
    monkeypatch.chdir(checkpoint_and_data)
    args = ["--model", "ckpt", "--data", "q.jsonl", "--samples", "1", "--max-new-tokens",
            "2", "--mask-ratios", "--kl-ratio", "-1"]
    evaluation.main(args)
    first = (checkpoint_and_data / "eval_results.json").read_text()
    evaluation.main(args)
    assert "wrote eval_results-2.json" in capsys.readouterr().out
    assert (checkpoint_and_data / "eval_results.json").read_text() == first
    assert (checkpoint_and_data / "eval_results-2.json").is_file()


# ---------------------------------------------------------------------------------------------
# 3. A refused resume changes nothing
# ---------------------------------------------------------------------------------------------

def test_a_resume_change_the_checkpoint_cannot_take_is_refused_before_anything_is_written(
        tmp_path, capsys):
    """--allow-changes --lora-rank 4 (or --freeze-vision-tower) used to rewrite config.json,
    then fail to load every checkpoint: the run then failed to resume for good."""
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    before = _tree(run)
    saved = (run / "config.json").read_text()
    for flags, reason in ((["--lora-rank", "4"], "it trained every weight: its checkpoints "
                                                 "hold no adapters"),
                          (["--freeze-vision-tower"], "its optimizer state covers the vision "
                                                      "tower too"),
                          (["--tiny-size", "small"], "the run started from another offline")):
        with pytest.raises(SystemExit):
            train.main(["--resume", str(run), "--steps", "2", "--allow-changes", *flags])
        err = " ".join(capsys.readouterr().err.split())
        assert "cannot be applied to the run's checkpoints" in err and reason in err, err
        assert (run / "config.json").read_text() == saved and _tree(run) == before
    train.main(["--resume", str(run), "--steps", "2"])              # the run goes on
    assert last_checkpoint(run).name == "checkpoint-000002"


def test_a_lora_runs_rank_cannot_change_on_resume(tmp_path, capsys):
    pytest.importorskip("peft")
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1", "--lora-rank", "2"))
    saved = (run / "config.json").read_text()
    for rank in ("0", "4"):
        with pytest.raises(SystemExit):
            config.parse_config(["--resume", str(run), "--steps", "2", "--allow-changes",
                                 "--lora-rank", rank])
        assert "its checkpoints hold LoRA adapters of rank 2" in capsys.readouterr().err
    assert (run / "config.json").read_text() == saved


def test_config_json_changes_only_after_the_resumed_checkpoint_loaded(tmp_path, monkeypatch):
    """A resume that fails while loading (here: every checkpoint damaged) leaves config.json
    and config_history.jsonl as they were."""
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    saved = (run / "config.json").read_text()
    (last_checkpoint(run) / "trainer_state.pt").write_bytes(b"damaged")
    with pytest.raises(SystemExit, match="cannot resume"):
        train.main(["--resume", str(run), "--steps", "2", "--allow-changes", "--lr", "2e-4"])
    assert (run / "config.json").read_text() == saved
    assert not (run / "config_history.jsonl").exists()


def test_resuming_with_a_model_of_another_family_is_refused_up_front(tmp_path, capsys):
    import model as qwen
    import toy
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    other, processor = toy.build_tiny_model(seed=0, size="tiny", family="qwen3-vl")
    other.save_pretrained(tmp_path / "qwen3")
    qwen.save_processor(processor, tmp_path / "qwen3")
    with pytest.raises(SystemExit):
        config.parse_config(["--resume", str(run), "--steps", "2", "--allow-changes",
                             "--model", str(tmp_path / "qwen3"), "--data", "x.jsonl"])
    err = " ".join(capsys.readouterr().err.split())
    assert "--model: '' -> " in err and "its checkpoints are qwen2_5_vl" in err
    assert "is qwen3_vl" in err


# ---------------------------------------------------------------------------------------------
# 4. No pickle from a run folder is unpickled with code: --fsdp's optimizer metadata
# ---------------------------------------------------------------------------------------------

def _sharded_state(folder: Path) -> dict:
    """A small optimizer state written by torch.distributed.checkpoint (one process)."""
    import warnings
    import torch
    import torch.distributed.checkpoint as dcp
    state = {"optimizer": {"state": {"w": {"exp_avg": torch.arange(3.0),
                                           "step": torch.tensor(2.0)}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"]}]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "assuming the intent is to save in one process"
        dcp.save(state, checkpoint_id=str(folder))
    return state


def test_sharded_optimizer_metadata_is_read_without_running_code(tmp_path):
    import pickle
    import warnings
    import torch
    import torch.distributed.checkpoint as dcp
    from test_safety import _payloads
    folder = tmp_path / "optimizer"
    state = _sharded_state(folder)
    template = {"optimizer": {"state": {"w": {"exp_avg": torch.zeros(3), "step": torch.tensor(0.)}},
                              "param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": ["w"]}]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=str(folder),
                 storage_reader=integrity.SafeCheckpointReader(folder))
    assert torch.equal(template["optimizer"]["state"]["w"]["exp_avg"],
                       state["optimizer"]["state"]["w"]["exp_avg"])         # it still loads
    for trick, payload in _payloads(tmp_path / "it-ran").items():
        (folder / ".metadata").write_bytes(pickle.dumps(payload))
        with pytest.raises(ValueError, match=r"\.metadata is not a checkpoint's metadata"):
            integrity.SafeCheckpointReader(folder).read_metadata()
        assert not (tmp_path / "it-ran").exists(), trick
    # the stock reader would have run it (then failed on what it returned): the payload is real
    with pytest.raises(AttributeError):
        dcp.FileSystemReader(folder).read_metadata()
    assert (tmp_path / "it-ran").exists()


@pytest.mark.slow
def test_resuming_an_fsdp_run_with_a_crafted_metadata_file_runs_nothing(tmp_path):
    """Two gloo processes with --fsdp, then --resume after `.metadata` of the sharded optimizer
    state was replaced by a pickle that creates a folder when unpickled."""
    import pickle
    import subprocess
    import sys
    from test_safety import _Payload
    from test_train import REPO
    marker = tmp_path / "it-ran"
    run = tmp_path / "run"

    def torchrun(port, args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                               "2", "--master_port", str(port), str(REPO / "train.py"), *args],
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)

    assert torchrun(29581, tiny_args(tmp_path, "--steps", "1", "--fsdp")).returncode == 0
    metadata = last_checkpoint(run) / "optimizer" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Payload(os.makedirs, str(marker))))
    done = torchrun(29582, ["--resume", str(run), "--steps", "2"])
    assert done.returncode != 0
    assert not marker.exists()
    assert "is not a checkpoint's metadata" in done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# 5. A checkpoint's weights and the run's data are verified on --resume
# ---------------------------------------------------------------------------------------------

def _edit_weights(checkpoint: Path, edit) -> None:
    from safetensors.torch import load_file, save_file
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_resume_refuses_weights_changed_after_the_checkpoint_was_written(tmp_path, capsys):
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    checkpoint = last_checkpoint(run)
    original = (checkpoint / "model.safetensors").read_bytes()

    def zero_one(tensors):                                     # zeroed in part
        name = sorted(tensors)[0]
        tensors[name][0].zero_()
    _edit_weights(checkpoint, zero_one)
    with pytest.raises(SystemExit, match=r"weights are not the ones the run saved:\n  .*"
                                         r"model\.safetensors: its bytes changed"):
        train.main(["--resume", str(run), "--steps", "2"])
    # swapped for another model's (a run with another seed: same shapes)
    other = tmp_path / "other"
    train.main(tiny_args(tmp_path, "--steps", "1", "--seed", "1", "--out", str(other)))
    (checkpoint / "model.safetensors").write_bytes(
        (last_checkpoint(other) / "model.safetensors").read_bytes())
    with pytest.raises(SystemExit, match="model.safetensors: its bytes changed"):
        train.main(["--resume", str(run), "--steps", "2"])
    (checkpoint / "model.safetensors").write_bytes(original)       # restored: it resumes
    train.main(["--resume", str(run), "--steps", "2"])
    assert last_checkpoint(run).name == "checkpoint-000002"


def test_resume_refuses_changed_training_data_unless_allowed_then_records_it(tmp_path, capsys):
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    record = integrity.read_fingerprint(last_checkpoint(run))
    train_file = next(p for p in record["data"] if "train" in p)
    rows = Path(train_file).read_text().splitlines(keepends=True)
    Path(train_file).write_text("".join(rows[1:] + rows[:1]))      # same rows, another order
    with pytest.raises(SystemExit, match=r"data the run trained on changed since its last "
                                         r"checkpoint:\n  .*train.*data\.jsonl: changed"):
        train.main(["--resume", str(run), "--steps", "2"])
    assert last_checkpoint(run).name == "checkpoint-000001"
    train.main(["--resume", str(run), "--steps", "2", "--allow-changes"])
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    changed = [h["data_changed"] for h in history if "data_changed" in h]
    assert len(changed) == 1 and list(changed[0]) == [train_file]
    assert changed[0][train_file].startswith("changed since the run trained on it (sha256")


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_it(tmp_path):
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    checkpoint = last_checkpoint(run)
    _edit_weights(checkpoint, lambda t: t[sorted(t)[0]].view(-1)[:3].fill_(float("nan")))
    (checkpoint / integrity.FINGERPRINT).unlink()          # as a checkpoint of an earlier version
    with pytest.raises(SystemExit, match=r"checkpoint .*checkpoint-000001 does not load "
                                         r"\(ValueError: .*holds non-finite weights \(3 NaN"):
        train.main(["--resume", str(run), "--steps", "2"])


# ---------------------------------------------------------------------------------------------
# 6. Late or unclear failures made early and named
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["load_datasets", "evaluate_heldout"])
def test_a_stop_signal_before_the_first_step_stops_the_run_at_once(tmp_path, monkeypatch,
                                                                    capsys, phase):
    """SIGTERM during the data check or the evaluation before RL used to wait for step 1 to
    finish (minutes on a real model, past the scheduler's grace period)."""
    import signal
    real = getattr(runtime, phase)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(runtime, phase, signalled)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tmp_path, "--steps", "3"))
    assert stop.value.code == 128 + signal.SIGTERM
    run = tmp_path / "run"
    assert not list(run.glob("checkpoint-*")) and not (run / "metrics.jsonl").exists()
    assert not (run / ".lock").exists()
    err = capsys.readouterr().err
    assert "stopped by SIGTERM before the first step" in err
    if phase == "load_datasets":           # nothing of the run was written yet
        # nothing of the run was written, and the folder it made first is gone again
        assert not run.exists() and "start it again with the same" in err


def test_yaml_duplicate_keys_tags_and_numbers(tmp_path, capsys):
    for text, message in (("steps: 3\nlr: 0.1\nsteps: 4\n", "steps given more than once"),
                          ("steps: !!python/object/apply:os.system [echo]\n",
                           "could not determine a constructor"),
                          ("steps: [3\n", "while parsing a flow sequence")):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(SystemExit):
            config.parse_config(["--config", str(tmp_path / "c.yaml")])
        err = " ".join(capsys.readouterr().err.split())
        assert f"--config {tmp_path / 'c.yaml'}: cannot read it" in err and message in err
        assert f'in "{tmp_path / "c.yaml"}", line' in err           # where in the file
    (tmp_path / "c.json").write_text('{"steps": 3, "steps": 4}')
    with pytest.raises(SystemExit):
        config.parse_config(["--config", str(tmp_path / "c.json")])
    assert "steps given more than once" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("lr: 1e-4\ngamma: 2E-2\n")     # YAML 1.1: strings
    cfg = config.parse_config(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.lr, cfg.gamma) == (1e-4, 0.02)


def test_resume_given_a_checkpoint_or_a_broken_latest_txt_and_an_empty_out(tmp_path, capsys):
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    with pytest.raises(SystemExit):
        config.parse_config(["--resume", str(run / "checkpoint-000001"), "--steps", "2"])
    assert f"give the run folder: --resume {run}" in " ".join(capsys.readouterr().err.split())
    (run / "latest.txt").write_text("\x00garbage\n")
    with pytest.raises(SystemExit, match=r"latest.txt holds '\\x00garbage', not the name of a "
                                         r"checkpoint folder there \(the newest is "
                                         r"checkpoint-000001\)"):
        config.check_config(config.parse_config(["--resume", str(run), "--steps", "2"]), 1)
    with pytest.raises(SystemExit, match="--out '': give a run folder"):
        config.check_config(config.parse_config(["--out", ""]), 1)


def test_eval_refuses_pickled_or_truncated_weights_naming_the_file(checkpoint_and_data, capsys,
                                                                   monkeypatch):
    import eval as evaluation
    import model as qwen
    import torch
    folder = checkpoint_and_data
    monkeypatch.chdir(folder)
    monkeypatch.setattr(qwen, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    weights = (folder / "ckpt" / "model.safetensors").read_bytes()
    (folder / "ckpt" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(SystemExit):
        evaluation.main(["--model", "ckpt", "--data", "q.jsonl"])
    assert f"ckpt/model.safetensors: truncated ({len(weights) // 2} of {len(weights)} bytes" \
        in capsys.readouterr().err
    (folder / "ckpt" / "model.safetensors").unlink()
    torch.save({}, folder / "ckpt" / "pytorch_model.bin")
    with pytest.raises(SystemExit):
        evaluation.main(["--model", "ckpt", "--data", "q.jsonl"])
    assert "ckpt/pytorch_model.bin: pickled weights" in capsys.readouterr().err
    # train.py refuses the same folder as --model before any work
    with pytest.raises(SystemExit, match=r"--model ckpt/pytorch_model.bin: pickled weights"):
        config.check_config(config.parse_config(["--model", "ckpt", "--data", "q.jsonl",
                                                 "--out", "r"]), 1)


def test_eval_given_a_run_folder_evaluates_its_latest_checkpoint(tmp_path, capsys, monkeypatch):
    import eval as evaluation
    run = tmp_path / "run"
    train.main(tiny_args(tmp_path, "--steps", "1"))
    info = json.loads((run / "run.json").read_text())
    monkeypatch.chdir(tmp_path)
    evaluation.main(["--model", str(run), "--data", info["eval_data"], "--samples", "1",
                     "--max-new-tokens", "2", "--mask-ratios", "--kl-ratio", "-1", "--limit", "1"])
    assert (f"is a run folder; evaluating its latest checkpoint, {run / 'checkpoint-000001'}"
            in capsys.readouterr().out)


def test_wandb_without_a_key_is_refused_before_the_run_folder_is_made(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))                # no credentials there
    with pytest.raises(SystemExit, match="--report-to wandb: no W&B API key"):
        train.main(tiny_args(tmp_path, "--report-to", "wandb"))
    assert not (tmp_path / "run").exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    config.check_config(config.parse_config(tiny_args(tmp_path, "--report-to", "wandb")), 1)
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    config.check_config(config.parse_config(tiny_args(tmp_path, "--report-to", "wandb")), 1)


def test_a_jsonl_file_named_in_capitals_loads_as_jsonl(checkpoint_and_data):
    import data
    (checkpoint_and_data / "TEST.JSONL").write_text((checkpoint_and_data / "q.jsonl").read_text())
    rows = data.load_dataset(checkpoint_and_data / "TEST.JSONL")
    assert len(rows) == 1 and rows[0].answer == "3"


def test_eval_refuses_a_model_with_non_finite_weights_naming_it(checkpoint_and_data, monkeypatch):
    import eval as evaluation
    monkeypatch.chdir(checkpoint_and_data)
    _edit_weights(checkpoint_and_data / "ckpt",
                  lambda t: t[sorted(t)[0]].view(-1)[:2].fill_(float("inf")))
    with pytest.raises(SystemExit, match=r"--model ckpt holds non-finite weights \(2 NaN/inf "
                                         r"values in "):
        evaluation.main(["--model", "ckpt", "--data", "q.jsonl", "--samples", "1",
                         "--max-new-tokens", "2", "--mask-ratios", "--kl-ratio", "-1"])
    assert not list(checkpoint_and_data.glob("eval_results*.json"))
