"""Evaluate Qwen2.5-VL / Qwen3-VL policies with the paper's protocol, on any data or its suite.

    python eval.py                                    # the checkpoint train.py wrote last
    python eval.py --model runs/papo/checkpoint-000150 --data test.jsonl
    python eval.py --model runs/grpo/... --model runs/papo/... --data a.parquet --data b.json
    python eval.py --suite suite/ --model runs/grpo/... --model runs/papo/...   # Table 1
    python eval.py --mean-of runs/exp-eval-seed0.json runs/exp-eval-seed1.json ...   # over seeds

Protocol (docs/paper.md section 7): k = 8 samples per question at temperature 1.0, top_p 1.0,
top_k 50, pictures resized into [1,024, 589,824] pixels; the score is avg@k, the mean accuracy
over all k * n samples. Also reported per dataset: pass@k (a question counts if any of its k
samples is right), the format rate, the mean response length, and - outside --suite - avg@k with
the image masked at ratio 0.6 and 1.0 (how much the answers depend on seeing the picture) and
the mean per-token KL_prcp between the original-image and masked-image policies on the model's
own rollouts (how differently the policy behaves when it cannot see).

--suite DIR scores the nine benchmark files of the paper's evaluation suite (ShareGPT JSON, see
SUITE) and prints Table 1: avg@k per benchmark, the General / Vision-dependent / Overall
averages, and each later model's relative gain over the first as the paper computes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import custom_reward
import data
import imaging
import integrity
import model as qwen
import papo
import rewards


def pass_at_k(correct: np.ndarray) -> float:
    """correct: [n_questions, k] of 0/1 -> fraction of questions with at least one correct sample.

    Example: [[1, 0], [0, 0]] -> 0.5."""
    return float((correct.max(axis=1) > 0).mean()) if correct.size else 0.0


def avg_at_k(correct: np.ndarray) -> float:
    """Mean accuracy over every sample of every question. Example: [[1, 0], [0, 0]] -> 0.25."""
    return float(correct.mean()) if correct.size else 0.0


@torch.no_grad()
def evaluate(policy, processor, examples, *, samples: int = 8, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 2048,
             batch_size: int = 16, mask_ratios=(0.6, 1.0), kl_ratio: float | None = None,
             seed: int = 0, progress: bool = False, template: str | None = None,
             min_pixels: int | None = None, max_pixels: int | None = None,
             decoys: list[str | None] | None = None, user_reward=None,
             split_over_ranks: bool = False) -> dict:
    """Score `policy` on `examples` (a sequence of data.Example); see the module docstring for
    the metrics.

    batch_size counts questions per `generate` call (each with `samples` rollouts).
    kl_ratio: mask ratio for the KL_prcp measurement (None: skip it).
    template, min_pixels, max_pixels: how rows become prompts (data.Example.to_prompt); the
    masks are applied to the raw pictures and the pixel budget after them, as in training.
    decoys: per example, a WRONG answer a shortcut would give (or None); reports "decoy_rate",
    the share of samples with the original picture that give it, over the examples that have one.
    user_reward: a custom_reward.UserReward (--reward) instead of the built-in math reward.
    split_over_ranks: under torchrun, each rank scores every world-th batch of questions and the
    ranks gather their results: the same numbers as one process (each batch keeps its own
    sampling seeds, and the parts are added up in batch order), in 1/world of the time."""
    if not examples:
        raise ValueError("evaluate: no examples")
    rank, world = ((dist.get_rank(), dist.get_world_size())
                   if split_over_ranks and dist.is_initialized() else (0, 1))
    starts = range(0, len(examples), batch_size)
    mine = [_score_batch(policy, processor, examples, start, samples=samples,
                         temperature=temperature, top_p=top_p, top_k=top_k,
                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                         mask_ratios=mask_ratios, kl_ratio=kl_ratio, seed=seed, template=template,
                         min_pixels=min_pixels, max_pixels=max_pixels, decoys=decoys,
                         user_reward=user_reward)
            for start in tqdm(starts[rank::world], desc="eval", disable=not progress, leave=False)]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        mine = [part for parts in everyone for part in parts]
    parts = sorted(mine, key=lambda part: part["start"])         # batch order, as one process
    c = np.concatenate([p["correct"][None] for p in parts])
    fmt = [x for p in parts for x in p["format"]]
    lengths = [x for p in parts for x in p["lengths"]]
    decoyed = [x for p in parts for x in p["decoyed"]]
    out = {"n": len(examples), "samples": samples, "accuracy": avg_at_k(c),
           f"pass@{samples}": pass_at_k(c), "format": float(np.mean(fmt)),
           "response_length": float(np.mean(lengths))}
    for ratio in mask_ratios:
        out[f"accuracy_mask{ratio}"] = avg_at_k(np.concatenate([p["correct"][ratio]
                                                                for p in parts]))
    if kl_ratio is not None:
        kl_sum = kl_tokens = 0.0
        for p in parts:                        # the running sums of one process, in its order
            kl_sum += p["kl_sum"]
            kl_tokens += p["kl_tokens"]
        out["kl_prcp"] = kl_sum / max(kl_tokens, 1.0)
    if decoyed:
        out["decoy_rate"] = float(np.mean(decoyed))
    return out


def _score_batch(policy, processor, examples, start: int, *, samples, temperature, top_p,
                 top_k, max_new_tokens, batch_size, mask_ratios, kl_ratio, seed, template,
                 min_pixels, max_pixels, decoys, user_reward) -> dict:
    """One batch of questions, examples[start:start + batch_size]: its correct answers per
    picture variant ({None: original, ratio: masked} -> [n, samples]), format scores, response
    lengths, KL_prcp sums and decoy hits. Its seeds depend on `start` alone."""
    chunk = examples[start:start + batch_size]
    thinking_open = qwen.prompt_opens_thinking(processor)   # a Thinking model's format check
    # As in training: the masked variants black out squares of the RAW picture, then every
    # variant is resized into the pixel budget on its own (train.load_pictures says why).
    fit = lambda pictures: [imaging.budget_resize(p, min_pixels, max_pixels) for p in pictures]
    raw = [ex.load_images() for ex in chunk]
    items = [ex.to_prompt(template, pictures=fit(pictures)) for ex, pictures in zip(chunk, raw)]
    asked = [ex for ex in chunk for _ in range(samples)]
    out = dict(start=start, correct={}, format=[], lengths=[], decoyed=[], kl_sum=0.0,
               kl_tokens=0.0)
    # the same seeds for every model compared, so differences are not sampling luck
    rng = np.random.default_rng([seed, start])
    for ratio in (None, *mask_ratios):
        torch.manual_seed(seed * 1_000_003 + start)
        images = [it["images"] if ratio is None else
                  fit(papo.mask_image(pictures, ratio=ratio, rng=rng))
                  for it, pictures in zip(items, raw)]
        prompts = [{**it, "images": im} for it, im in zip(items, images)]
        rollouts = qwen.generate_rollouts(policy, processor, prompts, num_samples=samples,
                                          max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, top_k=top_k)
        details = (user_reward.score(rollouts.texts, asked,
                                     rollouts.completion_mask.sum(-1).int().tolist())
                   if user_reward is not None else
                   [rewards.reward_details(t, ex.answer, thinking_open)
                    for t, ex in zip(rollouts.texts, asked)])
        out["correct"][ratio] = np.array([x["accuracy"] for x in details]).reshape(-1, samples)
        if ratio is not None:
            continue
        out["format"] = [x["format"] for x in details]
        if decoys is not None:
            wrong = [decoys[start + i // samples] for i in range(len(details))]
            out["decoyed"] = [rewards.reward_details(t, w)["accuracy"]
                              for t, w in zip(rollouts.texts, wrong) if w is not None]
        out["lengths"] = rollouts.completion_mask.sum(-1).tolist()
        if kl_ratio is not None:
            masked = [fit(papo.mask_image(pictures, ratio=kl_ratio, rng=rng)) for pictures in raw]
            pixels = qwen.encode_images(processor, masked)
            logp = qwen.completion_logprobs(policy, rollouts, temperature=temperature)
            masked_logp = qwen.completion_logprobs(policy, rollouts,
                                                   pixel_values=pixels["pixel_values"],
                                                   temperature=temperature)
            m = rollouts.completion_mask.float()
            out["kl_sum"] = float((papo.perception_kl(logp, masked_logp) * m).sum())
            out["kl_tokens"] = float(m.sum())
    return out


# ---------------------------------------------------------------------------------------------
# The paper's benchmark suite (Table 1): bookkeeping only, no model and no I/O
# ---------------------------------------------------------------------------------------------
# evaluate() gives one avg@8 per (model, benchmark). The paper reports nine of them in a fixed
# column order, split into two groups, with three averages and, for each PAPO row, a relative
# gain over its baseline. The functions below turn a {model: {benchmark: score}} dict into that
# table. Two choices in the paper are easy to get wrong and are spelled out here:
#   - every AVG is the unweighted mean over benchmarks, and Overall is the mean over all nine
#     benchmarks, not the mean of the two group averages (5 General vs 4 Vision benchmarks);
#   - the gain in brackets is the MEAN OF PER-BENCHMARK RELATIVE GAINS (%), not the relative
#     gain of the averages. The two differ: a low-scoring benchmark (Geo3k ~30%) moves the mean of
#     gains more than the gain of means (GRPO -> PAPO-G 3B, General: +3.38 vs +2.89).

GENERAL, VISION, OVERALL = "General", "Vision-dependent", "Overall"

SUITE: tuple[tuple[str, str, str], ...] = (
    # (file as the suite ships it, column name in the paper's table, group), in column order
    ("hiyouga_geometry3k.json", "Geo3k", GENERAL),
    ("AI4Math_MathVista.json", "MathVista", GENERAL),
    ("We-Math_We-Math.json", "We-Math", GENERAL),
    ("PAPO_MMK12.json", "MMK12", GENERAL),
    ("AI4Math_MathVerse.json", "MathVerse", GENERAL),
    ("lscpku_LogicVista.json", "LogicVista", VISION),
    ("BUAADreamer_clevr_count_70k.json", "Counting", VISION),
    ("MMMU_MMMU_Pro.json", "MMMU-Pro", VISION),
    ("AI4Math_MathVerse-vision-dependent.json", "MathVerse-V", VISION),
)
SUITE_FILES = [file for file, _, _ in SUITE]
# the benchmarks each average runs over; Overall is all nine, weighted equally
SUITE_GROUPS = {GENERAL: [f for f, _, g in SUITE if g == GENERAL],
                VISION: [f for f, _, g in SUITE if g == VISION],
                OVERALL: SUITE_FILES}


def suite_files(folder) -> tuple[dict[str, Path], list[str]]:
    """Which of the nine suite files are in `folder` (only checks that they exist).

    Returns (present: {file name: path}, missing: [file names]), both in the paper's column
    order, so a caller can evaluate what is there and still report what is not.
    Example: a folder holding only PAPO_MMK12.json and lscpku_LogicVista.json gives
    ({"PAPO_MMK12.json": folder/"PAPO_MMK12.json", "lscpku_LogicVista.json": ...},
     ["hiyouga_geometry3k.json", "AI4Math_MathVista.json", ...the other five]).
    """
    folder = Path(folder)
    present = {f: folder / f for f in SUITE_FILES if (folder / f).is_file()}
    return present, [f for f in SUITE_FILES if f not in present]


def relative_gain(base: float, new: float) -> float:
    """Relative gain of `new` over `base`, in percent: (new - base) / base * 100.

    Example: base 28.72, new 30.95 (Geo3k, GRPO-3B -> PAPO-G-3B) -> +7.76; base 50, new 40 -> -20.
    base <= 0 raises ValueError rather than returning inf: scores are accuracies, so a baseline
    of exactly 0 means that evaluation broke (or the benchmark is useless), and an inf would turn
    the whole group's mean gain into inf and hide every other benchmark.
    """
    if base <= 0:
        raise ValueError(f"relative_gain: the baseline score is {base}; a relative gain needs a "
                         "positive baseline (a 0 accuracy usually means that evaluation failed)")
    return (new - base) / base * 100.0


def _suite_scores(model: str, per_benchmark: dict, percent: bool) -> dict[str, float | None]:
    """{suite file: score in percent, or None where missing} for one model.

    Keys may be bare file names or paths (main keys results by the path it was given); only the
    file name is matched. Benchmarks outside the suite are ignored: a misspelled suite file
    still shows up, as missing. A None value counts as missing."""
    by_name: dict[str, float] = {}
    for key, value in per_benchmark.items():
        name = Path(key).name
        if name in by_name:
            raise ValueError(f"suite_summary: {model} has two scores for {name}")
        by_name[name] = value
    out: dict[str, float | None] = {}
    for f in SUITE_FILES:
        value = by_name.get(f)
        if value is not None:
            # refuse the likely unit mix-up (percent given as fractions) instead of printing a
            # table 100x off; the reverse (fractions with percent=True) cannot be told apart
            top = 100.0 if percent else 1.0
            if not 0.0 <= value <= top:
                hint = "" if percent else " (percentages? pass percent=True)"
                raise ValueError(f"suite_summary: {model} on {f}: score {value} is outside "
                                 f"[0, {top:g}]{hint}")
            value = float(value) if percent else float(value) * 100.0
        out[f] = value
    return out


def suite_summary(scores: dict[str, dict[str, float]], models: list[str], *,
                  percent: bool = False) -> dict[str, dict]:
    """The numbers of the paper's Table 1 for `models`, the first being the baseline.

    scores: {model: {suite file name (or a path to it): avg@8}}; fractions in [0, 1] as
    evaluate() returns them, or percentages (the paper's tables) with percent=True.
    Returns, per model, everything in percent:
      "scores":  {file: score or None if missing}, in column order
      "avg":     {"General", "Vision-dependent", "Overall": unweighted mean over the group's
                  benchmarks, or None if any of them is missing}
      "gain":    None for the baseline; else {group: mean over the group's benchmarks of
                  relative_gain(baseline, model), or None if either model misses one}
      "missing": [suite files with no score], in column order
      "zero":    [suite files scored 0]: a baseline's zero leaves its groups' gains None
    An average is never taken over the benchmarks that happen to be there: one missing score
    makes its group (and Overall) None, so a partial table cannot pass for a full one.

    Worked example (two General benchmarks, the rest equal): baseline Geo3k 10, MathVista 50;
    model Geo3k 20 (+100%), MathVista 45 (-10%). General gain = (100 - 10 + 0 + 0 + 0) / 5 = +18,
    Overall = (100 - 10) / 9 = +10. The gain of the averages would be much smaller (+2.78 with the
    other three General scores at 40), because Geo3k's large relative jump counts in full.
    """
    if not models:
        raise ValueError("suite_summary: no models")
    unknown = [m for m in models if m not in scores]
    if unknown:
        raise ValueError(f"suite_summary: no scores for {unknown}")
    table = {m: _suite_scores(m, scores[m], percent) for m in models}
    base = table[models[0]]
    summary = {}
    for m in models:
        s = table[m]
        avg = {g: (None if any(s[f] is None for f in files)
                   else statistics.fmean(s[f] for f in files))
               for g, files in SUITE_GROUPS.items()}
        gain = None
        if m != models[0]:
            gain = {}
            for g, files in SUITE_GROUPS.items():
                if any(s[f] is None or base[f] is None for f in files):
                    gain[g] = None
                    continue
                if any(base[f] <= 0 for f in files):
                    # no relative gain over a zero score; this runs at the end of a long
                    # evaluation, so it is reported in the table instead of raised
                    gain[g] = None
                    continue
                gain[g] = statistics.fmean(relative_gain(base[f], s[f]) for f in files)
        summary[m] = {"scores": s, "avg": avg, "gain": gain,
                      "missing": [f for f in SUITE_FILES if s[f] is None],
                      "zero": [f for f in SUITE_FILES if s[f] is not None and s[f] <= 0]}
    return summary


def format_suite_table(summary: dict[str, dict], models: list[str]) -> str:
    """The paper's Table 1 layout: a row per model, scores in percent with 2 decimals,

        Geo3k MathVista We-Math MMK12 MathVerse | General AVG | LogicVista Counting MMMU-Pro
        MathVerse-V | Vision-dependent AVG | Overall AVG

    and, for every model after the first, each average followed by its gain, e.g.
    "53.39 (+3.38)". A missing score prints "missing", an average over an incomplete group
    "n/a" (a gain that cannot be computed "(n/a)"), and a last line names the missing files.
    """
    def score(v):
        return "missing" if v is None else f"{v:.2f}"

    def average(m, group):
        v, gain = summary[m]["avg"][group], summary[m]["gain"]
        if v is None:
            return "n/a"
        if gain is None:                                     # the baseline row
            return f"{v:.2f}"
        return f"{v:.2f} ({'n/a' if gain[group] is None else format(gain[group], '+.2f')})"

    # blocks of columns, with "|" between blocks like the paper's vertical rules
    blocks = [[c for _, c, g in SUITE if g == GENERAL], [f"{GENERAL} AVG"],
              [c for _, c, g in SUITE if g == VISION], [f"{VISION} AVG"], [f"{OVERALL} AVG"]]
    header = [c for block in blocks for c in block]
    rows = []
    for m in models:
        s = summary[m]["scores"]
        rows.append([score(s[f]) for f in SUITE_FILES[:5]] + [average(m, GENERAL)]
                    + [score(s[f]) for f in SUITE_FILES[5:]] + [average(m, VISION)]
                    + [average(m, OVERALL)])
    names = column_names(models)
    name_width = max(len("model"), *(len(n) for n in names))
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    ends = {sum(len(b) for b in blocks[:i + 1]) for i in range(len(blocks) - 1)}  # block edges

    def line(label, cells):
        out = f"{label:<{name_width}s}"
        for j, (cell, w) in enumerate(zip(cells, widths)):
            out += (" | " if j in ends else "  ") + f"{cell:>{w}s}"
        return out

    lines = [line("model", header)] + [line(n, r) for n, r in zip(names, rows)]
    if len(models) > 1:
        lines.append(f"(+x): mean of per-benchmark relative gains (%) over {names[0]}")
    zero = summary[models[0]]["zero"]
    if len(models) > 1 and zero:
        lines.append(f"(n/a) gains: {names[0]} scores 0 on {', '.join(zero)}, so no relative gain "
                     "is defined there")
    missing = [f"{n}: {', '.join(summary[m]['missing'])}"
               for n, m in zip(names, models) if summary[m]["missing"]]
    if missing:
        lines.append("missing benchmark files - " + "; ".join(missing))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

DEFAULT_RUN = Path("runs/default")


def run_targets(run: Path) -> dict:
    """What `python train.py` recorded in RUN/run.json for a later evaluation: the latest
    checkpoint, the held-out data, the generation length, the pixel budget, the prompt
    template and the column names. (This module never imports train.py: the run folder is the
    interface between the two.)"""
    path = run / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    if not info.get("checkpoint"):
        raise SystemExit(f"eval.py: no --model given and {path} names no checkpoint; run "
                         "`python train.py` first, or pass --model and --data")
    return info


def recorded_reward(models: list[str], bad: list[str]) -> str:
    """The --reward that the runs of `models` trained with (their run.json, next to each
    checkpoint), so that a run trained on its own reward is scored by it; "" for the built-in
    math reward. Models outside a run (a hub id, a base model) do not count; runs that trained
    on different rewards are a problem added to `bad` (give --reward to choose)."""
    found = {}
    for name in models:
        info = Path(name).parent / "run.json"
        if info.is_file():
            try:
                found[name] = json.loads(info.read_text()).get("reward") or ""
            except (OSError, ValueError, AttributeError) as err:
                bad.append(f"--model {name}: cannot read its run's {info}: {err}")
    if len(set(found.values())) > 1:
        bad.append("the runs trained on different rewards (" + "; ".join(
            f"{m}: {r or 'the built-in math reward'}" for m, r in found.items())
            + "); give --reward to score them alike")
        return ""
    reward = next(iter(found.values()), "")
    if reward:
        print(f"scoring with the run's own reward, --reward {reward} (from its run.json)")
    return reward


def run_checkpoint(name: str) -> str:
    """--model given a run folder of train.py (it holds latest.txt, not a model): the checkpoint
    its latest.txt names, with a note; any other name as it is."""
    folder = Path(name)
    if not (folder / "latest.txt").is_file() or (folder / "model.safetensors").is_file():
        return name
    latest = folder / (folder / "latest.txt").read_text().strip()
    if not latest.is_dir() or latest.parent != folder:
        found = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
        raise SystemExit(f"eval.py: --model {name} is a run folder, and its latest.txt names no "
                         f"checkpoint folder there; give one of its checkpoints: "
                         f"{', '.join(found) or '(none)'}")
    print(f"note: --model {name} is a run folder; evaluating its latest checkpoint, {latest}")
    return str(latest)


def default_out(folder: Path = Path(".")) -> Path:
    """eval_results.json, or the first eval_results-N.json that does not exist: the default
    never meets an earlier evaluation's results (an explicit existing --out is refused)."""
    out, n = folder / "eval_results.json", 1
    while out.exists():
        n += 1
        out = folder / f"eval_results-{n}.json"
    return out


def column_names(models: list[str]) -> list[str]:
    """The shortest path tails that tell the models apart: runs/a/checkpoint-000150 and
    runs/b/checkpoint-000150 become a/checkpoint-000150 and b/checkpoint-000150."""
    parts = [Path(m).parts or (m,) for m in models]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(models)            # the same model given twice: nothing shorter tells them apart


def _block(dataset: str, names: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    """The lines of one dataset's table: a header of column names, then label + cells per row."""
    widths = [max(16, len(n), *(len(cells[j]) for _, cells in rows)) + 2 for j, n in enumerate(names)]
    line = lambda label, cells: f"{label:22s}" + "".join(f"{c:>{w}s}" for c, w in zip(cells, widths))
    return [f"\n{dataset}", line("", names)] + [line(label, cells) for label, cells in rows]


def format_table(results: dict, models: list[str]) -> str:
    """One block per dataset, one column per model."""
    lines = []
    for dataset, per_model in results.items():
        keys = list(next(iter(per_model.values())).keys())
        cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
        rows = [(k, [cell(per_model[m][k]) for m in models]) for k in keys]
        lines += _block(dataset, column_names(models), rows)
    return "\n".join(lines)


def mean_table(files: list[str]) -> str:
    """Mean +- std (over files) of result files that compare the same recipes, one file per seed:
    column j of every file holds the same recipe. Columns are named after the first file's
    models with "seedN" written "seed*"; std is the sample standard deviation (n - 1)."""
    if len(files) < 2:
        raise SystemExit("eval.py --mean-of: give at least two result files")
    loaded = []
    for f in files:
        try:
            loaded.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"eval.py --mean-of: cannot read {f}: {e}") from None
    lines = [f"mean +- std over {len(files)} files: {', '.join(files)}"]
    for dataset, per_model in loaded[0].items():
        models = list(per_model)
        columns = []                     # per file: its models' metric dicts, in the given order
        for f, result in zip(files, loaded):
            if len(result.get(dataset, {})) != len(models):
                raise SystemExit(f"eval.py --mean-of: {f} does not have {len(models)} models on "
                                 f"{dataset} like {files[0]}")
            columns.append(list(result[dataset].values()))
        rows = []
        for key, value in per_model[models[0]].items():
            if not isinstance(value, (int, float)) or key in ("n", "samples"):
                continue
            cells = []
            for j in range(len(models)):
                missing = [f for f, cols in zip(files, columns) if key not in cols[j]]
                if missing:
                    raise SystemExit(f"eval.py --mean-of: {missing[0]} has no {key!r} for model "
                                     f"{j + 1} on {dataset}")
                vals = [cols[j][key] for cols in columns]
                cells.append(f"{statistics.mean(vals):.3f} +- {statistics.stdev(vals):.3f}")
            rows.append((key, cells))
        names = [re.sub(r"seed\d+", "seed*", n) for n in column_names(models)]
        lines += _block(dataset, names, rows)
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Score every --model on every dataset; print the table (and Table 1 with --suite) and
    write the results file. Everything that can be refused is checked before a model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mean_of:                     # only a summary of results files written earlier
        print(mean_table(args.mean_of))
        return {}
    plan = resolve_plan(args, parser)           # what to score, on what, every flag checked
    loaded, template = load_sources(plan)       # every row checked before any model loads
    user_reward = check_reward(plan, loaded)    # likewise the reward, on a few rows
    # torchrun --nproc_per_node N eval.py ...: every rank loads each model and scores every N-th
    # batch of questions; rank 0 gathers the results (evaluate(split_over_ranks=True))
    device, main_rank = _processes()
    results: dict[str, dict] = {s: {} for s in plan.sources}
    try:
        _score_models(plan, args, loaded, template, user_reward, results, device, main_rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if main_rank:
        print_results(results, plan, suite=bool(args.suite))
    return results


def build_parser() -> argparse.ArgumentParser:
    """eval.py's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="checkpoint folder or hub id (repeatable)")
    p.add_argument("--data", action="append",
                   help="dataset (repeatable): JSONL, ShareGPT .json, parquet file/glob/folder, "
                        "save_to_disk folder, or hub id owner/name[:split]")
    p.add_argument("--suite", metavar="DIR",
                   help="the paper's evaluation suite: score every benchmark file of SUITE in DIR "
                        "and print Table 1 (avg@k, group averages, relative gains)")
    p.add_argument("--samples", type=int, default=8, help="k: samples per question")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50,
                   help="sample among the k most likely tokens (0 = off); 50 as the official "
                        "evaluation code")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 2048, or the training run's value for the offline default")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="pixel budget applied to raw pictures (default 1024, as the official "
                        "evaluation; the run's own for the offline default)")
    p.add_argument("--max-pixels", type=int, default=None, help="default 589,824 (see above)")
    p.add_argument("--prompt-template", default=None,
                   help="plain-text file with one {problem} (default: the official instruction); "
                        "ShareGPT rows are used verbatim")
    p.add_argument("--problem-key", default="problem",
                   help="table column or JSONL key of the question")
    p.add_argument("--answer-key", default="answer",
                   help="table column or JSONL key of the gold answer")
    p.add_argument("--image-key", default="images",
                   help="table column or JSONL key of the picture(s)")
    p.add_argument("--image-dir", default=None, help="folder for relative picture paths")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000,
                   help="largest picture (width x height) a row may have")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    p.add_argument("--mask-ratios", type=float, nargs="*", default=None,
                   help="also score with the images masked at these ratios (default 0.6 1.0; "
                        "none with --suite, whose protocol is avg@k alone)")
    p.add_argument("--kl-ratio", type=float, default=None,
                   help="mask ratio of the KL_prcp measurement, negative: skip (default 0.6; "
                        "skipped with --suite)")
    p.add_argument("--limit", type=int, default=0, help="first N questions only (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="",
                   help="your own reward, FILE.py:function or module:function (as train.py's "
                        "--reward); default: the official math reward")
    p.add_argument("--reward-time-limit", type=float, default=10.0,
                   help="seconds one call of --reward may take (a call past it scores 0)")
    p.add_argument("--out", default=None,
                   help="where to write the JSON (default: eval_results.json, or the first free "
                        "eval_results-N.json: a plain rerun never replaces earlier results)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (without it, it is refused); never one "
                        "of the evaluation's inputs")
    p.add_argument("--mean-of", nargs="+", metavar="FILE",
                   help="only print mean +- std over result files written by earlier runs "
                        "(one per seed, same models in the same order)")
    return p


@dataclass
class Plan:
    """An evaluation resolved from its flags (and, without --model, from the run train.py
    wrote last): what to score, on what, how, and where the results go."""
    models: list[str]
    sources: list[str]
    keys: dict                 # the column names, picture folder and size limit of the rows
    template_file: str | None
    limit: int
    max_new: int
    min_pixels: int
    max_pixels: int
    mask_ratios: list[float]
    kl_ratio: float
    reward: str
    reward_time_limit: float
    out: Path


def resolve_plan(args, p: argparse.ArgumentParser) -> Plan:
    """The evaluation the flags ask for, with every problem of the flags, the models and --out
    refused at once (the parser's error, naming each)."""
    models, sources, max_new = args.model, list(args.data or []), args.max_new_tokens
    budget = (args.min_pixels, args.max_pixels)
    template_file, limit = args.prompt_template, args.limit
    keys = dict(problem_key=args.problem_key, answer_key=args.answer_key,
                image_key=args.image_key, image_dir=args.image_dir,
                max_image_pixels=args.max_image_pixels)
    if not models:                       # the offline default: the run train.py wrote
        info = run_targets(DEFAULT_RUN)
        models = [info["checkpoint"]]
        sources = sources or ([info["eval_data"]] if info.get("eval_data") else [])
        max_new = info.get("max_new_tokens") if max_new is None else max_new
        budget = tuple(info.get(k) if v is None else v
                       for v, k in zip(budget, ("min_pixels", "max_pixels")))
        template_file = template_file or info.get("prompt_template")
        keys = {k: info.get(k) or v for k, v in keys.items()}
        limit = limit or info.get("eval_size") or 0   # the run's held-out slice
    if args.suite:
        present, _ = suite_files(args.suite)
        if not present:
            p.error(f"--suite {args.suite}: none of the benchmark files is there "
                    f"({', '.join(SUITE_FILES)})")
        sources += [str(path) for path in present.values()]
    if not sources:
        p.error("--data or --suite is required when --model is given")
    # "is None", not "or": an explicit 0 must be refused below, not replaced by the default
    plan = Plan(models=models, sources=sources, keys=keys, template_file=template_file,
                limit=limit, max_new=2048 if max_new is None else max_new,
                min_pixels=1024 if budget[0] is None else budget[0],
                max_pixels=589_824 if budget[1] is None else budget[1],
                mask_ratios=args.mask_ratios if args.mask_ratios is not None else (
                    [] if args.suite else [0.6, 1.0]),
                kl_ratio=args.kl_ratio if args.kl_ratio is not None else (
                    -1 if args.suite else 0.6),
                reward="", reward_time_limit=args.reward_time_limit,
                out=Path(args.out) if args.out else default_out())
    bad = flag_problems(args, plan)
    plan.models = [run_checkpoint(name) for name in plan.models]   # a run folder: its latest
    plan.reward = args.reward or recorded_reward(plan.models, bad)
    bad += out_problems(plan, args.overwrite)
    bad += model_problems(plan.models)
    if bad:
        p.error("\n  " + "\n  ".join(bad))
    return plan


def flag_problems(args, plan: Plan) -> list[str]:
    """Each numeric flag outside its range, "--flag value: must be ..."."""
    max_new, min_pixels, max_pixels = plan.max_new, plan.min_pixels, plan.max_pixels
    mask_ratios, kl_ratio = plan.mask_ratios, plan.kl_ratio
    return [f"--{flag} {value!r}: must be {allowed}" for flag, value, ok, allowed in (
        ("samples", args.samples, args.samples >= 1, ">= 1"),
        ("max-image-pixels", args.max_image_pixels, args.max_image_pixels >= 1, ">= 1"),
        ("batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("limit", plan.limit, plan.limit >= 0, ">= 0 (0 = all)"),
        ("temperature", args.temperature, 0 <= args.temperature < float("inf"), ">= 0 (0 = greedy)"),
        ("top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = off)"),
        ("max-new-tokens", max_new, max_new >= 1, ">= 1"),
        ("min-pixels", min_pixels, 1 <= min_pixels <= max_pixels, ">= 1 and <= --max-pixels"),
        ("mask-ratios", mask_ratios, all(0 <= r <= 1 for r in mask_ratios), "each in [0, 1]"),
        ("kl-ratio", kl_ratio, kl_ratio <= 1, "<= 1 (negative: skip)"),
        ("reward-time-limit", args.reward_time_limit,
         0 < args.reward_time_limit <= custom_reward.MAX_REWARD_TIME_LIMIT,
         f"in (0, {custom_reward.MAX_REWARD_TIME_LIMIT:g}] (seconds)"),
    ) if not ok]


def out_problems(plan: Plan, overwrite: bool) -> list[str]:
    """Why the results file cannot be written where --out says: it would replace (or sit in)
    an input of this evaluation, it is a folder, it exists (without --overwrite), or its folder
    is missing or read-only."""
    out, reward = plan.out, plan.reward
    inputs = [("--model", m) for m in plan.models] + [("--data", d) for d in plan.sources] + [
        ("--prompt-template", plan.template_file),
        ("--reward", reward.rsplit(":", 1)[0] if ":" in reward else "")]
    clash = []                # the results file must never replace (or sit in) what it reads
    for flag, value in inputs:
        if not value or not Path(value).exists():
            continue
        where = Path(value).resolve()
        if where == out.resolve() or where in out.resolve().parents:
            clash.append(f"--out {out}: {'is' if where == out.resolve() else 'lies inside'} "
                         f"{flag} {value}, an input of this evaluation; give another --out")
    if clash:
        return clash
    if out.is_dir():
        return [f"--out {out}: is a folder; give a file name"]
    if out.exists() and not overwrite:
        return [f"--out {out}: exists (an earlier evaluation's results); pass --overwrite to "
                "replace it, or give another --out"]
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        return [f"--out {out}: folder {out.parent} does not exist or is not writable"]
    return []


def model_problems(models: list[str]) -> list[str]:
    """Every model must be loadable before the first one is scored: its source, and weight
    files that are pickles or truncated."""
    bad = []
    for name in models:
        try:
            qwen.model_source(name)
        except (ValueError, FileNotFoundError) as err:
            bad.append(str(err))
        bad += integrity.weight_file_problems(Path(name))     # pickles, truncated files
    return bad


def load_sources(plan: Plan) -> tuple[dict, str | None]:
    """({source: its rows}, the prompt template's text), every source checked before any
    model loads; pictures that the processor would refuse in the pixel budget are refused."""
    try:
        template = data.read_template(plan.template_file) if plan.template_file else None
        loaded = {s: data.load_dataset(s, **plan.keys)[: plan.limit or None]
                  for s in plan.sources}
    except (data.DatasetError, ValueError) as err:
        raise SystemExit(f"eval.py: {err}") from None
    # the processor's aspect limit applies to the pictures as the budget resizes them
    too_thin = [p for rows in loaded.values()
                for p in data.budget_problems(rows.rows, plan.min_pixels, plan.max_pixels)]
    if too_thin:
        raise SystemExit("eval.py: pictures that the processor would refuse in the pixel budget:"
                         "\n  " + "\n  ".join(too_thin[:20]))
    return loaded, template


def check_reward(plan: Plan, loaded: dict):
    """--reward's runner (None: the built-in math reward), tried on a few rows: a reward that
    raises or returns nonsense is refused before any model loads."""
    try:
        user_reward = (custom_reward.UserReward(plan.reward, plan.reward_time_limit)
                       if plan.reward else None)
        if user_reward is not None:
            custom_reward.check_user_reward(user_reward, next(iter(loaded.values())))
    except custom_reward.RewardError as err:
        raise SystemExit(f"eval.py: {err}") from None
    return user_reward


def print_results(results: dict, plan: Plan, suite: bool) -> None:
    """The per-dataset table, Table 1 with --suite, and where the results went (rank 0)."""
    print(format_table(results, plan.models))
    if suite:
        scores = {m: {Path(s).name: results[s][m]["accuracy"] for s in plan.sources
                      if Path(s).name in SUITE_FILES} for m in plan.models}
        print("\n" + format_suite_table(suite_summary(scores, plan.models), plan.models))
    print(f"\nwrote {plan.out}")


def _processes() -> tuple[torch.device, bool]:
    """(this process's device, whether it is rank 0); starts the process group under torchrun."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), True
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":     # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return device, dist.get_rank() == 0


def _score_models(plan: Plan, args, loaded: dict, template, user_reward, results: dict,
                  device: torch.device, main_rank: bool) -> None:
    """Each model on each dataset, the results file rewritten after every model (rank 0)."""
    min_pixels, kl_ratio = plan.min_pixels, plan.kl_ratio
    for name in plan.models:
        policy, processor = qwen.load_model(name, device=device)
        policy.eval()
        problem = integrity.non_finite_weights(policy)
        if problem:           # it would sample garbage, or fail deep inside generate
            raise SystemExit(f"eval.py: --model {name} holds non-finite weights ({problem})")
        # as in training: a picture is never scaled up past the most pixels this processor
        # keeps, only for the processor to scale it straight back down (model.fit_min_pixels)
        low = qwen.fit_min_pixels(processor.image_processor, min_pixels)
        if low != min_pixels and main_rank:
            print(f"{name}: --min-pixels {min_pixels} is above the most pixels its processor "
                  f"keeps ({low}); using {low}")
        for s, examples in loaded.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                results[s][name] = evaluate(
                    policy, processor, examples, samples=args.samples,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=plan.max_new, batch_size=args.batch_size,
                    mask_ratios=tuple(plan.mask_ratios),
                    kl_ratio=kl_ratio if kl_ratio >= 0 else None,
                    seed=args.seed, progress=main_rank, template=template, min_pixels=low,
                    max_pixels=plan.max_pixels, user_reward=user_reward, split_over_ranks=True)
        del policy
        if main_rank:
            plan.out.write_text(json.dumps(results, indent=2))   # after every model: nothing lost


if __name__ == "__main__":
    main()
