"""What users of RL trainers expect, each against an oracle: Dr. GRPO's advantages and leaving
truncated completions out of the loss (closed forms), a run started from a config file, a frozen
vision tower, LoRA (only adapters change, the reference is the base model, the merged folder
scores like the adapter model, resume is exact), the user's own reward, the trackers (read back
from what they wrote), and evaluation split over two processes (equal to one)."""

import dataclasses
import importlib.util
import json
import os
import re
import socket
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import custom_reward
import data
import lora
import model as qwen
import checkpoints
import toy
import train
from test_train import (MIXED_A, MIXED_B, GradientRecorder, _scripted_accuracies,
                        _tiny_batch, last_checkpoint, params, tiny_args)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# --scale-rewards, --mask-truncated
# ---------------------------------------------------------------------------------------------

def test_scale_rewards_none_only_subtracts_the_group_mean(tmp_path, monkeypatch):
    """--scale-rewards none (Dr. GRPO): A = r - mean_G(r); the default divides by the std too."""
    _scripted_accuracies(monkeypatch, [[MIXED_A, MIXED_B]] * 2)
    r = torch.tensor([MIXED_A, MIXED_B], dtype=torch.float32) * 0.9 + 0.1   # [2, 4]
    for flag, expected in (("none", r - r.mean(1, keepdim=True)),
                           ("group", (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6))):
        cfg, d, examples, policy, processor = _tiny_batch(
            tmp_path / flag, "--preset", "grpo", "--prompts-per-step", "2", "--scale-rewards", flag)
        batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                          need_masked=False)
        torch.testing.assert_close(batch.advantages.view(2, 4), expected, rtol=0, atol=1e-6)


def test_truncated_rows_are_the_ones_cut_at_the_limit_without_an_end_token():
    ids = torch.tensor([[5, 7, 9], [5, 7, 2], [5, 2, 0], [9, 9, 9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.float32)
    rows = dataclasses.make_dataclass("R", ["completion_ids", "completion_mask"])(ids, mask)
    assert qwen.truncated_rows(rows, 3, [2]).tolist() == [True, False, False, False]


def test_mask_truncated_zeroes_the_cut_rows_and_keeps_their_advantages(tmp_path):
    """collect_batch with --mask-truncated: the rows cut at --max-new-tokens (model.truncated_rows)
    have no completion token left for any loss term; the others are untouched; advantages (each
    group's baseline counts every rollout) and the logged share are as without the flag."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "grpo", "--max-new-tokens", "6", "--mask-truncated")
    batch, _, stats = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                          need_masked=False)
    plain = dataclasses.replace(cfg, mask_truncated=False)
    unmasked, _, _ = train.collect_batch(policy, processor, examples, plain, d, step=1, cursor=0,
                                         need_masked=False)
    cut = qwen.truncated_rows(unmasked.rollouts, 6, qwen.eos_ids(policy))        # [B]
    assert cut.any()
    assert torch.equal(batch.rollouts.completion_mask[cut], torch.zeros_like(
        batch.rollouts.completion_mask[cut]))
    assert torch.equal(batch.rollouts.completion_mask[~cut], unmasked.rollouts.completion_mask[~cut])
    assert torch.equal(batch.advantages, unmasked.advantages)
    assert float(torch.cat(stats["truncated"]).mean()) == pytest.approx(float(cut.float().mean()))


def test_truncated_rows_are_left_out_of_the_loss_in_closed_form(tmp_path):
    """The update's gradient with rows 0-5 left out (leave_out_truncated) is the closed form
    over the others: one update, so rho = 1 and L = -sum_{kept i} A_i sum_t l_{i,t} / N_kept."""
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "grpo", "--beta", "0", "--grad-clip", "1e9")
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=False)
    batch.advantages = torch.linspace(-1, 1, 16)       # the test's choice: every row counts
    cut = torch.arange(16) < 6
    recorder = GradientRecorder(policy)
    train.update_phase(train.leave_out_truncated(batch, cut), policy, recorder, cfg, d, step=1)
    logp = qwen.completion_logprobs(policy, batch.rollouts)                      # [B, T]
    kept = batch.rollouts.completion_mask * (~cut)[:, None]                     # [B, T]
    oracle = -(batch.advantages[:, None] * logp * kept).sum() / kept.sum()
    grads = torch.autograd.grad(oracle, list(policy.parameters()), allow_unused=True)
    expected = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                          for g, p in zip(grads, policy.parameters())])
    assert expected.norm() > 0
    torch.testing.assert_close(recorder.grads[0], expected, rtol=1e-4, atol=1e-7)
    whole = GradientRecorder(policy)                    # and it is not the gradient of all rows
    train.update_phase(batch, policy, whole, cfg, d, step=1)
    assert (whole.grads[0] - expected).norm() > 1e-3 * expected.norm()


# ---------------------------------------------------------------------------------------------
# --config
# ---------------------------------------------------------------------------------------------

def test_a_runs_config_json_restarts_that_run_and_flags_override_it(tmp_path):
    """A run's own config.json as --config gives the same settings (a new run, no resume);
    a YAML file of a few keys on top of the defaults; flags on the command line win."""
    train.main(tiny_args(tmp_path, "--preset", "papo-d", "--gamma", "0.05", "--steps", "1"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg = config.parse_config(["--config", str(tmp_path / "run" / "config.json"),
                               "--out", str(tmp_path / "again")])
    assert {k: v for k, v in config.saved_config(cfg).items() if k not in config.RUN_CONTROL} == \
        {k: v for k, v in saved.items() if k not in config.RUN_CONTROL}
    assert (cfg.preset, cfg.gamma, cfg.eta_orig, cfg.dynamic_sampling) == ("papo-d", 0.05, 0.03, True)
    assert config.parse_config(["--config", str(tmp_path / "run" / "config.json"),
                                "--out", str(tmp_path / "again"), "--steps", "9"]).steps == 9
    # a command-line preset replaces the file's coefficients, its other flags still win
    cfg = config.parse_config(["--config", str(tmp_path / "run" / "config.json"), "--preset",
                               "grpo", "--beta", "0.02", "--out", str(tmp_path / "again")])
    assert (cfg.gamma, cfg.eta_orig, cfg.beta, cfg.dynamic_sampling) == (0.0, 0.0, 0.02, False)
    (tmp_path / "small.yaml").write_text("preset: grpo\nlr: 0.0003\nmask_truncated: true\n")
    cfg = config.parse_config(["--config", str(tmp_path / "small.yaml")])
    assert (cfg.preset, cfg.lr, cfg.mask_truncated, cfg.gamma) == ("grpo", 0.0003, True, 0.0)
    assert cfg.prompts_per_step == config.TOY_OVERRIDES["prompts_per_step"]   # still the toy run


@pytest.mark.parametrize("text,message", [
    ("preset: grpo\nlearning_rate: 0.1\nsteps_total: 3\n", "unknown settings learning_rate, steps_total"),
    ("steps: many\n", r"wrong types: steps = 'many' \(expected int\)"),
    ("- a list\n", "holds no settings"),
])
def test_a_bad_config_file_is_refused_naming_what_is_wrong(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit):
        config.parse_config(["--config", str(tmp_path / "c.yaml")])
    assert re.search(message, " ".join(capsys.readouterr().err.split()))


def test_config_and_resume_together_are_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        config.parse_config(["--config", str(tmp_path / "c.yaml"), "--resume", str(tmp_path / "run")])
    assert "give one of them" in capsys.readouterr().err


def test_the_warm_starts_old_sft_flags_still_parse_hidden_from_help(tmp_path, capsys):
    """--sft-steps & co. were renamed --warm-start-* (they read as the SFT term's --sft-coef);
    the old spellings still work, and --help shows only the new ones."""
    old = config.parse_config(["--sft-steps", "7", "--sft-lr", "0.002", "--sft-batch", "5",
                               "--sft-target-acc", "0.3"])
    new = config.parse_config(["--warm-start-steps", "7", "--warm-start-lr", "0.002",
                               "--warm-start-batch", "5", "--warm-start-target-acc", "0.3"])
    assert old == new
    assert (new.warm_start_steps, new.warm_start_lr, new.warm_start_batch,
            new.warm_start_target_acc) == (7, 0.002, 5, 0.3)
    with pytest.raises(SystemExit):
        config.parse_config(["--help"])
    shown = capsys.readouterr().out
    assert "--warm-start-target-acc" in shown and "--sft-steps" not in shown
    # the warm start's cache folder keeps its name: caches made before the rename stay valid
    assert re.fullmatch(r"warmstart-small-count\+count_color-seed0-steps7-batch5-lr0\.002-"
                        r"beta20\.99-probe50-target0\.3-prompt[0-9a-f]{8}",
                        toy.warm_start_path(new).name)


def test_the_warm_starts_batch_and_lr_are_part_of_its_cache_key():
    """A warm start trained with another batch size or learning rate is another model: it gets
    its own cache folder. The older settings (batch 32, lr 1e-3) keep the older, shorter name,
    so the caches and recorded runs made with them are still found."""
    older = ["--warm-start-probe-every", "25", "--warm-start-beta2", "0.999"]
    names = {(b, lr): toy.warm_start_path(config.parse_config(
        ["--warm-start-batch", str(b), "--warm-start-lr", lr, *older])).name
        for b in (16, 32) for lr in ("1e-3", "3e-3")}
    assert len(set(names.values())) == 4
    assert re.fullmatch(r"warmstart-small-count\+count_color-seed0-steps3000-target0\.45-prompt"
                        r"[0-9a-f]{8}", names[32, "1e-3"])
    assert "-steps3000-batch16-lr0.001-target0.45-" in names[16, "1e-3"]
    default = toy.warm_start_path(config.parse_config(older)).name
    assert default == names[16, "1e-3"]                        # the default batch and lr


def test_the_warm_starts_beta2_is_a_setting_used_by_its_optimizer_and_part_of_its_key(
        tmp_path, monkeypatch):
    """Adam's beta2 changes the warm start's whole trajectory, so it is part of the cache key;
    0.999 (the only value before the setting existed) keeps the older name, a run saved before
    the setting resumes with 0.999, not today's 0.99, and the optimizer really gets the value."""
    default = config.parse_config([])
    assert default.warm_start_beta2 == 0.99
    name = toy.warm_start_path(default).name
    assert "-lr0.001-beta20.99-probe50-" in name
    older = toy.warm_start_path(config.parse_config(["--warm-start-beta2", "0.999"])).name
    assert older == name.replace("-beta20.99", "")
    saved = config.saved_config(default)
    del saved["warm_start_beta2"]                              # a config.json from before it
    assert config.saved_settings(saved)["warm_start_beta2"] == 0.999
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(saved))
    assert config.parse_config(["--resume", str(run)]).warm_start_beta2 == 0.999
    for bad in ("1", "-0.1"):
        assert any("--warm-start-beta2" in p for p in
                   config.range_problems(config.parse_config(["--warm-start-beta2", bad])))
    # the value reaches the optimizer: record the betas of every AdamW the warm start builds
    seen = []
    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.defaults["betas"])
    monkeypatch.setattr(toy.torch.optim, "AdamW", Recording)
    cfg = config.parse_config(tiny_args(tmp_path, "--warm-start-beta2", "0.5",
                                        "--warm-start-steps", "1"))
    toy.prepare_toy_data(cfg)
    train_split = data.load_dataset(toy.toy_splits(cfg)["train"][0] / "data.jsonl")
    assert "-beta20.5-" in toy.warm_start(cfg, train_split).name
    assert seen == [(0.9, 0.5)]


def test_a_run_saved_with_the_old_warm_start_names_resumes(tmp_path):
    """A config.json (or --config file) of an earlier version names the warm start's settings
    sft_*: it still reads, under the new names, and a resume records no change."""
    train.main(tiny_args(tmp_path))
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    old_name = {new: old for old, new in config.RENAMED.items()}
    old = {old_name.get(k, k): v for k, v in saved.items()}
    assert "sft_steps" in old and "warm_start_steps" not in old
    (run / "config.json").write_text(json.dumps(old, indent=2))
    (tmp_path / "old.json").write_text(json.dumps(old))
    cfg = config.parse_config(["--config", str(tmp_path / "old.json"), "--out", str(tmp_path / "b")])
    assert cfg.warm_start_steps == 2
    train.main(["--resume", str(run), "--steps", "2"])
    assert checkpoints.checkpoint_step(last_checkpoint(run)) == 2
    assert json.loads((run / "config.json").read_text())["warm_start_steps"] == 2
    history = json.loads((run / "config_history.jsonl").read_text())   # only --steps changed
    assert list(history["changed"]) == ["steps"]


# ---------------------------------------------------------------------------------------------
# --freeze-vision-tower and LoRA
# ---------------------------------------------------------------------------------------------

# (the LoRA and tracker tests skip where requirements-extras.txt is not installed; CI installs it)

def _trainer_state(run: Path) -> dict:
    return checkpoints.read_trainer_state(last_checkpoint(run) / "trainer_state.pt")


def test_a_frozen_vision_tower_never_changes_and_has_no_optimizer_state(tmp_path):
    train.main(tiny_args(tmp_path, "--freeze-vision-tower", "--lr", "1e-2"))
    start = params(toy.warm_start_path(config.parse_config(tiny_args(tmp_path))))
    after = params(last_checkpoint(tmp_path / "run"))
    tower = [k for k in start if k.startswith("model.visual.")]
    assert tower and all(torch.equal(start[k], after[k]) for k in tower)
    assert any(not torch.equal(start[k], after[k]) for k in start if k not in tower)
    # AdamW state only for the trainable weights: every parameter but the tower's (tied
    # lm_head/embed_tokens is one parameter)
    policy, _ = qwen.load_model(last_checkpoint(tmp_path / "run"))
    trainable = sum(1 for name, _ in policy.named_parameters() if not name.startswith("model.visual."))
    assert len(_trainer_state(tmp_path / "run")["optimizer"]["state"]) == trainable


@pytest.fixture(scope="module")
def adapted():
    """A tiny model with rank-4 adapters whose B is not zero (so the adapters change the output),
    and the base model it started from."""
    pytest.importorskip("peft", reason="LoRA needs PEFT: pip install -r requirements-extras.txt")
    base, processor = toy.build_tiny_model(seed=0, size="tiny")
    policy, _ = toy.build_tiny_model(seed=0, size="tiny")
    lora.add_adapters(policy, 4, 8.0, ["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    prompts = [toy.toy_example(np.random.default_rng(i)).to_prompt() for i in range(2)]
    rollouts = qwen.generate_rollouts(base, processor, prompts, num_samples=2, max_new_tokens=6)
    return policy, base, processor, rollouts


def test_lora_adapters_sit_on_the_language_model_only_and_alone_train(adapted):
    policy, *_ = adapted
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "language_model" in n for n in trained)
    assert not any("visual" in n for n, _ in policy.named_parameters() if "lora_" in n)
    assert {n.split(".")[-4] for n in trained} == {"q_proj", "v_proj", "down_proj"}   # ...q_proj.lora_A.default.weight


def test_lora_reference_is_the_base_model_and_the_merged_folder_scores_like_the_adapters(
        adapted, tmp_path):
    policy, base, processor, rollouts = adapted
    with torch.no_grad():
        with_adapters = qwen.completion_logprobs(policy, rollouts)
        with lora.reference(policy, None) as ref:
            reference = qwen.completion_logprobs(ref, rollouts)
        after = qwen.completion_logprobs(policy, rollouts)
        base_logp = qwen.completion_logprobs(base, rollouts)
    assert torch.equal(reference, base_logp)                   # adapters off = the base model
    assert torch.equal(after, with_adapters)                   # ... and back on afterwards
    assert (with_adapters - base_logp).abs().max() > 1e-3      # the adapters do change it
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    # the merged plain-transformers folder scores like the adapter model
    checkpoints.unsharded_copy(policy, lora.merged_state_dict(policy)).save_pretrained(tmp_path / "m")
    qwen.save_processor(processor, tmp_path / "m")
    from transformers import Qwen2_5_VLForConditionalGeneration
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(qwen.completion_logprobs(plain, rollouts), with_adapters,
                                   rtol=0, atol=2e-5)
    # the adapter folder is PEFT's own: PeftModel loads it onto the base model
    lora.save_adapters(policy, tmp_path / "a")
    from peft import PeftModel
    fresh, _ = toy.build_tiny_model(seed=0, size="tiny")
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(qwen.completion_logprobs(peft_model.base_model.model, rollouts),
                                   with_adapters, rtol=0, atol=1e-6)


def test_lora_training_changes_only_adapters_and_resumes_exactly(tmp_path):
    """--lora-rank 4 with beta > 0: after the steps only the adapted layers' merged weights
    differ from the start, and 2 + 2 resumed steps give the adapters of 4 straight steps."""
    pytest.importorskip("peft", reason="LoRA needs PEFT: pip install -r requirements-extras.txt")
    args = lambda folder, *more: tiny_args(folder, "--lora-rank", "4", "--lr", "1e-2", "--beta",
                                           "0.04", "--cache", str(tmp_path / "cache"), *more)
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(args(a, "--steps", "4"))
    train.main(args(b, "--steps", "2"))
    train.main(["--resume", str(b / "run"), "--steps", "4"])
    start = params(toy.warm_start_path(config.parse_config(args(a))))
    merged = params(last_checkpoint(a / "run"))
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj")
                           and "language_model" in k for k in changed)
    from safetensors.torch import load_file
    adapters = lambda run: load_file(last_checkpoint(run) / "adapter" / "adapter_model.safetensors")
    pa, pb = adapters(a / "run"), adapters(b / "run")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    rows = [json.loads(line) for line in (a / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kl_ref"] > 0                  # the reference (adapters off) was used


@pytest.mark.slow
def test_lora_with_ddp_and_gradient_checkpointing_keeps_the_ranks_identical(tmp_path):
    """torchrun, 2 processes, LoRA with gradient checkpointing and the masked branch (PAPO-G):
    every rank ends with the same weights, and the adapters moved."""
    pytest.importorskip("peft", reason="LoRA needs PEFT: pip install -r requirements-extras.txt")
    from test_train import _torchrun
    _torchrun(2, _free_port(), tiny_args(tmp_path, "--lora-rank", "4", "--lr", "1e-2",
                                         "--gradient-checkpointing", "--steps", "2",
                                         "--prompts-per-step", "4"))
    fingerprints = json.loads((tmp_path / "run" / "final_eval.json").read_text())["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    from safetensors.torch import load_file
    adapters = load_file(last_checkpoint(tmp_path / "run") / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)


def test_lora_is_refused_with_fsdp_and_without_peft(tmp_path, monkeypatch):
    cfg = config.parse_config(tiny_args(tmp_path, "--lora-rank", "4", "--fsdp"))
    assert any("not supported" in p for p in config.optional_install_problems(cfg))
    real = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name: None if name in ("peft", "wandb") else real(name))
    cfg = config.parse_config(tiny_args(tmp_path, "--lora-rank", "4", "--report-to", "wandb"))
    assert config.optional_install_problems(cfg) == [
        "--report-to wandb: wandb is not installed; pip install wandb",
        "--lora-rank: PEFT is not installed; pip install peft"]


# ---------------------------------------------------------------------------------------------
# --reward
# ---------------------------------------------------------------------------------------------

USER_REWARD = '''
import time

def even_length(response, gold, example):
    """right when the response has an even number of characters; always formatted"""
    return (1.0 if len(response) % 2 == 0 else 0.0), 1.0

def too_big(response, gold, example):
    return 2.0, 1.0

def broken(response, gold, example):
    raise KeyError(example["problem"])

def slow(response, gold, example):
    time.sleep(30)
    return 1.0, 1.0
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_REWARD)
    return path


def test_a_user_reward_scores_every_rollout_with_the_official_weights(reward_file, tmp_path):
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "grpo", "--reward", f"{reward_file}:even_length")
    config.check_config(cfg, 1)
    batch, _, _ = train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                                      need_masked=False)
    expected = torch.tensor([1.0 if len(t) % 2 == 0 else 0.0 for t in batch.rollouts.texts])
    assert 0 < expected.sum() < len(expected)
    assert torch.equal(batch.accuracy, expected) and torch.equal(batch.fmt, torch.ones(16))
    assert torch.allclose(batch.rewards, 0.9 * expected + 0.1)


@pytest.mark.parametrize("name,message", [
    ("too_big", r"too_big returned accuracy 2.0 on .*data\.jsonl:\d+: expected a finite number"),
    ("broken", r"broken failed on .*data\.jsonl:\d+: KeyError"),
])
def test_a_user_reward_that_misbehaves_stops_the_run_naming_function_and_row(
        reward_file, tmp_path, name, message):
    cfg, d, examples, policy, processor = _tiny_batch(
        tmp_path, "--preset", "grpo", "--reward", f"{reward_file}:{name}")
    with pytest.raises(custom_reward.RewardError, match=message):
        train.collect_batch(policy, processor, examples, cfg, d, step=1, cursor=0,
                            need_masked=False)


def test_a_user_reward_past_its_time_limit_scores_0_and_is_reported(reward_file, capsys):
    scorer = custom_reward.UserReward(f"{reward_file}:slow", time_limit=0.5)
    example = data.Example(problem="p", answer="1", images=[], source="x:1")
    assert scorer("anything", example) == {"reward": 0.0, "accuracy": 0.0, "format": 0.0}
    assert "ran past 0.5 s and scored 0" in capsys.readouterr().err
    scorer.stop()


@pytest.mark.parametrize("spec,message", [
    ("nowhere.py:f", "no such file nowhere.py"),
    ("{file}:missing", "has no function 'missing'"),
    ("no_colon", "expected FILE.py:function"),
])
def test_a_bad_reward_spec_is_refused_before_training(reward_file, tmp_path, spec, message):
    cfg = config.parse_config(tiny_args(tmp_path, "--reward", spec.format(file=reward_file)))
    with pytest.raises(SystemExit, match=message):
        config.check_config(cfg, 1)


# ---------------------------------------------------------------------------------------------
# --report-to: read back what each tracker wrote
# ---------------------------------------------------------------------------------------------

def _wandb_history(run_folder: Path) -> list[dict]:
    """The history rows of an offline wandb run, read from its .wandb file (a log of protobuf
    records in 32 KiB blocks, each record behind a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2
    raw = (next((run_folder / "wandb").glob("offline-run-*/run-*.wandb"))).read_bytes()
    records, pos, pending = [], 7, b""                         # after the file's own header
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:                            # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            records.append(pending + chunk)
    rows = []
    for blob in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_tensorboard_wandb_and_trackio_receive_the_metrics_evaluations_and_samples(
        tmp_path, monkeypatch):
    # first the environment: trackio reads TRACKIO_DIR when it is imported
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for package in ("tensorboard", "wandb", "trackio"):     # CI installs requirements-extras.txt
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed: pip install -r requirements-extras.txt")
    train.main(tiny_args(tmp_path, "--steps", "2", "--sample-every", "2", "--report-to",
                         "tensorboard,wandb,trackio", "--project", "papo-test"))
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run / "final_eval.json").read_text())
    # TensorBoard: every scalar of metrics.jsonl at its step, the evaluations at 0 and the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    for key in ("reward", "kl_prcp", "entropy_orig", "t_update"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == \
            [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    assert [(e.step, e.value) for e in events.Scalars("eval_accuracy")] == \
        [(0, pytest.approx(final["before"]["accuracy"])), (2, pytest.approx(final["after"]["accuracy"]))]
    pictures = [t for t in events.Tags()["images"] if t.startswith("samples/")]
    assert sorted(pictures) == sorted(f"samples/{i}/{k}" for i in range(3)
                                      for k in ("picture", "masked_picture"))
    assert events.Images("samples/0/picture")[0].width == 112
    # wandb, offline: the same rows in its run file, and a table of samples at step 2
    history = _wandb_history(run)
    by_step = {}
    for h in history:
        by_step.setdefault(h["_step"], {}).update(h)
    assert by_step[1]["reward"] == pytest.approx(rows[0]["reward"])
    assert by_step[2]["kl_prcp"] == pytest.approx(rows[1]["kl_prcp"])
    assert by_step[0]["eval_accuracy"] == pytest.approx(final["before"]["accuracy"])
    assert by_step[2]["samples/nrows"] == 3 and by_step[2]["samples/_type"] == "table-file"
    # trackio: its local database
    db = sqlite3.connect(tmp_path / "trackio" / "papo-test.db")
    logged = [(step, json.loads(blob)) for step, blob in
              db.execute("select step, metrics from metrics where run_name = ?", ("run",))]
    assert any(step == 2 and m.get("reward") == pytest.approx(rows[1]["reward"])
               for step, m in logged)
    assert any(step == 2 and "samples/0/masked_picture" in m for step, m in logged)


# ---------------------------------------------------------------------------------------------
# torchrun eval.py
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_evaluation_split_over_two_ranks_equals_one_process(tmp_path):
    """torchrun --nproc_per_node 2 eval.py: every rank scores every other batch of questions
    and rank 0 gathers them: the same avg@k, pass@k, masked accuracies and KL_prcp as one
    process (both with one thread per process, so the arithmetic is the same)."""
    policy, processor = toy.build_tiny_model(seed=0, size="tiny")
    policy.save_pretrained(tmp_path / "ckpt")
    qwen.save_processor(processor, tmp_path / "ckpt")
    toy.make_toy_dataset(10, seed=5, out_dir=tmp_path / "q")
    common = ["--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "q" / "data.jsonl"),
              "--samples", "3", "--batch-size", "2", "--max-new-tokens", "6", "--top-k", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REPO / "eval.py"), *common, "--out",
                    str(tmp_path / "one.json")], check=True, cwd=REPO, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(_free_port()), str(REPO / "eval.py"), *common,
                    "--out", str(tmp_path / "two.json")], check=True, cwd=REPO, env=env,
                   timeout=300)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one == two
    scores = next(iter(next(iter(one.values())).values()))
    assert scores["n"] == 10 and 0 < scores["kl_prcp"]


def test_the_warm_starts_probe_interval_is_a_setting_and_part_of_its_key(tmp_path):
    """How often the stopping rule is tested decides where the warm start stops, so it is part
    of the cache key; every 25 steps (the only value before the setting existed) keeps the older
    name, and a run saved before the setting resumes with 25, not today's default."""
    default = config.parse_config([])
    assert default.warm_start_probe_every == 50
    assert "-probe50-" in toy.warm_start_path(default).name
    old = config.parse_config(["--warm-start-probe-every", "25", "--warm-start-batch", "32",
                               "--warm-start-beta2", "0.999"])
    assert re.fullmatch(r"warmstart-small-count\+count_color-seed0-steps3000-target0\.45-prompt"
                        r"[0-9a-f]{8}", toy.warm_start_path(old).name)
    saved = config.saved_config(old)
    del saved["warm_start_probe_every"]                       # a config.json from before it
    assert config.saved_settings(saved)["warm_start_probe_every"] == 25
    assert config.saved_settings({"warm_start_probe_every": 10})["warm_start_probe_every"] == 10
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(saved))
    assert config.parse_config(["--resume", str(run)]).warm_start_probe_every == 25
    assert any("--warm-start-probe-every" in p for p in
               config.range_problems(config.parse_config(["--warm-start-probe-every", "0"])))
