"""The method at the REAL widths of Qwen2.5-VL-3B, depth reduced to fit a CPU test.

Every other test runs models 64-128 wide. These build architectures.py's Qwen2.5-VL-3B with
every width of the published model - hidden 2048, 16 query / 2 key-value heads of 128 with the
M-RoPE sections [16, 24, 24], MLP 11008, a vision tower of width 1280 - and one decoder layer
and two vision blocks: one attending within 112-px windows, one over the whole picture (the
real tower alternates them). Pictures come at the recipe's pixel budget (a few at its minimum,
200,704 px, one larger), so each spans many windows, and sizes differ within one batch.
The vocabulary is the offline tokenizer's (400 ids): a 400 x 2048 embedding, not 151,936 x 2048
- the one width reduced, and the one the chunked log-probs make irrelevant (bench.py target 2
measures them at the real vocabulary).

Oracles: the fast paths (each prompt and picture read once, generation from a shared prefill)
against the plain ones, through model.py's switch FAST_PATHS (`plain_paths`). float32, so values and gradients
agree to float32's rounding of sums over 2048-11008 terms, not bit for bit.
"""

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import architectures
import config
import data
import lora
import model as qwen
import toy
import train

REPO = Path(__file__).resolve().parents[1]
G, NEW_TOKENS = 2, 3
ARCH = architectures.reduced("qwen2.5-vl-3b", text_layers=1, vision_blocks=2)


@contextlib.contextmanager
def plain_paths():
    """Inside: model.py's one switch, FAST_PATHS, is off - generation is one plain `generate`
    over every row, and scoring the plain one-pass forward with each row's own pictures."""
    with mock.patch.object(qwen, "FAST_PATHS", False):
        yield


def _raw_picture(rng, width, height):
    """A toy picture at a raw size of (width, height), before the pixel budget."""
    return toy.toy_example(rng, image_size=448).load_images()[0].resize((width, height))


@pytest.fixture(scope="module")
def recipe():
    """The recipe's pixel budget (given: without --model the offline one applies) and masking,
    rollouts of G = 2."""
    return config.parse_config([f"--group-size={G}", f"--max-new-tokens={NEW_TOKENS}",
                                f"--min-pixels={architectures.OFFICIAL_MIN_PIXELS}",
                                f"--max-pixels={architectures.OFFICIAL_MAX_PIXELS}"])


@pytest.fixture(scope="module")
def examples():
    """Prompt 1: one picture at exactly the budget's minimum (448 x 448). Prompt 2: a 300 x 200
    picture (scaled UP into the budget: 560 x 364 after the processor) and a 532 x 476 one,
    already inside it - three sizes, each many 112-px windows, in one batch."""
    rng = np.random.default_rng(0)
    sizes = [[(448, 448)], [(300, 200), (532, 476)]]
    return [data.Example(problem="How many shapes are there?" if len(s) == 1 else
                         "<image> or <image>: which picture has more shapes?", answer="1",
                         images=[_raw_picture(rng, *wh) for wh in s], source=f"row {i}")
            for i, s in enumerate(sizes)]


@pytest.fixture(scope="module")
def real():
    net, processor = architectures.build(ARCH, seed=0, vocab="tokenizer")
    net.train()         # as in training: generate_rollouts switches to eval mode itself
    return net, processor


@pytest.fixture(scope="module")
def prompts(examples, recipe):
    pictures, _ = train.load_pictures(examples, recipe, seed=0, need_masked=False)
    return [ex.to_prompt(pictures=p) for ex, p in zip(examples, pictures)]


@pytest.fixture(scope="module")
def rollouts(real, prompts):
    net, processor = real
    torch.manual_seed(5)
    return qwen.generate_rollouts(net, processor, prompts, num_samples=G,
                                  max_new_tokens=NEW_TOKENS)


# ---------------------------------------------------------------------------------------------
# the architecture and the pictures
# ---------------------------------------------------------------------------------------------

def test_reduced_depth_keeps_every_width_and_both_kinds_of_vision_block(real):
    net, _ = real
    text, vision = net.config.text_config, net.config.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (2048, 16, 2, 11008)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    attention = net.model.language_model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (16 * 128, 2 * 128)
    assert (vision.hidden_size, vision.intermediate_size, vision.window_size) == (1280, 3420, 112)
    assert len(net.model.language_model.layers) == 1 and len(net.model.visual.blocks) == 2
    assert list(vision.fullatt_block_indexes) == [1]          # block 0 windowed, block 1 full
    # at full depth the published indexes, and the real parameter count
    full = architectures.ARCHITECTURES["qwen2.5-vl-3b"]
    assert full.vision["fullatt_block_indexes"] == [7, 15, 23, 31]
    assert architectures.reduced("qwen2.5-vl-3b", 36, 32) == full
    assert architectures.reduced("qwen2.5-vl-3b", 36, 12).vision["fullatt_block_indexes"] == [7, 11]
    assert architectures.reduced("qwen3-vl-2b", 2, 2).vision["deepstack_visual_indexes"] == [0, 1]


@pytest.mark.parametrize("name, parameters", [
    ("qwen2.5-vl-3b", 3_754_622_976), ("qwen2.5-vl-7b", 8_292_166_656),
    ("qwen3-vl-2b", 2_127_532_032), ("qwen3-vl-4b", 4_437_815_808),
    ("qwen3-vl-8b", 8_767_123_696)])
def test_full_architectures_have_the_published_parameter_counts(name, parameters):
    """Built on the meta device (no memory): the parameter count of the released checkpoint."""
    assert architectures.parameter_count(name) == parameters


def test_pictures_at_the_budget_span_windows_and_the_masked_grid_equals_the_originals(
        real, examples, recipe):
    """train.load_pictures at the recipe's budget, with masking: every picture lands between
    256 and 1,280 image tokens and spans many 112-px windows (8 x 8 patches); the masked copy of
    each gives the same grid. A raw picture far over the budget (1,600 x 1,000) is scaled down
    into it."""
    _, processor = real
    big = data.Example(problem="?", answer="1", source="big",
                       images=[_raw_picture(np.random.default_rng(1), 1600, 1000)])
    pictures, masked = train.load_pictures([*examples, big], recipe, seed=3, need_masked=True)
    original = qwen.encode_images(processor, pictures)["image_grid_thw"]
    assert torch.equal(qwen.encode_images(processor, masked)["image_grid_thw"], original)
    # 448 x 448 as it is; 300 x 200 x sqrt(200,704 / 60,000) -> 548 x 365 -> 560 x 364 px
    # (multiples of 28); 532 x 476 as it is; 1,600 x 1,000 x sqrt(1,003,520 / 1.6M) -> 1,267 x
    # 791 -> 1,260 x 784 px, 1,260 tokens: [1, rows, columns] of 14-px patches
    assert original.tolist() == [[1, 32, 32], [1, 26, 40], [1, 34, 38], [1, 56, 90]]
    tokens = original.prod(-1) // 4
    assert tokens.min() >= 256 and tokens.max() <= 1280
    windows = (original[:, 1] // 8 + (original[:, 1] % 8 > 0)) * (original[:, 2] // 8 +
                                                                 (original[:, 2] % 8 > 0))
    assert windows.tolist() == [16, 20, 25, 84]


# ---------------------------------------------------------------------------------------------
# fast paths against the plain ones
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_generation_from_a_shared_prefill_equals_plain_generate_token_for_token(
        real, prompts, rollouts):
    net, processor = real
    with plain_paths():
        torch.manual_seed(5)
        plain = qwen.generate_rollouts(net, processor, prompts, num_samples=G,
                                       max_new_tokens=NEW_TOKENS)
    assert rollouts.completion_ids.shape == (2 * G, NEW_TOKENS)
    assert torch.equal(rollouts.completion_ids, plain.completion_ids)
    assert torch.equal(rollouts.prompt_ids, plain.prompt_ids)
    assert torch.equal(rollouts.pixel_values, plain.pixel_values)
    assert net.training                                     # train mode restored


def _scored(net, r, checkpointing=False):
    """Log-probs, entropies and the gradient of a loss on both, w.r.t. every parameter."""
    net.zero_grad(set_to_none=True)
    weights = torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(2))
    if checkpointing:
        qwen._enable_gradient_checkpointing(net)
    try:
        logp, ent = qwen.completion_logprobs(net, r, temperature=0.8, with_entropy=True)
        ((logp * weights).sum() + (ent * weights.flip(1)).sum()).backward()
    finally:
        net.activation_checkpointing_disable()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return logp.detach(), ent.detach(), grads


@pytest.fixture(scope="module")
def group(rollouts):
    """The first prompt's group (G rows sharing one picture at the budget's minimum: 16
    windows), its common left padding cut: a backward at these widths costs seconds a row."""
    part = rollouts.select(list(range(G)))
    real = part.prompt_mask.bool().any(0)                                   # [P]
    return dataclasses.replace(part, prompt_ids=part.prompt_ids[:, real],
                               prompt_mask=part.prompt_mask[:, real],
                               mm_token_type_ids=part.mm_token_type_ids[:, real])


@pytest.fixture(scope="module")
def plain_scores(real, group):
    with plain_paths():
        return _scored(real[0], group)


def _assert_same_gradients(grads, plain):
    """Per tensor: ||a - b|| <= 1e-4 ||b|| (float32 sums of up to 11,008 terms per entry)."""
    assert grads.keys() == plain.keys()
    for name in plain:
        gap = float((grads[name] - plain[name]).norm() / plain[name].norm())
        assert gap <= 1e-4, (name, gap)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["prompt-once", "checkpointing"])
def test_logprobs_entropies_and_gradients_equal_the_plain_forward(real, group, plain_scores,
                                                                  checkpointing):
    """completion_logprobs (each distinct picture encoded once; without checkpointing each
    prompt read once too; with it, the one-pass forward the checkpointed update takes) against
    the plain forward and full log_softmax, per row: values, entropies and the gradient of
    every parameter, vision tower included, on one group of G rows."""
    net, _ = real
    logp, ent, grads = _scored(net, group, checkpointing)
    ref_logp, ref_ent, ref_grads = plain_scores
    assert len(ref_grads) == len(list(net.parameters()))
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=2e-5)
    _assert_same_gradients(grads, ref_grads)


# ---------------------------------------------------------------------------------------------
# LoRA and FSDP on the real module tree
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen3-vl-2b"])
def test_lora_targets_are_found_on_the_real_module_names(name):
    """The default --lora-targets put one adapter on each of the 7 projections of every decoder
    layer of the FULL-depth model (built on the meta device), at the real widths, and none in
    the vision tower."""
    net, _ = architectures.build(name, dtype=torch.bfloat16, device="meta")
    targets = config.Config().lora_targets.split(",")
    lora.add_adapters(net, rank=8, alpha=16, targets=targets)
    adapted = {n.rsplit(".lora_A", 1)[0]: m for n, m in net.named_modules()
               if n.endswith(".lora_A")}
    arch = architectures.ARCHITECTURES[name]
    assert len(adapted) == 7 * arch.text_layers
    assert not any("visual" in n for n in adapted)
    text = arch.text
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    outs = {"q_proj": text["num_attention_heads"] * head_dim,
            "k_proj": text["num_key_value_heads"] * head_dim,
            "v_proj": text["num_key_value_heads"] * head_dim, "o_proj": text["hidden_size"],
            "gate_proj": text["intermediate_size"], "up_proj": text["intermediate_size"],
            "down_proj": text["hidden_size"]}
    for layer in range(arch.text_layers):
        for target, out in outs.items():
            part = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            base = net.get_submodule(f"model.language_model.layers.{layer}.{part}.{target}")
            assert base.lora_B["default"].out_features == out == base.base_layer.out_features
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.slow
def test_two_process_fsdp_step_at_real_widths(tmp_path):
    """torchrun, 2 gloo processes: the real-width model sharded with FSDP2 (each decoder layer
    and vision block a unit), gradient checkpointing on, one PAPO-G step (generate, mask, masked
    log-probs, update) on a picture at the budget's minimum per rank: the global gradient norm
    is finite, positive and the same on both ranks, and every trainable tensor moves (AdamW
    without weight decay: each got a gradient)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29571", str(REPO / "tests" / "_real_width_fsdp.py"), str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=600)
    result = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in result:
        assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0, r
        assert r["moved"] == r["trainable"] > 0, r
    assert result[0]["grad_norm"] == result[1]["grad_norm"]
