"""Experiment trackers (--report-to): TensorBoard, Weights & Biases, trackio.

metrics.jsonl stays the run's record (the notebooks and tests read it); a tracker receives the
same rows - every step's metrics, each held-out evaluation (before RL at step 0, then every
--eval-every steps and at the end) - and every --sample-every steps a few completions with the
picture the policy saw, its masked copy and their rewards. Each tracker is an optional install
(`pip install tensorboard | wandb | trackio`); config.check_config refuses a missing one before
any work, with that command. Only rank 0 reports.

    tensorboard   event files in RUN/tensorboard (tensorboard --logdir RUN/tensorboard)
    wandb         a wandb run in RUN/wandb; WANDB_MODE=offline keeps it on the disk (wandb sync)
    trackio       a local-first dashboard (trackio show), its data in TRACKIO_DIR or trackio's
                  default folder
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _scalars(row: dict) -> dict[str, float]:
    """The numeric, finite entries of a metrics row (step itself excluded)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoard:
    def __init__(self, run: Path, config: dict, name: str, project: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, row: dict, step: int) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, step)

    def log_samples(self, samples: list[dict], step: int) -> None:
        for i, s in enumerate(samples):
            self.writer.add_text(f"samples/{i}", f"reward {s['reward']:.2f} (accuracy "
                                 f"{s['accuracy']:.0f}): {s['text']}", step)
            for kind in ("picture", "masked_picture"):
                if s.get(kind) is not None:
                    self.writer.add_image(f"samples/{i}/{kind}", np.asarray(s[kind]), step,
                                          dataformats="HWC")

    def finish(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run: Path, config: dict, name: str, project: str):
        import wandb
        self.wandb = wandb
        (run / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=str(run), config=config,
                              id=_run_id(run, "wandb"), resume="allow")

    def log(self, row: dict, step: int) -> None:
        self.run.log(_scalars(row), step=step)

    def log_samples(self, samples: list[dict], step: int) -> None:
        image = lambda p: None if p is None else self.wandb.Image(p)
        table = self.wandb.Table(columns=["picture", "masked picture", "response", "reward",
                                          "accuracy"],
                                 data=[[image(s.get("picture")), image(s.get("masked_picture")),
                                        s["text"], s["reward"], s["accuracy"]] for s in samples])
        self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, run: Path, config: dict, name: str, project: str):
        import trackio
        self.trackio = trackio
        trackio.init(project=project, name=name, config=config, resume="allow",
                     auto_log_cpu=False)

    def log(self, row: dict, step: int) -> None:
        self.trackio.log(_scalars(row), step=step)

    def log_samples(self, samples: list[dict], step: int) -> None:
        logged = {}
        for i, s in enumerate(samples):
            for kind in ("picture", "masked_picture"):
                if s.get(kind) is not None:
                    logged[f"samples/{i}/{kind}"] = self.trackio.Image(
                        s[kind], caption=f"reward {s['reward']:.2f}: {s['text'][:200]}")
        if logged:
            self.trackio.log(logged, step=step)

    def finish(self) -> None:
        self.trackio.finish()


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


def _run_id(run: Path, tracker: str) -> str:
    """A tracker run id kept in the run folder, so that --resume continues the same tracker run."""
    path = run / f".{tracker}_id"
    if not path.is_file():
        import uuid
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


class Trackers:
    """Every tracker of --report-to at once (none: this does nothing)."""

    def __init__(self, names: str, run: Path, config: dict, project: str):
        chosen = [n for n in dict.fromkeys(names.split(",")) if n and n != "none"]
        self.backends = [BACKENDS[n](run, config, run.resolve().name, project) for n in chosen]

    def log(self, row: dict, step: int) -> None:
        for backend in self.backends:
            backend.log(row, step)

    def log_samples(self, samples: list[dict], step: int) -> None:
        for backend in self.backends:
            backend.log_samples(samples, step)

    def finish(self) -> None:
        for backend in self.backends:
            backend.finish()
