"""Which count does the perception term favour on a conflict question - the right one or the letter's?

    python experiments/favours.py --toy-canvas dark --cache runs/dark/cache --seed 0 --no-build \
        --out experiments/results/dark/favours-seed0.json
    python experiments/favours.py --toy-canvas light --cache runs/light-cache --seed 0 \
        --out experiments/results/light/favours-seed0.json          # builds the warm start if missing

The shortcut world's seed-S warm start (the model RL starts from, the one experiments/shortcut.py
builds for that seed and canvas) reads the first 32 questions of the held-out conflict split,
where the panel letter always points to a wrong count. For each question and each count k = 1..5
it scores "<think>I see k" teacher-forced, with the original picture (pi_k, the probability of
writing count k) and with the picture masked at 0.6 as in training (q_k; mask seeds 1000 + i, as
notebook 03 uses), and with the picture masked at 1.0. From those:

    value_k = k3(log pi_k, log q_k)     the KL_prcp a completion writing count k carries on it
                                        (papo.perception_kl, capped at 10 as in training)
    push_k  = pi_k - q_k                the expected push of maximising KL_prcp on count k's
                                        logit, per unit gamma (notebook 03, section 6: the
                                        expectation over o ~ pi of d k3 / d z is pi - q)

The term FAVOURS the right count on a question when push_right > push_letter: in expectation it
raises the right count's logit more than the letter's. Under the official clamp (--kl-prcp-clip
0.2) a sampled count whose value is above 0.2 gets no push at all; the record says which.

The whole count is treated as one choice (counts 4 and 5 are two tokens, a space and the digit:
their log-probs are summed), with pi_k and q_k unnormalised - the mass the five counts leave to
other continuations is reported. Writes a JSON record (per question and a summary) to --out and
prints the table; notebook 01 and notebook 03 read these records.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import config       # noqa: E402  (the project's modules sit in the repository root)
import data         # noqa: E402
import model        # noqa: E402
import papo         # noqa: E402
import toy          # noqa: E402

_spec = importlib.util.spec_from_file_location("shortcut", ROOT / "experiments" / "shortcut.py")
shortcut = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shortcut)

MASK_RATIO = 0.6
N_QUESTIONS = 32
CLAMP = 0.2          # the official --kl-prcp-clip


def run_config(canvas: str, cache: str, seed: int, extra=()) -> config.Config:
    """The settings of the shortcut experiment's runs of this seed and canvas (the warm start's
    key does not depend on the recipe); extra: more train.py flags, as shortcut.py passes them."""
    return config.parse_config([*shortcut.COMMON, *shortcut.RECIPES["grpo"], "--seed", str(seed),
                                "--cache", cache, "--toy-canvas", canvas, *extra])


def ensure_warm_start(cfg: config.Config, build: bool) -> Path:
    path = toy.warm_start_path(cfg)
    if (path / "config.json").is_file():
        return path
    if not build:
        raise SystemExit(f"favours.py: no warm start at {path} (--no-build given)")
    toy.prepare_toy_data(cfg)
    train = data.load_dataset(toy.toy_splits(cfg)["train"][0] / "data.jsonl",
                              max_image_pixels=cfg.max_image_pixels)
    return toy.warm_start(cfg, train)


def count_logprobs(policy, processor, examples, pictures, opts) -> np.ndarray:
    """[questions, 5]: log P("<think>I see k" continues with count k), k = 1..5, teacher-forced;
    the count's tokens summed (notebook 03, section 5, normalises these; here they are not)."""
    enc = lambda s: processor.tokenizer(s, add_special_tokens=False)["input_ids"]
    prefix = "<think>I see"
    n = len(enc(prefix))
    prompts = [ex.to_prompt(**opts, pictures=[pic]) for ex, pic in zip(examples, pictures)]
    out = []
    for k in range(1, 6):
        full = enc(f"{prefix} {k}")
        assert full[:n] == enc(prefix), "the count must not merge with the prefix"
        r = model.rollouts_from_texts(processor, prompts, [f"{prefix} {k}"] * len(examples))
        with torch.no_grad():
            lp = model.completion_logprobs(policy, r)                       # [B, T]
        out.append(lp[:, n:len(full)].sum(-1).double())
    return torch.stack(out, -1).numpy()                                     # [B, 5]


def analyse(cfg: config.Config, warm: Path, n: int = N_QUESTIONS) -> dict:
    conflict = data.load_dataset(toy.toy_splits(cfg)["conflict"][0] / "data.jsonl")
    examples = list(conflict)[:n]
    letter = [int(toy.wording_answer(ex.problem)) for ex in examples]
    truth = [int(ex.answer) for ex in examples]
    assert all(w != t for w, t in zip(letter, truth)), "the conflict letter is always wrong"
    raw = [ex.load_images(None, None)[0] for ex in examples]
    pictures = {"original": raw,
                "masked 0.6": [papo.mask_image(im, ratio=MASK_RATIO, rng=1000 + i)
                               for i, im in enumerate(raw)],
                "masked 1.0": [papo.mask_image(im, ratio=1.0, rng=0) for im in raw]}
    policy, processor = model.load_model(str(warm))
    policy.eval()
    opts = config.prompt_options(cfg)
    logp = {name: count_logprobs(policy, processor, examples, pics, opts)
            for name, pics in pictures.items()}
    l, a = torch.from_numpy(logp["original"]), torch.from_numpy(logp["masked 0.6"])
    value = papo.perception_kl(l, a).numpy()                                # [B, 5]
    pi, q = np.exp(logp["original"]), np.exp(logp["masked 0.6"])
    push = pi - q                                                           # per unit gamma
    rows = []
    for i, (t, w) in enumerate(zip(truth, letter)):
        rows.append({"question": examples[i].problem, "right": t, "letter": w,
                     "pi": pi[i].round(5).tolist(), "q": q[i].round(5).tolist(),
                     "value": value[i].round(4).tolist(), "push": push[i].round(5).tolist(),
                     "favours_right": bool(push[i, t - 1] > push[i, w - 1])})

    def counts(name):
        p = np.exp(logp[name])
        p = p / p.sum(-1, keepdims=True)                                    # over the five counts
        return {"mean_count": float((p * np.arange(1, 6)).sum(-1).mean()),
                "most_likely": np.bincount(p.argmax(-1), minlength=5).tolist(),
                "mass": float(np.exp(logp[name]).sum(-1).mean()),
                "mean_count_by_truth": {str(k): float((p * np.arange(1, 6)).sum(-1)[
                    np.array(truth) == k].mean()) for k in range(1, 6) if k in truth}}

    right = np.array([r["right"] - 1 for r in rows])
    wrong = np.array([r["letter"] - 1 for r in rows])
    idx = np.arange(len(rows))
    return {"canvas": cfg.toy_canvas, "seed": cfg.seed, "warm_start": warm.name,
            "mask_ratio": MASK_RATIO, "questions": len(rows),
            "counts": {name: counts(name) for name in pictures},
            "favours_right_share": float(np.mean([r["favours_right"] for r in rows])),
            "median_value_right": float(np.median(value[idx, right])),
            "median_value_letter": float(np.median(value[idx, wrong])),
            "clamped_right_share": float(np.mean(value[idx, right] > CLAMP)),
            "clamped_letter_share": float(np.mean(value[idx, wrong] > CLAMP)),
            "true_counts": np.bincount(right + 1, minlength=6)[1:].tolist(),
            "rows": rows}


def show(result: dict) -> str:
    lines = [f"{result['canvas']} canvas, seed-{result['seed']} warm start "
             f"({result['warm_start']}), {result['questions']} conflict questions",
             "", f"{'picture':12s} {'mean count':>10s} {'mass':>6s}   most likely count 1..5"]
    for name, c in result["counts"].items():
        lines.append(f"{name:12s} {c['mean_count']:10.2f} {c['mass']:6.3f}   {c['most_likely']}")
    lines.append(f"the right counts 1..5: {result['true_counts']}")
    lines += ["", f"{'right':>5s} {'letter':>6s} | {'pi':>6s} {'q':>6s} {'KL_prcp':>7s} "
                  f"{'push':>7s} | {'pi':>6s} {'q':>6s} {'KL_prcp':>7s} {'push':>7s} | favours",
              f"{'':13s}  the right count{'':17s}  the letter's count"]
    for r in result["rows"]:
        t, w = r["right"] - 1, r["letter"] - 1
        cell = lambda k: (f"{r['pi'][k]:6.3f} {r['q'][k]:6.3f} {r['value'][k]:7.2f} "
                          f"{r['push'][k]:+7.3f}")
        lines.append(f"{r['right']:5d} {r['letter']:6d} | {cell(t)} | {cell(w)} | "
                     + ("right" if r["favours_right"] else "letter"))
    lines += ["", f"the push (pi - q, per unit gamma) is larger on the right count on "
                  f"{result['favours_right_share']:.0%} of the questions",
              f"... and on the larger of the two counts on {favours_larger(result)} of "
              f"{result['questions']}",
              f"median KL_prcp if written: right count {result['median_value_right']:.2f}, "
              f"letter's {result['median_value_letter']:.2f}; above the clamp at {CLAMP}: "
              f"{result['clamped_right_share']:.0%} / {result['clamped_letter_share']:.0%}"]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The record as notebook 03 shows it: one row per question (tests/test_notebooks.py checks
    that the notebook's tables are exactly these)."""
    lines = ["| right | letter | pi, q of the right count | its KL_prcp, push | pi, q of the "
             "letter's count | its KL_prcp, push | favours |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t, w = r["right"] - 1, r["letter"] - 1
        pair = lambda k: f"{r['pi'][k]:.3f}, {r['q'][k]:.3f}"
        term = lambda k: f"{r['value'][k]:.2f}, {r['push'][k]:+.3f}"
        lines.append(f"| {r['right']} | {r['letter']} | {pair(t)} | {term(t)} | {pair(w)} | "
                     f"{term(w)} | {'right' if r['favours_right'] else 'letter'} |")
    lines.append("")
    lines.append(f"{result['canvas']} canvas: the push is larger on the right count on "
                 f"{sum(r['favours_right'] for r in result['rows'])} of {result['questions']} "
                 f"questions ({result['favours_right_share']:.0%}); median KL_prcp if written "
                 f"{result['median_value_right']:.2f} on the right count, "
                 f"{result['median_value_letter']:.2f} on the letter's; above the clamp at "
                 f"{CLAMP}: {result['clamped_right_share']:.0%} and "
                 f"{result['clamped_letter_share']:.0%}. It is larger on the larger of the two "
                 f"counts on {favours_larger(result)} of {result['questions']}.")
    return "\n".join(lines)


def favours_larger(result: dict) -> int:
    """On how many questions the push is larger on the larger of the two counts: the masked
    branch's reading moves every count's q the same way (toward 5 on the light canvas, toward
    fewer shapes on the dark one), so the term may follow the count's size, not its truth."""
    larger = lambda r: r["right"] if r["right"] > r["letter"] else r["letter"]
    return sum((r["right"] == larger(r)) == r["favours_right"] for r in result["rows"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy-canvas", choices=list(toy.CANVASES), required=True)
    p.add_argument("--cache", required=True, help="The experiment's cache folder.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="The JSON record to write.")
    p.add_argument("--markdown", action="store_true",
                   help="Print the committed record --out as notebook 03's table; compute nothing.")
    p.add_argument("--no-build", action="store_true",
                   help="Refuse instead of building a missing warm start.")
    args, extra = p.parse_known_args(argv)   # anything else: train.py flags (as shortcut.py)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(1)
    cfg = run_config(args.toy_canvas, args.cache, args.seed, extra)
    warm = ensure_warm_start(cfg, build=not args.no_build)
    result = analyse(cfg, warm)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(show(result))


if __name__ == "__main__":
    main()
