"""The optimisations of model.py: the same numbers as its plain path, with less work.

model.py holds the plain paths - transformers' own `generate` over the repeated prompts, one
forward over prompt + completion per row - and calls these instead where they apply while its
one switch, model.FAST_PATHS, is on (the default). The float64 equivalence tests of
tests/test_model.py compare the two through that switch (sampled tokens and logits, log-probs,
entropies and every gradient to 1e-10), and docs/performance.md gives what each saves.

    generate_from_shared_prompts   generation reads each prompt and picture once for its G
                                   samples (a cache filled once, repeated G times)
    states_prompt_once             scoring reads each distinct prompt once: its KV cache, then
                                   the completions alone
    encode_each_picture_once       the vision tower runs once per distinct picture, not per row
    distinct_prompts, first_of_each   which rows share a prompt / a picture
    rotary_positions               the model's 3-D positions, computed outside a forward that
                                   sees only part of a sequence (both of the above need them)
    root_gathered, sharded         FSDP2: the root unit's parameters gathered by hand around
                                   calls that enter the model through its parts
    PatchEmbedAsMatmul             the patchify Conv3d as the matrix product it is
    TRANSFORMERS_SDPA_FORCE_GQA    shared key/value heads in one attention kernel (CPU only)

It imports nothing of the project: model.py sits above it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from transformers.modeling_outputs import BaseModelOutputWithPooling

# Grouped-query attention on a CPU-only machine. Qwen shares each key/value head between several
# query heads (Qwen2.5-VL-3B: 16 query heads, 2 key/value heads). transformers hands that sharing
# to PyTorch's attention kernel (enable_gqa) only when there is no padding mask - on CUDA a mask
# would push such a call onto the slow "math" kernel - and otherwise copies every key and value
# once per query head, or, for one query token, folds the heads into the query length. Batched
# prompts are left padded, so every call of this project has a mask. PyTorch's CPU kernel takes
# masks AND shared heads; transformers' own switch below gives it both. Same attention, fewer
# copies: the side-by-side GRPO step of bench/trl_side_by_side.sh (2 CPU threads) took 12-15 ms (6-7%)
# less, one step of each alternated in one process. setdefault: exporting the variable as "0"
# keeps transformers' choice. Never on a machine with a GPU, whatever device a model is put on.
if not torch.cuda.is_available():
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")

# ---------------------------------------------------------------------------------------------
# Generation: each prompt and picture read once for its G samples
# ---------------------------------------------------------------------------------------------

def generate_from_shared_prompts(net, once: dict, num_samples: int, config) -> torch.Tensor:
    """`generate` for G samples of each of N prompts, reading each prompt (and picture) ONCE.

    A plain generate over the N * G rows would run its first forward - the vision tower and the
    whole prompt - G times per prompt, on identical rows. Instead:
      1. one forward over the N prompts without their last token fills a KV cache (N rows);
      2. the cache is repeated G times, group-major (Cache.batch_repeat_interleave);
      3. generate continues from that cache, a path transformers supports ("restarting from a
         cache"): it feeds only the uncached last prompt token, then samples as usual.
    The positions are passed in (rotary_positions, the model's own rule), so the forward never
    has to infer them from a partial sequence. Same distribution as the plain call: a test
    compares the sampled tokens and their logits with it in float64."""
    P = once["prompt_ids"].shape[1]
    positions = rotary_positions(net, once["prompt_ids"], once["prompt_mask"],
                                 once["mm_token_type_ids"], once["image_grid_thw"])  # [3, N, P]
    prefill = dict(input_ids=once["prompt_ids"][:, :P - 1],
                   attention_mask=once["prompt_mask"][:, :P - 1],
                   position_ids=positions[..., :P - 1], use_cache=True)
    if once["pixel_values"] is not None:   # the pictures sit before the last token (a text one)
        prefill.update(pixel_values=once["pixel_values"], image_grid_thw=once["image_grid_thw"])
    # the inner model: the prefill needs the cache, not logits
    cache = net.model(**prefill).cache                                       # N rows, P - 1
    cache.batch_repeat_interleave(num_samples)                               # B rows
    repeat = lambda t, dim=0: t.repeat_interleave(num_samples, dim=dim)
    return net.generate(input_ids=repeat(once["prompt_ids"]),
                        attention_mask=repeat(once["prompt_mask"]),
                        position_ids=repeat(positions, dim=1), cache=cache,
                        generation_config=config,
                        # sharded: every rank must run the same number of decode steps (each
                        # gathers layers collectively), so a rank whose rollouts all ended keeps
                        # stepping until every rank's have
                        synced_gpus=sharded(net) and torch.distributed.get_world_size() > 1)


def rotary_positions(net, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
    """[3, B, S] rotary positions of a batch of token rows, as the model's own forward makes them.

    Qwen2.5-VL gives each token three positions (time, row, column): an image token its place in
    the picture's grid, a text token its running count three times over, continued after the
    largest position of the picture before it (get_rope_index). Padding is skipped (it gets 0).
    Computed here, not inside the forward, where a forward sees only PART of a sequence: the
    prompt alone, or a completion whose prompt is in a cache (generate_rollouts,
    completion_logprobs) - the forward can only work positions out from a whole sequence."""
    if len(image_grid_thw) == 0:     # text only: counts of the real tokens, as generate does
        counts = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                 # [B, S]
        return counts[None].expand(3, -1, -1)
    positions, _ = net.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
        attention_mask=attention_mask)
    return positions                                                               # [3, B, S]


# ---------------------------------------------------------------------------------------------
# Scoring: each distinct prompt read once, each distinct picture encoded once
# ---------------------------------------------------------------------------------------------

def states_prompt_once(model, net, r, pixels, first: list[int], prompt_of,
                       capture) -> torch.Tensor:
    """The final hidden states that predict the completion tokens, [B, T, H] - the same states
    as model._states_one_pass - reading each distinct prompt ONCE. model: the policy (through
    its DDP wrapper, if any), net: the bare model, r: model.Rollouts, capture: model._final_states.


      1. a forward over the distinct prompts (and their pictures) fills a KV cache, [N, P];
      2. the cache is indexed by prompt_of: each row gets its prompt's keys and values, [B, P]
         (an index, so in the backward each row's gradient flows into its prompt's states and
         the G rows of a group add up there, as the G copies of the one-pass forward do);
      3. a forward over the completions attends to that cache, [B, T].
    Exact by causality: no prompt position attends to the completion, so the prompt's states do
    not depend on which completion follows. The state that predicts token 0 is the prompt's last
    one; token t > 0 is predicted by completion position t - 1. Positions are passed in: the
    completion pass cannot work them out without its prompt (rotary_positions).

    Not used with gradient checkpointing and gradients on: checkpointed layers drop the cache
    (transformers), so that case takes the one-pass forward."""
    T = r.completion_ids.shape[1]
    p = dataclasses.replace(r, pixel_values=pixels).select(first)         # the distinct prompts
    images = p.row_images()                                         # each prompt's pictures
    grid = p.image_grid_thw[images.to(p.image_grid_thw.device)]        # [n, 3], in row order
    positions = rotary_positions(net, p.prompt_ids, p.prompt_mask, p.mm_token_type_ids,
                                 grid)                                     # [3, N, P]
    prompt_pass = dict(input_ids=p.prompt_ids, attention_mask=p.prompt_mask,
                       position_ids=positions, use_cache=True)
    if p.pixel_values is not None and len(grid):
        prompt_pass.update(image_grid_thw=grid, mm_encoder_outputs={"image": (
            encode_each_picture_once(net, p.pixel_values, p.image_grid_thw, images.tolist()))})
    after_prompt = positions[:, prompt_of, -1:] + 1 + torch.arange(T, device=positions.device)
    captured, hook = capture(net, lambda states: states)
    try:
        cache = net.model(**prompt_pass).cache                             # [N, P] keys, values
        last = captured.pop()[:, -1]                                       # [N, H]
        cache.batch_select_indices(prompt_of)                              # [B, P]
        model(input_ids=r.completion_ids,                                  # through the wrapper
              attention_mask=torch.cat([r.prompt_mask, r.completion_mask.long()], dim=1),
              position_ids=after_prompt, cache=cache, use_cache=True, logits_to_keep=1)
        completion = captured.pop()                                        # [B, T, H]
    finally:
        hook.remove()
    return torch.cat([last[prompt_of, None], completion[:, :-1]], dim=1)  # [B, T, H]


def distinct_prompts(r) -> tuple[list[int], torch.Tensor]:
    """Which rows repeat an earlier row's prompt: (first, prompt_of) with `first` the first row
    of each distinct prompt and prompt_of [B] the index in `first` of each row's prompt.

    Same prompt = same prompt entry (Rollouts.prompt_of: the G rollouts of a group) and the
    same token ids and padding (compared, so that rows put together by hand that point to one
    entry with different prompts are never merged). Read from the rows, not assumed from a group
    size: micro-batches may hold parts of groups and DAPO's refills reorder them."""
    entry = r.prompt_of.tolist()

    def same(a, b):
        return (entry[a] == entry[b] and torch.equal(r.prompt_ids[a], r.prompt_ids[b])
                and torch.equal(r.prompt_mask[a], r.prompt_mask[b]))

    first, prompt_of = first_of_each(len(r), same)
    return first, torch.tensor(prompt_of, dtype=torch.long, device=r.prompt_ids.device)


def first_of_each(n: int, same) -> tuple[list[int], list[int]]:
    """Group items 0..n-1 by same(i, j): (first, group) with first[k] the first item of group k
    and group[i] the group of item i. The newest group is tried first, so the adjacent rows of a
    GRPO group match at the first try."""
    first, group = [], []
    for i in range(n):
        k = next((k for k in reversed(range(len(first))) if same(first[k], i)), None)
        if k is None:
            k = len(first)
            first.append(i)
        group.append(k)
    return first, group


def encode_each_picture_once(net, pixel_values, image_grid_thw,
                              images: list[int] | None = None) -> BaseModelOutputWithPooling:
    """The vision features of the images a forward needs, each distinct picture encoded once.

    pixel_values / image_grid_thw: the stored pictures (Rollouts: once per prompt entry).
    images: the stored image behind each image the forward sees, in the forward's order (None:
        every stored image, in order). The one-pass forward, for example, sees every row's
        pictures: images = the row's entry's images, row after row.
    Returns what the model's forward accepts as mm_encoder_outputs["image"]: pooler_output = one
    [tokens_i, H] tensor per image the forward sees (the layout of the model's own
    get_image_features). Images that show the same picture get the SAME tensor, so in the
    backward autograd sums the gradients of every row that reuses it - what the per-row forward
    gives, since there each copy's gradient reaches the same vision weights.

    The rollouts already store a group's pictures once; on top of that, stored pictures that
    are the same - same (t, h, w) grid and identical patch rows (torch.equal, exact) - are
    encoded once: two prompt entries can show one picture (DAPO's refill drew the example
    again, two questions about one picture). The comparison is exact whatever the order, and
    cheap next to the tower (first_of_each). Sharing is exact because the tower encodes each
    image on its own (its attention stays within an image, via cu_seqlens): an image's features
    depend on its own pixels and grid only."""
    blocks = pixel_values.split(image_grid_thw.prod(-1).tolist())   # one [rows_i, D] per image
    grids = image_grid_thw.tolist()
    # first image of each distinct picture; image i shows picture shows[i]
    first, shows = first_of_each(len(blocks), lambda a, b: grids[a] == grids[b]
                                  and torch.equal(blocks[a], blocks[b]))
    out = net.get_image_features(torch.cat([blocks[i] for i in first]), image_grid_thw[first],
                                 return_dict=True)
    wanted = range(len(blocks)) if images is None else images
    per_image = lambda features: tuple(features[shows[i]] for i in wanted)   # distinct -> wanted
    fields = {"pooler_output": per_image(out.pooler_output)}
    # Qwen3-VL (DeepStack) also adds features of a few vision layers to the hidden states of the
    # first decoder layers, at the image tokens: one more tuple per such layer, indexed alike.
    if getattr(out, "deepstack_features", None) is not None:
        fields["deepstack_features"] = [per_image(level) for level in out.deepstack_features]
    return type(out)(**fields)


# ---------------------------------------------------------------------------------------------
# FSDP2 and the vision tower's first layer
# ---------------------------------------------------------------------------------------------

def sharded(net) -> bool:
    """Whether `net` is an FSDP2 model (train.py --fsdp: torch.distributed.fsdp.fully_shard on
    every decoder layer and vision block, then on the whole model). fully_shard is not a
    wrapper: it changes the module's class in place, so unwrap returns it unchanged."""
    return isinstance(net, FSDPModule)


@contextlib.contextmanager
def root_gathered(net):
    """Keep the parameters owned by the ROOT FSDP unit of a sharded model gathered meanwhile.

    With --fsdp every decoder layer and vision block is its own unit: its hooks gather its
    weights when it is called, whoever calls it. What the root unit owns - embed_tokens, the
    final norm, lm_head (tied to embed_tokens when config.tie_word_embeddings), the vision
    patch_embed and merger - FSDP gathers only when the root module itself is called. The code
    below also enters the model through net.model(...) (prefills), net.get_image_features(...)
    (each picture once) and net.lm_head.weight (the chunked log-probs, outside any forward), so
    it gathers the root's parameters by hand around the whole call (FSDPModule.unshard: one
    all-gather of the root's shards; tied weights stay one tensor).

    Giving those pieces units of their own would not remove this: lm_head.weight is still read
    outside a forward, and a tied lm_head/embed_tokens cannot live in two units.

    Afterwards: without gradients (generation, scoring) the root is resharded at once. With
    gradients it must stay gathered until the backward, which reads lm_head.weight and the
    others again; FSDP's own end-of-backward callback then reduce-scatters their gradients and
    reshards them (as for every unit), so the next call gathers the updated weights. A no-op for
    a model that is not sharded."""
    if not sharded(net):
        yield
        return
    net.unshard()
    try:
        yield
    finally:
        if not torch.is_grad_enabled():
            net.reshard()


class PatchEmbedAsMatmul(torch.nn.Module):
    """The vision tower's first layer, computed as the matrix product it is.

    Both families cut a picture into rows of C x T x p x p numbers (3 x 2 x 14 x 14 = 1176 for
    Qwen2.5-VL) and project each row to the tower's width with a Conv3d whose stride equals its
    kernel: the kernel never overlaps itself, so the convolution is one [rows, D] x [D, E]
    product. As a Conv3d it goes through the convolution kernels, which are slow for this shape:
    on the CPU 1.8 ms against 0.05 for 512 rows of the tiny model (3-4.5 ms of the side-by-side
    GRPO step), and some GPU / cuDNN / bf16 combinations are known to take orders of magnitude
    longer (transformers offers the same replacement as an opt-in `fusion_config`). It holds the
    SAME Conv3d, so parameter names, checkpoints and the optimizer see nothing new; a test
    compares values and gradients with the stock forward in float64."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        conv = original.proj
        if conv.stride != conv.kernel_size or conv.padding != (0, 0, 0) or conv.groups != 1:
            raise ValueError(f"patch embedding {conv} is not a plain patchify convolution")
        self.proj = conv                            # [E, C, T, p, p] weight, as in the checkpoint
        self.embed_dim = original.embed_dim

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight                                           # [E, C, T, p, p]
        rows = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)  # [rows, C*T*p*p]
        return F.linear(rows, weight.flatten(1), self.proj.bias)          # [rows, E]


def patch_embed_as_matmul(model) -> None:
    """Put PatchEmbedAsMatmul in place of the model's vision patch embedding (once)."""
    visual = getattr(model, "module", model).model.visual      # a bare or a DDP model
    if not isinstance(visual.patch_embed, PatchEmbedAsMatmul):
        visual.patch_embed = PatchEmbedAsMatmul(visual.patch_embed)
