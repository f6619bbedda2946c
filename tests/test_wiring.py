"""The RL loop's wiring: which prompt grades which rollout, which group normalises which reward,
which model and which temperature score which log-probs, which sampler settings reach
`generate`, which tokens (of the mini-batch, of all ranks) normalise the loss.

Each test is an oracle computed outside the code under test (closed forms by hand, log-probs
taken straight from model.completion_logprobs, gradients by autograd on the rows themselves),
and each names the plausible bug it would catch: a bug of this kind leaves the end-to-end smoke
runs green, because the loop still runs and still trains - on the wrong numbers."""

import dataclasses
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
import model as qwen
import toy
import config
import checkpoints
import processes
import runtime
import train
from test_train import GradientRecorder, tiny_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy data (64 rows), the tiny random model and its processor, and the same model saved
    as a folder (`base`) for the runs that load it by path; shared by the whole module."""
    root = tmp_path_factory.mktemp("wiring")
    cfg = config.parse_config(tiny_args(root))
    d = processes.Dist()
    toy.prepare_toy_data(cfg)
    examples, _ = runtime.load_datasets(cfg, d)
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    policy.save_pretrained(root / "base")
    qwen.save_processor(processor, root / "base")
    return SimpleNamespace(root=root, examples=examples, policy=policy, processor=processor,
                           base=root / "base", data=Path(checkpoints.data_sources(cfg)[0]))


def make_config(world, *extra: str) -> config.Config:
    """tiny_args' offline configuration on the module's toy data, with `extra` flags."""
    return config.parse_config(tiny_args(world.root, *extra))


@torch.no_grad()
def logprobs(model, rollouts, temperature):
    """The oracle every scored log-prob is checked against: one direct call, no loop code."""
    return qwen.completion_logprobs(model, rollouts, temperature=temperature)


def flat_grad(loss, policy) -> torch.Tensor:
    """d loss / d parameters, flattened in GradientRecorder's layout (zeros where unused)."""
    params = list(policy.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for g, p in zip(grads, params)])


def truncated(rollouts, caps) -> qwen.Rollouts:
    """The rollouts with row b cut to at most caps[b] tokens, as if EOS had come earlier: the
    test's choice of lengths, so that token counts differ where the test needs them to."""
    T = rollouts.completion_mask.shape[1]
    keep = torch.arange(T)[None, :] < torch.tensor(caps)[:, None]           # [B, T]
    return dataclasses.replace(rollouts, completion_mask=rollouts.completion_mask * keep)


def record_update(monkeypatch, batch):
    """Record every papo_loss call of an update (its logp argument and keywords) and the rows
    of the micro-batch behind it (Rollouts.select on the batch's own rollouts)."""
    calls, rows = [], []
    real_loss, real_select = train.papo.papo_loss, qwen.Rollouts.select

    def loss(*args, **kwargs):
        logp = args[0] if args else kwargs["logp"]
        calls.append(SimpleNamespace(logp=logp.detach().clone(), kwargs=kwargs))
        return real_loss(*args, **kwargs)

    def select(self, indices):
        if self is batch.rollouts:
            rows.append([int(i) for i in indices])
        return real_select(self, indices)
    monkeypatch.setattr(train.papo, "papo_loss", loss)
    monkeypatch.setattr(qwen.Rollouts, "select", select)
    return calls, rows


def normalizer_of(call) -> float:
    """The global normaliser a recorded papo_loss call was given (its normalizer keyword)."""
    return float(call.kwargs["normalizer"])


class StepRecorder(GradientRecorder):
    """GradientRecorder that also notes how many papo_loss calls came before each optimizer
    step, so that each call can be assigned to its mini-batch."""

    def __init__(self, policy, calls):
        super().__init__(policy)
        self.calls, self.bounds = calls, []

    def step(self):
        self.bounds.append(len(self.calls))
        super().step()


# ---------------------------------------------------------------------------------------------
# Rewards and advantages: each rollout graded against ITS prompt, grouped by G
# ---------------------------------------------------------------------------------------------

# Per prompt, what each of its G = 4 rollouts answers: R right and formatted, r right without
# the <think> format, W another prompt's answer formatted, U another prompt's answer without
# the format. (accuracy, format) of each, and no group with all rewards equal.
PATTERNS = (("R", "W", "W", "U"), ("W", "R", "r", "U"), ("U", "R", "W", "R"))
GRADES = {"R": (1.0, 1.0), "r": (1.0, 0.0), "W": (0.0, 1.0), "U": (0.0, 0.0)}


@pytest.fixture(scope="module")
def graded(world):
    """collect_batch on 3 prompts x G = 4 (N != G), generated in chunks of 2 prompts, with every
    sampled text replaced by a crafted answer: prompt k's rollouts follow PATTERNS[k], and a
    wrong one gives the answer of prompt k + 1 - so a rollout graded against another prompt of
    the batch changes its accuracy. Returns the batch and, row by row, the code of the text
    each row should hold (its prompt's PATTERNS entry, prompts in the order generated)."""
    picked = {}
    for ex in world.examples:                     # three questions with distinct answers
        picked.setdefault(ex.answer, ex)
    picked = list(picked.values())[:3]
    answers = [ex.answer for ex in picked]
    assert len(set(answers)) == 3
    generated = []
    real = qwen.generate_rollouts

    def crafted(policy, processor, items, **kwargs):
        rollouts = real(policy, processor, items, **kwargs)
        assert kwargs["num_samples"] == 4
        texts = []
        for it in items:
            k = answers.index(it["answer"])
            generated.append(it["answer"])
            right, wrong = answers[k], answers[(k + 1) % 3]
            texts += [{"R": f"<think>I count them.</think> \\boxed{{{right}}}",
                       "r": f"\\boxed{{{right}}}",
                       "W": f"<think>I count them.</think> \\boxed{{{wrong}}}",
                       "U": f"\\boxed{{{wrong}}}"}[code] for code in PATTERNS[k]]
        return dataclasses.replace(rollouts, texts=texts)

    cfg = make_config(world, "--preset", "grpo", "--prompts-per-step", "3", "--group-size", "4",
                 "--generation-batch", "2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.qwen, "generate_rollouts", crafted)
        batch, _, _ = train.collect_batch(world.policy, world.processor, picked, cfg,
                                          processes.Dist(), step=1, cursor=0, need_masked=False)
    assert sorted(generated) == sorted(answers)             # each prompt generated once
    # row n * G + g of the batch should hold the g-th crafted text of the n-th prompt generated
    plan = [code for answer in generated for code in PATTERNS[answers.index(answer)]]
    return batch, plan


def test_each_rollout_is_graded_against_its_own_prompts_answer(graded):
    """reward_phase grades row b = n * G + g against prompt n = b // G, in the order the prompts
    were generated (across --generation-batch chunks). Catches prompts[b % N] (or any other
    index), prompts handed to the grader in another order than generated, and chunks stacked
    out of order: a row then meets another prompt's answer and its accuracy flips."""
    batch, plan = graded
    acc = [GRADES[code][0] for code in plan]
    fmt = [GRADES[code][1] for code in plan]
    assert batch.accuracy.tolist() == acc
    assert batch.fmt.tolist() == fmt
    assert batch.rewards.tolist() == torch.tensor([0.9 * a + 0.1 * f
                                                   for a, f in zip(acc, fmt)]).tolist()


def test_advantages_are_normalised_within_each_group_of_g(graded):
    """collect_batch's advantages are A_i = (r_i - mean_G) / (std_G + 1e-6) over each prompt's
    G = 4 rollouts (unbiased std), computed here by hand from the crafted rewards. Catches
    grouping by the number of prompts (3) or any other size, and groups taken across prompts."""
    batch, plan = graded
    rewards = [0.9 * GRADES[c][0] + 0.1 * GRADES[c][1] for c in plan]
    expected = []
    for n in range(0, len(rewards), 4):
        group = [float(torch.tensor(r, dtype=torch.float32)) for r in rewards[n:n + 4]]
        mean, std = statistics.mean(group), statistics.stdev(group)
        expected += [(r - mean) / (std + 1e-6) for r in group]
    torch.testing.assert_close(batch.advantages.double().cpu(),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Scoring: which model and which temperature
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(world):
    """A PAPO-G batch sampled at temperature 0.7 (4 prompts x 4), scored with 2 updates per step
    (so old log-probs are computed), beta > 0 and a reference model that is NOT the policy (a
    tiny model of another seed), so that every log-prob says which model produced it."""
    cfg = make_config(world, "--preset", "papo-g", "--beta", "0.01", "--temperature", "0.7",
                 "--updates-per-step", "2", "--micro-batch-size", "4", "--grad-clip", "1e9")
    ref, _ = toy.build_tiny_model(seed=1, size="tiny")
    ref.requires_grad_(False).eval()
    d = processes.Dist()
    batch, _, _ = train.collect_batch(world.policy, world.processor, world.examples, cfg, d,
                                      step=1, cursor=0, need_masked=True)
    masked = batch.masked                   # score_phase frees it once scored
    train.score_phase(batch, world.policy, ref, cfg, d)
    return SimpleNamespace(cfg=cfg, d=d, batch=batch, masked=masked, ref=ref)


def test_reference_logprobs_come_from_the_frozen_reference_model(world, scored):
    """score_phase's ref_logp is the REFERENCE model's log-prob of the rollouts (at the sampling
    temperature), not the policy's: the two models differ, and ref_logp matches the reference
    to 1e-5 while it is far from the policy's. Catches ref log-probs scored with the policy."""
    batch, T = scored.batch, scored.cfg.temperature
    ref = logprobs(scored.ref, batch.rollouts, T)
    mine = logprobs(world.policy, batch.rollouts, T)
    mask = batch.rollouts.completion_mask.bool()
    torch.testing.assert_close(batch.ref_logp, ref, rtol=1e-5, atol=1e-5)
    assert (mine - ref)[mask].abs().max() > 0.1


def test_every_logprob_of_the_loop_is_scored_at_the_sampling_temperature(world, scored,
                                                                         monkeypatch):
    """--temperature 0.7: the old, reference and masked-image log-probs of score_phase, and the
    log-probs the update feeds papo.papo_loss (micro-batch by micro-batch), all equal
    completion_logprobs(..., temperature=0.7) of the right model and rollouts, and are far from
    those at temperature 1.0. Catches any of them scored at the default temperature 1 (or
    another one) while the rollouts were sampled at 0.7."""
    batch, T = scored.batch, scored.cfg.temperature
    assert T == 0.7
    mask = batch.rollouts.completion_mask.bool()
    for got, model, rollouts in ((batch.old_logp, world.policy, batch.rollouts),
                                 (batch.ref_logp, scored.ref, batch.rollouts),
                                 (batch.masked_logp, world.policy, scored.masked)):
        assert got is not None
        torch.testing.assert_close(got, logprobs(model, rollouts, 0.7), rtol=1e-5, atol=1e-5)
        assert (got - logprobs(model, rollouts, 1.0))[mask].abs().max() > 0.1
    # the update's own forward; GradientRecorder leaves the weights as they are, so the second
    # mini-batch is scored with the same weights as the first
    calls, rows = record_update(monkeypatch, batch)
    train.update_phase(batch, world.policy, GradientRecorder(world.policy), scored.cfg,
                       scored.d, step=1)
    assert len(calls) == len(rows) == 4                      # 2 mini-batches x 2 micro-batches
    direct = logprobs(world.policy, batch.rollouts, 0.7)
    at_one = logprobs(world.policy, batch.rollouts, 1.0)
    for call, idx in zip(calls, rows):
        torch.testing.assert_close(call.logp, direct[idx], rtol=1e-5, atol=1e-5)
        assert (call.logp - at_one[idx])[mask[idx]].abs().max() > 0.1


def test_reference_is_the_starting_policy_after_updates_and_after_a_resume(world, monkeypatch):
    """End to end (train.main, PAPO-G with beta 0.01 and lr 1e-2, so one update moves the
    policy a long way): at steps 2 and 3 - step 3 after --resume from step 2's checkpoint - the
    ref_logp that score_phase produced equal the STARTING model's (--model, the init_path a toy
    run's warm start would be) log-probs of that step's rollouts, while the live policy's are
    far from them (at step 1 the two coincide). Catches a reference that is the policy
    itself (not a copy) or scored with it, and a resume that copies the resumed policy instead
    of reloading the starting one."""
    run = world.root / "ref-run"
    args = ["--model", str(world.base), "--data", str(world.data), "--out", str(run),
            "--preset", "papo-g", "--beta", "0.01", "--lr", "1e-2", "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "2", "--updates-per-step", "1",
            "--max-new-tokens", "6", "--micro-batch-size", "4", "--min-pixels", "3136",
            "--max-pixels", "12544", "--sample-every", "0"]
    seen = []
    real = train.score_phase

    def recording(batch, policy, ref, cfg, d):
        real(batch, policy, ref, cfg, d)
        seen.append((batch.rollouts, batch.ref_logp.clone(),
                     logprobs(policy, batch.rollouts, cfg.temperature)))
    monkeypatch.setattr(train, "score_phase", recording)
    train.main(args)
    train.main(["--resume", str(run), "--steps", "3"])
    assert len(seen) == 3
    start, _ = qwen.load_model(str(world.base))
    for step, (rollouts, ref_logp, live) in enumerate(seen, start=1):
        expected = logprobs(start, rollouts, 1.0)
        torch.testing.assert_close(ref_logp, expected, rtol=1e-5, atol=1e-5)
        moved = (live - expected)[rollouts.completion_mask.bool()].abs().max()
        assert moved > 0.1 if step > 1 else moved < 1e-5, (step, moved)


# ---------------------------------------------------------------------------------------------
# Sampling: top_p, temperature and top_k reach generate (behaviour only)
# ---------------------------------------------------------------------------------------------

def groups_identical(rollouts, G) -> list[bool]:
    """Per group: are its G completions the same tokens (and the same length)?"""
    T = rollouts.completion_ids.shape[1]
    ids = (rollouts.completion_ids * rollouts.completion_mask.long()).view(-1, G, T)
    mask = rollouts.completion_mask.view(-1, G, T)
    return [bool((ids[n] == ids[n, :1]).all() and (mask[n] == mask[n, :1]).all())
            for n in range(len(ids))]


@pytest.mark.parametrize("flags,identical", [
    (("--top-p", "1e-6", "--temperature", "1.0"), True),     # a nucleus of one token: greedy
    (("--top-p", "1.0", "--temperature", "1e-4"), True),     # (almost) all mass on the argmax
    (("--top-p", "1.0", "--temperature", "1.0"), False),     # the control: real sampling
])
def test_top_p_and_temperature_reach_the_sampler(world, flags, identical):
    """Through collect_batch (the command-line flags, generate_phase, generate_rollouts):
    --top-p 1e-6 or --temperature 1e-4 make every group's G rollouts identical, plain sampling
    of the same tiny random model makes every group's rollouts differ. Catches either setting
    dropped on its way to the sampler (it then samples at top_p 1 / temperature 1)."""
    cfg = make_config(world, "--preset", "grpo", "--prompts-per-step", "3", *flags)
    batch, _, _ = train.collect_batch(world.policy, world.processor, world.examples, cfg,
                                      processes.Dist(), step=1, cursor=0, need_masked=False)
    assert groups_identical(batch.rollouts, cfg.group_size) == [identical] * 3


def test_top_k_reaches_the_sampler_in_eval_and_in_generate_rollouts(world, monkeypatch):
    """top_k = 1 is greedy: eval.evaluate(..., top_k=1) samples every question's k answers
    identical, and so does model.generate_rollouts(..., top_k=1) itself; top_k = 0 (off) gives
    different samples. Catches top_k dropped by evaluate or by generate_rollouts' config."""
    examples = world.examples[:3]
    generated = []
    real = qwen.generate_rollouts
    monkeypatch.setattr(evaluation.qwen, "generate_rollouts",
                        lambda *a, **k: generated.append(real(*a, **k)) or generated[-1])
    for top_k, identical in ((1, True), (0, False)):
        generated.clear()
        evaluation.evaluate(world.policy, world.processor, examples, samples=4, top_k=top_k,
                            max_new_tokens=8, mask_ratios=(), kl_ratio=None)
        assert len(generated) == 1
        assert groups_identical(generated[0], 4) == [identical] * 3, top_k
    items = [ex.to_prompt(None, 3136, 12544) for ex in examples]
    for top_k, identical in ((1, True), (0, False)):
        torch.manual_seed(0)
        rollouts = real(world.policy, world.processor, items, num_samples=4, max_new_tokens=8,
                        top_k=top_k)
        assert groups_identical(rollouts, 4) == [identical] * 3, top_k


# ---------------------------------------------------------------------------------------------
# The update: the token-mean normaliser of each MINI-batch
# ---------------------------------------------------------------------------------------------

def test_each_mini_batch_is_normalised_by_its_own_tokens_and_gets_its_own_gradient(
        world, monkeypatch):
    """--updates-per-step 2 (GRPO, beta 0, token-mean): every papo_loss call of a mini-batch is
    given that mini-batch's token count as normaliser, and each of the two recorded gradients
    equals the oracle on the mini-batch's own rows, grad of -sum(A * exp(l - old) * m) / sum(m)
    (ratios stay inside the clip range: the weights do not move). Response lengths and
    advantages are the test's: the two mini-batches hold different token counts. Catches the
    count taken over the whole batch (or another mini-batch) instead of the mini-batch."""
    cfg = make_config(world, "--preset", "grpo", "--beta", "0", "--updates-per-step", "2",
                 "--micro-batch-size", "4", "--grad-clip", "1e9")
    d = processes.Dist()
    policy = world.policy
    batch, _, _ = train.collect_batch(policy, world.processor, world.examples, cfg, d, step=1,
                                      cursor=0, need_masked=False)
    assert len(batch.rollouts) == 16
    batch.rollouts = truncated(batch.rollouts, [1, 2, 3, 4, 2, 2, 2, 2, 8, 8, 8, 8, 3, 5, 7, 8])
    batch.advantages = torch.tensor([1.5, -0.5, -0.5, -0.5, -1.0, 1.0, -1.0, 1.0,
                                     0.5, 0.5, -0.5, -0.5, -1.5, 0.5, 0.5, 0.5])
    train.score_phase(batch, policy, None, cfg, d)
    calls, rows = record_update(monkeypatch, batch)
    recorder = StepRecorder(policy, calls)
    train.update_phase(batch, policy, recorder, cfg, d, step=1)
    assert recorder.bounds == [2, 4] and len(rows) == 4     # 2 mini-batches x 2 micro-batches
    mask = batch.rollouts.completion_mask
    minis = [rows[0] + rows[1], rows[2] + rows[3]]
    assert sorted(minis[0] + minis[1]) == list(range(16))
    counts = [float(mask[m].sum()) for m in minis]
    assert counts[0] != counts[1]                             # so a wrong count shows
    for k, call in enumerate(calls):
        assert normalizer_of(call) == counts[k // 2]
    for grad, mini in zip(recorder.grads, minis):
        logp = qwen.completion_logprobs(policy, batch.rollouts.select(mini),
                                        temperature=cfg.temperature)
        m = mask[mini]
        ratio = torch.exp(logp - batch.old_logp[mini])
        oracle = flat_grad(-(batch.advantages[mini, None] * ratio * m).sum() / m.sum(), policy)
        assert oracle.norm() > 0
        torch.testing.assert_close(grad, oracle, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Data parallel: every count and every logged mean is over ALL ranks
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_of(parts: list[dict]) -> train.Batch:
    """One Batch holding the rows of every part (a rank's saved pieces), in rank order; the
    [B, T] masked-branch log-probs are padded on the right like cat_rollouts pads the rows."""
    rollouts = qwen.cat_rollouts([p["rollouts"] for p in parts])
    T = rollouts.completion_ids.shape[1]
    cat = lambda key: torch.cat([p[key] for p in parts])
    return train.Batch(rollouts=rollouts, masked=None, rewards=cat("rewards"),
                       accuracy=cat("accuracy"), fmt=cat("fmt"), advantages=cat("advantages"),
                       masked_logp=torch.cat([F.pad(p["masked_logp"],
                                                    (0, T - p["masked_logp"].shape[1]))
                                              for p in parts]))


@pytest.mark.slow
def test_two_ranks_update_as_one_process_on_the_union_of_their_rollouts(world, tmp_path):
    """torchrun, 2 gloo ranks, each with its own prompts, response lengths, advantages and
    correct rollouts (tests/_two_rank_update.py; PAPO-G with gamma 0.5, SFT coefficient 0.5,
    micro-batches of 4): the gradient every rank applies equals the gradient of ONE process
    updating on the union of both ranks' rows (to 1e-4), and the metrics rank 0 returns are the
    union's token-weighted ones (a rank's own are not). The ranks' token counts and SFT token
    counts differ, so a count or a mean left local, or taken as world x the local one, shows.
    Catches the token-count normaliser, the SFT term's count of correct rollouts' tokens or the
    logged metrics not summed over ranks, and a loss not scaled for DDP's averaging."""
    out = tmp_path / "ranks"
    out.mkdir()
    flags = tiny_args(world.root, "--preset", "papo-g", "--beta", "0", "--gamma", "0.5",
                      "--sft-coef", "0.5", "--micro-batch-size", "4", "--grad-clip", "1e9",
                      "--updates-per-step", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(REPO / "tests" / "_two_rank_update.py"),
           str(world.base), str(out), *flags]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert parts[0]["tokens"] != parts[1]["tokens"]
    sft_tokens = [float((p["rollouts"].completion_mask * p["accuracy"][:, None]).sum())
                  for p in parts]
    assert sft_tokens[0] != sft_tokens[1]
    assert parts[0]["rollouts"].texts != parts[1]["rollouts"].texts     # their own samples
    assert len(parts[0]["grads"]) == len(parts[1]["grads"]) == 1
    torch.testing.assert_close(parts[0]["grads"][0], parts[1]["grads"][0], rtol=0, atol=0)

    cfg = config.parse_config(flags)
    policy, _ = qwen.load_model(str(world.base))
    policy.train()
    recorder = GradientRecorder(policy)
    union = train.update_phase(_batch_of(parts), policy, recorder, cfg, processes.Dist(), step=1)
    assert recorder.grads[0].norm() > 0
    torch.testing.assert_close(parts[0]["grads"][0], recorder.grads[0], rtol=1e-4, atol=1e-7)
    logged = parts[0]["metrics"]
    assert set(logged) == set(union)
    for key, value in union.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    # rank 0's own rows give other means: a metric not averaged over ranks would show
    alone = train.update_phase(_batch_of(parts[:1]), policy, GradientRecorder(policy), cfg,
                               processes.Dist(), step=1)
    for key in ("pg_loss", "kl_prcp", "entropy_orig", "entropy_mask", "sft_nll"):
        assert alone[key] != pytest.approx(union[key], rel=1e-3), key
