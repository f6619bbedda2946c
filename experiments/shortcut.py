"""The shortcut-world experiment: GRPO and PAPO recipes from the same warm starts, over seeds.

    python experiments/shortcut.py --out runs/shortcut                  # the design: 7 recipes x 5 seeds
    python experiments/shortcut.py --out runs/shortcut --recipes papo-g-gamma0.2-unguarded
    python experiments/shortcut.py --out runs/shortcut --recipes dapo --seeds 0 1   # a subset
    python experiments/shortcut.py --out runs/shortcut --summary-only   # just the table again
    python experiments/shortcut.py --out runs/dark --toy-canvas dark --jobs 1 \
        --results experiments/results/dark                   # the dark-canvas design, one at a time
    python experiments/shortcut.py --out runs/dark --toy-canvas dark --results experiments/results/dark \
        --summary-only --figure letter-share.png             # its tables and per-recipe panels

Every (recipe, seed) is one `train.py --toy-world shortcut` run in OUT/<recipe>-seed<S>; the runs
of one seed share its warm start (the cache folder keys it by seed), so the recipes differ only in
their objective. Runs go `--jobs` at a time with `--threads` torch threads each (two jobs of one
thread each on 2 cores: a second thread per job only spins, see docs/toy.md). A finished run
(final_eval.json present) is skipped, so an interrupted experiment continues where it stopped.

With --results DIR, each finished run's record (its before/after numbers, the held-out curve, the
training curve's key columns and the collapse watch's warnings: a few kB, no checkpoint) is
written to DIR/<recipe>-seed<S>.json, a folder kept in the repository; a run whose record is
there counts as finished even when OUT is gone, so the experiment can be resumed on another
machine, and the summary reads the records.

The summary reads each run's final_eval.json and metrics.jsonl (or its record) and writes OUT/summary.json (also
the curves, for notebook 04) and OUT/summary.md: per recipe the mean and spread over seeds of
every held-out number after RL, per PAPO recipe the paired difference from its baseline (GRPO;
DAPO for PAPO-D) seed by seed with a 95% t-interval (the same seed shares the warm start, data
order and sampling seeds, so the pairing removes the warm start's luck from the comparison), and
the collapsed seeds of each recipe by name. The design - recipes, outcomes, the collapse rule and
how the annealed variant is chosen - is written down in docs/results.md.
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
if str(ROOT) not in sys.path:   # the project's modules, for runtime.blind_warning
    sys.path.insert(0, str(ROOT))
import runtime  # noqa: E402

# name -> train.py flags. The baselines (GRPO, DAPO), the paper's PAPO-D, and PAPO-G at three
# gammas above the paper's 0.02 with the official safeguards on: each token's KL_prcp clamped to
# [0, 0.2] and only the top 20% of each rollout's tokens kept (docs/paper.md section 3b). The
# annealed variants decay gamma linearly to 0 over the first half of the run; only one of them
# runs, chosen from the finished PAPO-G runs by `annealed_recipe` (docs/results.md, the design).
SAFEGUARDS = ["--kl-prcp-clip", "0.2", "--kl-prcp-token-fraction", "0.2"]
GAMMAS = ("0.05", "0.1", "0.2")
RECIPES: dict[str, list[str]] = {
    "grpo": ["--preset", "grpo"],
    "dapo": ["--preset", "dapo"],
    "papo-d": ["--preset", "papo-d"],
    **{f"papo-g-gamma{g}": ["--preset", "papo-g", "--gamma", g, *SAFEGUARDS] for g in GAMMAS},
    **{f"papo-g-gamma{g}-anneal": ["--preset", "papo-g", "--gamma", g, *SAFEGUARDS,
                                   "--gamma-anneal"] for g in GAMMAS},
}
# The same gamma 0.2 without the safeguards: does the clip and token mask change the outcome at
# one gamma (paired by seed with papo-g-gamma0.2)? Run after the design's seven, by name.
RECIPES["papo-g-gamma0.2-unguarded"] = ["--preset", "papo-g", "--gamma", "0.2"]
FIXED_RECIPES = ["grpo", "dapo", "papo-d", *(f"papo-g-gamma{g}" for g in GAMMAS)]
# The dark-canvas design (docs/results.md): the six fixed recipes and the unguarded gamma 0.2,
# no annealed variant.
DARK_RECIPES = [*FIXED_RECIPES, "papo-g-gamma0.2-unguarded"]
# 100 RL steps (the plain world's default is 150), scored at steps 50 and 100 (and before RL) on
# 128 questions x 4 samples of each held-out split. How often the held-out sets are scored does
# not change the training trajectory (tests/test_train.py), only how finely the curves are drawn.
# The warm start's settings are written out, not left to train.py's defaults: the recorded runs
# were made from these warm starts, and a later change of the defaults must not change them.
COMMON = ["--toy-world", "shortcut", "--steps", "100", "--eval-every", "50", "--eval-size", "128",
          "--warm-start-steps", "3000", "--warm-start-lr", "1e-3", "--warm-start-batch", "32",
          "--warm-start-target-acc", "0.45", "--warm-start-probe-every", "25",
          "--warm-start-beta2", "0.999"]

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


def record_path(results: Path | None, recipe: str, seed: int) -> Path | None:
    return results / f"{recipe}-seed{seed}.json" if results else None


def finished(out: Path, results: Path | None, recipe: str, seed: int) -> bool:
    record = record_path(results, recipe, seed)
    return ((run_folder(out, recipe, seed) / "final_eval.json").is_file()
            or (record is not None and record.is_file()))


# The training-curve columns a record keeps (metrics.jsonl holds many more): what the analysis
# of the collapse and of the clamp needs.
RECORD_KEYS = ("reward", "accuracy", "format", "kl_prcp", "kl_prcp_clipped", "entropy_orig",
               "entropy_mask", "response_length")


def write_record(out: Path, results: Path, recipe: str, seed: int) -> None:
    """DIR/<recipe>-seed<S>.json: what the summary and the analysis need of one finished run."""
    folder = run_folder(out, recipe, seed)
    final = json.loads((folder / "final_eval.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    curve = [{k: v for k, v in row.items() if k == "step" or k.startswith("eval_")}
             for row in rows if any(k.startswith("eval_") for k in row)]
    train = [{k: (round(row[k], 5) if isinstance(row[k], float) else row[k])
              for k in ("step", *RECORD_KEYS) if k in row} for row in rows]
    log = out / "logs" / f"{recipe}-seed{seed}.log"
    warnings = [line.strip() for line in (log.read_text(errors="replace").splitlines()
                                         if log.is_file() else []) if "WARNING" in line]
    record = {"recipe": recipe, "seed": seed, "flags": RECIPES[recipe],
              "before": final["before"], "after": final["after"], "curve": curve,
              "train": train, "warnings": warnings}
    results.mkdir(parents=True, exist_ok=True)
    tmp = record_path(results, recipe, seed).with_suffix(".tmp")
    # readable and small: one line per key, and per row of the curves
    text = ",\n".join(f"{json.dumps(k)}: " + (
        "[\n" + ",\n".join(json.dumps(row) for row in v) + "\n]" if k in ("curve", "train")
        else json.dumps(v)) for k, v in record.items())
    tmp.write_text("{\n" + text + "\n}\n")
    tmp.rename(record_path(results, recipe, seed))


def train_command(out: Path, recipe: str, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *COMMON, *RECIPES[recipe], "--seed", str(seed),
            "--cache", str(out / "cache"), "--out", str(run_folder(out, recipe, seed)), *extra]


def run(cmd: list[str], log: Path, threads: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def run_all(out: Path, seeds: list[int], recipes: list[str], jobs: int, threads: int,
            extra: list[str], results: Path | None = None) -> None:
    for r, s in ((r, s) for s in seeds for r in recipes):   # a record lost to an interruption
        record = record_path(results, r, s)
        if (record is not None and not record.is_file()
                and (run_folder(out, r, s) / "final_eval.json").is_file()):
            write_record(out, results, r, s)
    # seed-major: with one job at a time, complete seeds accumulate
    todo = [(r, s) for s in seeds for r in recipes if not finished(out, results, r, s)]
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
    if jobs == 1:   # nothing runs side by side: each seed's warm start is built by its first run
        for job in todo:
            step(out, *job, threads, extra, results)
        return
    first = {}
    for r, s in todo:
        first.setdefault(s, (r, s))
    rest = [job for job in todo if job not in first.values()]
    for batch in (list(first.values()), rest):
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda job: step(out, *job, threads, extra, results), batch))


def step(out: Path, recipe: str, seed: int, threads: int, extra: list[str],
         results: Path | None = None) -> None:
    folder = run_folder(out, recipe, seed)
    if finished(out, results, recipe, seed):
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
    if results is not None and (folder / "final_eval.json").is_file():
        write_record(out, results, recipe, seed)


def load_runs(out: Path, recipes: list[str], seeds: list[int], results: Path | None = None
              ) -> dict:
    """recipe -> seed -> {"before", "after", "curve"} for the finished runs (from their records
    in `results` where there are any)."""
    runs: dict = {}
    for r in recipes:
        for s in seeds:
            folder = run_folder(out, r, s)
            record = record_path(results, r, s)
            if record is not None and record.is_file():
                rec = json.loads(record.read_text())
                runs.setdefault(r, {})[s] = {k: rec[k] for k in ("before", "after", "curve")}
                continue
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
    # what the objective did: each recipe against its baseline from the same warm start
    paired_lines = ["", "Paired difference from the recipe's baseline (same seed), mean [95% "
                    "t-interval]:", "", header[0].replace("| recipe |", "| recipe - baseline |"),
                    header[1]]
    for r, seeds in runs.items():
        b = baseline_of(r)
        base = {s: v["after"] for s, v in runs.get(b, {}).items()}
        common = sorted(set(seeds) & set(base))
        if b is None or not common:
            continue
        row, cells = _paired({s: seeds[s]["after"] for s in common}, base)
        summary["paired"][r] = {"baseline": b, **row}
        paired_lines.append(f"| {r} - {b} | {len(common)} | " + " | ".join(cells) + " |")
    # collapses, seed by seed (a band over seeds would hide a split outcome)
    collapse_lines = ["", "Collapsed seeds (held-out accuracy after RL below half the warm "
                      "start's, or format rate below 0.5):", ""]
    for r, seeds in runs.items():
        hit = [s for s, v in sorted(seeds.items()) if collapsed(v["before"], v["after"])]
        summary["recipes"][r]["collapsed"] = hit
        collapse_lines.append(f"- {r}: {len(hit)} of {len(seeds)}"
                              + (f" (seed {', '.join(map(str, hit))})" if hit else ""))
    # warm starts that do not read the picture: the perception term is silent on their seeds
    by_seed = {s: v["before"] for rec in runs.values() for s, v in rec.items()}
    blind = sorted(s for s, b in by_seed.items() if runtime.blind_warning(b))
    summary["blind_warm_starts"] = blind
    blind_lines = ["", "Warm starts that do not use the picture (held-out accuracy the same under "
                   "every mask, KL_prcp ~0: the perception term has nothing to work with): "
                   + (f"seed {', '.join(map(str, blind))}" if blind else "none") + "."]
    return summary, "\n".join(lines + change_lines + paired_lines + collapse_lines
                              + blind_lines) + "\n"


def without_collapsed(runs: dict) -> dict:
    """The runs with every collapsed (recipe, seed) left out: the dark design's means and paired
    differences (a policy that answers nothing scores 0 on the letter's share, which would read
    as "follows the letter less"). The collapsed seeds are listed by summarise on the full runs."""
    kept = {r: {s: v for s, v in seeds.items() if not collapsed(v["before"], v["after"])}
            for r, seeds in runs.items()}
    return {r: seeds for r, seeds in kept.items() if seeds}


def baseline_of(recipe: str) -> str | None:
    """Each PAPO recipe is compared with the baseline it adds to: PAPO-D with DAPO, PAPO-G with
    GRPO. The baselines themselves are not paired."""
    if recipe.startswith("papo-d"):
        return "dapo"
    if recipe == "papo-g-gamma0.2-unguarded":
        return "papo-g-gamma0.2"
    return "grpo" if recipe.startswith("papo") else None


def collapsed(before: dict, after: dict) -> bool:
    """The design's collapse rule (docs/results.md): RL lost more than half the warm start's
    held-out accuracy, or most answers lost the format."""
    return after["accuracy"] < 0.5 * before["accuracy"] or after.get("format", 1.0) < 0.5


def annealed_recipe(runs: dict, seeds: list[int]) -> str | None:
    """The design's choice of the one annealed variant: the largest gamma whose PAPO-G runs
    finished on every seed without a collapse; if every gamma collapsed somewhere, the one with
    the fewest collapsed seeds (the smaller gamma on a tie). None until all those runs finished."""
    counts = {}
    for g in GAMMAS:
        done = runs.get(f"papo-g-gamma{g}", {})
        if set(seeds) - set(done):
            return None
        counts[g] = sum(collapsed(done[s]["before"], done[s]["after"]) for s in seeds)
    clean = [g for g in GAMMAS if counts[g] == 0]
    gamma = max(clean, key=float) if clean else min(GAMMAS, key=lambda g: (counts[g], float(g)))
    return f"papo-g-gamma{gamma}-anneal"


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


# The figure notebook 04 draws per canvas: one small panel per compared recipe, its baseline in
# the same panel, drawn LAST (on top) and named in the legend, each seed a thin line, collapsed
# seeds marked and left out of the recipe's mean line.
PANEL_KEYS = {"conflict_decoy_rate": "conflict: letter's share",
              "conflict_accuracy": "conflict accuracy", "accuracy": "held-out accuracy"}


def eval_curve(run: dict, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one run's held-out `key`: step 0 is the warm start, then every
    logged evaluation (metrics.jsonl's eval_<key>)."""
    points = [(0, run["before"][key])] if key in run["before"] else []
    points += [(row["step"], row[f"eval_{key}"]) for row in run["curve"] if f"eval_{key}" in row]
    return [p[0] for p in points], [p[1] for p in points]


def plot_panels(runs: dict, key: str = "conflict_decoy_rate", title: str = "", path=None):
    """One panel per recipe that has a baseline (baseline_of), in RECIPES' order. Returns the
    figure (and saves it to `path` when given)."""
    import matplotlib.pyplot as plt
    compared = [r for r in RECIPES if r in runs and baseline_of(r) in runs]
    cols = min(3, max(1, len(compared)))
    rows = max(1, -(-len(compared) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False,
                             sharey=True)
    for ax, recipe in zip(axes.flat, compared):
        base = baseline_of(recipe)
        # Both means run over the same seeds - those that both have and neither collapsed - so
        # the two thick lines are paired like the table's differences (a mean over other seeds
        # would start elsewhere at step 0, from other warm starts).
        kept = {s for s in set(runs[recipe]) & set(runs[base])
                if not any(collapsed(runs[n][s]["before"], runs[n][s]["after"])
                           for n in (recipe, base))}
        # the recipe first, the baseline last: drawn on top, so it is never hidden
        for name, colour in ((recipe, "tab:red"), (base, "black")):
            means = []
            for seed, run in sorted(runs[name].items()):
                steps, values = eval_curve(run, key)
                bad = collapsed(run["before"], run["after"])
                ax.plot(steps, values, ":" if bad else "-", color=colour, lw=0.8, alpha=0.55,
                        marker="x" if bad else None)
                if bad:
                    ax.annotate(f"seed {seed} collapsed", (steps[-1], values[-1]), fontsize=7,
                                color=colour, xytext=(-60, 6), textcoords="offset points")
                elif steps and seed in kept:
                    means.append(dict(zip(steps, values)))
            common = sorted(set.intersection(*(set(m) for m in means))) if means else []
            if common:
                dropped = sorted(set(runs[name]) - kept)
                ax.plot(common, [np.mean([m[s] for m in means]) for s in common], "-o",
                        color=colour, lw=2.2, ms=4,
                        label=f"{name}: mean of {len(means)} seed(s)"
                              + (f", without seed {', '.join(map(str, dropped))}" if dropped else ""))
        ax.set_title(f"{recipe} vs {base}", fontsize=9)
        ax.set_xlabel("RL step (0 = warm start)")
        ax.set_ylabel(PANEL_KEYS.get(key, key))
        ax.grid(alpha=0.3)
        # below the panel, not inside it: inside, it covers whichever seed runs along its corner
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    for ax in list(axes.flat)[len(compared):]:
        ax.axis("off")
    import textwrap
    fig.suptitle(textwrap.fill(title or f"{PANEL_KEYS.get(key, key)}: thin = each seed, thick = "
                                        "mean over the seeds on which neither collapsed, dotted x = "
                                        "collapsed seed", 50 * cols), fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Folder of the runs and the summary.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES),
                   help="Only these (default: the design's six fixed recipes, then the annealed "
                        "variant that `annealed_recipe` picks from their results).")
    p.add_argument("--jobs", type=int, default=2, help="Runs at a time.")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    p.add_argument("--summary-only", action="store_true", help="Do not train; summarise.")
    p.add_argument("--toy-canvas", choices=["light", "dark"], default="light",
                   help="The toy pictures' background (train.py --toy-canvas). dark: the "
                        "dark-canvas design's recipes (DARK_RECIPES) unless --recipes is given.")
    p.add_argument("--figure", default="",
                   help="Also draw the letter's share per recipe against its baseline to this PNG.")
    p.add_argument("--results", default="",
                   help="Folder for each finished run's record (kept in the repository; a run "
                        "with a record there is not run again).")
    args, extra = p.parse_known_args(argv)   # anything else goes to every train.py run
    out = Path(args.out).resolve()
    results = Path(args.results).resolve() if args.results else None
    dark = args.toy_canvas == "dark"
    if dark:
        extra = ["--toy-canvas", "dark", *extra]
    recipes = args.recipes or (DARK_RECIPES if dark else FIXED_RECIPES)
    if not args.summary_only:
        run_all(out, args.seeds, recipes, args.jobs, args.threads, extra, results)
    if not args.recipes and not dark:   # the light design's last run: the annealed variant
        chosen = annealed_recipe(load_runs(out, FIXED_RECIPES, args.seeds, results), args.seeds)
        if chosen is None:
            print("the annealed variant waits for every seed of the PAPO-G runs", flush=True)
        else:
            print(f"annealed variant (docs/results.md's rule): {chosen}", flush=True)
            recipes = recipes + [chosen]
            if not args.summary_only:
                run_all(out, args.seeds, [chosen], args.jobs, args.threads, extra, results)
    runs = load_runs(out, recipes, args.seeds, results)
    if not runs:
        raise SystemExit(f"no finished runs under {out}" + (f" or {results}" if results else ""))
    summary, table = summarise(runs)
    if dark:   # the design's reading: collapsed seeds apart, out of the means (docs/results.md)
        summary_kept, table_kept = summarise(without_collapsed(runs))
        table_kept = table_kept.split("\nCollapsed seeds (")[0]   # its "0 of N" would mislead
        summary = {"without_collapsed": summary_kept, "all": summary}
        table = ("Collapsed seeds left out of every mean and paired difference:\n\n" + table_kept
                 + "\nEvery finished seed, collapsed ones included:\n\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(table)
    if results is not None:   # the table travels with the records
        (results / "summary.md").write_text(table)
    if args.figure:
        plot_panels(runs, title=f"{args.toy_canvas} canvas: the conflict split's letter share, "
                                "each recipe against its baseline", path=args.figure)
    print(table)


if __name__ == "__main__":
    main()
