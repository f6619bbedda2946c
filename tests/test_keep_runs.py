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
import runtime
import train
from test_train import last_checkpoint, tiny_args


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
