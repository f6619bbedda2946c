#!/usr/bin/env bash
# Step time of TRL's GRPOTrainer and of this project's train.py, side by side, on the SAME tiny
# Qwen2.5-VL (built offline by trl_anchor.py), the same prompts and pictures, the same batch
# (PROMPTS prompts x GENS rollouts x TOKENS new tokens), 2 threads, fp32 on the CPU.
# TRL lives in a scratch venv and never becomes a dependency of the project.
# Rounds alternate TRL / project so that machine drift hits both. Prints "RATIO ..." last:
# TRL's median step time divided by the project's (above 1 = the project is faster).
#
# Usage, with the project's requirements installed in `python` (docs/performance.md has the runs):
#   tools/trl_side_by_side.sh [BETA] [PRESET]      e.g.  ... 0.0 grpo   |  ... 0.01 papo-g
# Environment: STEPS (14), ROUNDS (2), PROMPTS (8), GENS (4), TOKENS (32), PY (python).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."                     # the project root: train.py is run from there
BETA=${1:-0.0}; PRESET=${2:-grpo}
STEPS=${STEPS:-14}; ROUNDS=${ROUNDS:-2}; PROMPTS=${PROMPTS:-8}; GENS=${GENS:-4}; TOKENS=${TOKENS:-32}
PY=${PY:-python}
V=${TMPDIR:-/tmp}/trl_side_by_side/venv
if ! "$V/bin/python" -c "import trl, datasets" 2>/dev/null; then
  python3 -m venv "$V" >&2
  "$V/bin/pip" install -q torch==2.13.0 >&2          # first, so that the CPU wheel is kept
  "$V/bin/pip" install -q trl transformers datasets pillow >&2
fi
TPY=$V/bin/python
W=$(mktemp -d "${TMPDIR:-/tmp}/side_by_side.XXXX")
"$TPY" "$HERE/trl_anchor.py" --steps 2 --workdir "$W" --quiet >/dev/null 2>&1   # builds $W/tiny
"$TPY" - "$W" "$HERE" <<'PY'
import sys, os, json
sys.path.insert(0, sys.argv[2]); import trl_anchor as A
W = sys.argv[1]; ds = A.build_dataset(64, 0); os.makedirs(f"{W}/data/img", exist_ok=True)
with open(f"{W}/data/data.jsonl", "w") as f:
    for i, r in enumerate(ds):
        p = f"img/{i:03d}.png"; r["image"].save(f"{W}/data/{p}")
        f.write(json.dumps({"problem": r["prompt"][0]["content"], "answer": r["answer"], "images": [p]}) + "\n")
PY
trl=(); ours=()
for round in $(seq "$ROUNDS"); do
  t=$(OMP_NUM_THREADS=2 "$TPY" "$HERE/trl_anchor.py" --steps "$STEPS" --beta "$BETA" --threads 2 \
        --prompts-per-step "$PROMPTS" --num-generations "$GENS" --max-new-tokens "$TOKENS" \
        --workdir "$W" --quiet 2>/dev/null | grep '^TRL_GRPO' | sed 's/.*median=\([0-9.]*\).*/\1/')
  rm -rf "$W/run"
  OMP_NUM_THREADS=2 "$PY" train.py --model "$W/tiny" --data "$W/data/data.jsonl" --preset "$PRESET" \
     --beta "$BETA" --prompts-per-step "$PROMPTS" --group-size "$GENS" --max-new-tokens "$TOKENS" \
     --updates-per-step 1 --micro-batch-size $((PROMPTS * GENS)) --steps "$STEPS" --lr 1e-5 --top-p 1.0 \
     --save-every 100000 --sample-every 0 --dtype float32 --out "$W/run" >"$W/train.log" 2>&1 \
     || { tail -5 "$W/train.log"; echo "train.py failed"; exit 1; }
  o=$("$PY" - "$W/run/metrics.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])][2:]          # steps 1-2 are warm-up, as for TRL
print(round(statistics.median(r["t_rollout"] + r.get("t_score", 0) + r.get("t_update", 0) for r in rows), 3))
PY
)
  trl+=("$t"); ours+=("$o")
  echo "round $round: TRL $t s/step, project $o s/step"
done
"$PY" -c "
import statistics as s; t=[float(x) for x in '${trl[*]}'.split()]; o=[float(x) for x in '${ours[*]}'.split()]
print(f'RATIO TRL/project = {s.median(t)/s.median(o):.2f} (TRL {s.median(t):.3f} s/step, project {s.median(o):.3f} s/step; beta=$BETA preset=$PRESET, $PROMPTS x $GENS x $TOKENS)')"
