"""Tests of model.py on the offline "tiny" Qwen2.5-VL and Qwen3-VL (every test that takes the
`tiny` fixture runs on both families).

Oracles, not smoke tests: the fast log-prob path must equal generate's own logits and the naive
full-vocabulary formula; micro-batching, gradient checkpointing and a save/load round trip must
not change a number; the completion mask must count the first EOS and nothing after it.
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen_modeling
from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_modeling

import data
import papo
import toy
import model as qwen
import speedups

MAX_NEW = 12


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def tiny(request):
    model, processor = toy.build_tiny_model(seed=0, size="tiny", family=request.param)
    return model, processor


@pytest.fixture(scope="module")
def tiny25():
    """The tiny Qwen2.5-VL alone, for tests written in its 28-px token size."""
    return toy.build_tiny_model(seed=0, size="tiny")


@pytest.fixture(scope="module")
def prompts():
    """Three toy prompts of different lengths (so left padding happens) plus one prompt with two
    images of different sizes (so image rows per rollout differ)."""
    rng = np.random.default_rng(0)
    items = [toy.toy_example(rng).to_prompt() for _ in range(3)]
    two = [toy.toy_example(rng).load_images()[0], toy.toy_example(rng).load_images()[0]]
    two[1] = two[1].resize((140, 84))   # -> a 6 x 10 patch grid, 15 image tokens
    items.append({"messages": data.make_messages("Which picture has more shapes?", 2),
                  "images": two})
    return items


def vocab_id(processor, token):
    return processor.tokenizer.convert_tokens_to_ids(token)


def generate_with_logits(model, processor, prompts, seed=0, **kwargs):
    """generate_rollouts, plus the raw logits generate computed at each step ([B, T, V]): a hook
    on lm_head records what generate itself saw, before any temperature / top-p processing."""
    steps = []
    hook = model.lm_head.register_forward_hook(
        lambda m, i, out: steps.append(qwen._at_least_fp32(out[:, -1])))
    try:
        torch.manual_seed(seed)
        rollouts = qwen.generate_rollouts(model, processor, prompts, **kwargs)
    finally:
        hook.remove()
    return rollouts, torch.stack(steps, dim=1)


def boost_logits(model, token_ids, amount, rows=None, step=None):
    """A forward hook on lm_head that adds `amount` to the logits of `token_ids` (optionally only
    for some rows / at one generation step): a way to force a random model's hand."""
    calls = [0]

    def hook(module, inputs, out):
        s = calls[0]
        calls[0] += 1
        if step is not None and s != step:
            return out
        bump = torch.zeros(out.shape[-1], dtype=out.dtype)
        bump[token_ids] = amount
        out = out.clone()
        which = slice(None) if rows is None else rows
        out[which] = out[which] + bump                    # [b, L, V] + [V]
        return out

    return model.lm_head.register_forward_hook(hook)


def black_square(image, box=(10, 10, 90, 90)):
    masked = image.copy()
    ImageDraw.Draw(masked).rectangle(box, fill=(0, 0, 0))
    return masked


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# log-probs: oracles
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.6, 1.0)])
def test_logprobs_and_entropy_equal_generates_own_logits(tiny, prompts, temperature, top_p):
    model, processor = tiny
    r, logits = generate_with_logits(model, processor, prompts, num_samples=2,
                                     max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p)
    # the sampler's distribution: raw logits / temperature (top-p only truncates what is sampled)
    ref_all = torch.log_softmax(logits / temperature, dim=-1)                     # [B, T, V]
    ref = ref_all.gather(-1, r.completion_ids[..., None]).squeeze(-1)            # [B, T]
    ref_entropy = -(ref_all.exp() * ref_all).sum(-1)                             # [B, T]
    with torch.no_grad():
        logp, entropy = qwen.completion_logprobs(model, r, temperature=temperature,
                                                 with_entropy=True)
    m = r.completion_mask.bool()
    assert logp.dtype == torch.float32 and logp.shape == r.completion_ids.shape
    torch.testing.assert_close(logp[m], ref[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[m], ref_entropy[m], rtol=0, atol=1e-5)
    assert (logp[~m] == 0).all() and (entropy[~m] == 0).all()


def test_text_only_prompts_with_left_padding(tiny):
    """No image in the batch: the positions must still skip the left padding, as generate's do."""
    model, processor = tiny
    prompts = [{"messages": [{"role": "user", "content": "How many?"}], "images": []},
               {"messages": [{"role": "user", "content": [{"type": "text", "text":
                             "A much longer question about nothing in particular, really."}]}],
                "images": []}]
    r, logits = generate_with_logits(model, processor, prompts, num_samples=2,
                                     max_new_tokens=MAX_NEW)
    assert r.pixel_values is None and r.image_grid_thw.shape == (0, 3)
    assert (r.prompt_mask[0] == 0).any()                      # the short prompt is padded
    ref = torch.log_softmax(logits, -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    m = r.completion_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(qwen.completion_logprobs(model, r)[m], ref[m], rtol=0, atol=1e-5)
    assert len(r.select([3, 0])) == 2


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_equals_naive_values_and_gradients(tiny, prompts, chunk_size, float64_norms):
    """In float64 (float64_norms): in float32 the two group the same sums differently, and on
    some CPUs (an Intel Xeon at 2 threads) a weight's gradient landed just past 1e-4 relative."""
    model, processor = tiny
    r = generate_with_logits(model, processor, prompts, num_samples=2, max_new_tokens=MAX_NEW)[0]
    model = copy.deepcopy(model).double()
    weights = torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(1))

    def run(fn, **kw):
        model.zero_grad(set_to_none=True)
        logp, ent = fn(model, r, temperature=0.8, with_entropy=True, **kw)
        ((logp * weights).sum() + (ent * weights.flip(0)).sum()).backward()
        return logp.detach(), ent.detach(), grads(model)

    fast = run(qwen.completion_logprobs, chunk_size=chunk_size)
    slow = run(qwen.naive_completion_logprobs)
    model.zero_grad(set_to_none=True)
    assert fast[0].dtype == torch.float64
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=1e-10)
    assert fast[2].keys() == slow[2].keys() and len(fast[2]) == len(list(model.parameters()))
    for name in slow[2]:
        torch.testing.assert_close(fast[2][name], slow[2][name], rtol=1e-8, atol=1e-12, msg=name)


def test_chunk_entropy_is_papos_exact_entropy_banned_tokens_included():
    """The chunked scorer's entropy is papo.entropy_from_logits itself (one implementation):
    bit for bit on the same logits, and finite where a token's logit is -inf (a banned token,
    p = 0, contributes nothing): the oracle -sum p log p over the tokens with p > 0."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = (torch.randn(4, 3, dtype=torch.float64, generator=g),
                      torch.randn(6, 3, dtype=torch.float64, generator=g))
    bias = torch.zeros(6, dtype=torch.float64)
    bias[[1, 4]] = -torch.inf
    targets = torch.tensor([0, 2, 3, 5])
    logp, ent = qwen._chunk_logp_entropy(hidden, weight, bias, targets, 0.7, True)
    z = torch.nn.functional.linear(hidden, weight, bias) / 0.7                # [4, 6]
    p = torch.softmax(z, -1)
    oracle = -(p * p.log()).nan_to_num(0.0).sum(-1)           # 0 * log 0 = 0 for banned tokens
    assert torch.isfinite(ent).all()
    torch.testing.assert_close(ent, oracle, rtol=0, atol=1e-12)
    assert torch.equal(ent, papo.entropy_from_logits(z))
    torch.testing.assert_close(logp, p.log().gather(-1, targets[:, None])[:, 0], rtol=0, atol=1e-12)


def test_logprobs_without_grad_and_with_grad_agree(tiny, prompts):
    model, processor = tiny
    r = generate_with_logits(model, processor, prompts[:2], num_samples=2,
                             max_new_tokens=MAX_NEW)[0]
    with torch.no_grad():
        frozen = qwen.completion_logprobs(model, r)
    live = qwen.completion_logprobs(model, r)
    assert not frozen.requires_grad and live.requires_grad
    torch.testing.assert_close(live.detach(), frozen, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# masks, images, vision tokens
# ---------------------------------------------------------------------------------------------

def test_sampler_distribution_is_the_scored_one_whatever_the_generation_config_says(tiny, prompts):
    """The distribution generate samples from must be the one completion_logprobs scores:
    logits / temperature, with only the vision tokens removed. Qwen2.5-VL-Instruct's
    generation_config.json ships top_k=1, top_p=0.001, temperature=0.1 and
    repetition_penalty=1.05 (and transformers' global default is top_k=50); generate fills every
    unset knob from there, so each left in place would silently change the sampler."""
    model, processor = tiny
    gc = model.generation_config
    saved = (gc.do_sample, gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty)
    hub_like = (True, 1, 0.001, 0.1, 1.05)
    gc.do_sample, gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty = hub_like
    seen = {}
    original = model.generate

    def spy(*args, **kwargs):   # generate's own processed scores and raw logits
        out = original(*args, output_scores=True, output_logits=True,
                       return_dict_in_generate=True, **kwargs)
        seen["scores"], seen["logits"] = torch.stack(out.scores, 1), torch.stack(out.logits, 1)
        return out.sequences

    model.generate = spy
    try:
        torch.manual_seed(0)
        r = qwen.generate_rollouts(model, processor, prompts, num_samples=2,
                                   max_new_tokens=MAX_NEW, temperature=0.7, top_p=1.0)
    finally:
        del model.generate
        gc.do_sample, gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty = saved
    scores, logits = seen["scores"], seen["logits"].float()                        # [B, T, V]
    vision = [vocab_id(processor, t) for t in
              (qwen.VISION_START, qwen.VISION_END, qwen.IMAGE_PAD, qwen.VIDEO_PAD)]
    allowed = torch.ones(scores.shape[-1], dtype=torch.bool)
    allowed[vision] = False
    assert torch.isneginf(scores[..., ~allowed]).all()
    torch.testing.assert_close(scores[..., allowed], logits[..., allowed] / 0.7, rtol=0, atol=1e-6)
    # and those logits are the ones completion_logprobs reproduces
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    m = r.completion_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(qwen.completion_logprobs(model, r, temperature=0.7)[m], ref[m],
                                   rtol=0, atol=1e-5)


def test_completion_mask_closed_form():
    ids = torch.tensor([[5, 7, 2, 0, 0],     # EOS at 2, then pad (pad 0 is an EOS id too)
                        [5, 7, 8, 9, 6],     # no EOS: cut at max_new_tokens, all count
                        [2, 0, 0, 0, 0],     # EOS first
                        [5, 0, 3, 2, 0]])    # <|endoftext|> (0) ends it as well
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    assert torch.equal(qwen.completion_mask_from_eos(ids, [2, 0]), expected.float())


def test_generation_stops_at_eos_which_counts_and_padding_does_not(tiny, prompts):
    model, processor = tiny
    im_end = vocab_id(processor, qwen.IM_END)
    pad = model.generation_config.pad_token_id
    hook = boost_logits(model, [im_end], 1e4, rows=[0], step=3)   # row 0 must say EOS 4th
    try:
        torch.manual_seed(0)
        r = qwen.generate_rollouts(model, processor, prompts[:2], num_samples=2,
                                   max_new_tokens=MAX_NEW)
    finally:
        hook.remove()
    assert r.completion_ids[0, 3] == im_end
    assert (r.completion_ids[0, 4:] == pad).all()
    assert r.completion_mask[0].tolist() == [1.0] * 4 + [0.0] * (r.completion_ids.shape[1] - 4)
    assert qwen.IM_END not in r.texts[0] and qwen.ENDOFTEXT not in r.texts[0]
    expected = processor.tokenizer.decode(r.completion_ids[0, :3])
    assert r.texts[0] == expected
    # rows that never sampled an EOS keep every token
    eos = torch.tensor(model.generation_config.eos_token_id)
    for b in range(1, len(r)):
        if not torch.isin(r.completion_ids[b], eos).any():
            assert r.completion_mask[b].all()


def test_vision_tokens_are_never_sampled(tiny, prompts):
    model, processor = tiny
    vision = [vocab_id(processor, t) for t in
              (qwen.VISION_START, qwen.VISION_END, qwen.IMAGE_PAD, qwen.VIDEO_PAD)]
    hook = boost_logits(model, vision, 30.0)    # without suppression they would win every draw
    try:
        torch.manual_seed(0)
        r = qwen.generate_rollouts(model, processor, prompts[:2], num_samples=4,
                                   max_new_tokens=MAX_NEW, temperature=1.5)
    finally:
        hook.remove()
    assert not torch.isin(r.completion_ids, torch.tensor(vision)).any()
    qwen.completion_logprobs(model, r)          # and the rollouts can be scored again


def test_masked_image_changes_logprobs_not_shapes(tiny, prompts):
    model, processor = tiny
    G = 2
    r = generate_with_logits(model, processor, prompts, num_samples=G, max_new_tokens=MAX_NEW)[0]
    originals = [p["images"] for p in prompts]
    # encode_images reproduces the rollouts' pixels exactly (same processor, same order: each
    # prompt's pictures once), and with G the per-row layout of a plain forward
    same = qwen.encode_images(processor, originals)
    assert torch.equal(same["pixel_values"], r.pixel_values)
    assert torch.equal(same["image_grid_thw"], r.image_grid_thw)
    per_row = qwen.encode_images(processor, originals, G)
    assert torch.equal(per_row["pixel_values"], r.row_pictures()[0])
    assert torch.equal(per_row["image_grid_thw"], r.row_pictures()[1])

    blacked = [[black_square(im) for im in ims] for ims in originals]
    masked = qwen.encode_images(processor, blacked)
    assert torch.equal(masked["image_grid_thw"], r.image_grid_thw)   # same number of image tokens
    with torch.no_grad():
        logp = qwen.completion_logprobs(model, r)
        logp_masked = qwen.completion_logprobs(model, r, pixel_values=masked["pixel_values"])
        logp_replace = qwen.completion_logprobs(
            model, dataclasses.replace(r, pixel_values=masked["pixel_values"]))
    m = r.completion_mask.bool()
    assert logp_masked.shape == logp.shape
    assert (logp_masked - logp)[m].abs().max() > 1e-3
    torch.testing.assert_close(logp_masked, logp_replace, rtol=0, atol=0)
    # the override never touched the rollouts' own pixels
    assert torch.equal(r.pixel_values, same["pixel_values"])


# The tiny processor's pixel budget is 56 x 56 to 112 x 112 (shortest_edge 3136, longest_edge
# 12544) and its resize works in multiples of 28 px.
@pytest.mark.parametrize("size, mode, skips", [
    ((112, 112), "RGB", True), ((84, 56), "RGBA", True), ((56, 84), "L", True),
    ((100, 100), "RGB", False),     # not a multiple of 28: resized to 112 x 112
    ((28, 28), "RGB", False),       # under the budget: resized up to 56 x 56
    ((168, 168), "RGB", False),     # over the budget: resized down
])
def test_resize_is_skipped_only_where_it_is_the_identity(tiny25, size, mode, skips):
    _, processor = tiny25
    ip = processor.image_processor
    channels = len(mode)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], channels), np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    kwargs = qwen.resize_kwargs(ip, [image])
    assert kwargs == ({"do_resize": False} if skips else {})
    stock = ip(images=[image], return_tensors="pt")            # always resizes
    ours = ip(images=[image], return_tensors="pt", **kwargs)
    assert torch.equal(ours["pixel_values"], stock["pixel_values"])    # bit for bit
    assert torch.equal(ours["image_grid_thw"], stock["image_grid_thw"])


def test_resize_is_kept_if_any_picture_needs_it(tiny25):
    ip = tiny25[1].image_processor
    aligned, other = Image.new("RGB", (112, 112)), Image.new("RGB", (100, 100))
    assert qwen.resize_kwargs(ip, [aligned, aligned]) == {"do_resize": False}
    assert qwen.resize_kwargs(ip, [aligned, other]) == {}
    assert qwen.resize_kwargs(ip, [np.zeros((112, 112, 3), np.uint8)]) == {}   # not a PIL image


def test_presize_gives_the_processors_own_pixels_bit_for_bit(tiny, prompts):
    """Pictures that the processor must resize (odd sizes, over and under its budget), resized
    beforehand on threads: the same patch rows and grid as the processor resizing them itself,
    for the prompts (generation) and for the masked branch (encode_images)."""
    model, processor = tiny
    ip = processor.image_processor
    source = prompts[0]["images"][0]
    own = qwen._processor_size(ip, 112, 112)        # a size the processor keeps as it is
    odd = [source.resize(size) for size in [(300, 170), (97, 211), (40, 40), own]]
    resized = qwen.presize(ip, odd)
    assert resized[-1].size == own and resized[-1] is odd[-1]
    assert all(im.size != old.size for im, old in zip(resized[:3], odd[:3]))
    direct = ip(images=odd, return_tensors="pt")                      # the processor's resize
    ours = qwen.encode_images(processor, [odd], 1)
    assert torch.equal(ours["image_grid_thw"], direct["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], direct["pixel_values"])
    item = {"messages": data.make_messages("Which is larger?", len(odd)), "images": odd}
    encoded = qwen._encode_prompts(processor, [item])
    texts = [processor.apply_chat_template(item["messages"], add_generation_prompt=True,
                                           tokenize=False)]
    plain = processor(text=texts, images=odd, return_tensors="pt")
    assert torch.equal(encoded["pixel_values"], plain["pixel_values"])
    assert torch.equal(encoded["prompt_ids"], plain["input_ids"])


def test_pixel_values_must_match_the_grid(tiny, prompts):
    model, processor = tiny
    r = generate_with_logits(model, processor, prompts[:1], num_samples=2, max_new_tokens=4)[0]
    with pytest.raises(ValueError, match="patch rows"):
        dataclasses.replace(r, pixel_values=r.pixel_values[:-4])
    with pytest.raises(ValueError, match="do not match"):
        qwen.completion_logprobs(model, r, pixel_values=r.pixel_values[:-4])
    with pytest.raises(ValueError, match="outside the 1 prompt entries"):
        dataclasses.replace(r, prompt_of=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one entry per row"):
        dataclasses.replace(r, prompt_of=torch.tensor([0]))


# ---------------------------------------------------------------------------------------------
# micro-batching: select / cat_rollouts
# ---------------------------------------------------------------------------------------------

def test_select_gives_the_full_batch_logprobs(tiny, prompts):
    model, processor = tiny
    G = 2
    r = generate_with_logits(model, processor, prompts, num_samples=G, max_new_tokens=MAX_NEW)[0]
    assert len(r) == len(prompts) * G and r.num_samples == G
    assert r.images_per_rollout.tolist() == [1, 1, 1, 1, 1, 1, 2, 2]
    with torch.no_grad():
        full = qwen.completion_logprobs(model, r)
        for rows in ([0, 1], [6], [7, 2, 5], torch.tensor([6, 7, 0]), [-1, -3]):
            part = r.select(rows)
            idx = torch.as_tensor(rows) % len(r)
            assert len(part) == len(idx) and part.texts == [r.texts[i] for i in idx]
            groups = sorted(set((idx // G).tolist()))          # its pictures: once per group
            assert len(part.image_grid_thw) == sum(len(prompts[n]["images"]) for n in groups)
            assert part.images_per_rollout.tolist() == r.images_per_rollout[idx].tolist()
            torch.testing.assert_close(qwen.completion_logprobs(model, part), full[idx],
                                       rtol=0, atol=1e-5)
        with pytest.raises(IndexError):
            r.select([len(r)])
        # pieces glued back together (re-padded to the longest prompt) score the same again
        glued = qwen.cat_rollouts([r.select([7, 6]), r.select(range(6))])
        order = [7, 6, 0, 1, 2, 3, 4, 5]
        torch.testing.assert_close(qwen.completion_logprobs(model, glued), full[order],
                                   rtol=0, atol=1e-5)


def test_every_rollout_carries_its_own_prompts_pixels(tiny, prompts):
    """Each row (alone, as select makes it) carries its prompt's pictures; the whole batch holds
    each prompt's pictures once, not once per rollout; row_pictures gives a plain forward's
    per-row copies."""
    model, processor = tiny
    G = 3
    r = generate_with_logits(model, processor, prompts, num_samples=G, max_new_tokens=4)[0]
    alone = [processor.image_processor(images=p["images"], return_tensors="pt") for p in prompts]
    assert r.prompt_of.tolist() == [b // G for b in range(len(r))]
    assert len(r.pixel_values) == sum(len(a["pixel_values"]) for a in alone)      # once each
    for b in range(len(r)):
        n = b // G                                   # group-major: row b belongs to prompt b // G
        row = r.select([b])
        assert torch.equal(row.pixel_values, alone[n]["pixel_values"])
        assert torch.equal(row.image_grid_thw, alone[n]["image_grid_thw"])
        assert row.prompt_of.tolist() == [0] and row.images_per_prompt.tolist() == [
            len(prompts[n]["images"])]
        assert torch.equal(r.prompt_ids[b], r.prompt_ids[n * G])
    pixels, grid = r.row_pictures()
    assert torch.equal(pixels, torch.cat([alone[b // G]["pixel_values"] for b in range(len(r))]))
    assert torch.equal(grid, torch.cat([alone[b // G]["image_grid_thw"] for b in range(len(r))]))


# ---------------------------------------------------------------------------------------------
# the vision tower encodes each distinct picture once per call, not once per row
# ---------------------------------------------------------------------------------------------

G_SHARED = 3
# rows of the 4 prompts x 3 rollouts batch (prompt 3 has two pictures): the whole batch; a
# micro-batch that cuts groups 0 and 2; groups interleaved as a refilled or shuffled batch is;
# one row per group (nothing to share)
SHARING_ROWS = {"whole": list(range(12)), "cut": [2, 3, 4, 5, 6],
                "interleaved": [9, 0, 10, 3, 1, 11, 4], "unrelated": [0, 3, 6, 9]}


@pytest.fixture(scope="module")
def shared_batch(tiny, prompts):
    """A float64 copy of the tiny model (two computations compared to 1e-10), rollouts of G = 3,
    and the masked-branch pixels of the same rollouts (one blacked picture per prompt)."""
    model, processor = tiny
    r = generate_with_logits(model, processor, prompts, num_samples=G_SHARED,
                             max_new_tokens=MAX_NEW)[0]
    blacked = [[black_square(im) for im in p["images"]] for p in prompts]
    masked = qwen.encode_images(processor, blacked)["pixel_values"]
    return (copy.deepcopy(model).double(), r, dataclasses.replace(r, pixel_values=masked),
            processor)


@pytest.fixture
def float64_norms(monkeypatch):
    """Qwen's RMSNorm computes in float32 whatever the model's dtype (it upcasts from bf16), and
    so does the vision tower's rotary embedding; a float64 model is rounded to float32 there,
    and two computations that group the same arithmetic differently (a batch of another shape,
    a sum over a group's rows) can land one float32 step apart. For comparisons at 1e-10 both
    keep float64 here, in both families; the formulas are the same."""
    def norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def vision_rotary(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        rotate = qwen3_modeling.rotate_half
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    monkeypatch.setattr(qwen_modeling.Qwen2_5_VLRMSNorm, "forward", norm)
    monkeypatch.setattr(qwen3_modeling.Qwen3VLTextRMSNorm, "forward", norm)
    for module in (qwen_modeling, qwen3_modeling):
        monkeypatch.setattr(module, "apply_rotary_pos_emb_vision", vision_rotary)


def _part(shared_batch, rows, branch):
    """(rollouts of `rows`, pixel_values= argument or None) for the original or masked branch."""
    _, r, masked, _ = shared_batch
    part = r.select(rows)
    return part, (masked.select(rows).pixel_values if branch == "masked" else None)


def _patch_rows_seen(model):
    """A forward hook on the vision tower's patch embedding: the patch rows of each call."""
    seen = []
    hook = model.model.visual.patch_embed.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0]))
    return seen, hook


@pytest.fixture(params=["prompt-once", "one-pass"])
def scoring_path(request, monkeypatch):
    """Both ways completion_logprobs reads a batch: each distinct prompt once (the default), and
    one forward over prompt + completion per row (taken with gradient checkpointing)."""
    if request.param == "one-pass":
        monkeypatch.setattr(speedups, "states_prompt_once",
                            lambda model, net, r, pixels, first, prompt_of, capture:
                            qwen._states_one_pass(model, r, pixels))
    return request.param


def _expected_work(shared_batch, rows, path):
    """(vision patch rows, language-model calls as (rows, positions)) that `rows` should cost:
    each group's picture once; on the prompt-once path the group's prompt once too."""
    r = shared_batch[1]
    part = r.select(rows)
    groups = sorted({b // G_SHARED for b in rows})
    patch_rows = int(r.select([g * G_SHARED for g in groups]).image_grid_thw.prod(-1).sum())
    P, T = part.prompt_ids.shape[1], part.completion_ids.shape[1]
    if path == "prompt-once" and len(groups) < len(rows):
        return patch_rows, [(len(groups), P), (len(rows), T)]
    return patch_rows, [(len(rows), P + T)]


@pytest.mark.parametrize("branch", ["original", "masked"])
@pytest.mark.parametrize("case", list(SHARING_ROWS))
def test_scoring_each_picture_and_prompt_once_same_logprobs_as_per_row(
        shared_batch, case, branch, scoring_path, float64_norms):
    """Values equal the plain per-row forward (the naive oracle: pixel_values in, so the tower
    runs once per row, and the whole prompt per row), one-picture and two-picture prompts, cut
    and interleaved groups alike. Work counted: the tower sees each distinct picture once; on
    the prompt-once path the language model reads each distinct prompt once, then B completions."""
    model = shared_batch[0]
    rows = SHARING_ROWS[case]
    part, pixels = _part(shared_batch, rows, branch)
    patches, vision_hook = _patch_rows_seen(model)
    calls, lm_hook = _language_model_rows(model)
    try:
        with torch.no_grad():
            logp, ent = qwen.completion_logprobs(model, part, pixel_values=pixels,
                                                 temperature=0.8, with_entropy=True)
            work = list(patches), list(calls)
            ref_logp, ref_ent = qwen.naive_completion_logprobs(model, part, pixel_values=pixels,
                                                               temperature=0.8, with_entropy=True)
    finally:
        vision_hook.remove()
        lm_hook.remove()
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-10)
    patch_rows, lm_calls = _expected_work(shared_batch, rows, scoring_path)
    assert work == ([patch_rows], lm_calls)
    every_row = int(part.row_pictures()[1].prod(-1).sum())     # what a plain forward encodes
    assert patches[-1] == every_row and (patch_rows < every_row) == (case != "unrelated")


@pytest.mark.parametrize("branch", ["original", "masked"])
@pytest.mark.parametrize("case", ["whole", "cut", "interleaved"])
def test_scoring_each_picture_and_prompt_once_same_gradients_as_per_row(
        shared_batch, case, branch, scoring_path, float64_norms):
    """The gradient of a loss on log-probs and entropies, w.r.t. every parameter (vision tower
    included), equals the per-row forward's to 1e-10: what a shared picture's features or a
    shared prompt's keys and values receive is the sum over the rows that read them. A row's
    gradient lost, or counted once instead of G times, would be off by far more."""
    model = shared_batch[0]
    part, pixels = _part(shared_batch, SHARING_ROWS[case], branch)
    weights = torch.randn(part.completion_ids.shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(2))

    def run(fn):
        model.zero_grad(set_to_none=True)
        logp, ent = fn(model, part, pixel_values=pixels, with_entropy=True)
        ((logp * weights).sum() + (ent * weights.flip(1)).sum()).backward()
        return grads(model)

    shared, per_row = run(qwen.completion_logprobs), run(qwen.naive_completion_logprobs)
    model.zero_grad(set_to_none=True)
    assert shared.keys() == per_row.keys() and len(shared) == len(list(model.parameters()))
    assert per_row["model.visual.patch_embed.proj.weight"].abs().sum() > 0   # the tower learns
    for name in per_row:
        torch.testing.assert_close(shared[name], per_row[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("branch", ["original", "masked"])
def test_plain_paths_switch_reads_every_row_and_gives_the_same_numbers(
        shared_batch, branch, monkeypatch, float64_norms):
    """model.FAST_PATHS off selects the plain scoring path: one forward over prompt + completion
    per row with every row's own pictures (the vision tower sees them all, G per group). Its
    log-probs, entropies and every gradient equal the default fast path's to 1e-10 on cut and
    interleaved groups (float64)."""
    model = shared_batch[0]
    part, pixels = _part(shared_batch, SHARING_ROWS["interleaved"] + [5, 6], branch)
    weights = torch.randn(part.completion_ids.shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(4))
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(qwen, "FAST_PATHS", fast)
        model.zero_grad(set_to_none=True)
        patches, vision_hook = _patch_rows_seen(model)
        calls, lm_hook = _language_model_rows(model)
        try:
            logp, ent = qwen.completion_logprobs(model, part, pixel_values=pixels,
                                                 temperature=0.8, with_entropy=True)
            ((logp * weights).sum() + (ent * weights.flip(1)).sum()).backward()
        finally:
            vision_hook.remove()
            lm_hook.remove()
        runs[fast] = logp.detach(), ent.detach(), grads(model), patches, calls
    model.zero_grad(set_to_none=True)
    (logp, ent, fast_grads, patches, calls), plain = runs[True], runs[False]
    B, P, T = len(part), part.prompt_ids.shape[1], part.completion_ids.shape[1]
    every_row = int(part.row_pictures()[1].prod(-1).sum())
    assert plain[3] == [every_row] and plain[4] == [(B, P + T)]          # the plain forward
    assert patches[0] < every_row and calls[0][0] < B                      # the fast one shares
    torch.testing.assert_close(plain[0], logp, rtol=0, atol=1e-10)
    torch.testing.assert_close(plain[1], ent, rtol=0, atol=1e-10)
    assert plain[2].keys() == fast_grads.keys() and len(fast_grads) == len(list(model.parameters()))
    for name in fast_grads:
        torch.testing.assert_close(plain[2][name], fast_grads[name], rtol=1e-9, atol=1e-10,
                                   msg=name)


def _language_model_rows(model):
    """A pre-hook on the language model: (rows, positions) of each of its calls."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    return seen, hook


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generation_reads_each_prompt_once_same_samples_and_logits(shared_batch, prompts,
                                                                  temperature, monkeypatch):
    """Sampling G answers from a cache filled once per prompt gives what the plain generate over
    N * G rows (model.FAST_PATHS off) gives: the same tokens from the same seed and the same
    logits at every step (float64, 1e-10), with left-padded prompts and a two-picture prompt.
    Work: the prompt pass and the vision tower see N rows, not N * G."""
    model = shared_batch[0]
    processor = shared_batch[3]
    runs = {}
    for name in ("shared", "plain"):
        monkeypatch.setattr(qwen, "FAST_PATHS", name == "shared")
        rows, hook = _language_model_rows(model)
        patches, vision_hook = _patch_rows_seen(model)
        try:
            r, logits = generate_with_logits(model, processor, prompts, seed=3,
                                             num_samples=G_SHARED, max_new_tokens=MAX_NEW,
                                             temperature=temperature)
        finally:
            hook.remove()
            vision_hook.remove()
        runs[name] = r, logits, rows, patches
    (r, logits, rows, patches), (r0, logits0, rows0, patches0) = runs["shared"], runs["plain"]
    assert torch.equal(r.completion_ids, r0.completion_ids) and r.texts == r0.texts
    assert torch.equal(r.prompt_ids, r0.prompt_ids) and torch.equal(r.pixel_values, r0.pixel_values)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, logits0, rtol=0, atol=1e-10)
    N, B, P, T = len(prompts), len(r), r.prompt_ids.shape[1], r.completion_ids.shape[1]
    assert rows == [(N, P - 1)] + [(B, 1)] * T
    assert rows0 == [(B, P)] + [(B, 1)] * (T - 1)
    assert patches0 == [G_SHARED * patches[0]] and len(patches) == 1


# ---------------------------------------------------------------------------------------------
# gradient checkpointing, save / load, determinism, errors
# ---------------------------------------------------------------------------------------------

def test_gradient_checkpointing_same_gradients_and_cached_greedy_generation(tiny, prompts,
                                                                             tmp_path,
                                                                             float64_norms):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    qwen.save_processor(processor, tmp_path)
    plain, _ = qwen.load_model(tmp_path)
    ckpt, _ = qwen.load_model(tmp_path, gradient_checkpointing=True)
    blocks = list(ckpt.model.language_model.layers) + list(ckpt.model.visual.blocks)
    assert all(b.gradient_checkpointing for b in blocks)      # both towers recompute
    assert not plain.model.language_model.layers[0].gradient_checkpointing
    plain.train(), ckpt.train()

    greedy = dict(num_samples=1, max_new_tokens=MAX_NEW, temperature=0)
    seen = []   # sequence length of each language-model call during generate
    hook = ckpt.model.language_model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    r_plain = qwen.generate_rollouts(plain, processor, prompts, **greedy)
    r_ckpt = qwen.generate_rollouts(ckpt, processor, prompts, **greedy)
    hook.remove()
    assert torch.equal(r_plain.completion_ids, r_ckpt.completion_ids)
    # KV cache in use: one pass over the prompt but its last token (which fills the cache),
    # then one token per step, that last prompt token first
    T = r_ckpt.completion_ids.shape[1]
    assert seen == [r_ckpt.prompt_ids.shape[1] - 1] + [1] * T
    assert ckpt.training and plain.training                 # train mode restored

    # gradients with groups of 2: the plain model reads each prompt once, the checkpointed one
    # (whose layers drop a cache) one forward per row - the same numbers either way (float64)
    torch.manual_seed(0)
    pairs = qwen.generate_rollouts(plain, processor, prompts, num_samples=2, max_new_tokens=MAX_NEW)
    plain.double(), ckpt.double()
    grads_by_model = []
    for m in (plain, ckpt):
        logp, ent = qwen.completion_logprobs(m, pairs, with_entropy=True)
        (-(logp * pairs.completion_mask).sum() + ent.sum()).backward()
        grads_by_model.append(grads(m))
    a, b = grads_by_model
    assert a.keys() == b.keys() and len(a) == len(list(plain.parameters()))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-9, atol=1e-10, msg=name)


def test_greedy_generation_is_the_argmax_of_generates_logits(tiny, prompts):
    model, processor = tiny
    r, logits = generate_with_logits(model, processor, prompts[:2], num_samples=2,
                                     max_new_tokens=MAX_NEW, temperature=0)
    m = r.completion_mask.bool()
    assert torch.equal(logits.argmax(-1)[m], r.completion_ids[m])
    assert torch.equal(r.completion_ids[0], r.completion_ids[1])   # greedy: a group is identical


def test_save_load_round_trip_is_exact(tiny, prompts, tmp_path):
    model, processor = tiny
    r = generate_with_logits(model, processor, prompts, num_samples=2, max_new_tokens=MAX_NEW)[0]
    model.save_pretrained(tmp_path)
    qwen.save_processor(processor, tmp_path)
    loaded, loaded_processor = qwen.load_model(str(tmp_path), dtype="float32")
    assert isinstance(loaded, type(model)) and isinstance(loaded_processor, type(processor))
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert loaded.generation_config.pad_token_id == model.generation_config.pad_token_id
    # the same prompts encode to the same tokens and pixels
    again = qwen.generate_rollouts(loaded, loaded_processor, prompts, num_samples=2,
                                   max_new_tokens=1)
    assert torch.equal(again.prompt_ids, r.prompt_ids)
    assert torch.equal(again.pixel_values, r.pixel_values)
    with torch.no_grad():
        torch.testing.assert_close(qwen.completion_logprobs(loaded, r),
                                   qwen.completion_logprobs(model, r), rtol=0, atol=0)


def test_patch_embedding_as_matmul_equals_the_stock_convolution(tiny, prompts, float64_norms):
    """Every model of the project runs its vision tower's first layer as a matrix product
    (speedups.PatchEmbedAsMatmul: load_model and the builders put it in place). Oracle: the same
    model with transformers' own patch embedding (a Conv3d) holding the same weights - picture
    features and every gradient equal in float64, on prompts with one and two pictures. The
    parameter names do not change (the stock module loads its state dict strictly), and a
    convolution whose patches would overlap is refused."""
    model, processor = tiny
    ours = copy.deepcopy(model).double()
    assert isinstance(ours.model.visual.patch_embed, speedups.PatchEmbedAsMatmul)
    vision = ours.config.vision_config
    if isinstance(ours.config, qwen.FAMILIES["qwen3_vl"].config_class):
        stock_embed = qwen3_modeling.Qwen3VLVisionPatchEmbed(vision)
    else:
        stock_embed = qwen_modeling.Qwen2_5_VisionPatchEmbed(
            vision.patch_size, vision.temporal_patch_size, vision.in_channels, vision.hidden_size)
    stock_embed.load_state_dict(ours.model.visual.patch_embed.state_dict(), strict=True)
    stock = copy.deepcopy(ours)
    stock.model.visual.patch_embed = stock_embed.double()
    pictures = qwen.encode_images(processor, [p["images"] for p in prompts], 1)
    features, grads = [], []
    for net in (ours, stock):
        out = net.model.get_image_features(pictures["pixel_values"].double(),
                                           pictures["image_grid_thw"])
        merged = torch.cat(out.pooler_output)                               # [tokens, H]
        merged.square().sum().backward()
        features.append(merged)
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    torch.testing.assert_close(features[0], features[1], rtol=1e-12, atol=1e-12)
    assert grads[0].keys() == grads[1].keys()
    assert "model.visual.patch_embed.proj.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12,
                                   msg=name)
    overlapping = copy.deepcopy(stock_embed)
    overlapping.proj.stride = (1, 1, 1)
    with pytest.raises(ValueError, match="not a plain patchify"):
        speedups.PatchEmbedAsMatmul(overlapping)


def test_shared_key_value_heads_in_one_kernel_call_change_nothing(tiny, prompts, monkeypatch):
    """On a CPU-only machine speedups.py sets transformers' TRANSFORMERS_SDPA_FORCE_GQA, so the
    attention kernel shares each key/value head between its query heads itself, padding mask
    and all, instead of transformers copying keys and values per head (tiny: 4 query heads, 2
    key/value heads). Oracle: transformers' own path - the same sampled tokens, generate's
    logits and the scored log-probs and entropies, in float64."""
    if torch.cuda.is_available():
        pytest.skip("set only on machines without a GPU")
    assert speedups.os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    model, processor = tiny
    net = copy.deepcopy(model).double()
    assert net.config.text_config.num_attention_heads > net.config.text_config.num_key_value_heads
    sdpa, shared = torch.nn.functional.scaled_dot_product_attention, []

    def recording(*args, **kwargs):          # which calls the kernel was told to share heads in
        shared.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    runs = []
    for switch in ("1", "0"):
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", switch)
        shared.clear()
        r, logits = generate_with_logits(net, processor, prompts, seed=5, num_samples=2,
                                         max_new_tokens=MAX_NEW)
        with torch.no_grad():
            runs.append((r, logits, *qwen.completion_logprobs(net, r, with_entropy=True),
                         shared.count(True)))
    (r, logits, logp, ent, n), (r0, logits0, logp0, ent0, n0) = runs
    # the language model's calls (2 layers, every decode step and the scoring passes) shared
    # heads in the kernel; with transformers' own choice none did (every call has a mask)
    assert n >= 2 * (MAX_NEW + 1) and n0 == 0
    assert torch.equal(r.completion_ids, r0.completion_ids)
    for a, b in ((logits, logits0), (logp, logp0), (ent, ent0)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_load_model_dtype_and_device(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    qwen.save_processor(processor, tmp_path)
    loaded, _ = qwen.load_model(tmp_path, dtype="bfloat16", device="cpu")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    loaded, _ = qwen.load_model(tmp_path, dtype=torch.float16)
    assert next(loaded.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="not a torch dtype"):
        qwen.load_model(tmp_path, dtype="floaty")


def test_build_tiny_model_is_deterministic_per_seed():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, pa = toy.build_tiny_model(seed=3)
    assert torch.equal(torch.rand(1), before)        # the caller's random stream is untouched
    b, pb = toy.build_tiny_model(seed=3)
    c, _ = toy.build_tiny_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    assert pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab()
    # Qwen's special tokens exist, are single tokens, and the config points at them
    tok = pa.tokenizer
    assert tok.convert_tokens_to_ids(qwen.IMAGE_PAD) == a.config.image_token_id
    assert tok.convert_tokens_to_ids(qwen.VISION_START) == a.config.vision_start_token_id
    assert tok.eos_token == qwen.IM_END and tok.pad_token == qwen.ENDOFTEXT
    assert len(tok(qwen.IMAGE_PAD * 3, add_special_tokens=False)["input_ids"]) == 3
    assert 300 <= len(tok) <= 600 and a.config.text_config.vocab_size == len(tok)


def test_tiny_processor_gives_16_tokens_for_112px_and_qwen_chat_format(tiny, prompts):
    """16 tokens either way: Qwen2.5-VL keeps 112 px (4 x 4 tokens of 28 px), Qwen3-VL resizes to
    128 px (4 x 4 tokens of 32 px). Only Qwen2.5-VL's template adds a default system turn."""
    model, processor = tiny
    text = processor.apply_chat_template(prompts[0]["messages"], add_generation_prompt=True,
                                         tokenize=False)
    system = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              if qwen.family_of(model).name == "qwen2.5-vl" else "")
    assert text.startswith(system + "<|im_start|>user\n"
                                    "<|vision_start|><|image_pad|><|vision_end|>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert not qwen.prompt_opens_thinking(processor)
    r = qwen.generate_rollouts(model, processor, prompts[:1], num_samples=1, max_new_tokens=1)
    assert prompts[0]["images"][0].size == (112, 112)
    assert r.image_grid_thw.tolist() == [[1, 8, 8]]
    assert int((r.prompt_ids == model.config.image_token_id).sum()) == 16
    assert torch.equal(r.mm_token_type_ids, (r.prompt_ids == model.config.image_token_id).long())


def test_load_model_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        qwen.load_model(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*config\.json"):
        qwen.load_model(empty)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"llama.*'llama'.*qwen2_5_vl"):
        qwen.load_model(other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken"):
        qwen.load_model(broken)


def test_load_model_without_processor_files_says_so(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)            # weights only
    with pytest.raises(ValueError, match="processor"):
        qwen.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# teacher-forced targets
# ---------------------------------------------------------------------------------------------

def test_rollouts_from_texts_encode_prompt_like_generation_and_end_with_eos(tiny, prompts):
    model, processor = tiny
    texts = ["<think>I see 3 shapes.</think> \\boxed{3}", "no", "\\boxed{1}", "x y"]
    t = qwen.rollouts_from_texts(processor, prompts, texts)
    g = qwen.generate_rollouts(model, processor, prompts, num_samples=1, max_new_tokens=1)
    assert torch.equal(t.prompt_ids, g.prompt_ids) and torch.equal(t.pixel_values, g.pixel_values)
    im_end = vocab_id(processor, qwen.IM_END)
    for b, text in enumerate(texts):
        n = int(t.completion_mask[b].sum())
        ids = t.completion_ids[b, :n]
        assert ids[-1] == im_end and processor.tokenizer.decode(ids[:-1]) == text
    # supervised loss through the RL scoring path has a gradient
    loss = -(qwen.completion_logprobs(model, t) * t.completion_mask).sum()
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# saved processor folders: load_model without torchvision, stock AutoProcessor with it
# ---------------------------------------------------------------------------------------------

def _encode_one(processor, prompt):
    """The processor's own call on one prompt (no project code in between): ids and patches."""
    text = processor.apply_chat_template(prompt["messages"], add_generation_prompt=True,
                                         tokenize=False)
    return processor(text=[text], images=prompt["images"], return_tensors="pt")


def _resized_prompt(prompts):
    """One picture whose size is not a multiple of 28, so the image processor really resizes it
    (150 x 95 -> 140 x 84, a 6 x 10 grid); prompts[3]'s two pictures need no resize."""
    return {"messages": data.make_messages("How many shapes?", 1),
            "images": [prompts[0]["images"][0].resize((150, 95))]}


STOCK = {"qwen2.5-vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
         "qwen3-vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor")}


def test_saved_processor_config_names_the_stock_classes(tiny, tmp_path):
    from transformers.models.auto.processing_auto import processor_class_from_name
    from transformers.models.auto.video_processing_auto import video_processor_class_from_name
    model, processor = tiny
    stock, stock_video = STOCK[qwen.family_of(model).name]
    qwen.save_processor(processor, tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["processor_class"] == tokenizer_config["processor_class"] == stock
    # AutoProcessor's own name lookup: the stock class for the saved name, nothing for ours
    # (which is why a plain save_pretrained folder gives a stock user only the tokenizer)
    assert processor_class_from_name(config["processor_class"]).__name__ == stock
    assert processor_class_from_name(type(processor).__name__) is None
    image, video = config["image_processor"], config["video_processor"]
    assert video["video_processor_type"] == stock_video
    assert video_processor_class_from_name(stock_video) is not None   # a name transformers knows
    for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                "size"):
        assert video[key] == image[key], key
    ip = processor.image_processor
    assert video["size"] == {"shortest_edge": ip.size["shortest_edge"],
                             "longest_edge": ip.size["longest_edge"]}


@pytest.mark.parametrize("saver", ["save_processor", "plain save_pretrained (older folders)"])
def test_load_model_reads_saved_processor_with_pil_images_and_same_encoding(tiny, prompts,
                                                                           tmp_path, saver):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        Qwen2VLImageProcessorPil
    model, processor = tiny
    model.save_pretrained(tmp_path)
    if saver == "save_processor":
        qwen.save_processor(processor, tmp_path)
    else:
        processor.save_pretrained(tmp_path)
    loaded_model, loaded = qwen.load_model(tmp_path)
    assert type(loaded) is type(processor) and type(loaded_model) is type(model)
    assert type(loaded.image_processor) is Qwen2VLImageProcessorPil   # also with torchvision
    for prompt in (prompts[3], _resized_prompt(prompts)):
        want, got = _encode_one(processor, prompt), _encode_one(loaded, prompt)
        for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
            assert torch.equal(got[key], want[key]), key


def test_stock_autoprocessor_loads_the_full_processor_with_torchvision(tiny, prompts, tmp_path):
    """What a user with a normal GPU install gets: AutoProcessor on a saved checkpoint is the
    stock Qwen2_5_VLProcessor / Qwen3VLProcessor, video processor included, and encodes as ours
    does (pixels only close where a picture is resized: torchvision's bicubic differs slightly
    from PIL's)."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor
    model, processor = tiny
    family = qwen.family_of(model).name
    qwen.save_processor(processor, tmp_path)
    stock = AutoProcessor.from_pretrained(tmp_path)
    assert type(stock).__name__ == STOCK[family][0]
    assert type(stock.video_processor).__name__ == STOCK[family][1]
    if family == "qwen2.5-vl":
        # the video processor got the image pixel budget, not its class default (>= 100,352
        # pixels per frame): a 2-frame 112 x 112 clip stays 112 x 112 -> one 8 x 8 grid
        clip = np.zeros((2, 112, 112, 3), dtype=np.uint8)
        video = stock.video_processor(videos=[clip], cap_pixels_per_frame=False,
                                      return_tensors="pt")
        assert video["video_grid_thw"].tolist() == [[1, 8, 8]]
    for prompt, atol in ((prompts[3], 1e-5), (_resized_prompt(prompts), 0.1)):
        want, got = _encode_one(processor, prompt), _encode_one(stock, prompt)
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=atol)
