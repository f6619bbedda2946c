"""Evaluate Qwen2.5-VL policies on JSONL datasets with the paper's protocol.

    python eval.py                                    # the checkpoint train.py wrote last
    python eval.py --model runs/papo/checkpoint-000150 --data test.jsonl
    python eval.py --model runs/grpo/... --model runs/papo/... --data a.jsonl --data b.jsonl
    python eval.py --mean-of runs/exp-eval-seed0.json runs/exp-eval-seed1.json ...   # over seeds

Protocol (PAPO_REFERENCE section 6): k = 8 samples per question at temperature 1.0, top_p 1.0;
the score is avg@k, the mean accuracy over all k * n samples. Also reported per dataset:
pass@k (a question counts if any of its k samples is right), the format rate, the mean response
length, avg@k with the image masked at ratio 0.6 and 1.0 (how much the answers depend on seeing
the picture), and the mean per-token KL_prcp between the original-image and masked-image
policies on the model's own rollouts (how differently the policy behaves when it cannot see).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import data
import model as qwen
import papo


def pass_at_k(correct: np.ndarray) -> float:
    """correct: [n_questions, k] of 0/1 -> fraction of questions with at least one correct sample.

    Example: [[1, 0], [0, 0]] -> 0.5."""
    return float((correct.max(axis=1) > 0).mean()) if correct.size else 0.0


def avg_at_k(correct: np.ndarray) -> float:
    """Mean accuracy over every sample of every question. Example: [[1, 0], [0, 0]] -> 0.25."""
    return float(correct.mean()) if correct.size else 0.0


@torch.no_grad()
def evaluate(policy, processor, examples: list[data.Example], *, samples: int = 8,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 2048,
             batch_size: int = 16, mask_ratios=(0.6, 1.0), kl_ratio: float | None = None,
             seed: int = 0, progress: bool = False) -> dict:
    """Score `policy` on `examples`; see the module docstring for the metrics.

    batch_size counts questions per `generate` call (each with `samples` rollouts).
    kl_ratio: mask ratio for the KL_prcp measurement (None: skip it)."""
    if not examples:
        raise ValueError("evaluate: no examples")
    correct = {None: [], **{r: [] for r in mask_ratios}}
    fmt, lengths, kl_sum, kl_tokens = [], [], 0.0, 0.0
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc="eval", disable=not progress, leave=False):
        chunk = examples[start:start + batch_size]
        items = [ex.to_prompt() for ex in chunk]
        answers = [ex.answer for ex in chunk for _ in range(samples)]
        # the same seeds for every model compared, so differences are not sampling luck
        rng = np.random.default_rng([seed, start])
        for ratio in correct:
            torch.manual_seed(seed * 1_000_003 + start)
            images = [it["images"] if ratio is None else
                      papo.mask_image(it["images"], ratio=ratio, rng=rng) for it in items]
            prompts = [{**it, "images": im} for it, im in zip(items, images)]
            rollouts = qwen.generate_rollouts(policy, processor, prompts, num_samples=samples,
                                              max_new_tokens=max_new_tokens,
                                              temperature=temperature, top_p=top_p)
            details = [data.reward_details(t, a) for t, a in zip(rollouts.texts, answers)]
            correct[ratio].append(np.array([x["accuracy"] for x in details]).reshape(-1, samples))
            if ratio is None:
                fmt += [x["format"] for x in details]
                lengths += rollouts.completion_mask.sum(-1).tolist()
                if kl_ratio is not None:
                    masked = [papo.mask_image(it["images"], ratio=kl_ratio, rng=rng) for it in items]
                    pixels = qwen.encode_images(processor, masked, samples)
                    logp = qwen.completion_logprobs(policy, rollouts, temperature=temperature)
                    masked_logp = qwen.completion_logprobs(
                        policy, rollouts, pixel_values=pixels["pixel_values"],
                        temperature=temperature)
                    m = rollouts.completion_mask.float()
                    kl_sum += float((papo.perception_kl(logp, masked_logp) * m).sum())
                    kl_tokens += float(m.sum())
    c = np.concatenate(correct[None])
    out = {"n": len(examples), "samples": samples, "accuracy": avg_at_k(c),
           f"pass@{samples}": pass_at_k(c), "format": float(np.mean(fmt)),
           "response_length": float(np.mean(lengths))}
    for ratio in mask_ratios:
        out[f"accuracy_mask{ratio}"] = avg_at_k(np.concatenate(correct[ratio]))
    if kl_ratio is not None:
        out["kl_prcp"] = kl_sum / max(kl_tokens, 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

DEFAULT_RUN = Path("runs/default")


def default_targets(run: Path) -> tuple[str, str, int]:
    """(checkpoint, held-out JSONL, max_new_tokens) of the run that `python train.py` wrote."""
    import train  # imported here: train imports this module
    pointer = run / "latest.txt"
    if not pointer.is_file():
        raise SystemExit(f"eval.py: no --model given and {pointer} not found; run "
                         "`python train.py` first or pass --model and --data")
    cfg = train.Config(**json.loads((run / "config.json").read_text()))
    heldout = Path(cfg.eval_data) if cfg.eval_data else train.toy_paths(cfg)[1] / "data.jsonl"
    return str(train.latest_checkpoint(run)), str(heldout), cfg.max_new_tokens


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="checkpoint folder or hub id (repeatable)")
    p.add_argument("--data", action="append", help="JSONL dataset (repeatable)")
    p.add_argument("--samples", type=int, default=8, help="k: samples per question")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 2048, or the training run's value for the offline default")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    p.add_argument("--mask-ratios", type=float, nargs="*", default=[0.6, 1.0],
                   help="also score with the images masked at these ratios")
    p.add_argument("--kl-ratio", type=float, default=0.6,
                   help="mask ratio of the KL_prcp measurement (negative: skip)")
    p.add_argument("--limit", type=int, default=0, help="first N questions only (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval_results.json", help="where to write the JSON")
    p.add_argument("--mean-of", nargs="+", metavar="FILE",
                   help="only print mean +- std over result files written by earlier runs "
                        "(one per seed, same models in the same order)")
    args = p.parse_args(argv)
    if args.mean_of:
        print(mean_table(args.mean_of))
        return {}

    models, datasets, max_new = args.model, args.data, args.max_new_tokens
    if not models:
        ckpt, heldout, run_max_new = default_targets(DEFAULT_RUN)
        models, datasets = [ckpt], datasets or [heldout]
        max_new = max_new or run_max_new
    if not datasets:
        p.error("--data is required when --model is given")
    max_new = max_new or 2048
    loaded = {d: data.load_jsonl(d)[: args.limit or None] for d in datasets}  # validate first
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, dict] = {d: {} for d in datasets}
    for name in models:
        policy, processor = qwen.load_model(name, device=device)
        policy.eval()
        for d, examples in loaded.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                results[d][name] = evaluate(
                    policy, processor, examples, samples=args.samples,
                    temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new,
                    batch_size=args.batch_size, mask_ratios=tuple(args.mask_ratios),
                    kl_ratio=args.kl_ratio if args.kl_ratio >= 0 else None, seed=args.seed,
                    progress=True)
        del policy
    print(format_table(results, models))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
