"""End-to-end checks of the training loop on the "tiny" offline model (seconds each)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import checkpoints
import processes
import runtime
import train
import model as qwen
import data
import imaging
import toy

REPO = Path(__file__).resolve().parents[1]


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    """A configuration small enough for a unit test: tiny model, 64 toy rows, 2-step warm start."""
    return ["--tiny-size", "tiny", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--toy-train-size", "64", "--toy-eval-size", "4", "--eval-samples", "1",
            "--warm-start-steps", "2", "--steps", "1", "--prompts-per-step", "4", "--group-size", "4",
            "--max-new-tokens", "8", "--micro-batch-size", "8", "--sample-every", "1",
            "--save-every", "1", *extra]


def params(folder: Path) -> dict[str, torch.Tensor]:
    policy, _ = qwen.load_model(str(folder))
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def last_checkpoint(run: Path) -> Path:
    return checkpoints.latest_checkpoint(run)


def test_smoke_one_step_changes_parameters_and_logs_every_field(tmp_path):
    """Smoke test: one PAPO-G step runs, its loss is finite and the parameters move."""
    result = train.main(tiny_args(tmp_path, "--lr", "1e-2"))
    run = tmp_path / "run"
    start = params(toy.warm_start_path(config.parse_config(tiny_args(tmp_path))))
    after = params(last_checkpoint(run))
    assert any(not torch.equal(start[k], after[k]) for k in start)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward", "accuracy", "format", "kl_prcp", "kl_ref", "entropy_orig",
                "entropy_mask", "clip_low", "clip_high", "clip_dual", "response_length",
                "zero_var_frac", "grad_norm", "t_rollout", "t_score", "t_update", "pg_loss"):
        assert key in row, key
        assert row[key] == row[key], key  # not NaN
    assert result["before"] is not None and result["after"] is not None
    assert (run / "curves.png").is_file()
    # the checkpoint is a plain transformers folder too
    from transformers import Qwen2_5_VLForConditionalGeneration
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(last_checkpoint(run))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_resume_is_exact(tmp_path):
    """2 steps, then resume to 4 == 4 steps in one go (same parameters, same metrics)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(); b.mkdir()
    common = ["--cache", str(tmp_path / "cache")]
    train.main(tiny_args(a, "--steps", "4", *common))
    train.main(tiny_args(b, "--steps", "2", *common))
    train.main(["--resume", str(b / "run"), "--steps", "4"])
    pa, pb = params(last_checkpoint(a / "run")), params(last_checkpoint(b / "run"))
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    rows = lambda r: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines()]
    ra, rb = rows(a / "run"), rows(b / "run")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    train.main(tiny_args(tmp_path, "--steps", "1"))
    run = tmp_path / "run"
    good = last_checkpoint(run)
    cfg = config.Config(**json.loads((run / "config.json").read_text()))
    policy, processor = qwen.load_model(str(good))
    optimizer = torch.optim.AdamW(policy.parameters())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", crash)     # dies after the weights, before the state
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(run, 2, policy, processor, optimizer, {"step": 2}, cfg)
    monkeypatch.undo()
    assert last_checkpoint(run) == good
    qwen.load_model(str(last_checkpoint(run)))      # still complete and loadable
    assert (good / "trainer_state.pt").is_file()


def test_bad_configuration_fails_before_heavy_work(tmp_path, capsys):
    for extra, needle in [(["--group-size", "1"], "--group-size"),
                          (["--data", str(tmp_path / "nope.jsonl")], "nope.jsonl"),
                          (["--preset", "ppo"], "preset"),
                          (["--prompts-per-step", "6", "--updates-per-step", "5"], "--updates-per-step"),
                          (["--fsdp"], "torchrun")]:
        with pytest.raises(SystemExit) as err:
            train.main(tiny_args(tmp_path, *extra))
        assert needle in str(err.value) + capsys.readouterr().err


def test_papo_preset_on_a_dataset_without_images_is_refused(tmp_path):
    rows = tmp_path / "text.jsonl"
    rows.write_text(json.dumps({"problem": "1+1?", "answer": "2", "images": []}) + "\n")
    with pytest.raises(SystemExit) as err:
        train.main(tiny_args(tmp_path, "--data", str(rows)))
    assert "image" in str(err.value)


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_parameters(tmp_path):
    """Two gloo ranks train 2 steps; train.py gathers a fingerprint of every rank's parameters
    at the end, and they must be identical (gradients were all-reduced every update)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", str(REPO / "train.py"), *tiny_args(tmp_path, "--steps", "2")]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=300)
    final = json.loads((tmp_path / "run" / "final_eval.json").read_text())
    prints = final["rank_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]       # rank 0 alone logged


def _torchrun(nproc: int, port: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(port), str(REPO / "train.py"), *args]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=300)


def _assert_same_parameters(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Every tensor equal to `rel` relative (||a - b|| <= rel ||a||, float32); 0 = bit for bit."""
    assert a.keys() == b.keys()
    for k in a:
        if rel == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            gap = float((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-30))
            assert gap <= rel, (k, gap)


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_exactly_and_saves_a_plain_transformers_folder(tmp_path):
    """--fsdp on 2 gloo ranks (PAPO-G with a sharded reference, beta 0.01):
    - after 2 steps it holds the parameters of a 2-rank DDP run of the same configuration
      (measured: identical bit for bit, torch 2.13 CPU; asserted to 1e-5 relative per tensor
      so that another reduction order passes; lr 1e-3 moves the weights by up to 2e-3);
    - resumed from that checkpoint (model gathered into one HF folder, optimizer from its
      torch.distributed.checkpoint shards) to step 4 == 4 steps in one go, bit for bit;
    - the checkpoint folder loads with plain transformers."""
    common = ["--cache", str(tmp_path / "cache"), "--lr", "1e-3"]
    ddp, fsdp, straight = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "straight"
    _torchrun(2, 29541, tiny_args(ddp, "--steps", "2", *common))
    _torchrun(2, 29542, tiny_args(fsdp, "--steps", "2", "--fsdp", *common))
    start = params(toy.warm_start_path(config.parse_config(tiny_args(fsdp, *common))))
    p_ddp, p_fsdp = params(last_checkpoint(ddp / "run")), params(last_checkpoint(fsdp / "run"))
    assert any(not torch.equal(start[k], p_fsdp[k]) for k in start)       # it did train
    _assert_same_parameters(p_ddp, p_fsdp)
    final = json.loads((fsdp / "run" / "final_eval.json").read_text())
    assert final["rank_fingerprints"][0] == final["rank_fingerprints"][1]
    assert final["before"] is not None and final["after"] is not None     # evaluated on all ranks

    from transformers import Qwen2_5_VLForConditionalGeneration
    folder = last_checkpoint(fsdp / "run")
    assert (folder / "optimizer").is_dir()                                 # sharded AdamW state
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    assert plain.config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    for k, v in plain.state_dict().items():
        assert torch.equal(v, p_fsdp[k]), k
    if plain.config.tie_word_embeddings:                                   # the tiny model: tied
        assert plain.lm_head.weight is plain.model.language_model.embed_tokens.weight

    _torchrun(2, 29543, ["--resume", str(fsdp / "run"), "--steps", "4"])
    _torchrun(2, 29544, tiny_args(straight, "--steps", "4", "--fsdp", *common))
    _assert_same_parameters(params(last_checkpoint(straight / "run")),
                            params(last_checkpoint(fsdp / "run")), rel=0)
    rows = lambda r: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows(fsdp / "run")] == [1, 2, 3, 4]
    assert [r["kl_prcp"] for r in rows(fsdp / "run")] == [r["kl_prcp"] for r in rows(straight / "run")]


@pytest.mark.slow
def test_fsdp_matches_ddp_through_every_update_path(tmp_path):
    """The update's other paths under --fsdp on 2 ranks, against DDP: micro-batches of 2 (FSDP
    reduce-scatters after each, DDP all-reduces once), 2 updates per step (old log-probs),
    gradient checkpointing (pictures encoded inside the forward), --perception-grad (two
    forwards before one backward), exact entropies, the Double Entropy Loss, SFT and the
    token-level KL_prcp mask (a no-gradient pass before the gradient ones). Measured after 2
    steps: largest element gap 3.4e-7 against changes up to 4e-3, largest per-tensor relative
    gap 2.9e-5 (a tensor whose AdamW steps magnify the rounding of tiny gradients); asserted
    to 2e-4 relative per tensor."""
    extra = ["--cache", str(tmp_path / "cache"), "--lr", "1e-3", "--steps", "2",
             "--micro-batch-size", "2", "--updates-per-step", "2", "--gradient-checkpointing",
             "--perception-grad", "--entropy", "exact", "--eta-orig", "0.05", "--eta-mask",
             "0.05", "--sft-coef", "0.001", "--kl-prcp-token-fraction", "0.2"]
    _torchrun(2, 29546, tiny_args(tmp_path / "ddp", *extra))
    _torchrun(2, 29547, tiny_args(tmp_path / "fsdp", "--fsdp", *extra))
    _assert_same_parameters(params(last_checkpoint(tmp_path / "ddp" / "run")),
                            params(last_checkpoint(tmp_path / "fsdp" / "run")), rel=2e-4)


def test_resume_names_an_fsdp_mismatch(tmp_path):
    """A checkpoint keeps AdamW's state as one file (DDP / one process) or as per-rank shards in
    optimizer/ (--fsdp); resuming it the other way is refused, naming the flag. (The sharded
    folder is faked here: a real one needs torchrun, see the tests above.)"""
    train.main(tiny_args(tmp_path, "--steps", "1"))
    (last_checkpoint(tmp_path / "run") / "optimizer").mkdir()
    with pytest.raises(SystemExit) as err:
        train.main(["--resume", str(tmp_path / "run"), "--steps", "2"])
    assert "written with --fsdp; resume it with --fsdp" in str(err.value)


@pytest.mark.slow
def test_fsdp_one_process_matches_a_plain_run(tmp_path):
    """A 1-rank --fsdp run (torchrun) == the plain single-process run, with gradient
    checkpointing on (enabled before fully_shard), to 1e-5 relative per tensor (measured: 1.7e-6,
    largest element gap 4.4e-7 against changes up to 2e-3; not bit for bit, because the sharded
    model's checkpointed update encodes pictures inside the forward, model._states_one_pass). The 2-rank comparison is with DDP instead:
    the prompts and samples of a rank depend on its rank, so 2 ranks != 1 process by design."""
    common = ["--cache", str(tmp_path / "cache"), "--lr", "1e-3", "--steps", "2",
              "--gradient-checkpointing"]
    # one thread, as the torchrun process below (OMP_NUM_THREADS=1): another thread count
    # groups the sums of each kernel otherwise, and AdamW's m / sqrt(v) magnifies that rounding
    # in the gradients near 0 (on an Intel Xeon a zero-initialised bias moved 1.05e-5 apart)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(tiny_args(tmp_path / "plain", *common))
    finally:
        torch.set_num_threads(threads)
    _torchrun(1, 29545, tiny_args(tmp_path / "fsdp", "--fsdp", *common))
    _assert_same_parameters(params(last_checkpoint(tmp_path / "plain" / "run")),
                            params(last_checkpoint(tmp_path / "fsdp" / "run")))


def _tiny_batch(tmp_path, *extra):
    """A real rollout batch of the tiny model on the toy task, and everything that made it."""
    cfg = config.parse_config(tiny_args(tmp_path, *extra))
    d = processes.Dist()
    toy.prepare_toy_data(cfg)
    examples, _ = runtime.load_datasets(cfg, d)
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    return cfg, d, examples, policy, processor


def test_generation_in_chunks_of_prompts_gives_the_rollouts_of_one_call(tmp_path, monkeypatch):
    """--generation-batch 2 on 5 prompts: three generate calls (2 + 2 + 1 prompts), stacked in
    prompt order. Greedy decoding in float64 makes the samples comparable: every row's prompt,
    pictures, masked-branch pixels and completion equal those of one call over all 5 prompts."""
    cfg, d, examples, policy, processor = _tiny_batch(tmp_path, "--prompts-per-step", "5")
    policy = policy.double()
    calls = []
    real = train.qwen.generate_rollouts
    monkeypatch.setattr(train.qwen, "generate_rollouts",
                        lambda policy, processor, items, **kw:
                        calls.append(len(items)) or real(policy, processor, items, **kw))
    prompts = examples[:5]
    runs = {}
    for batch in (0, 2):
        c = dataclasses.replace(cfg, generation_batch=batch, temperature=0.0)
        runs[batch] = train.generate_phase(policy, processor, prompts, c, seed=3, need_masked=True)
    assert calls == [5, 2, 2, 1]
    (whole, whole_masked), (chunked, chunked_masked) = runs[0], runs[2]
    assert len(chunked) == len(whole) == 5 * cfg.group_size
    strip = lambda ids, mask: ids[mask.bool()].tolist()
    for b in range(len(whole)):
        assert strip(chunked.prompt_ids[b], chunked.prompt_mask[b]) == \
            strip(whole.prompt_ids[b], whole.prompt_mask[b])
        assert strip(chunked.completion_ids[b], chunked.completion_mask[b]) == \
            strip(whole.completion_ids[b], whole.completion_mask[b])
    assert chunked.texts == whole.texts
    assert torch.equal(chunked.pixel_values, whole.pixel_values)
    assert torch.equal(chunked.image_grid_thw, whole.image_grid_thw)
    assert torch.equal(chunked_masked.pixel_values, whole_masked.pixel_values)


def _scripted_accuracies(monkeypatch, draws):
    """Replace reward_phase: draw k's groups get the accuracies draws[k] (one row of G per
    group); returns the list of the rollout counts it was called with."""
    calls = []

    def fake_rewards(rollouts, prompts, group_size, thinking_open):
        acc = torch.tensor(draws[len(calls)], dtype=torch.float32).flatten()
        calls.append(len(rollouts))
        assert len(acc) == len(rollouts)
        return acc * 0.9 + 0.1, acc, torch.ones_like(acc)
    monkeypatch.setattr(train, "reward_phase", fake_rewards)
    return calls


MIXED_A, MIXED_B, MIXED_C = [1, 0, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]
ALL_WRONG, ALL_RIGHT = [0, 0, 0, 0], [1, 1, 1, 1]


def test_dynamic_sampling_refills_with_draws_of_draw_size_and_trims_the_extra(tmp_path,
                                                                             monkeypatch):
    """The official refill, 4 groups a step in draws of 2 prompts: draw 1 keeps its mixed
    group; in draw 2 no group passes, so BOTH its groups are kept; draw 3 passes both, one
    more than the step needs, and the extra is trimmed. Whole groups, in draw order."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "dapo", "--prompts-per-step", "4", "--draw-size", "2")
    assert cfg.max_draws == 20                                     # the official number of tries
    calls = _scripted_accuracies(monkeypatch, [[MIXED_A, ALL_WRONG], [ALL_RIGHT, ALL_WRONG],
                                               [MIXED_B, MIXED_C]])
    generated, real = [], train.generate_phase
    monkeypatch.setattr(train, "generate_phase", lambda *a, **k: generated.append(real(*a, **k))
                        or generated[-1])
    batch, cursor, stats = train.collect_batch(policy, processor, examples, cfg, d, step=1,
                                               cursor=0, need_masked=False)
    assert calls == [8, 8, 8] and cursor == 6 and stats["draws"] == 3
    assert batch.accuracy.view(-1, 4).tolist() == [MIXED_A, ALL_RIGHT, ALL_WRONG, MIXED_B]
    assert len(batch.rollouts) == 16 and batch.advantages.view(-1, 4)[1:3].abs().sum() == 0
    assert stats["zero_var_groups"] == 3 and stats["groups"] == 6     # every sampled group
    # the kept rows are the rollouts those accuracies belong to, with their own prompts
    drawn = [(r.texts, r.prompt_ids) for r, _ in generated]
    texts = drawn[0][0][:4] + drawn[1][0] + drawn[2][0][:4]
    assert batch.rollouts.texts == texts
    strip = lambda ids: ids[ids != batch.rollouts.pad_token_id].tolist()
    prompts = [drawn[0][1][0], drawn[1][1][0], drawn[1][1][4], drawn[2][1][0]]
    assert [strip(batch.rollouts.prompt_ids[4 * g]) for g in range(4)] == \
        [strip(p) for p in prompts]


def test_dynamic_sampling_stops_with_a_named_error_after_max_draws(tmp_path, monkeypatch):
    """A step that is still not full after --max-draws draws stops the run with an error that
    names what to change, instead of training on fewer groups."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "dapo", "--prompts-per-step", "4", "--draw-size", "2",
        "--max-draws", "3")
    calls = _scripted_accuracies(monkeypatch, [[MIXED_A, ALL_WRONG]] * 3)
    with pytest.raises(train.DynamicSamplingExhausted,
                       match=r"--max-draws 3 draws of --draw-size 2 prompts and kept only 3 of "
                             r"the 4 groups .* Raise --max-draws or --draw-size"):
        train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                            need_masked=False)
    assert calls == [8, 8, 8]


def test_a_dapo_run_that_cannot_fill_a_step_exits_naming_the_flags_and_logs_draws(
        tmp_path, monkeypatch):
    """End to end: step 1 fills in two draws (logged as draws 2, every kept rollout trained on);
    step 2 never fills, and train.py exits with the error and how to continue."""
    _scripted_accuracies(monkeypatch, [[MIXED_A, MIXED_B], [MIXED_C, MIXED_A]]
                         + [[ALL_WRONG, MIXED_C]] * 2)
    args = tiny_args(tmp_path, "--preset", "dapo", "--prompts-per-step", "4", "--draw-size",
                     "2", "--max-draws", "2", "--steps", "2", "--beta", "0")
    with pytest.raises(SystemExit, match=r"step 2: dynamic sampling made --max-draws 2 draws.*"
                                         r"kept only 2 of the 4 groups(.|\n)*--resume"):
        train.main(args)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["draws"] == 2 and row["kept_rollouts"] == 16


def test_without_dynamic_sampling_nothing_is_dropped(tmp_path, monkeypatch):
    cfg, d, examples, policy, processor = _tiny_batch(tmp_path, "--preset", "grpo")
    monkeypatch.setattr(train, "reward_phase", lambda r, p, g, t: (torch.zeros(len(r)),) * 3)
    batch, cursor, stats = train.collect_batch(policy, processor, examples, cfg, d, step=1,
                                               cursor=0, need_masked=False)
    assert len(batch.rollouts) == 16 and stats["zero_var_groups"] == 4 and cursor == 4
    assert torch.equal(batch.advantages, torch.zeros(16))


@pytest.mark.parametrize("perception_grad", [False, True])
def test_perception_grad_decides_whether_the_masked_branch_carries_gradient(tmp_path,
                                                                            perception_grad):
    extra = ["--perception-grad"] if perception_grad else []
    cfg, d, examples, policy, processor = _tiny_batch(tmp_path, "--preset", "papo-g", "--beta", "0", *extra)
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=True)
    train.score_phase(batch, policy, None, cfg, d)
    idx = torch.arange(len(batch.rollouts))
    masked_logp, _ = train._masked_branch(batch, policy, idx, cfg)
    assert masked_logp.requires_grad == perception_grad
    assert (batch.masked_logp is None) == perception_grad    # detached: computed once, up front
    # The perception term alone: its parameter gradient includes the masked branch's only
    # when --perception-grad is on, so the two modes give different gradients.
    logp = qwen.completion_logprobs(policy, batch.rollouts)
    mask = batch.rollouts.completion_mask
    d_term = (train.papo.perception_kl(logp, masked_logp) * mask).sum()
    grads = torch.autograd.grad(d_term, list(policy.parameters()), allow_unused=True,
                                retain_graph=True)
    detached = train.papo.perception_kl(logp, masked_logp.detach())
    grads_l_only = torch.autograd.grad((detached * mask).sum(), list(policy.parameters()),
                                       allow_unused=True)
    same = all((a is None and b is None) or torch.allclose(a, b) for a, b in zip(grads, grads_l_only))
    assert same != perception_grad


def test_update_micro_batches_hold_whole_groups_each_row_once(tmp_path, monkeypatch):
    """Mini-batches are random groups with their G rollouts adjacent, so every micro-batch
    holds whole groups (each read by completion_logprobs with its prompt once), and each rollout
    is trained on exactly once per step."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "grpo", "--beta", "0", "--updates-per-step", "2",
        "--micro-batch-size", "4", "--group-size", "2", "--prompts-per-step", "8")
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=False)
    micro_batches = []
    select = qwen.Rollouts.select

    def recording(self, indices):
        if self is batch.rollouts:     # the update's micro-batches, not selections inside them
            micro_batches.append([int(i) for i in indices])
        return select(self, indices)
    monkeypatch.setattr(qwen.Rollouts, "select", recording)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    out = train.update_phase(batch, policy, optimizer, cfg, d, step=1)
    G, B = cfg.group_size, len(batch.rollouts)
    assert B == 16 and len(micro_batches) == 4                  # 2 mini-batches x 2 micro
    assert sorted(i for rows in micro_batches for i in rows) == list(range(B))
    for rows in micro_batches:
        assert len(rows) == 4 and all(rows[k] % G == 0 and rows[k:k + G] == list(
            range(rows[k], rows[k] + G)) for k in range(0, len(rows), G))
    assert out["skipped_updates"] == 0


def test_collapse_warning_fires_only_on_the_kl_prcp_hacking_signature():
    calm = [dict(step=i, kl_prcp=0.10, entropy_orig=0.50, entropy_mask=0.80) for i in range(10)]
    hacked = dict(step=10, kl_prcp=0.50, entropy_orig=0.70, entropy_mask=1.00)
    assert "KL_prcp" in runtime.collapse_warning(calm + [hacked])
    # a KL jump with falling entropy is the intended effect, not collapse
    assert runtime.collapse_warning(calm + [{**hacked, "entropy_orig": 0.40}]) is None
    # rising entropies without a KL jump: no warning either
    assert runtime.collapse_warning(calm + [{**hacked, "kl_prcp": 0.12}]) is None
    assert runtime.collapse_warning(calm[:5] + [hacked]) is None         # too little history


# ---------------------------------------------------------------------------------------------
# Real data formats from the command line: a parquet table with <image> markers, the prompt-
# length guard, and the run.json that eval.py reads.
# ---------------------------------------------------------------------------------------------

def _toy_parquet(path: Path, n: int, long_rows: int = 0) -> Path:
    """n toy rows as the PAPO sets store them: images = a list of Image features (PNG bytes),
    the picture placed by an <image> marker; `long_rows` extra rows with a very long question."""
    import io
    import datasets
    import numpy as np
    import toy
    rows = {"problem": [], "answer": [], "images": []}
    for i in range(n + long_rows):
        ex = toy.sample_toy_example(np.random.default_rng([5, i]))
        buf = io.BytesIO()
        ex["image"].save(buf, format="PNG")
        question = ex["problem"] + (" Look again." * 400 if i >= n else "")
        rows["problem"].append(f"Picture: <image> {question}")
        rows["answer"].append(ex["answer"])
        rows["images"].append([{"bytes": buf.getvalue(), "path": None}])
    features = datasets.Features({"problem": datasets.Value("string"),
                                  "answer": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def _real_model_args(tmp_path: Path, data_file: Path, *extra: str) -> list[str]:
    """--model given: the official recipe's defaults apply, so the test shrinks them by flag."""
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    policy.save_pretrained(tmp_path / "base")
    qwen.save_processor(processor, tmp_path / "base")
    return ["--model", str(tmp_path / "base"), "--data", str(data_file),
            "--eval-data", str(data_file), "--eval-size", "2", "--eval-samples", "1",
            "--out", str(tmp_path / "runs" / "default"), "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "2", "--updates-per-step", "1", "--max-new-tokens", "6",
            "--micro-batch-size", "4", "--lr", "1e-3", "--sample-every", "1",
            "--min-pixels", "3136", "--max-pixels", "12544", *extra]


def test_two_steps_on_a_parquet_table_then_eval_reads_the_run_folder(tmp_path, monkeypatch):
    import datasets
    import eval as evaluation
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    table = _toy_parquet(tmp_path / "train.parquet", 6, long_rows=1)
    args = _real_model_args(tmp_path, table, "--preset", "papo-g", "--max-prompt-length", "200")
    run = tmp_path / "runs" / "default"

    # one row is ~1,600 tokens: the run stops before training and names the row
    with pytest.raises(SystemExit, match=r"1 of 7 training prompts are longer than "
                                         r"--max-prompt-length 200[\s\S]*train\.parquet:6: \d+ tokens"):
        train.main(args)
    assert not (run / "metrics.jsonl").exists()

    # with --drop-long-prompts it is dropped, counted, and recorded
    train.main(args + ["--drop-long-prompts"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["kl_prcp"] < float("inf") for r in rows)
    info = json.loads((run / "run.json").read_text())
    assert info["dropped_long_prompts"] == {"training": 1, "held-out": 0}  # eval-size 2: no long row
    assert info["checkpoint"] == str((run / "checkpoint-000002").absolute())
    assert (info["min_pixels"], info["max_pixels"], info["max_new_tokens"]) == (3136, 12544, 6)
    assert info["eval_data"] == str(table.absolute())

    # eval.py with no --model: everything from run.json, nothing from train.py
    monkeypatch.chdir(tmp_path)
    results = evaluation.main(["--samples", "1", "--limit", "2", "--mask-ratios", "--kl-ratio", "-1",
                               "--out", str(tmp_path / "res.json")])
    assert list(results) == [str(table.absolute())]
    assert list(results[str(table.absolute())]) == [info["checkpoint"]]


def test_a_min_pixels_above_what_the_processor_keeps_is_lowered_to_it(capsys):
    from types import SimpleNamespace
    import numpy as np
    from PIL import Image
    # The tiny processor keeps at most 112 x 112 = 12,544 pixels; the official budget starts at
    # 200,704. Unlowered, a 112 x 112 picture would go up to 448 x 448, then straight back down.
    tiny = SimpleNamespace(image_processor=toy.image_processor(
        toy.SIZES["tiny"], "qwen2.5-vl", 56 * 56, 112 * 112))
    official = config.Config()
    assert (official.min_pixels, official.max_pixels) == (200_704, 1_003_520)
    fitted = config.fit_pixel_budget(official, tiny)
    assert (fitted.min_pixels, fitted.max_pixels) == (12_544, 1_003_520)
    assert "--min-pixels 200704" in capsys.readouterr().out
    assert dataclasses.replace(fitted, min_pixels=official.min_pixels) == official  # nothing else

    # What the model receives: with the lowered budget, the raw picture's own pixels; through
    # the round trip, blurred ones (which is what the lowering saves, besides the time).
    raw = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), np.uint8))
    pixels = lambda cfg: qwen.encode_images(tiny, [[imaging.budget_resize(
        raw, cfg.min_pixels, cfg.max_pixels)]])["pixel_values"]
    direct = qwen.encode_images(tiny, [[raw]])["pixel_values"]
    assert torch.equal(pixels(fitted), direct)
    assert pixels(official).shape == direct.shape and not torch.allclose(pixels(official), direct)

    # Qwen2.5-VL's own processor keeps up to 12,845,056 pixels: the official budget is untouched.
    real = SimpleNamespace(image_processor=toy.image_processor(
        toy.SIZES["tiny"], "qwen2.5-vl", 3136, 12_845_056))
    assert config.fit_pixel_budget(official, real) is official
    assert capsys.readouterr().out == ""


def test_eval_py_never_imports_train():
    """eval.py is a leaf beside the loop: importing it must not import train.py (a circle)."""
    code = "import sys, eval; assert 'train' not in sys.modules, 'eval imported train'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_eval_every_logs_held_out_accuracy_with_and_without_the_picture(tmp_path):
    """--eval-every 2 over 4 steps: steps 2 and 4 carry eval_* columns and their time, and the
    last one equals the final evaluation (same questions, same seeds, same weights)."""
    result = train.main(tiny_args(tmp_path, "--steps", "4", "--eval-every", "2"))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "eval_accuracy" in r]
    assert logged == [2, 4]
    for r in rows:
        assert ("t_eval" in r) == (r["step"] in (2, 4))
    last = rows[-1]
    assert last["eval_accuracy"] == result["after"]["accuracy"]
    assert last["eval_accuracy_mask0.6"] == result["after"]["accuracy_mask0.6"]
    assert last["t_eval"] > 0


def test_eval_every_does_not_change_the_training_trajectory(tmp_path):
    """The periodic evaluation reseeds torch's generator; each step reseeds its own sampling,
    so the training metrics are the same with and without it."""
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(tiny_args(a, "--steps", "3", "--eval-every", "1"))
    train.main(tiny_args(b, "--steps", "3"))
    keys = ("reward", "accuracy", "response_length", "pg_loss", "kl_prcp", "grad_norm")
    rows = [[{k: json.loads(l)[k] for k in keys} for l in (x / "run" / "metrics.jsonl").read_text().splitlines()]
            for x in (a, b)]
    assert rows[0] == rows[1]


def test_the_shortcut_world_scores_a_conflict_split_where_the_wording_always_misleads(tmp_path):
    """--toy-world shortcut: the before/after evaluation, the eval_* columns, the table and
    run.json carry the conflict split besides the training-like one; the conflict split was drawn
    with its own seed and its letter never gives the answer."""
    result = train.main(tiny_args(tmp_path, "--toy-world", "shortcut", "--eval-every", "1"))
    run = tmp_path / "run"
    for key in ("accuracy", "accuracy_mask0.6", "accuracy_mask1.0", "kl_prcp"):
        assert key in result["after"] and f"conflict_{key}" in result["after"], key
    # every conflict question has a decoy; the 4 training-like ones may have none
    assert "conflict_decoy_rate" in result["after"]
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["eval_conflict_accuracy"] == result["after"]["conflict_accuracy"]
    assert row["eval_conflict_decoy_rate"] == result["after"]["conflict_decoy_rate"]
    table = (run / "final_table.txt").read_text()
    assert "held-out (" in table and "conflict (" in table and "masked 1.0" in table
    info = json.loads((run / "run.json").read_text())
    conflict = [json.loads(l) for l in Path(info["other_eval_data"]["conflict"]).read_text().splitlines()]
    heldout = [json.loads(l) for l in Path(info["eval_data"]).read_text().splitlines()]
    assert {r["task"] for r in conflict} == {"count_conflict"}
    assert toy.wording_rule_accuracy(conflict) == 0.0
    assert {r["task"] for r in heldout} == {"count", "count_color", "count_hint"}
    train_rows = (tmp_path / "cache" / "toy-count+count_color+count_hint" / "train-64" / "data.jsonl")
    seeds = {r["id"].split("-")[1] for r in map(json.loads, train_rows.read_text().splitlines())}
    assert seeds == {"1"} and {r["id"].split("-")[1] for r in heldout} == {"2"}
    assert {r["id"].split("-")[1] for r in conflict} == {"3"}


def test_eval_data_replaces_only_the_training_like_split_of_the_shortcut_world(tmp_path):
    cfg = config.parse_config(tiny_args(tmp_path, "--toy-world", "shortcut",
                                       "--eval-data", "mine.jsonl"))
    _, held = checkpoints.data_sources(cfg)
    assert held["held-out"] == "mine.jsonl" and held["conflict"].endswith("heldout-4/data.jsonl")
    # the plain world keeps its tasks, and with them its cached warm start's name
    plain = config.parse_config(tiny_args(tmp_path))
    assert toy.world_tasks(plain) == toy.DEFAULT_TOY_TASKS
    assert "-count+count_color-seed0-" in toy.warm_start_path(plain).name
    assert list(checkpoints.data_sources(plain)[1]) == ["held-out"]
    # training on one's own data: no toy split is added
    own = config.parse_config(tiny_args(tmp_path, "--toy-world", "shortcut", "--data", "t.jsonl"))
    assert checkpoints.data_sources(own) == ("t.jsonl", {})


def test_shortcut_decoys_are_the_letters_wrong_answers_only():
    ex = lambda problem, answer: data.Example(problem=problem, answer=answer, images=[])
    examples = [ex("Panel B: how many shapes are in the image?", "4"),   # points to 2: a decoy
                ex("Panel D: how many shapes are in the image?", "4"),   # points to the answer
                ex("How many shapes are in the image?", "3")]            # points nowhere
    assert toy.shortcut_decoys(examples) == ["2", None, None]
    assert toy.shortcut_decoys(examples[2:]) is None


def test_the_last_steps_evaluation_is_the_final_one_not_a_second_pass(tmp_path, monkeypatch):
    """--eval-every 3 over 4 steps evaluates at step 3 and at the last step, and the final table
    reuses the last step's numbers: 1 (before) + 2 calls, not 4."""
    calls = []
    real = runtime.evaluate_heldout
    monkeypatch.setattr(runtime, "evaluate_heldout", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = train.main(tiny_args(tmp_path, "--steps", "4", "--eval-every", "3"))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [3, 4]
    assert len(calls) == 3
    assert rows[-1]["eval_accuracy"] == result["after"]["accuracy"]


# ---------------------------------------------------------------------------------------------
# The official objective's switches, as update_phase wires them
# ---------------------------------------------------------------------------------------------

def _recording_papo_loss(monkeypatch):
    """Replace papo.papo_loss by a wrapper that records every call's keyword arguments (and the
    fields of its options)."""
    calls = []
    real = train.papo.papo_loss

    def recording(*args, **kwargs):
        options = kwargs.get("options") or train.papo.Options()        # its fields, flattened
        calls.append({**kwargs, **{f.name: getattr(options, f.name)
                                   for f in dataclasses.fields(options)}})
        return real(*args, **kwargs)
    monkeypatch.setattr(train.papo, "papo_loss", recording)
    return calls


@pytest.mark.parametrize("mode,expected", [("token-mean", "tokens"), ("micro-token-mean", 4.0),
                                           ("seq-mean-token-mean", 16.0)])
def test_update_normalises_by_tokens_sequences_or_micro_batches(tmp_path, monkeypatch, mode,
                                                                expected):
    """The global normaliser of each mode: the mini-batch's token count, its rollout count, or
    for micro-token-mean the number K of micro-batches (16 rollouts in micro-batches of 4)."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "grpo", "--beta", "0", "--micro-batch-size", "4",
        "--agg-mode", mode)
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=False)
    calls = _recording_papo_loss(monkeypatch)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    train.update_phase(batch, policy, optimizer, cfg, d, step=1)
    assert len(calls) == 4 and all(c["agg_mode"] == mode for c in calls)
    if expected == "tokens":
        expected = float(batch.rollouts.completion_mask.sum())
    assert [float(c["normalizer"]) for c in calls] == [expected] * 4


class GradientRecorder:
    """Stands in for the optimizer: records the gradient at each step, changes no weight, so
    update_phase can run again on the same policy with other settings."""

    def __init__(self, policy):
        self.params = list(policy.parameters())
        self.grads = []

    def step(self):
        self.grads.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                     for p in self.params]))

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _update_gradient(batch, policy, cfg, d, **changes):
    """The one gradient update_phase applies (one mini-batch) with the config changed."""
    recorder = GradientRecorder(policy)
    train.update_phase(batch, policy, recorder, dataclasses.replace(cfg, **changes), d, step=1)
    assert len(recorder.grads) == 1
    return recorder.grads[0]


def test_token_mask_gradient_does_not_depend_on_the_micro_batch_size(tmp_path, monkeypatch):
    """--kl-prcp-token-fraction under the default token-mean: each rollout's dropped tokens are
    zeroed and the term is divided by the mini-batch's count of ALL valid tokens (the official
    normaliser), so micro-batches of 4 give the gradient of one micro-batch of 16; the term is
    really in it (the gradient differs with the mask off)."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "papo-g", "--beta", "0", "--gamma", "1.0", "--grad-clip", "1e9",
        "--kl-prcp-token-fraction", "0.2")
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=True)
    train.score_phase(batch, policy, None, cfg, d)
    calls = _recording_papo_loss(monkeypatch)
    whole = _update_gradient(batch, policy, cfg, d, micro_batch_size=16)
    assert len(calls) == 1
    assert float(calls[0]["normalizer"]) == float(batch.rollouts.completion_mask.sum())
    by_four = _update_gradient(batch, policy, cfg, d, micro_batch_size=4)
    torch.testing.assert_close(by_four, whole, rtol=1e-4, atol=1e-7)
    unmasked = _update_gradient(batch, policy, cfg, d, micro_batch_size=16,
                                kl_prcp_token_fraction=0.0)
    assert (unmasked - whole).norm() > 1e-3 * whole.norm()


def test_sft_term_gradient_is_the_same_for_micro_batches_of_2_and_of_16(tmp_path):
    """--sft-coef: the gradient it adds equals coef * grad(sum of -log pi over the correct
    rollouts' tokens / their number), computed directly on the whole batch, whether the update
    runs micro-batches of 2 rollouts or one of 16 (the count is the mini-batch's)."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "grpo", "--beta", "0", "--grad-clip", "1e9")
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=False)
    # which rollouts count as right is the test's choice: 5 of 16, groups split unevenly
    batch.accuracy = torch.zeros(16)
    batch.accuracy[[0, 1, 2, 7, 12]] = 1.0
    base = _update_gradient(batch, policy, cfg, d, micro_batch_size=16)
    by_16 = _update_gradient(batch, policy, cfg, d, micro_batch_size=16, sft_coef=0.5) - base
    by_2 = _update_gradient(batch, policy, cfg, d, micro_batch_size=2, sft_coef=0.5) - \
        _update_gradient(batch, policy, cfg, d, micro_batch_size=2)
    logp = qwen.completion_logprobs(policy, batch.rollouts)
    tokens = batch.rollouts.completion_mask * batch.accuracy[:, None]
    oracle = torch.autograd.grad(0.5 * (-logp * tokens).sum() / tokens.sum(),
                                 list(policy.parameters()), allow_unused=True)
    oracle = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                        for g, p in zip(oracle, policy.parameters())])
    assert oracle.norm() > 0
    torch.testing.assert_close(by_16, oracle, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(by_2, oracle, rtol=1e-4, atol=1e-6)
    # the logged sft_nll is the mean over the correct rollouts' tokens, also when most
    # micro-batches of 2 hold none of them
    out = train.update_phase(batch, policy, GradientRecorder(policy),
                             dataclasses.replace(cfg, micro_batch_size=2, sft_coef=0.5), d, step=1)
    nll = (-logp.detach() * tokens).sum() / tokens.sum()
    assert out["sft_nll"] == pytest.approx(float(nll), rel=1e-5)


def test_gamma_anneal_passes_gamma_t_and_scaled_etas_and_logs_gamma_t(tmp_path, monkeypatch):
    """--gamma-anneal over 4 steps, fraction 0.5 (2 steps): step 1 trains with gamma 0.02,
    step 2 with 0.01 and etas halved, step 3 with 0; without the flag, gamma itself."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "papo-g", "--beta", "0", "--steps", "4", "--gamma-anneal",
        "--eta-orig", "0.04", "--eta-mask", "0.02")
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=True)
    train.score_phase(batch, policy, None, cfg, d)
    calls = _recording_papo_loss(monkeypatch)
    logged = []
    for step, c in ((1, cfg), (2, cfg), (3, cfg), (2, dataclasses.replace(cfg, gamma_anneal=False))):
        logged.append(train.update_phase(batch, policy, GradientRecorder(policy), c, d, step))
    assert len(calls) == 8                                  # 2 micro-batches of 8 per update
    used = [(c["gamma"], c["eta_orig"], c["eta_mask"]) for c in calls[::2]]
    assert used == [(c["gamma"], c["eta_orig"], c["eta_mask"]) for c in calls[1::2]]
    assert used[0] == (0.02, 0.04, 0.02) and used[3] == (0.02, 0.04, 0.02)
    assert used[1] == pytest.approx((0.01, 0.02, 0.01), abs=1e-15)
    assert used[2] == (0.0, 0.0, 0.0)
    assert [r["gamma_t"] for r in logged] == [u[0] for u in used]
    assert logged[1]["eta_orig_t"] == used[1][1] and "eta_orig_t" not in logged[3]


def _jsonl_with_pre_masked_pictures(folder: Path, n: int = 4) -> Path:
    """n toy rows with an images_aug key: each picture's pre-masked copy is its left half
    blacked out (a 'semantic' mask no random patch grid would draw). Pictures of 40 x 40 px,
    under the toy budget's 56 x 56 minimum, so both are upscaled."""
    import numpy as np
    from PIL import Image
    rows = []
    for i in range(n):
        ex = toy.sample_toy_example(np.random.default_rng([9, i]))
        picture = ex["image"].convert("RGB").resize((40, 40))
        pixels = np.asarray(picture).copy()
        pixels[:, :20] = 0
        picture.save(folder / f"p{i}.png")
        Image.fromarray(pixels).save(folder / f"p{i}_masked.png")
        rows.append({"problem": ex["problem"], "answer": ex["answer"], "images": [f"p{i}.png"],
                     "images_aug": [f"p{i}_masked.png"]})
    return data.write_jsonl(rows, folder / "train.jsonl")


def test_masked_image_key_feeds_the_datasets_pictures_to_the_masked_branch(tmp_path):
    """--masked-image-key images_aug: the masked branch's patch rows are exactly those of the
    dataset's pre-masked pictures after the same pixel budget; the held-out set is not asked
    for them; a row built in code with a wrong size is stopped, naming row and column."""
    from PIL import Image
    jsonl = _jsonl_with_pre_masked_pictures(tmp_path)
    cfg = config.parse_config(tiny_args(tmp_path, "--data", str(jsonl), "--eval-data",
                                       str(tmp_path / "plain.jsonl"), "--masked-image-key",
                                       "images_aug", "--prompts-per-step", "2"))
    data.write_jsonl([{"problem": "How many shapes are in the image?", "answer": "1",
                       "images": ["p0.png"]}], tmp_path / "plain.jsonl")
    config.check_config(cfg, 1)
    d = processes.Dist()
    examples, heldout = runtime.load_datasets(cfg, d)
    assert examples[0].masked_images == [tmp_path / "p0_masked.png"]
    assert heldout["held-out"][0].masked_images is None
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    prompts = [examples[0], examples[1]]
    rollouts, masked = train.generate_phase(policy, processor, prompts, cfg, seed=3,
                                            need_masked=True)
    budget = lambda name: imaging.budget_resize(Image.open(tmp_path / name).convert("RGB"),
                                             cfg.min_pixels, cfg.max_pixels)
    assert budget("p0_masked.png").size == (56, 56)
    expected = qwen.encode_images(processor, [[budget("p0_masked.png")], [budget("p1_masked.png")]])
    assert torch.equal(masked.pixel_values.cpu(), expected["pixel_values"])
    assert not torch.equal(masked.pixel_values, rollouts.pixel_values)
    assert torch.equal(masked.completion_ids, rollouts.completion_ids)     # same rollouts
    wrong = dataclasses.replace(examples[0], masked_images=[tmp_path / "p1.png"],
                                images=[Image.new("RGB", (30, 50))], sizes=None)
    with pytest.raises(ValueError, match=r"train\.jsonl:1: column 'images_aug'"):
        train.generate_phase(policy, processor, [wrong, examples[1]], cfg, seed=3,
                             need_masked=True)


def _raw_pictures_outside_the_budget():
    """Two rows built in code whose pictures are outside the tiny run's budget (3,136 ..
    12,544 pixels): 210 x 154 is scaled down, 30 x 44 scaled up."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(4)
    raws = [Image.fromarray(rng.integers(40, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            ((210, 154), (30, 44))]
    rows = [data.Example(problem="How many shapes are in the image?", answer=str(i + 1),
                         images=[raw], source=f"code:{i}") for i, raw in enumerate(raws)]
    return raws, rows


def test_the_patch_mask_is_applied_to_the_raw_picture_then_resized_into_the_budget(tmp_path):
    """The official order: black out 14 x 14 squares of the RAW picture, then resize the masked
    copy into the pixel budget exactly like the original. The masked branch's pixels equal
    budget_resize(mask(raw)) computed by hand (one mask per prompt, drawn in prompt order from
    the step's seed), its grid equals the original's, and the other order (mask the resized
    picture) gives different pixels."""
    cfg, d, _, policy, processor = _tiny_batch(tmp_path, "--prompts-per-step", "2")
    raws, rows = _raw_pictures_outside_the_budget()
    rollouts, masked = train.generate_phase(policy, processor, rows, cfg, seed=5,
                                            need_masked=True)
    fit = lambda im: imaging.budget_resize(im, cfg.min_pixels, cfg.max_pixels)
    assert [fit(raw).size for raw in raws] == [(130, 95), (46, 67)]       # both really resized
    rng = train.np.random.default_rng(5)
    by_hand = [[fit(m) for m in train.papo.mask_image([raw], patch_size=14, ratio=cfg.mask_ratio,
                                                      rng=rng)] for raw in raws]
    expected = qwen.encode_images(processor, by_hand)
    assert torch.equal(masked.pixel_values.cpu(), expected["pixel_values"])
    assert torch.equal(masked.image_grid_thw, rollouts.image_grid_thw)
    assert torch.equal(rollouts.pixel_values.cpu(),
                       qwen.encode_images(processor, [[fit(raw)] for raw in raws])["pixel_values"])
    rng = train.np.random.default_rng(5)
    other_order = [train.papo.mask_image([fit(raw)], patch_size=14, ratio=cfg.mask_ratio, rng=rng)
                   for raw in raws]
    assert not torch.equal(masked.pixel_values.cpu(),
                           qwen.encode_images(processor, other_order)["pixel_values"])


def test_eval_masks_the_raw_picture_then_resizes_it_like_training(tmp_path, monkeypatch):
    """eval.evaluate's masked variant: the pictures handed to generation are
    budget_resize(mask(raw)) with the evaluation's seed stream, not mask(budget_resize(raw))."""
    import eval as evaluation
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    raws, rows = _raw_pictures_outside_the_budget()
    seen = []
    real = evaluation.qwen.generate_rollouts
    monkeypatch.setattr(evaluation.qwen, "generate_rollouts", lambda policy, processor, prompts,
                        **kw: seen.append([p["images"] for p in prompts])
                        or real(policy, processor, prompts, **kw))
    budget = dict(min_pixels=3136, max_pixels=12544)
    evaluation.evaluate(policy, processor, rows, samples=1, max_new_tokens=4, mask_ratios=(0.6,),
                        kl_ratio=None, seed=7, **budget)
    fit = lambda im: imaging.budget_resize(im, budget["min_pixels"], budget["max_pixels"])
    rng = train.np.random.default_rng([7, 0])
    by_hand = [[fit(m) for m in train.papo.mask_image([raw], ratio=0.6, rng=rng)] for raw in raws]
    original, masked_variant = seen
    as_arrays = lambda groups: [[train.np.asarray(im) for im in g] for g in groups]
    assert [[im.size for im in g] for g in masked_variant] == [[(130, 95)], [(46, 67)]]
    for got, want in zip(as_arrays(masked_variant), as_arrays(by_hand)):
        assert all(train.np.array_equal(a, b) for a, b in zip(got, want))
    assert [[im.size for im in g] for g in original] == [[(130, 95)], [(46, 67)]]


def test_smoke_every_official_switch_on_saves_its_settings_and_logs_finite_metrics(tmp_path):
    """Smoke test: two steps with every switch of the official objective on run, log their
    metrics (finite) and store the switches in config.json, from where a resume reads them."""
    switches = {"gamma_anneal": True, "gamma_end": 0.005, "gamma_anneal_fraction": 1.0,
                "kl_prcp_clip": 0.2, "kl_prcp_token_fraction": 0.2, "sft_coef": 1e-3,
                "agg_mode": "micro-token-mean"}
    flags = ["--gamma-anneal", "--gamma-end", "0.005", "--gamma-anneal-fraction", "1.0",
             "--kl-prcp-clip", "0.2", "--kl-prcp-token-fraction", "0.2", "--sft-coef", "1e-3",
             "--agg-mode", "micro-token-mean"]
    train.main(tiny_args(tmp_path, "--steps", "2", "--eta-orig", "0.03", *flags))
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert {k: saved[k] for k in switches} == switches
    assert saved["masked_image_key"] == ""
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["gamma_t"] for r in rows] == pytest.approx([0.02, 0.0125])   # 0.02 -> 0.005 in 2
    assert rows[1]["eta_orig_t"] == pytest.approx(0.03 * 0.0125 / 0.02)
    for key in ("kl_prcp", "kl_prcp_kept", "kl_prcp_clipped"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    # sft_nll is measured on the right rollouts: not logged for a step without one
    assert all(("sft_nll" in r) == (r["accuracy"] > 0) for r in rows)
    assert all(r["sft_nll"] == r["sft_nll"] for r in rows if "sft_nll" in r)
    assert config.parse_config(["--resume", str(run)]).kl_prcp_token_fraction == 0.2


def test_batch_select_keeps_every_field_row_for_row():
    """Batch.select (DAPO's kept groups) takes its rows of EVERY field, the phase-6 log-probs
    and the masked branch's exact entropies included - none is dropped to None on the way."""
    B, P, T, G = 6, 3, 4, 2
    ids = torch.arange(B * T).reshape(B, T)
    rollouts = qwen.Rollouts(
        prompt_ids=torch.ones(B, P, dtype=torch.long),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        mm_token_type_ids=torch.zeros(B, P, dtype=torch.long), pixel_values=None,
        image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
        images_per_prompt=torch.zeros(B // G, dtype=torch.long),
        prompt_of=torch.arange(B) // G, completion_ids=ids, completion_mask=torch.ones(B, T),
        texts=[str(b) for b in range(B)], num_samples=G)
    per_token = lambda k: torch.arange(B * T, dtype=torch.float32).reshape(B, T) + 100 * k
    per_row = lambda k: torch.arange(B, dtype=torch.float32) + 10 * k
    batch = train.Batch(rollouts, rollouts, per_row(0), per_row(1), per_row(2), per_row(3),
                        old_logp=per_token(1), ref_logp=per_token(2), masked_logp=per_token(3),
                        masked_entropy=per_token(4), pictures=[("p", "m")] * (B // G))
    rows = torch.tensor([2, 3, 4, 5])                                    # groups 1 and 2
    part = batch.select(rows)
    for field in dataclasses.fields(train.Batch):
        whole, kept = getattr(batch, field.name), getattr(part, field.name)
        if torch.is_tensor(whole):
            assert torch.equal(kept, whole[rows]), field.name
        elif isinstance(whole, qwen.Rollouts):
            assert torch.equal(kept.completion_ids, ids[rows]), field.name
        else:
            assert kept == whole[:2], field.name


def test_the_sft_term_counts_a_rollout_right_above_the_official_accuracy_threshold():
    """The official trainer marks a rollout for the SFT term when its accuracy is above 0.1
    (ray_trainer's correctness mask): 0 and 0.05 are not right, 0.2 (partial credit from a
    reward of your own) and 1 are; without --sft-coef there is no such set."""
    from types import SimpleNamespace
    acc = torch.tensor([0.0, 0.05, 0.1, 0.2, 1.0])
    batch = SimpleNamespace(accuracy=acc)
    on = SimpleNamespace(sft_coef=1e-3)
    assert train.right_rollouts(batch, on).tolist() == [False, False, False, True, True]
    assert train.right_rollouts(batch, SimpleNamespace(sft_coef=0.0)) is None
