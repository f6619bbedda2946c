"""The shortcut-world experiment: GRPO and PAPO recipes from the same warm starts, over seeds.

    python experiments/shortcut.py --out runs/shortcut                  # 5 seeds x 4 recipes
    python experiments/shortcut.py --out runs/shortcut --recipes papo-g-gamma0.2-entropy
    python experiments/shortcut.py --out runs/shortcut --summary-only   # just the table again

Every (recipe, seed) is one `train.py --toy-world shortcut` run in OUT/<recipe>-seed<S>; the runs
of one seed share its warm start (the cache folder keys it by seed), so the recipes differ only in
their objective. Runs go `--jobs` at a time with `--threads` torch threads each (two jobs of one
thread each on 2 cores: a second thread per job only spins, see docs/toy.md). A finished run
(final_eval.json present) is skipped, so an interrupted experiment continues where it stopped.

The summary reads each run's final_eval.json and metrics.jsonl and writes OUT/summary.json (also
the curves, for notebook 04) and OUT/summary.md: per recipe the mean and spread over seeds of
every held-out number after RL, and per PAPO recipe the paired difference from GRPO seed by seed
with a 95% t-interval (the same seed shares the warm start, data order and sampling seeds, so the
pairing removes the warm start's luck from the comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name -> train.py flags. PAPO-G at the paper's gamma and at 10x it (is 0.02 simply too weak for a
# model this small?); PAPO-D (DAPO + gamma 0.01 + the Double Entropy Loss); and 10x gamma with the
# Double Entropy Loss at PAPO-D's weights, the paper's remedy for the collapse large gammas cause.
RECIPES: dict[str, list[str]] = {
    "grpo": ["--preset", "grpo"],
    "papo-g": ["--preset", "papo-g"],
    "papo-g-gamma0.2": ["--preset", "papo-g", "--gamma", "0.2"],
    "papo-d": ["--preset", "papo-d"],
    "papo-g-gamma0.2-entropy": ["--preset", "papo-g", "--gamma", "0.2", "--eta-orig", "0.03",
                                "--eta-mask", "0.03"],
}
DEFAULT_RECIPES = ["grpo", "papo-g", "papo-g-gamma0.2", "papo-d"]   # docs/results.md's table
BASELINE = "grpo"
# 100 RL steps (the plain world's default is 150), scored at steps 50 and 100 (and before RL) on
# 128 questions x 4 samples of each held-out split. How often the held-out sets are scored does
# not change the training trajectory (tests/test_train.py), only how finely the curves are drawn.
COMMON = ["--toy-world", "shortcut", "--steps", "100", "--eval-every", "50", "--eval-size", "128"]

# (label, key in final_eval.json "after"): the columns of the table
COLUMNS = [("held-out acc", "accuracy"), ("masked 0.6", "accuracy_mask0.6"),
           ("masked 1.0", "accuracy_mask1.0"), ("KL_prcp", "kl_prcp"),
           ("conflict acc", "conflict_accuracy"), ("conflict masked 1.0", "conflict_accuracy_mask1.0"),
           ("conflict: letter's answer", "conflict_decoy_rate"), ("conflict KL_prcp", "conflict_kl_prcp")]

# two-sided 95% quantiles of Student's t, by degrees of freedom (numpy has no t distribution)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    return T975.get(df) or T975[max(k for k in T975 if k <= df)]


def interval(values) -> tuple[float, float, float]:
    """Mean and its 95% t-interval."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        raise ValueError("a 95% interval needs at least two values")
    half = t975(len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def run_folder(out: Path, recipe: str, seed: int) -> Path:
    return out / f"{recipe}-seed{seed}"


def train_command(out: Path, recipe: str, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *COMMON, *RECIPES[recipe], "--seed", str(seed),
            "--cache", str(out / "cache"), "--out", str(run_folder(out, recipe, seed)), *extra]


def run(cmd: list[str], log: Path, threads: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def run_all(out: Path, seeds: list[int], recipes: list[str], jobs: int, threads: int,
            extra: list[str]) -> None:
    todo = [(r, s) for s in seeds for r in recipes
            if not (run_folder(out, r, s) / "final_eval.json").is_file()]
    if not todo:
        return
    # The toy splits and each seed's warm start are cached; two runs must not build the same one
    # at once. So the splits are written first (they are the same for every seed), then the first
    # run of every seed goes (seeds in parallel), then the rest.
    r, s = todo[0]
    build = [sys.executable, "-c", "import sys, config, toy; toy.prepare_toy_data("
             "config.parse_config(sys.argv[1:]))",
             *train_command(out, r, s, extra)[2:]]
    if run(build, out / "logs" / "toy-data.log", threads):
        raise SystemExit(f"building the toy splits failed: see {out / 'logs' / 'toy-data.log'}")
    first = {}
    for r, s in todo:
        first.setdefault(s, (r, s))
    rest = [job for job in todo if job not in first.values()]
    for batch in (list(first.values()), rest):
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda job: step(out, *job, threads, extra), batch))


def step(out: Path, recipe: str, seed: int, threads: int, extra: list[str]) -> None:
    folder = run_folder(out, recipe, seed)
    if (folder / "final_eval.json").is_file():
        return
    start = time.time()
    if (folder / "latest.txt").is_file():   # interrupted: continue with its own saved settings
        cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(folder), *extra]
    else:                                    # never started, or stopped before a checkpoint
        cmd = train_command(out, recipe, seed, extra) + ["--overwrite"]
    log = out / "logs" / f"{recipe}-seed{seed}.log"
    rc = run(cmd, log, threads)
    print(f"{recipe} seed {seed}: exit {rc} after {(time.time() - start) / 60:.1f} min"
          + (f" - FAILED, see {log}" if rc else ""), flush=True)


def load_runs(out: Path, recipes: list[str], seeds: list[int]) -> dict:
    """recipe -> seed -> {"before", "after", "curve"} for the finished runs."""
    runs: dict = {}
    for r in recipes:
        for s in seeds:
            folder = run_folder(out, r, s)
            if not (folder / "final_eval.json").is_file():
                continue
            final = json.loads((folder / "final_eval.json").read_text())
            curve = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
                     if line.strip()]
            curve = [{k: v for k, v in row.items() if k == "step" or k.startswith("eval_")}
                     for row in curve if any(k.startswith("eval_") for k in row)]
            runs.setdefault(r, {})[s] = {"before": final["before"], "after": final["after"],
                                         "curve": curve}
    return runs


def summarise(runs: dict) -> tuple[dict, str]:
    summary = {"columns": dict(COLUMNS), "recipes": {}, "paired": {}}
    lines = ["| recipe | seeds | " + " | ".join(label for label, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    starts = [seed["before"] for rec in runs.values() for seed in rec.values()]
    if starts:   # the warm starts (identical across recipes of a seed): one row, seeds pooled
        by_seed = {s: v["before"] for rec in runs.values() for s, v in rec.items()}
        cells = [_mean_sd([b[k] for b in by_seed.values() if k in b]) for _, k in COLUMNS]
        lines.append(f"| before RL (warm start) | {len(by_seed)} | " + " | ".join(cells) + " |")
    for r, seeds in runs.items():
        after = [v["after"] for v in seeds.values()]
        summary["recipes"][r] = {k: [a.get(k) for a in after] for _, k in COLUMNS}
        summary["recipes"][r]["seeds"] = list(seeds)
        summary["recipes"][r]["curves"] = {s: v["curve"] for s, v in seeds.items()}
        cells = [_mean_sd([a[k] for a in after if k in a]) for _, k in COLUMNS]
        lines.append(f"| {r} | {len(seeds)} | " + " | ".join(cells) + " |")
    header = ["| recipe | seeds | " + " | ".join(label for label, _ in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 2) + "|"]
    # what RL did: each recipe's change from its own warm start, seed by seed
    change_lines = ["", "Change from the warm start (same seed), mean [95% t-interval]:", "", *header]
    for r, seeds in runs.items():
        row, cells = _paired({s: v["after"] for s, v in seeds.items()},
                             {s: v["before"] for s, v in seeds.items()})
        summary.setdefault("change", {})[r] = row
        change_lines.append(f"| {r} | {len(seeds)} | " + " | ".join(cells) + " |")
    # what the objective did: each recipe against the baseline from the same warm start
    base = {s: v["after"] for s, v in runs.get(BASELINE, {}).items()}
    paired_lines = ["", f"Paired difference from {BASELINE} (same seed), mean [95% t-interval]:",
                    "", *header]
    for r, seeds in runs.items():
        common = sorted(set(seeds) & set(base))
        if r == BASELINE or not common:
            continue
        row, cells = _paired({s: seeds[s]["after"] for s in common}, base)
        summary["paired"][r] = row
        paired_lines.append(f"| {r} | {len(common)} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines + change_lines + paired_lines) + "\n"


def _paired(new: dict, old: dict) -> tuple[dict, list[str]]:
    """Per column, new - old over the seeds both have: the mean, its 95% interval, each seed."""
    row, cells = {}, []
    for _, k in COLUMNS:
        diffs = [new[s][k] - old[s][k] for s in sorted(new)
                 if s in old and k in new[s] and k in old[s]]
        if len(diffs) > 1:
            m, lo, hi = interval(diffs)
            row[k] = {"mean": m, "low": lo, "high": hi, "per_seed": diffs}
            cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        elif diffs:   # one seed: a difference, but no interval
            row[k] = {"mean": diffs[0], "low": None, "high": None, "per_seed": diffs}
            cells.append(f"{diffs[0]:+.3f} [one seed]")
        else:
            cells.append("-")
    return row, cells


def _mean_sd(values) -> str:
    if not values:
        return "-"
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Folder of the runs and the summary.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=list(RECIPES))
    p.add_argument("--jobs", type=int, default=2, help="Runs at a time.")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    p.add_argument("--summary-only", action="store_true", help="Do not train; summarise.")
    args, extra = p.parse_known_args(argv)   # anything else goes to every train.py run
    out = Path(args.out).resolve()
    if not args.summary_only:
        run_all(out, args.seeds, args.recipes, args.jobs, args.threads, extra)
    runs = load_runs(out, args.recipes, args.seeds)
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    summary, table = summarise(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
