"""The mathematics of PAPO (Perception-Aware Policy Optimization), as pure functions.

PAPO trains a vision-language policy pi_theta with GRPO or DAPO and adds one term: on the
policy's own rollouts it rewards the policy for behaving differently when it sees the image I
than when it sees a copy I_mask with most patches blacked out. Per token t of rollout i:

    l_{i,t}   = log pi_theta(o_{i,t} | q, I,      o_{i,<t})   trainable, original image
    a_{i,t}   = log pi_theta(o_{i,t} | q, I_mask, o_{i,<t})   same tokens, masked image
    old_{i,t} = log-prob under the policy that sampled the rollout
    ref_{i,t} = log-prob under the frozen reference model
    m_{i,t}   = completion mask (1 on generated tokens up to and including the first EOS)
    A_i       = group-normalised advantage of rollout i, shared by all its tokens
    rho_{i,t} = exp(l - old), the importance ratio of the update

The objective, minimised:

    L = agg(L_clip) + beta * agg(KL_ref) - gamma * agg(KL_prcp) + eta1 * H_orig + eta2 * H_mask

    L_clip  = max(-A*rho, -A*clip(rho, 1-eps_low, 1+eps_high)), capped at -C*A where A < 0
    KL_ref  = k3(l, ref)   the usual pull towards the reference model
    KL_prcp = k3(l, a)     the Implicit Perception Loss, SUBTRACTED: it is maximised
    H_orig  = agg(-l), H_mask = agg(-a)   the Double Entropy Loss (sample estimates), added with
                          eta > 0 so both entropies are pushed down: KL_prcp is unbounded and
                          rising entropy of both branches is the first sign of collapse
    agg     = how per-token values become one number ("token-mean": sum(v*m) / sum(m))

Switches of the official code, all off by default (papo.Options, annealed_coefficients):
KL_prcp clamped to [0, c] per token; each rollout's tokens below its KL_prcp quantile zeroed;
gamma (and both etas with it) annealed linearly over training; and + sft_coef * (token mean of
-l over the rollouts whose answer is right). docs/paper.md lists them with the official files,
docs/objective.md derives each term.

Map of this module, in reading order:
    group_advantages        r -> A                              (GRPO / Dr. GRPO)
    kl_estimate             k1 / k2 / k3 estimators of KL from sampled tokens
    perception_kl           KL_prcp per token
    perception_token_mask   the tokens of each rollout with the largest KL_prcp (official switch)
    clipped_policy_loss     L_clip per token, with the clip fractions
    entropy_from_logits     exact per-position entropy, an alternative to the sample estimate
                            (model.completion_logprobs computes it with with_entropy=True)
    aggregate               agg: the modes of the field as a table (AGGREGATIONS), with a
                            global normaliser, and the official per-micro-batch token mean
    Options                 the official switches a run sets
    perception_term         KL_prcp as the objective aggregates it (token mask, clip)
    papo_loss               the whole objective and its logged metrics
    annealed_coefficients   gamma_t and the etas at a step of KL_prcp annealing (official switch)
    patch_mask_grid         which 14x14 squares to black out
    mask_image              I -> I_mask, in pixel space
    dynamic_sampling_keep   DAPO's filter of groups with no learning signal

Every function computes in the widest floating dtype of its inputs (float64 stays float64);
bfloat16 / float16 inputs are upcast to float32, never the other way round.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

# The four modes of the field. With a global normaliser each gives the full batch's value and
# gradient however the batch is cut into micro-batches and ranks.
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# The official PAPO code's aggregation (verl's token mean per micro-batch, divided by the number
# of accumulation steps). It depends on how the batch is cut, so it is kept apart from AGG_MODES.
MICRO_TOKEN_MEAN = "micro-token-mean"
ALL_AGG_MODES = AGG_MODES + (MICRO_TOKEN_MEAN,)
KL_KINDS = ("k1", "k2", "k3")
ENTROPY_KINDS = ("sample", "exact")
MASK_MODES = ("bernoulli", "exact")

Number = Union[int, float, torch.Tensor]


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The widest floating dtype among the inputs, and never narrower than float32."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_G(r)) / (std_G(r) + eps), one value per rollout.

    rewards: [N*G], group-major (rollout b belongs to group b // G); returns the same shape.
    std is the unbiased (Bessel, divide by G-1) standard deviation, as torch.std and the
    official GRPO code compute it. scale_by_std=False gives r - mean_G(r) (Dr. GRPO, which
    argues that dividing by std over-weights groups that are almost all right or all wrong).

    >>> group_advantages(torch.tensor([1., 0., 0., 0.]), 4).round(decimals=4).tolist()
    [1.5, -0.5, -0.5, -0.5]

    (mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5.)
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (one rollout has no baseline), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.to(_compute_dtype(rewards)).reshape(-1, group_size)          # [N, G]
    adv = r - r.mean(dim=1, keepdim=True)                                     # [N, G]
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True, correction=1) + eps)         # [N, G]
    # A group whose rollouts all got the same reward carries no preference between them. Its
    # mean can differ from the common value by one rounding step, so write the zero explicitly.
    same = (r == r[:, :1]).all(dim=1, keepdim=True)                           # [N, 1]
    adv = adv.masked_fill(same, 0.0)                                          # [N, G]
    return adv.reshape(rewards.shape)


# ---------------------------------------------------------------------------------------------
# KL estimators and the Implicit Perception Loss
# ---------------------------------------------------------------------------------------------

def kl_estimate(logp: torch.Tensor, other_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || other) from tokens sampled from pi.

    logp = log pi(token), other_logp = log other(token), same shape [...]. With x = other - logp:
        k1 = -x                   unbiased, but negative on some tokens and high variance
        k2 = 0.5 * x^2            biased, always >= 0
        k3 = exp(x) - x - 1       unbiased (E_pi[exp(x)] = 1) and always >= 0
    Only k3 is clamped, exactly as in the official code: x to [-20, 20], then k3 to [-10, 10].
    KL_ref is kl_estimate(l, ref); KL_prcp is kl_estimate(l, a).

    Why k3 makes a useful loss (k1's expected gradient is zero; k3's is that of KL(other || pi)):
    docs/objective.md.

    Example: pi(token) = 0.5, other(token) = 0.25, so x = -ln 2:
        k1 = ln 2 = 0.6931,  k2 = 0.5 ln^2 2 = 0.2402,  k3 = 0.5 + ln 2 - 1 = 0.1931.
    >>> lp, lo = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    >>> [round(kl_estimate(lp, lo, k).item(), 4) for k in KL_KINDS]
    [0.6931, 0.2402, 0.1931]
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_KINDS}")
    dtype = _compute_dtype(logp, other_logp)
    x = other_logp.to(dtype) - logp.to(dtype)                                # [...]
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x.square()
    # exp overflows float32 near x = 88, and the clamp below would then multiply a zero
    # gradient by inf = NaN; |x| <= 20 already means a ratio beyond 10^8.
    x = x.clamp(-20.0, 20.0)                                                  # [...]
    # k3 grows like exp(x): a handful of tokens with a huge ratio would dominate the batch mean.
    # The cap bounds each token's value and zeroes its gradient; -10 never binds (k3 >= 0).
    return (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)                       # [...]


def perception_kl(logp: torch.Tensor, masked_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """The Implicit Perception Loss per token: D = kl_estimate(l, a), D >= 0 for k3.

    l = log pi(o_t | q, I, o_<t) and a = log pi(o_t | q, I_mask, o_<t), both [B, T]. For k3:
        D = exp(a - l) - (a - l) - 1,   d(-gamma*D)/dl = -gamma * (1 - exp(a - l)).
    D is SUBTRACTED in the objective. Where the original image makes the token more likely than
    the masked one (l > a) that gradient is negative, so gradient descent raises l further; where
    the token is just as likely without the picture the gradient vanishes, and tokens the masked
    image favours (l < a) are pushed down. The policy learns to let the pixels change its text.

    Whether gradient also flows through the masked branch is the caller's choice: the official
    code passes a detached `a`, computed once per rollout batch with the pre-update weights.

    >>> round(perception_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item(), 4)
    0.1931

    (gradient of -gamma*D here: -gamma * (1 - 0.25/0.5) = -0.5 gamma.)
    """
    return kl_estimate(logp, masked_logp, kind)


def perception_token_mask(kl_prcp: torch.Tensor, mask: torch.Tensor,
                          fraction: float) -> torch.Tensor:
    """The token-level KL_prcp mask: per rollout, the tokens whose KL_prcp is in its top `fraction`.

        keep_{i,t} = m_{i,t}  and  D_{i,t} >= Q_i(1 - fraction)

    Q_i(q) is the q-quantile of row i's VALID values (torch.nanquantile over the row with its
    padding set to NaN, with its default linear interpolation between order statistics).
    kl_prcp (D), mask: [B, T] -> bool [B, T]. Values tied with the threshold are all kept, so
    a row of equal values is kept whole; a row with one valid token keeps it; padding and empty
    rows keep nothing. The selection carries no gradient.

    The intent: many tokens of a reasoning trace (connectives, arithmetic, formatting) are about
    as likely with the masked picture as with the real one, so their KL_prcp is mostly noise;
    keeping each rollout's most image-dependent tokens aims the term where the picture matters.

    Example: D = [0.5, 0.1, 0.9, 0.3, 0.7], fraction 0.2. Sorted: 0.1 0.3 0.5 0.7 0.9; the
    0.8-quantile sits at position 0.8 * 4 = 3.2, i.e. 0.7 + 0.2 * (0.9 - 0.7) = 0.74: only 0.9.
    >>> D = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7]])
    >>> perception_token_mask(D, torch.ones(1, 5), 0.2).int().tolist()
    [[0, 0, 1, 0, 0]]
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if kl_prcp.shape != mask.shape or kl_prcp.dim() != 2:
        raise ValueError(f"kl_prcp {tuple(kl_prcp.shape)} and mask {tuple(mask.shape)} must "
                         "both be [B, T]")
    valid = mask.bool()                                                       # [B, T]
    d = kl_prcp.detach().to(_compute_dtype(kl_prcp))                          # [B, T]
    # NaN padding is what nanquantile skips; a row with no valid token gives a NaN threshold,
    # and every comparison with NaN is False, so such a row keeps nothing.
    row = d.masked_fill(~valid, math.nan)                                     # [B, T]
    threshold = torch.nanquantile(row, 1.0 - fraction, dim=-1, keepdim=True)  # [B, 1]
    return valid & (d >= threshold)                                           # [B, T]


# ---------------------------------------------------------------------------------------------
# Clipped surrogate
# ---------------------------------------------------------------------------------------------

def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_low: float = 0.2, clip_high: float = 0.2,
                        dual_clip: Optional[float] = 3.0, mask: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss with asymmetric clip and dual clip, and how often each clip binds.

        rho    = exp(l - old)
        L_clip = max(-A*rho, -A*clip(rho, 1 - clip_low, 1 + clip_high))
        where A < 0:  L_clip = min(L_clip, -C*A)        (C = dual_clip; None disables it)

    logp, old_logp: [B, T]; advantages: [B] (broadcast over T) or [B, T]; mask: [B, T] or None.
    Returns the loss [B, T] and 0-dim fractions of masked tokens where a clip binds (there the
    gradient is exactly zero): "clip_low" (A < 0, rho < 1 - clip_low), "clip_high" (A > 0,
    rho > 1 + clip_high), "clip_dual" (A < 0, -A*rho > -C*A).

    Example, clip 0.2 / 0.2, C = 3:
        A = +1: rho 0.5 -> -0.5,  rho 1.5 -> -1.2 (clip_high)
        A = -1: rho 0.5 -> 0.8 (clip_low),  rho 1.5 -> 1.5,  rho 5 -> 3 (clip_dual)
    >>> rho = torch.tensor([[0.5, 1.5, 0.5, 1.5, 5.0]], dtype=torch.float64)
    >>> A = torch.tensor([[1., 1., -1., -1., -1.]], dtype=torch.float64)
    >>> clipped_policy_loss(rho.log(), torch.zeros_like(rho), A)[0].round(decimals=4).tolist()
    [[-0.5, -1.2, 0.8, 1.5, 3.0]]
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    dtype = _compute_dtype(logp, old_logp, advantages)
    logp, old_logp, adv = logp.to(dtype), old_logp.to(dtype), advantages.to(dtype)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)                                    # [B, 1]: one A per rollout
    # As in the official code: no change inside any sane range, but no inf (and no inf * 0 = NaN
    # in the backward pass) from a stale padding token either.
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))                  # [B, T]
    unclipped = -adv * ratio                                                  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)            # [B, T]
    # The max is the pessimistic choice: once the ratio has moved past the clip in the direction
    # that helps, the loss goes flat and the update stops pushing that token.
    loss = torch.maximum(unclipped, clipped)                                  # [B, T]
    adv = adv.expand_as(loss)                                                 # [B, T]
    hit_low = (adv < 0) & (ratio < 1.0 - clip_low)                           # [B, T]
    hit_high = (adv > 0) & (ratio > 1.0 + clip_high)                         # [B, T]
    hit_dual = torch.zeros_like(hit_low)                                     # [B, T]
    if dual_clip is not None:
        # For A < 0 the max above keeps -A*rho, which is unbounded in rho: one stale token with
        # rho = 100 would outweigh the batch. Dual clip caps its loss (and zeroes its gradient).
        cap = -dual_clip * adv                                                # [B, T]
        hit_dual = (adv < 0) & (loss > cap)                                   # [B, T]
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)          # [B, T]
    if mask is None:
        mask = torch.ones_like(loss)
    fractions = {name: aggregate(hit.to(dtype), mask) for name, hit in
                 (("clip_low", hit_low), ("clip_high", hit_high), ("clip_dual", hit_dual))}
    return loss, fractions


# ---------------------------------------------------------------------------------------------
# Entropy
# ---------------------------------------------------------------------------------------------

def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Exact entropy of softmax(z) at each position: H = logsumexp(z) - sum_v softmax(z)_v z_v.

    logits: [..., V] -> [...]. This equals -sum_v p_v log p_v without forming log p. Computed
    in float32 for bf16/fp16 input (float64 stays float64) and differentiable. Logits of -inf
    (banned tokens) have p_v = 0 and contribute nothing.

    >>> round(entropy_from_logits(torch.zeros(4)).item(), 4)      # uniform over 4: ln 4
    1.3863
    """
    z = logits.to(_compute_dtype(logits))                                     # [..., V]
    # H does not change when a constant is added to every logit; subtracting the max keeps both
    # terms small, so their difference does not lose digits to cancellation.
    z = z - z.amax(dim=-1, keepdim=True).detach()                             # [..., V]
    p = torch.softmax(z, dim=-1)                                              # [..., V]
    # p_v * z_v is 0 * -inf = NaN for a banned token; its true contribution is 0. Filling the
    # logit (not the product) keeps the backward pass free of NaN as well.
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)                          # [..., V]
    return torch.logsumexp(z, dim=-1) - (p * z_finite).sum(dim=-1)           # [...]


# ---------------------------------------------------------------------------------------------
# Aggregation: per-token values -> one number
# ---------------------------------------------------------------------------------------------
# Each mode returns (total, count) from the masked values vm = v * m [B, T]; aggregate divides
# the total by the count - or by the caller's global normaliser, which replaces the count.

def _token_mean(vm, m, max_len):                  # sum_{i,t} v m / N_tokens
    return vm.sum(), m.sum()


def _seq_mean_token_mean(vm, m, max_len):         # 1/B sum_i (sum_t v m / sum_t m)
    row_count = m.sum(-1)                                                     # [B]
    return (vm.sum(-1) / row_count.clamp(min=1)).sum(), _rows(vm)


def _seq_mean_token_sum(vm, m, max_len):          # 1/B sum_i sum_t v m
    return vm.sum(), _rows(vm)


def _seq_mean_token_sum_norm(vm, m, max_len):     # 1/B sum_i (sum_t v m / L)
    return vm.sum() / float(max_len or vm.shape[-1]), _rows(vm)


def _micro_token_mean(vm, m, max_len):            # (sum_{i,t} v m / N_tokens of THIS call) / K
    return vm.sum() / m.sum().clamp(min=1), torch.ones((), dtype=vm.dtype, device=vm.device)


def _rows(vm):
    return torch.tensor(float(vm.shape[0]), dtype=vm.dtype, device=vm.device)


AGGREGATIONS = {"token-mean": _token_mean, "seq-mean-token-mean": _seq_mean_token_mean,
                "seq-mean-token-sum": _seq_mean_token_sum,
                "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
                MICRO_TOKEN_MEAN: _micro_token_mean}


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              normalizer: Optional[Number] = None, max_len: Optional[int] = None) -> torch.Tensor:
    """Reduce per-token values [B, T] under the completion mask [B, T] to one scalar.

        "token-mean"               sum_{i,t} v*m / N_tokens                  (official PAPO, DAPO)
        "seq-mean-token-mean"      1/B sum_i (sum_t v*m / sum_t m)           (GRPO paper)
        "seq-mean-token-sum"       1/B sum_i  sum_t v*m
        "seq-mean-token-sum-norm"  1/B sum_i (sum_t v*m / L)                 (Dr. GRPO)
        "micro-token-mean"         (sum_{i,t} v*m / N_tokens of THIS call) / K  (official code)

    L = max_len if given, else T (pass the maximum response length, or micro-batches padded to
    different T would weigh a token differently). A row or a call with no tokens gives 0.
    normalizer replaces the local count (N_tokens, B, or K for "micro-token-mean", default 1):
    dividing every micro-batch by the GLOBAL count of the whole batch (all micro-batches and
    ranks) makes their losses and gradients SUM exactly to the full batch's, however the batch
    is cut. "micro-token-mean" instead reproduces the official code, whose result depends on
    the cut (docs/objective.md, "Aggregation").

    Example: v = [[1, 2, 3, 4], [5, 6, 7, 8]], m = [[1, 1, 1, 0], [1, 1, 0, 0]]:
        token-mean 17/5 = 3.4, seq-mean-token-mean (2 + 5.5)/2 = 3.75,
        seq-mean-token-sum 17/2 = 8.5, seq-mean-token-sum-norm (6/4 + 11/4)/2 = 2.125.
    >>> v = torch.tensor([[1., 2., 3., 4.], [5., 6., 7., 8.]])
    >>> m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    >>> [round(aggregate(v, m, mode).item(), 4) for mode in AGG_MODES]
    [3.4, 3.75, 8.5, 2.125]

    The same rows as two micro-batches of one row each, K = 2: (6/3 + 11/2) / 2 = 3.75, not 3.4.
    >>> round(sum(aggregate(v[i:i+1], m[i:i+1], "micro-token-mean", 2) for i in (0, 1)).item(), 4)
    3.75
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of "
                         f"{', '.join(ALL_AGG_MODES)}")
    if values.shape != mask.shape or (mode not in ("token-mean", MICRO_TOKEN_MEAN)
                                      and values.dim() != 2):
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    if isinstance(normalizer, (int, float)) and normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    dtype = _compute_dtype(values)
    m = mask.to(dtype)                                                        # [B, T]
    # Padding may hold garbage (even inf or NaN) and 0 * NaN = NaN, so overwrite, not just multiply.
    vm = (values.to(dtype) * m).masked_fill(m == 0, 0.0)                      # [B, T]
    total, count = AGGREGATIONS[mode](vm, m, max_len)
    if normalizer is not None:
        return total / torch.as_tensor(normalizer, dtype=dtype, device=values.device)
    return total / count.clamp(min=1)         # an empty micro-batch contributes 0, not 0/0


# ---------------------------------------------------------------------------------------------
# The whole objective
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """The official switches of the objective, all off by default: what a RUN sets, beyond the
    paper's knobs. Checked once, when built. The tensors a call brings (exact entropies, the
    right rollouts) and the counts a mini-batch computes (normalizer, sft_normalizer) are
    papo_loss's own arguments.

    kl_prcp_clip            c: each token's KL_prcp clamped to [0, c] (official value 0.2)
    kl_prcp_token_fraction  p: per rollout, tokens below its (1 - p) KL_prcp quantile zeroed
                            (official value 0.2); perception_term says how
    sft_coef                + sft_coef x token mean of -l over the rollouts papo_loss's sft_rows
                            marks as right (official value 1e-3)
    entropy                 "sample" (official: H = -l, -a) or "exact" (-sum_v p log p,
                            entropy_from_logits, given to papo_loss as entropy_orig / entropy_mask)
    """
    kl_prcp_clip: Optional[float] = None
    kl_prcp_token_fraction: Optional[float] = None
    sft_coef: float = 0.0
    entropy: str = "sample"

    def __post_init__(self):
        problems = []
        if self.kl_prcp_clip is not None and not 0 < self.kl_prcp_clip < math.inf:
            problems.append(f"kl_prcp_clip must be > 0 (or None = off), got {self.kl_prcp_clip}")
        if self.kl_prcp_token_fraction is not None and not 0 < self.kl_prcp_token_fraction <= 1:
            problems.append(f"kl_prcp_token_fraction must be in (0, 1] (or None = off), "
                            f"got {self.kl_prcp_token_fraction}")
        if not 0 <= self.sft_coef < math.inf:
            problems.append(f"sft_coef must be >= 0, got {self.sft_coef}")
        if self.entropy not in ENTROPY_KINDS:
            problems.append(f"unknown entropy {self.entropy!r}; choose one of {ENTROPY_KINDS}")
        if problems:
            raise ValueError("; ".join(problems))


def perception_term(logp: torch.Tensor, masked_logp: torch.Tensor, mask: torch.Tensor,
                    kind: str = "k3", token_fraction: Optional[float] = None,
                    clip: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """KL_prcp per token as the objective aggregates it, with the official switches:
    (values [B, T], metrics).

        D = perception_kl(l, a)                    every token's value, logged as "kl_prcp"
        D = D * perception_token_mask(D, m, p)     token_fraction p: the rest ZEROED, not removed
        D = clamp(D, 0, c)                         clip c

    The official order: select on the raw values, then clamp. Zeroed tokens stay in the
    aggregate's normaliser, so with the token mask the "token-mean" term is the sum over kept
    tokens / the number of ALL valid tokens, about p times a mean over the kept ones (the
    official dp_actor multiplies by the token mask, clamps, then averages over the response
    mask). Metrics, token means over this call: "kl_prcp", and with a switch on the share of
    tokens kept ("kl_prcp_kept") or changed by the clamp ("kl_prcp_clipped").
    """
    d = perception_kl(logp, masked_logp, kind)                                # [B, T]
    metrics = {"kl_prcp": aggregate(d.detach(), mask)}
    keep = mask.bool()                                                        # [B, T]
    if token_fraction is not None:
        keep = perception_token_mask(d, mask, token_fraction)                 # [B, T]
        metrics["kl_prcp_kept"] = aggregate(keep.to(d.dtype), mask)
        d = d.masked_fill(~keep, 0.0)                                         # [B, T]
    if clip is not None:
        changed = ((d < 0) | (d > clip)) & keep                               # [B, T]
        metrics["kl_prcp_clipped"] = aggregate(changed.to(d.dtype), mask)
        d = d.clamp(0.0, clip)                                                # [B, T]
    return d, metrics


def papo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, masked_logp: Optional[torch.Tensor] = None,
              ref_logp: Optional[torch.Tensor] = None,
              entropy_orig: Optional[torch.Tensor] = None,
              entropy_mask: Optional[torch.Tensor] = None,
              sft_rows: Optional[torch.Tensor] = None,
              gamma: float = 0.0, eta_orig: float = 0.0, eta_mask: float = 0.0, beta: float = 0.0,
              clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: Optional[float] = 3.0,
              agg_mode: str = "token-mean", kl_kind: str = "k3", max_len: Optional[int] = None,
              options: Optional[Options] = None, normalizer: Optional[Number] = None,
              sft_normalizer: Optional[Number] = None) -> tuple[torch.Tensor, dict]:
    """L = agg(L_clip) + beta agg(KL_ref) - gamma agg(KL_prcp) + eta_orig H_orig + eta_mask H_mask
           (+ sft_coef agg_sft(-l) over the right rollouts, when that switch is on)

    The rows of this call (a micro-batch):
        logp (l), old_logp, mask, masked_logp (a), ref_logp: [B, T]; advantages: [B] or [B, T];
        entropy_orig, entropy_mask: [B, T] exact entropies, read with options.entropy "exact"
        (else H_orig = -l and H_mask = -a per token, the official sample estimates);
        sft_rows: [B], the right rollouts of the SFT term (without sft_coef: logs "sft_nll").
    What the run sets:
        the coefficients (GRPO: gamma = eta = 0; PAPO-G adds gamma; PAPO-D is DAPO (beta 0)
        plus gamma and both etas), the clips, kl_kind, agg_mode, max_len (L of
        "seq-mean-token-sum-norm") and options, the official switches (Options).
    What the mini-batch computes:
        normalizer: the GLOBAL count that every agg divides by instead of this call's own
        (tokens, rollouts, or micro-batches K, by agg_mode; see aggregate), so that the calls'
        losses and gradients add up to the whole mini-batch's; None: this call's own count.
        sft_normalizer: the same for the SFT term, the tokens of the right rollouts.
    agg = aggregate(., mask, agg_mode, normalizer, max_len). A term is added only when its
    coefficient is non-zero, so GRPO's loss is exactly agg(L_clip) (+ the beta term).

    Returns the loss (0-dim, differentiable) and metrics as Python floats: "loss", and token means
    over this call of pg_loss, clip_low / clip_high / clip_dual, kl_ref, kl_prcp (+ kl_prcp_kept,
    kl_prcp_clipped), entropy_orig, entropy_mask, sft_nll, approx_kl_old (k3 KL(old || new)) and
    ratio_mean - each whenever its inputs are given, whatever the coefficients.
    docs/objective.md derives each term; notebooks/02_objective.ipynb computes them by hand.

    Example (token-mean, one token, A = 0 so only the perception term acts):
    >>> l = torch.tensor([[math.log(0.5)]], requires_grad=True)
    >>> loss, _ = papo_loss(l, l.detach(), torch.zeros(1), torch.ones(1, 1), gamma=1.0,
    ...                     masked_logp=torch.tensor([[math.log(0.25)]]))
    >>> round(loss.item(), 4), round(torch.autograd.grad(loss, l)[0].item(), 4)
    (-0.1931, -0.5)
    """
    o = options if options is not None else Options()
    _check_inputs(o, masked_logp, ref_logp, entropy_orig, entropy_mask, sft_rows, gamma,
                  eta_orig, eta_mask, beta, kl_kind, agg_mode, normalizer, sft_normalizer)
    agg = lambda v: aggregate(v, mask, agg_mode, normalizer, max_len)        # [B, T] -> 0-dim

    # the per-token terms, each computed whenever its inputs are given (for the metrics)
    pg, metrics = clipped_policy_loss(logp, old_logp, advantages, clip_low, clip_high,
                                      dual_clip, mask)                        # [B, T] L_clip
    kl_ref = kl_estimate(logp, ref_logp, kl_kind) if ref_logp is not None else None  # [B, T]
    kl_prcp = None
    if masked_logp is not None:
        kl_prcp, more = perception_term(logp, masked_logp, mask, kl_kind,
                                        o.kl_prcp_token_fraction, o.kl_prcp_clip)   # [B, T]
        metrics.update(more)
    h_orig, h_mask = _entropies(logp, masked_logp, entropy_orig, entropy_mask, o)  # [B, T] each

    # the objective, term by term as in the equation above
    loss = agg(pg)
    if beta:
        loss = loss + beta * agg(kl_ref)
    if gamma:
        loss = loss - gamma * agg(kl_prcp)            # SUBTRACTED: KL_prcp is maximised
    if eta_orig:
        loss = loss + eta_orig * agg(h_orig)          # added: both entropies pushed down
    if eta_mask:
        loss = loss + eta_mask * agg(h_mask)
    if o.sft_coef:                                    # l up on right answers
        loss = loss + o.sft_coef * _sft_mean(-logp, mask, sft_rows, agg_mode, normalizer,
                                             sft_normalizer)

    metrics.update(_monitored(logp, old_logp, mask, pg, kl_ref, h_orig, h_mask, sft_rows))
    metrics["loss"] = loss.detach()
    return loss, _as_floats(metrics)


def _check_inputs(o: Options, masked_logp, ref_logp, entropy_orig, entropy_mask, sft_rows,
                  gamma, eta_orig, eta_mask, beta, kl_kind, agg_mode, normalizer,
                  sft_normalizer) -> None:
    """The cross-argument checks of papo_loss (Options checks its own fields)."""
    if kl_kind not in KL_KINDS:
        raise ValueError(f"unknown kl_kind {kl_kind!r}; choose one of {KL_KINDS}")
    if gamma != 0 and masked_logp is None:
        raise ValueError("gamma != 0 (Implicit Perception Loss) needs masked_logp")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 (reference KL) needs ref_logp")
    if eta_mask != 0 and o.entropy == "sample" and masked_logp is None:
        raise ValueError("eta_mask != 0 with entropy='sample' needs masked_logp")
    for eta, given, name in ((eta_orig, entropy_orig, "entropy_orig"),
                             (eta_mask, entropy_mask, "entropy_mask")):
        if eta != 0 and o.entropy == "exact" and given is None:
            raise ValueError(f"{name.replace('entropy', 'eta')} != 0 with entropy='exact' "
                             f"needs {name}")
    if o.sft_coef and sft_rows is None:
        raise ValueError("sft_coef != 0 (SFT loss on correct rollouts) needs sft_rows")
    if (o.sft_coef and normalizer is not None and sft_normalizer is None
            and agg_mode != MICRO_TOKEN_MEAN):
        raise ValueError("sft_coef with a global normalizer needs sft_normalizer, the global "
                         "number of tokens of correct rollouts")


def _entropies(logp, masked_logp, entropy_orig, entropy_mask, o: Options):
    """(H_orig, H_mask) per token: the sample estimates -l and -a (official), or with
    options.entropy "exact" the exact entropies the caller passed (entropy_from_logits of each
    position's distribution, as model.completion_logprobs(with_entropy=True) computes them);
    None where not available."""
    if o.entropy == "exact":
        return entropy_orig, entropy_mask
    return -logp, (-masked_logp if masked_logp is not None else None)


def _sft_mean(nll, mask, sft_rows, agg_mode: str, normalizer, sft_normalizer) -> torch.Tensor:
    """The SFT term: a TOKEN mean of -l over the right rollouts' tokens in every mode, divided
    by their global count (sft_normalizer), or - with "micro-token-mean" - this call's own token
    mean over K, like every term there. A batch with no right rollout adds 0."""
    right = mask.bool() & sft_rows.bool().reshape(-1, 1)                      # [B, T]
    if agg_mode == MICRO_TOKEN_MEAN:
        k = sft_normalizer if sft_normalizer is not None else normalizer
        return aggregate(nll, right, MICRO_TOKEN_MEAN, k)
    return aggregate(nll, right, "token-mean", sft_normalizer)


@torch.no_grad()
def _monitored(logp, old_logp, mask, pg, kl_ref, h_orig, h_mask, sft_rows) -> dict:
    """What papo_loss logs beside the loss: token means over this call's tokens."""
    mean = lambda v: aggregate(v.detach(), mask)
    dtype = _compute_dtype(logp, old_logp)
    log_ratio = (logp.to(dtype) - old_logp.to(dtype)).clamp(-20.0, 20.0)      # [B, T]
    out = {"pg_loss": mean(pg), "approx_kl_old": mean(kl_estimate(old_logp, logp, "k3")),
           "ratio_mean": mean(torch.exp(log_ratio))}
    for name, values in (("kl_ref", kl_ref), ("entropy_orig", h_orig), ("entropy_mask", h_mask)):
        if values is not None:
            out[name] = mean(values)
    if sft_rows is not None:
        right = mask.bool() & sft_rows.bool().reshape(-1, 1)                  # [B, T]
        out["sft_nll"] = aggregate(-logp.detach(), right)
    return out


def _as_floats(metrics: dict) -> dict[str, float]:
    """0-dim tensors -> Python floats in ONE device-to-host copy (each copy is a sync on a GPU)."""
    widest = functools.reduce(torch.promote_types, (v.dtype for v in metrics.values()))
    values = torch.stack([v.reshape(()).to(widest) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def annealed_coefficients(step: int, total_steps: int, gamma: float, eta_orig: float = 0.0,
                          eta_mask: float = 0.0, *, gamma_end: float = 0.0,
                          fraction: float = 0.5) -> tuple[float, float, float]:
    """KL_prcp annealing: (gamma_t, eta_orig_t, eta_mask_t) for training step `step`.

        n        = max(1, int(total_steps * fraction))     the schedule's length, in steps
        progress = min((step - 1) / n, 1)
        gamma_t  = (1 - progress) * gamma + progress * gamma_end
        eta_t    = eta * gamma_t / gamma          (eta_orig and eta_mask alike)

    Steps are counted from 1 to total_steps, as train.py counts them: step 1 trains with gamma
    itself, and step 1 + n and every later one with gamma_end. The length is rounded down to
    whole steps, as the official code does (int(training steps * annealing ratio)): over 5
    steps with fraction 0.5 it is 2 steps, not 2.5. The Double
    Entropy Loss exists to hold back the collapse that a strong KL_prcp can cause, so it fades
    with the term it guards (as in the official code). gamma_end > gamma is allowed: a ramp up.

    The intent: a strong push to diverge from the masked branch early, while the policy learns
    to use the picture, and less of an unbounded bonus late, when it mostly risks the "KL_prcp
    hacking" collapse.

    Example: gamma 0.02 -> 0 over half of 200 steps; at step 51, half-way: gamma 0.01, eta 0.025.
    >>> [round(annealed_coefficients(s, 200, 0.02, 0.05)[0], 6) for s in (1, 51, 101, 200)]
    [0.02, 0.01, 0.0, 0.0]
    >>> round(annealed_coefficients(51, 200, 0.02, 0.05)[1], 6)
    0.025
    """
    if step < 1 or total_steps < 1:
        raise ValueError(f"steps are counted from 1: got step {step} of {total_steps}")
    if not 0 < gamma < math.inf:
        raise ValueError(f"annealing needs gamma > 0 (the etas are scaled by gamma_t / gamma), "
                         f"got {gamma}")
    if not 0 <= gamma_end < math.inf:
        raise ValueError(f"gamma_end must be >= 0, got {gamma_end}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    length = max(1, int(total_steps * fraction))
    progress = min((step - 1) / length, 1.0)
    # written as a weighted mean so that progress 0 gives gamma and progress 1 gives gamma_end
    # exactly, without a rounding step
    gamma_t = (1.0 - progress) * gamma + progress * gamma_end
    factor = gamma_t / gamma
    return gamma_t, eta_orig * factor, eta_mask * factor


# ---------------------------------------------------------------------------------------------
# Image corruption
# ---------------------------------------------------------------------------------------------

def _as_generator(rng: Union[None, int, np.random.Generator]) -> np.random.Generator:
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def patch_mask_grid(height: int, width: int, patch_size: int = 14, ratio: float = 0.6,
                    rng: Union[None, int, np.random.Generator] = None,
                    mode: str = "bernoulli") -> np.ndarray:
    """Which patch_size x patch_size squares of a height x width picture to black out.

    Returns bool [ceil(height / patch_size), ceil(width / patch_size)]; the partial squares at
    the right and bottom edges are squares like the others. "bernoulli" (official): each square
    is True independently with probability ratio. "exact": exactly round(ratio * n_squares)
    squares (Python's round, half to even), chosen uniformly without replacement.

    >>> patch_mask_grid(30, 20, 14, 1.0).shape      # 3 x 2 squares, the last row/column partial
    (3, 2)
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; choose one of {MASK_MODES}")
    rng = _as_generator(rng)
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    if mode == "bernoulli":
        return rng.random((rows, cols)) < ratio          # random() < 1 always: ratio 1 masks all
    grid = np.zeros(rows * cols, dtype=bool)
    grid[rng.choice(rows * cols, size=round(ratio * rows * cols), replace=False)] = True
    return grid.reshape(rows, cols)


def mask_image(image_or_images: Union[Image.Image, Sequence[Image.Image]], patch_size: int = 14,
               ratio: float = 0.6, rng: Union[None, int, np.random.Generator] = None,
               mode: str = "bernoulli") -> Union[Image.Image, list[Image.Image]]:
    """I -> I_mask: black out random patch_size x patch_size squares of the raw picture.

    Works IN PIXEL SPACE on the PIL image, before the processor resizes and normalises it; the
    masked picture is then processed exactly like the original, so it yields the same number of
    image tokens. Zeroing rows of the processor's normalised pixel_values is not the same thing:
    0 there is the dataset's mean colour, not black, and the rows are patches of a resized image.

    Returns a new image, or a list (tuple) of new images for a list (tuple); the input is untouched.
    Size and mode are kept for "RGB", "L" and "RGBA" (alpha is kept, only colour is blacked out);
    any other mode is converted to "RGB" first. rng: None, an int seed or a numpy Generator; the
    images of a list are masked independently, drawing from one stream. See patch_mask_grid
    for the modes.

    How the caller uses it: one mask per prompt, shared by its G rollouts - the group's
    advantages and KL_prcp values then compare like with like, differing only through the
    sampled text - and a fresh mask every step. In a multi-image prompt each image is masked
    independently (pass the prompt's images as one list).
    """
    rng = _as_generator(rng)
    if isinstance(image_or_images, (list, tuple)):
        return type(image_or_images)(_mask_one(im, patch_size, ratio, rng, mode)
                                     for im in image_or_images)
    return _mask_one(image_or_images, patch_size, ratio, rng, mode)


def _mask_one(image: Image.Image, patch_size: int, ratio: float, rng: np.random.Generator,
              mode: str) -> Image.Image:
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    pixels = np.array(image)                                  # [H, W] or [H, W, C] uint8, a copy
    grid = patch_mask_grid(image.height, image.width, patch_size, ratio, rng, mode)  # [rows, cols]
    keep = ~grid.repeat(patch_size, axis=0).repeat(patch_size, axis=1)               # [rows*p, cols*p]
    keep = keep[:image.height, :image.width]                                         # [H, W]
    # Multiplying by the 0/1 keep map is the same as writing 0 into the masked pixels, and half
    # the cost of boolean-index assignment.
    if image.mode == "RGBA":
        pixels[..., :3] *= keep[..., None]                    # alpha is kept
    elif image.mode == "RGB":
        pixels *= keep[..., None]
    else:
        pixels *= keep
    return Image.fromarray(pixels)            # uint8 [H, W] / [H, W, 3] / [H, W, 4]: L / RGB / RGBA


# ---------------------------------------------------------------------------------------------
# DAPO's dynamic sampling
# ---------------------------------------------------------------------------------------------

def dynamic_sampling_keep(group_scores: torch.Tensor, low: float = 0.01,
                          high: float = 0.99) -> torch.Tensor:
    """Keep a group iff low < mean_G(score) < high. group_scores: [N, G] -> bool [N].

    A group whose rollouts all agree (all right or all wrong) has A = 0 for every rollout and
    so no policy-gradient signal; DAPO drops it and draws more prompts instead.

    >>> dynamic_sampling_keep(torch.tensor([[1., 1., 1.], [0., 0., 0.], [1., 0., 0.]])).tolist()
    [False, False, True]
    """
    if group_scores.dim() != 2:
        raise ValueError(f"group_scores must be [N, G], got shape {tuple(group_scores.shape)}")
    mean = group_scores.to(_compute_dtype(group_scores)).mean(dim=1)          # [N]
    return (mean > low) & (mean < high)                                      # [N]
