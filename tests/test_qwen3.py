"""Qwen3-VL: the same method on the current model family, offline.

Every oracle of tests/test_model.py (log-probs against generate's own logits, each picture and
prompt read once with the same values and gradients, generation from a shared prefill, gradient
checkpointing, save / load) already runs on a tiny Qwen3-VL: its `tiny` fixture covers both
families. Here is what only Qwen3-VL has: the Thinking chat template and the format check that
follows from it, DeepStack features shared across a group, training end to end, and a
checkpoint laid out as the hub's that this project did not build.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

import model as qwen
import speedups
import rewards
import toy
import config
import train
from test_train import _assert_same_parameters, _torchrun, last_checkpoint, params, tiny_args


# ---------------------------------------------------------------------------------------------
# the chat template decides the format check
# ---------------------------------------------------------------------------------------------

def test_thinking_is_read_from_the_chat_template():
    opens = {family: qwen.prompt_opens_thinking(toy.build_tiny_model(size="tiny", family=family)[1])
             for family in toy.TINY_FAMILIES}
    assert opens == {"qwen2.5-vl": False, "qwen3-vl": False, "qwen3-vl-thinking": True}

    _, processor = toy.build_tiny_model(size="tiny", family="qwen3-vl-thinking")
    prompt = toy.toy_example(np.random.default_rng(0)).to_prompt()
    text = processor.apply_chat_template(prompt["messages"], add_generation_prompt=True,
                                         tokenize=False)
    assert text.startswith("<|im_start|>user\n")             # Qwen3-VL: no default system turn
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    tok = processor.tokenizer
    ids = tok("<think>a</think>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<think>", "</think>"]
    # ordinary added tokens, as in Qwen3's tokenizer: the decoded response keeps them
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"

    # a template that opens AND closes the block in the generation prompt (Qwen3's way of
    # switching thinking off) leaves the response outside it
    processor.chat_template = toy.QWEN3_CHAT_TEMPLATE.replace(
        "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not qwen.prompt_opens_thinking(processor)


def test_the_family_is_read_from_a_model_config_or_processor_and_others_are_named():
    for name, model_type in (("qwen2.5-vl", "qwen2_5_vl"), ("qwen3-vl-thinking", "qwen3_vl")):
        model, processor = toy.build_tiny_model(size="tiny", family=name)
        assert {qwen.family_of(x).model_type for x in (model, model.config, processor,
                                                        model_type)} == {model_type}
    with pytest.raises(ValueError, match=r"'qwen3_vl_moe'.*qwen2_5_vl.*qwen3_vl"):
        qwen.family_of("qwen3_vl_moe")


# ---------------------------------------------------------------------------------------------
# DeepStack
# ---------------------------------------------------------------------------------------------

def test_deepstack_features_of_a_repeated_picture_are_one_tensor_and_the_towers_own():
    """Qwen3-VL's vision tower also hands features of some of its layers to the first decoder
    layers. Encoding each picture once must share those too: the rows of a group get the SAME
    tensor (so their gradients add up in the backward), with the tower's own values."""
    model, processor = toy.build_tiny_model(size="tiny", family="qwen3-vl")
    assert list(model.config.vision_config.deepstack_visual_indexes) == [0]
    rng = np.random.default_rng(0)
    a, b = (toy.toy_example(rng).load_images()[0] for _ in range(2))
    enc = qwen.encode_images(processor, [[a], [b]], num_samples=3)          # a a a b b b
    seen = []
    hook = model.model.visual.patch_embed.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        shared = speedups.encode_each_picture_once(model, enc["pixel_values"], enc["image_grid_thw"])
        hook.remove()
        every = model.get_image_features(enc["pixel_values"], enc["image_grid_thw"],
                                         return_dict=True)
    rows = int(enc["image_grid_thw"][0].prod())
    assert seen == [2 * rows]                                   # two pictures, not six
    assert len(shared.deepstack_features) == 1 and len(shared.deepstack_features[0]) == 6
    for level, own in zip(shared.deepstack_features, every.deepstack_features):
        assert level[0] is level[1] is level[2] and level[3] is level[4] is level[5]
        assert level[0] is not level[3]
        for mine, theirs in zip(level, own):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    for mine, theirs in zip(shared.pooler_output, every.pooler_output):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# training end to end
# ---------------------------------------------------------------------------------------------

def _recording(monkeypatch):
    """Record the thinking_open flag of every reward and the target texts of the warm start."""
    flags, targets = [], []
    real_reward, real_targets = rewards.reward_details, qwen.rollouts_from_texts

    def reward_details(text, answer, thinking_open=False):
        flags.append(thinking_open)
        return real_reward(text, answer, thinking_open)

    def rollouts_from_texts(processor, prompts, texts):
        targets.extend(texts)
        return real_targets(processor, prompts, texts)

    monkeypatch.setattr(train.rewards, "reward_details", reward_details)
    monkeypatch.setattr(train.qwen, "rollouts_from_texts", rollouts_from_texts)
    return flags, targets


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3-vl-thinking"])
def test_one_papo_step_on_a_tiny_qwen3_saves_a_plain_transformers_folder(tmp_path, monkeypatch,
                                                                         family):
    """`train.py --tiny-family qwen3-vl[-thinking]`: warm start, one PAPO-G step, a checkpoint
    that plain transformers loads as Qwen3VLForConditionalGeneration. With the Thinking
    template the warm-start targets start inside the block its prompt opened, and every reward
    checks the format that way."""
    flags, targets = _recording(monkeypatch)
    args = tiny_args(tmp_path, "--tiny-family", family, "--lr", "1e-2")
    result = train.main(args)
    run = tmp_path / "run"
    start = params(toy.warm_start_path(config.parse_config(args)))
    after = params(last_checkpoint(run))
    assert any(not torch.equal(start[k], after[k]) for k in start)
    assert result["before"] is not None and result["after"] is not None
    assert f"warmstart-{family}-tiny-" in toy.warm_start_path(config.parse_config(args)).name

    thinking = family.endswith("-thinking")
    assert flags and set(flags) == {thinking}
    assert targets and all("</think>" in t for t in targets)
    assert all(t.startswith("<think>") != thinking for t in targets)

    plain = Qwen3VLForConditionalGeneration.from_pretrained(last_checkpoint(run))
    assert plain.config.architectures == ["Qwen3VLForConditionalGeneration"]
    for k, v in plain.state_dict().items():
        assert torch.equal(v, after[k]), k
    saved = json.loads((last_checkpoint(run) / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen3VLProcessor"


@pytest.mark.slow
def test_ddp_and_fsdp_with_gradient_checkpointing_on_a_tiny_qwen3_agree(tmp_path):
    """2 gloo ranks, 2 PAPO-G steps with gradient checkpointing on a tiny Qwen3-VL: DDP and
    --fsdp (every decoder layer and vision block a unit; DeepStack's mergers in the root unit)
    end with the same parameters, and the ranks of each run agree. Measured (torch 2.13 CPU):
    largest per-tensor relative gap 1.1e-6 and element gap 4.3e-7 against changes up to 2e-3
    (summation order: FSDP reduces every micro-batch, DDP the sum); asserted to 1e-5."""
    common = ["--tiny-family", "qwen3-vl-thinking", "--cache", str(tmp_path / "cache"),
              "--lr", "1e-3", "--steps", "2", "--gradient-checkpointing"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(2, 29561, tiny_args(ddp, *common))
    _torchrun(2, 29562, tiny_args(fsdp, "--fsdp", *common))
    start = params(toy.warm_start_path(config.parse_config(tiny_args(ddp, *common))))
    p_ddp, p_fsdp = params(last_checkpoint(ddp / "run")), params(last_checkpoint(fsdp / "run"))
    assert any(not torch.equal(start[k], p_ddp[k]) for k in start)         # it did train
    _assert_same_parameters(p_ddp, p_fsdp, rel=1e-5)
    for run in (ddp, fsdp):
        prints = json.loads((run / "run" / "final_eval.json").read_text())["rank_fingerprints"]
        assert prints[0] == prints[1]


# A Thinking model's chat template, written here in another style than the project's own
# (message.content attribute access, a whitespace-controlled loop, no system turn).
FOREIGN_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if item.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n<think>\n{%- endif -%}")


def _foreign_qwen3_folder(folder):
    """A Qwen3-VL-2B-Thinking-shaped checkpoint laid out as the hub's, built with transformers'
    classes directly (not build_tiny_model): 3 decoder layers, head_dim 32 (not hidden / heads),
    one KV head, untied embeddings, DeepStack from 2 of 3 vision blocks, a 12 x 12 position
    table; preprocessor_config.json naming the torchvision image processor, the chat template in
    chat_template.json, and the sampling defaults the hub ships in generation_config.json."""
    tok = toy.build_tokenizer(400, extra_tokens=("<think>", "</think>"))
    ids = tok.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                         intermediate_size=96, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                          "mrope_section": [6, 5, 5], "mrope_interleaved": True},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>")),
        vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64,
                           out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=144,
                           deepstack_visual_indexes=[0, 2]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)
    torch.manual_seed(7)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], pad_token_id=ids("<|endoftext|>"),
        do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 64 * 64, "longest_edge": 256 * 256},
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": FOREIGN_TEMPLATE}))
    return model


def test_a_hub_laid_out_qwen3_checkpoint_loads_and_trains(tmp_path, monkeypatch):
    folder = tmp_path / "Qwen3-VL-shaped"
    built = _foreign_qwen3_folder(folder)
    model, processor = qwen.load_model(folder)
    assert type(model) is Qwen3VLForConditionalGeneration
    assert type(processor) is qwen.Qwen3VLImageTextProcessor
    assert processor.image_processor.patch_size == 16
    assert qwen.prompt_opens_thinking(processor)
    # the toy picture (112 px) -> 128 px: 4 x 4 tokens of 32 px
    prompt = toy.toy_example(np.random.default_rng(0)).to_prompt()
    torch.manual_seed(0)
    r = qwen.generate_rollouts(model, processor, [prompt], num_samples=2, max_new_tokens=4)
    assert int((r.prompt_ids == model.config.image_token_id).sum()) == 2 * 16
    with torch.no_grad():                   # the loaded weights are the built ones
        torch.testing.assert_close(qwen.completion_logprobs(model, r),
                                   qwen.naive_completion_logprobs(built, r), rtol=0, atol=1e-5)

    flags, _ = _recording(monkeypatch)
    rows = toy.make_toy_dataset(16, seed=1, out_dir=tmp_path / "data")
    train.main(tiny_args(tmp_path, "--model", str(folder), "--data", str(rows),
                         "--eval-data", str(rows), "--updates-per-step", "1", "--lr", "1e-2"))
    assert flags and set(flags) == {True}
    after = params(last_checkpoint(tmp_path / "run"))
    before = {k: v for k, v in built.state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    plain = Qwen3VLForConditionalGeneration.from_pretrained(last_checkpoint(tmp_path / "run"))
    assert not plain.config.tie_word_embeddings
    assert list(plain.config.vision_config.deepstack_visual_indexes) == [0, 2]
