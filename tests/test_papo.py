"""Tests of papo.py that fail when the math is wrong: closed forms, hand-computed tables, oracle
comparisons, gradient signs and exactness, invariances. Closed-form checks run in float64."""

import dataclasses
import doctest
import math

import numpy as np
import pytest
import torch
from PIL import Image

import papo

F64 = torch.float64
LN2 = math.log(2.0)


def test_docstring_examples_hold():
    """The worked numeric examples in the docstrings are checked as doctests."""
    result = doctest.testmod(papo)
    assert result.attempted >= 8 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------

P = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
Q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)


def expectation_under_p(kind):
    """sum_v p_v k(v): the exact expectation of an estimator over tokens sampled from p."""
    return float((P * papo.kl_estimate(P.log(), Q.log(), kind)).sum())


def test_k1_and_k3_are_unbiased_for_kl():
    closed_form = float((P * (P / Q).log()).sum())          # KL(p || q)
    assert closed_form == pytest.approx(0.4564348191467836, abs=1e-12)
    assert expectation_under_p("k1") == pytest.approx(closed_form, abs=1e-12)
    assert expectation_under_p("k3") == pytest.approx(closed_form, abs=1e-12)


def test_k2_expectation_equals_its_closed_form():
    closed_form = 0.5 * float((P * (Q.log() - P.log()) ** 2).sum())
    assert expectation_under_p("k2") == pytest.approx(closed_form, abs=1e-12)
    assert closed_form != pytest.approx(float((P * (P / Q).log()).sum()), abs=1e-3)  # k2 is biased


def test_kl_estimators_hand_table():
    # x = other - logp:   0        ln 2                   -ln 2                 1         -1
    x = torch.tensor([0.0, LN2, -LN2, 1.0, -1.0], dtype=F64)
    logp = torch.zeros_like(x)
    k1 = [0.0, -0.6931471805599453, 0.6931471805599453, -1.0, 1.0]
    k2 = [0.0, 0.2402265069591007, 0.2402265069591007, 0.5, 0.5]
    # exp(x) - x - 1:  0,  2 - ln2 - 1,  0.5 + ln2 - 1,  e - 2,  1/e
    k3 = [0.0, 0.3068528194400547, 0.1931471805599453, 0.7182818284590451, 0.36787944117144233]
    for kind, table in (("k1", k1), ("k2", k2), ("k3", k3)):
        got = papo.kl_estimate(logp, x, kind)
        assert got.dtype == F64
        assert got.tolist() == pytest.approx(table, abs=1e-12), kind


def test_k3_is_nonnegative_on_a_grid_of_log_ratios():
    x = torch.linspace(-40.0, 40.0, 8001, dtype=F64)
    assert (papo.kl_estimate(torch.zeros_like(x), x, "k3") >= 0).all()


def test_k3_clamps_bind_at_the_documented_bounds():
    # exp(x) - x - 1 is 8.682 at x = 2.5 (below the cap), 11.18 at x = 2.7 and 11.000006 at
    # x = -12 (capped at 10); far out, x is clamped to +-20 where k3 is capped too.
    x = torch.tensor([2.5, 2.7, 3.0, -11.0, -12.0, 25.0, -25.0, 1000.0, -1000.0], dtype=F64,
                     requires_grad=True)
    k3 = papo.kl_estimate(torch.zeros_like(x), x, "k3")
    assert k3.tolist() == pytest.approx([8.682493960703473, 10, 10, 10, 10, 10, 10, 10, 10], abs=1e-12)
    (grad,) = torch.autograd.grad(k3.sum(), x)
    # below the cap the gradient is exp(x) - 1; capped tokens have exactly zero gradient and the
    # x clamp keeps exp from overflowing, so 0 * inf never produces a NaN
    assert grad[0].item() == pytest.approx(math.exp(2.5) - 1, abs=1e-12)
    assert torch.equal(grad[1:], torch.zeros(8, dtype=F64))
    x32 = torch.tensor([100.0, -100.0], requires_grad=True)
    (g32,) = torch.autograd.grad(papo.kl_estimate(torch.zeros(2), x32, "k3").sum(), x32)
    assert torch.isfinite(g32).all()


def test_only_k3_is_clamped():
    x = torch.tensor([30.0], dtype=F64)
    assert papo.kl_estimate(torch.zeros(1, dtype=F64), x, "k1").item() == -30.0
    assert papo.kl_estimate(torch.zeros(1, dtype=F64), x, "k2").item() == 450.0


def test_unknown_kl_kind_raises():
    with pytest.raises(ValueError, match="k4"):
        papo.kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


def test_low_precision_is_upcast_and_float64_is_kept():
    a = torch.tensor([0.5, -0.25])
    assert papo.kl_estimate(a.bfloat16(), a.bfloat16()).dtype == torch.float32
    assert papo.kl_estimate(a.double(), a.bfloat16()).dtype == F64


# ---------------------------------------------------------------------------------------------
# Implicit Perception Loss
# ---------------------------------------------------------------------------------------------

def test_perception_kl_is_zero_when_branches_agree():
    l = torch.randn(3, 7, dtype=F64, generator=torch.Generator().manual_seed(0)) - 3
    for kind in papo.KL_KINDS:
        assert torch.equal(papo.perception_kl(l, l.clone(), kind), torch.zeros_like(l))


def exact_kl(p_logits, q_logits):
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((lp.exp() * (lp - lq)).sum())


def test_minimising_minus_gamma_perception_kl_pushes_the_branches_apart():
    """The sign of the whole method, with an exact expectation over a 5-token vocabulary.

    The surrogate the policy minimises is E_{v ~ pi_old}[-gamma * D(l_v, a_v)], differentiated
    through l only (the masked branch detached). Its gradient w.r.t. the logits is exactly
    gamma * (q - p) = -gamma * grad KL(q || p), so a descent step increases KL(q || p); on this
    example it increases KL(p || q) as well."""
    z = torch.tensor([1.0, 0.5, -0.3, 0.2, -1.0], dtype=F64, requires_grad=True)  # original
    w = torch.tensor([0.2, 0.9, 0.1, -0.4, -0.2], dtype=F64)                       # masked
    gamma, lr = 0.5, 0.5
    p_old = torch.softmax(z, -1).detach()
    surrogate = (p_old * -gamma * papo.perception_kl(torch.log_softmax(z, -1),
                                                     torch.log_softmax(w, -1))).sum()
    (grad,) = torch.autograd.grad(surrogate, z)
    p, q = torch.softmax(z, -1).detach(), torch.softmax(w, -1)
    assert grad.tolist() == pytest.approx((gamma * (q - p)).tolist(), abs=1e-12)
    before_pq, before_qp = exact_kl(z.detach(), w), exact_kl(w, z.detach())
    z_new = z.detach() - lr * grad
    assert exact_kl(w, z_new) > before_qp + 1e-3
    assert exact_kl(z_new, w) > before_pq + 1e-3


def test_perception_kl_gradient_formula():
    l = torch.tensor([math.log(0.5), math.log(0.1)], dtype=F64, requires_grad=True)
    a = torch.tensor([math.log(0.25), math.log(0.4)], dtype=F64)
    (grad,) = torch.autograd.grad(-papo.perception_kl(l, a).sum(), l)
    # -(1 - exp(a - l)): -(1 - 0.5) = -0.5 (pushed up), -(1 - 4) = +3 (pushed down)
    assert grad.tolist() == pytest.approx([-0.5, 3.0], abs=1e-12)


def test_the_push_on_l_of_each_estimator_in_closed_form():
    """d(-D)/dl per token, x = a - l (the masked branch's log-prob minus the original's):
    k1 = -x: 1 everywhere, no zero (every sampled token pushed down the same in the loss's
    terms, whatever the picture did); k2 = x^2 / 2: -x; k3 = e^x - x - 1: -(1 - e^x) - zero
    where the branches agree, at most 1 in size where the picture supports the token (x < 0),
    and large where hiding the picture makes it likelier (x > 0), up to the official cap of k3
    at 10 (x = 2.61, a push of e^x - 1 = 12.6), beyond which it is 0."""
    x = torch.tensor([-8.0, -2.0, -0.5, 0.0, 0.5, 2.0, 2.6], dtype=F64)
    l = torch.full_like(x, -1.0).requires_grad_(True)
    a = l.detach() + x
    closed = {"k1": -torch.ones_like(x), "k2": x, "k3": -(1 - x.exp())}    # d(-D)/dl
    for kind, expected in closed.items():
        (grad,) = torch.autograd.grad(-papo.perception_kl(l, a, kind).sum(), l)
        assert grad.tolist() == pytest.approx(expected.tolist(), rel=1e-12, abs=1e-12), kind
    # descent moves l by -grad: up where the picture supports the token, down where it does not
    (grad,) = torch.autograd.grad(-papo.perception_kl(l, a).sum(), l)
    push = -grad
    assert push[3] == 0                                          # x = 0: no push
    assert (push[:3] > 0).all() and (push[:3] < 1).all()         # x < 0: up, by less than 1
    assert (push[4:] < 0).all() and push[-1] < -12               # x > 0: down, by up to 12.6
    l_far = torch.tensor([0.0], dtype=F64, requires_grad=True)   # x = 2.62: k3 = 10.1, capped
    (g_far,) = torch.autograd.grad(-papo.perception_kl(l_far, torch.tensor([2.62], dtype=F64)).sum(),
                                   l_far)
    assert g_far.item() == 0.0
    # k2 has the same zero and signs; k1 has neither
    (g2,) = torch.autograd.grad(-papo.perception_kl(l, a, "k2").sum(), l)
    assert g2[3] == 0 and (-g2[:3] > 0).all() and (-g2[4:] < 0).all()


def test_the_clamp_silences_the_push_outside_its_band():
    """With --kl-prcp-clip 0.2 a token's push is zero once its k3 passes 0.2, i.e. outside
    e^x - x - 1 < 0.2: x in about (-0.7068, 0.5722), where the push is at most 0.507 up and
    0.772 down. Inside, it is the unclamped -(1 - e^x)."""
    lo, hi = -0.7068, 0.5722                       # roots of e^x - x - 1 = 0.2 (to 1e-4)
    assert math.exp(lo) - lo - 1 == pytest.approx(0.2, abs=1e-4)
    assert math.exp(hi) - hi - 1 == pytest.approx(0.2, abs=1e-4)
    assert (1 - math.exp(lo), 1 - math.exp(hi)) == pytest.approx((0.507, -0.772), abs=1e-3)
    x = torch.tensor([-1.0, -0.72, -0.69, -0.3, 0.3, 0.56, 0.59, 1.0], dtype=F64)
    l = torch.zeros_like(x, requires_grad=True)
    mask = torch.ones(1, len(x), dtype=F64)
    values, _ = papo.perception_term(l[None], (l.detach() + x)[None], mask, clip=0.2)   # [1, T]
    (grad,) = torch.autograd.grad(-values.sum(), l)
    inside = (x > lo) & (x < hi)
    assert inside.tolist() == [False, False, True, True, True, True, False, False]
    assert grad[~inside].tolist() == [0.0] * 4
    assert grad[inside].tolist() == pytest.approx((-(1 - x.exp()))[inside].tolist(), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Entropy
# ---------------------------------------------------------------------------------------------

def oracle_entropy(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def test_entropy_of_uniform_is_log_v():
    for V in (2, 7, 1000):
        h = papo.entropy_from_logits(torch.full((3, V), 0.37, dtype=F64))
        assert h.tolist() == pytest.approx([math.log(V)] * 3, abs=1e-12)


def test_entropy_of_one_hot_is_zero():
    for dtype in (F64, torch.float32, torch.bfloat16):
        z = torch.zeros(2, 50, dtype=dtype)
        z[:, 3] = 1000.0
        h = papo.entropy_from_logits(z)
        assert torch.isfinite(h).all() and h.abs().max() < 1e-12


def test_entropy_matches_minus_sum_p_log_p():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, 300, generator=g) * 3
    h32 = papo.entropy_from_logits(z)
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), oracle_entropy(z), atol=1e-5, rtol=0)
    zb = z.bfloat16()
    hb = papo.entropy_from_logits(zb)
    assert hb.dtype == torch.float32                          # computed in float32, not bf16
    torch.testing.assert_close(hb.double(), oracle_entropy(zb), atol=1e-5, rtol=0)
    # against the unrounded logits: bf16 keeps 8 significant bits, so logits of size ~5 move by
    # up to 0.02 and the entropy by a few percent at most
    torch.testing.assert_close(hb.double(), oracle_entropy(z), atol=0, rtol=3e-2)
    z64 = z.double()
    h64 = papo.entropy_from_logits(z64)
    assert h64.dtype == F64
    torch.testing.assert_close(h64, oracle_entropy(z64), atol=1e-12, rtol=0)


def test_entropy_with_minus_inf_logits_has_no_nan():
    z = torch.tensor([[0.3, -math.inf, 1.2, -math.inf, -0.5]], dtype=F64, requires_grad=True)
    h = papo.entropy_from_logits(z)
    finite = torch.tensor([[0.3, 1.2, -0.5]], dtype=F64)
    assert h.item() == pytest.approx(oracle_entropy(finite).item(), abs=1e-12)
    (grad,) = torch.autograd.grad(h.sum(), z)
    assert torch.isfinite(grad).all()
    assert grad[0, 1] == 0 and grad[0, 3] == 0


def test_entropy_gradient_matches_finite_differences():
    z = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(papo.entropy_from_logits, (z,))


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def test_group_advantages_hand_example_uses_unbiased_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8], dtype=F64)
    a = papo.group_advantages(r, 4, eps=0.0)
    # group 1: mean 0.25, unbiased std 0.5 (biased std would be 0.433 -> 1.732)
    # group 2: mean 0.5, unbiased std sqrt(0.2/3) = 0.2582
    s = math.sqrt(0.2 / 3)
    expected = [1.5, -0.5, -0.5, -0.5, -0.3 / s, -0.1 / s, 0.1 / s, 0.3 / s]
    assert a.tolist() == pytest.approx(expected, abs=1e-12)


def test_group_advantages_zero_mean_unit_std_per_group():
    r = torch.rand(6 * 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    a = papo.group_advantages(r, 5).view(6, 5)
    assert a.mean(1).abs().max() < 1e-12
    assert a.std(1).tolist() == pytest.approx([1.0] * 6, abs=1e-4)     # up to eps
    exact = papo.group_advantages(r, 5, eps=0.0).view(6, 5)
    assert exact.std(1).tolist() == pytest.approx([1.0] * 6, abs=1e-12)


def test_all_equal_group_gives_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.7, 0.7, 0.7], dtype=F64)
    for scale in (True, False):
        a = papo.group_advantages(r, 3, scale_by_std=scale)
        assert torch.equal(a[:3], torch.zeros(3, dtype=F64))
        assert torch.equal(a[6:], torch.zeros(3, dtype=F64))
        assert a[3:6].abs().min() > 0.1


def test_group_advantages_are_permutation_equivariant():
    g = torch.Generator().manual_seed(4)
    r = torch.rand(12, dtype=F64, generator=g)
    perm = torch.cat([torch.randperm(4, generator=g) + 4 * k for k in range(3)])
    torch.testing.assert_close(papo.group_advantages(r[perm], 4), papo.group_advantages(r, 4)[perm],
                               atol=1e-12, rtol=0)


def test_unscaled_advantages_are_reward_minus_mean():
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 0.9], dtype=F64)
    a = papo.group_advantages(r, 3, scale_by_std=False)
    assert a.tolist() == pytest.approx([0.5, -0.5, 0.0, -0.3, -0.3, 0.6], abs=1e-12)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        papo.group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size"):
        papo.group_advantages(torch.zeros(10), 1)


# ---------------------------------------------------------------------------------------------
# Clipped surrogate
# ---------------------------------------------------------------------------------------------

# ratio rho, advantage A, expected loss, expected d loss / d logp (= -A*rho when unclipped)
CLIP_TABLE = [
    (0.5, 1.0, -0.5, -0.5),     # A > 0, below the range: not clipped (PPO only stops improvement)
    (1.0, 1.0, -1.0, -1.0),
    (1.1, 2.0, -2.2, -2.2),     # inside
    (1.5, 1.0, -1.2, 0.0),      # above 1 + 0.2: clipped
    (0.5, -1.0, 0.8, 0.0),      # A < 0, below 1 - 0.2: clipped
    (0.9, -2.0, 1.8, 1.8),      # inside
    (1.5, -1.0, 1.5, 1.5),      # A < 0, above the range: not clipped, below the dual cap 3
    (5.0, -1.0, 3.0, 0.0),      # dual clip: -A*rho = 5 capped at -C*A = 3
    (1e6, -0.5, 1.5, 0.0),      # a huge ratio: still capped at 3 * 0.5
]


def test_clipped_policy_loss_hand_table_and_gradients():
    rho = torch.tensor([[row[0] for row in CLIP_TABLE]], dtype=F64)
    adv = torch.tensor([[row[1] for row in CLIP_TABLE]], dtype=F64)
    logp = rho.log().requires_grad_()
    loss, _ = papo.clipped_policy_loss(logp, torch.zeros_like(rho), adv)
    assert loss.dtype == F64
    assert loss[0].tolist() == pytest.approx([row[2] for row in CLIP_TABLE], abs=1e-9)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    for g, row in zip(grad[0].tolist(), CLIP_TABLE):
        if row[3] == 0.0:
            assert g == 0.0, row                                 # exactly zero where clipped
        else:
            assert g == pytest.approx(row[3], abs=1e-9) and g != 0.0, row


def test_asymmetric_clip_and_dual_clip_off():
    rho = torch.tensor([[1.25, 1.3, 5.0]], dtype=F64)
    adv = torch.tensor([1.0, 1.0, -1.0], dtype=F64).view(1, 3)
    loss, _ = papo.clipped_policy_loss(rho.log(), torch.zeros_like(rho), adv, clip_high=0.28,
                                       dual_clip=None)
    assert loss[0].tolist() == pytest.approx([-1.25, -1.28, 5.0], abs=1e-12)


def test_advantages_per_rollout_broadcast_over_tokens():
    g = torch.Generator().manual_seed(5)
    logp, old = -torch.rand(3, 4, dtype=F64, generator=g), -torch.rand(3, 4, dtype=F64, generator=g)
    adv = torch.tensor([0.7, -1.3, 0.0], dtype=F64)
    per_row, _ = papo.clipped_policy_loss(logp, old, adv)
    per_token, _ = papo.clipped_policy_loss(logp, old, adv[:, None].expand(3, 4))
    assert torch.equal(per_row, per_token)


def test_clip_fractions_on_a_masked_hand_example():
    #            low   high  dual  inside low(pad) high(pad)
    rho = torch.tensor([[0.5, 1.5, 4.0, 1.0, 0.1, 2.0]], dtype=F64)
    adv = torch.tensor([[-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    _, frac = papo.clipped_policy_loss(rho.log(), torch.zeros_like(rho), adv, mask=mask)
    assert {k: v.item() for k, v in frac.items()} == pytest.approx(
        {"clip_low": 0.25, "clip_high": 0.25, "clip_dual": 0.25}, abs=1e-12)
    assert all(v.dim() == 0 for v in frac.values())
    _, frac_all = papo.clipped_policy_loss(rho.log(), torch.zeros_like(rho), adv)
    assert frac_all["clip_low"].item() == pytest.approx(2 / 6, abs=1e-12)
    assert frac_all["clip_high"].item() == pytest.approx(2 / 6, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

V = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=F64)
M = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_aggregate_hand_values_for_every_mode():
    got = {mode: papo.aggregate(V, M, mode).item() for mode in papo.AGG_MODES}
    assert got == pytest.approx({
        "token-mean": 17 / 5,                          # (1+2+3+5+6) / 5 tokens
        "seq-mean-token-mean": (6 / 3 + 11 / 2) / 2,   # 3.75
        "seq-mean-token-sum": (6 + 11) / 2,            # 8.5
        "seq-mean-token-sum-norm": (6 / 4 + 11 / 4) / 2,  # 2.125, L = T = 4
    }, abs=1e-12)
    assert papo.aggregate(V, M, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(0.85)
    assert papo.aggregate(V, M, "token-mean", normalizer=10).item() == pytest.approx(1.7)
    assert papo.aggregate(V, M, "seq-mean-token-sum", normalizer=torch.tensor(4.0)).item() == 4.25
    # micro-token-mean: this call's token mean 17/5, divided by K micro-batches
    assert papo.aggregate(V, M, "micro-token-mean").item() == pytest.approx(3.4, abs=1e-12)
    assert papo.aggregate(V, M, "micro-token-mean", normalizer=2).item() == pytest.approx(1.7)
    assert papo.aggregate(V, torch.zeros_like(M), "micro-token-mean", normalizer=2).item() == 0.0


def test_aggregate_empty_rows_and_garbage_padding():
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    assert papo.aggregate(V, m, "seq-mean-token-mean").item() == pytest.approx(0.75)  # (1.5 + 0) / 2
    assert papo.aggregate(V, torch.zeros_like(m), "token-mean").item() == 0.0
    v = V.clone()
    v[0, 3], v[1, 3] = math.nan, math.inf
    for mode in papo.AGG_MODES:
        assert papo.aggregate(v, M, mode).item() == pytest.approx(papo.aggregate(V, M, mode).item())


def test_aggregate_rejects_unknown_mode_listing_the_modes():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        papo.aggregate(V, M, "sequence-mean")


@pytest.mark.parametrize("mode", papo.AGG_MODES)
def test_micro_batches_with_global_normalizer_equal_the_full_batch(mode):
    """Loss AND gradient: uneven micro-batches (3, 1, 3 rows), each trimmed to its own longest
    row as a collator would, summed with the global normaliser, equal one full batch."""
    g = torch.Generator().manual_seed(6)
    B, T = 7, 9
    x = torch.randn(B, T, dtype=F64, generator=g)
    lengths = torch.tensor([9, 3, 0, 5, 1, 7, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)           # row 2 is empty
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    values = lambda rows: torch.sin(w * x[rows]) + w ** 2                  # depends on w

    full = papo.aggregate(values(slice(None)), mask, mode, max_len=T)
    (full_grad,) = torch.autograd.grad(full, w)

    normalizer = mask.sum() if mode == "token-mean" else float(B)
    total, grad_sum = 0.0, 0.0
    for rows in (slice(0, 3), slice(3, 4), slice(4, 7)):
        width = max(int(lengths[rows].max()), 1)
        micro = papo.aggregate(values(rows)[:, :width], mask[rows][:, :width], mode,
                               normalizer=normalizer, max_len=T)
        (g_micro,) = torch.autograd.grad(micro, w)
        total, grad_sum = total + micro.item(), grad_sum + g_micro.item()
    assert total == pytest.approx(full.item(), abs=1e-12)
    assert grad_sum == pytest.approx(full_grad.item(), abs=1e-12)


def _micro_token_mean_and_grad(x, mask, w, cuts):
    """Sum over micro-batches (row slices `cuts`) of aggregate(..., "micro-token-mean", K), and
    its gradient w.r.t. the scalar w, with values sin(w * x) + w^2 as above."""
    total, grad = 0.0, 0.0
    for rows in cuts:
        part = papo.aggregate(torch.sin(w * x[rows]) + w ** 2, mask[rows], "micro-token-mean",
                              normalizer=len(cuts))
        (g,) = torch.autograd.grad(part, w)
        total, grad = total + part.item(), grad + g.item()
    return total, grad


def test_micro_token_mean_is_the_mean_of_micro_batch_means_and_depends_on_the_cut():
    """The official aggregation: closed form = mean over micro-batches of each one's token mean.
    Two micro-batch sizes give different values and gradients; when every micro-batch holds the
    same number of tokens, it equals the global token mean (value and gradient)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, dtype=F64, generator=g)
    w = torch.tensor(0.3, dtype=F64, requires_grad=True)
    lengths = torch.tensor([6, 1, 2, 3])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).to(F64)             # 12 tokens
    v = (torch.sin(w * x) + w ** 2).detach()

    def row_sum(i):
        return float((v[i] * mask[i]).sum())
    by_two = [slice(0, 2), slice(2, 4)]                    # 7 and 5 tokens
    by_one = [slice(i, i + 1) for i in range(4)]           # 6, 1, 2, 3 tokens
    value_two, grad_two = _micro_token_mean_and_grad(x, mask, w, by_two)
    value_one, grad_one = _micro_token_mean_and_grad(x, mask, w, by_one)
    assert value_two == pytest.approx(((row_sum(0) + row_sum(1)) / 7
                                       + (row_sum(2) + row_sum(3)) / 5) / 2, abs=1e-12)
    assert value_one == pytest.approx(sum(row_sum(i) / int(lengths[i]) for i in range(4)) / 4,
                                      abs=1e-12)
    assert abs(grad_two - grad_one) > 1e-3               # the cut changes the gradient
    full = papo.aggregate(torch.sin(w * x) + w ** 2, mask, "token-mean")
    (full_grad,) = torch.autograd.grad(full, w)
    assert abs(grad_two - full_grad.item()) > 1e-3       # and neither is the global token mean

    # equal token counts per micro-batch (6 + 0 and 3 + 3): the global token mean exactly
    lengths = torch.tensor([6, 0, 3, 3])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).to(F64)
    value_two, grad_two = _micro_token_mean_and_grad(x, mask, w, by_two)
    full = papo.aggregate(torch.sin(w * x) + w ** 2, mask, "token-mean")
    (full_grad,) = torch.autograd.grad(full, w)
    assert value_two == pytest.approx(full.item(), abs=1e-12)
    assert grad_two == pytest.approx(full_grad.item(), abs=1e-12)


def test_aggregate_keeps_float64_and_upcasts_bf16():
    assert papo.aggregate(V, M).dtype == F64
    assert papo.aggregate(V.bfloat16(), M).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# papo_loss
# ---------------------------------------------------------------------------------------------

def make_batch(seed=7, B=3, T=5, V_size=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V_size, dtype=F64, generator=g)
    masked_logits = torch.randn(B, T, V_size, dtype=F64, generator=g)
    tokens = torch.randint(V_size, (B, T, 1), generator=g)
    # log-probs of sampled tokens, as leaves so each test can differentiate w.r.t. l directly
    logp = torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1).requires_grad_()  # [B, T]
    masked_logp = torch.log_softmax(masked_logits, -1).gather(-1, tokens).squeeze(-1)
    return dict(
        logits=logits, masked_logits=masked_logits, logp=logp,
        old_logp=(logp + 0.1 * torch.randn(B, T, dtype=F64, generator=g)).detach(),
        masked_logp=masked_logp.detach(),
        ref_logp=(logp + 0.3 * torch.randn(B, T, dtype=F64, generator=g)).detach(),
        advantages=torch.tensor([1.0, -0.5, 0.2], dtype=F64),
        mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
    )


def call(b, **kw):
    return papo.papo_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], **kw)


def test_papo_loss_without_extras_is_the_aggregated_clipped_loss():
    b = make_batch()
    for mode in papo.AGG_MODES:
        loss, _ = call(b, masked_logp=b["masked_logp"], ref_logp=b["ref_logp"], agg_mode=mode)
        pg, _ = papo.clipped_policy_loss(b["logp"], b["old_logp"], b["advantages"])
        assert torch.equal(loss, papo.aggregate(pg, b["mask"], mode))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_each_coefficient_adds_exactly_its_term(mode):
    b = make_batch()
    agg = lambda v: papo.aggregate(v, b["mask"], mode).item()
    inputs = dict(masked_logp=b["masked_logp"], ref_logp=b["ref_logp"], agg_mode=mode)
    base = call(b, **inputs)[0].item()
    terms = {
        "beta": 0.04 * agg(papo.kl_estimate(b["logp"], b["ref_logp"])),
        "gamma": -0.02 * agg(papo.perception_kl(b["logp"], b["masked_logp"])),
        "eta_orig": 0.05 * agg(-b["logp"]),
        "eta_mask": 0.03 * agg(-b["masked_logp"]),
    }
    coefs = {"beta": 0.04, "gamma": 0.02, "eta_orig": 0.05, "eta_mask": 0.03}
    for name, expected in terms.items():
        assert call(b, **inputs, **{name: coefs[name]})[0].item() - base == pytest.approx(
            expected, abs=1e-12), name
        assert abs(expected) > 1e-4
    everything = call(b, **inputs, **coefs)[0].item()
    assert everything - base == pytest.approx(sum(terms.values()), abs=1e-12)


def test_exact_entropies_add_exactly_their_terms():
    b = make_batch()
    h, hm = papo.entropy_from_logits(b["logits"]), papo.entropy_from_logits(b["masked_logits"])
    kw = dict(masked_logp=b["masked_logp"], gamma=0.02, eta_orig=0.05, eta_mask=0.03)
    precomputed, m1 = call(b, options=papo.Options(entropy="exact"), entropy_orig=h,
                           entropy_mask=hm, **kw)
    base = call(b, masked_logp=b["masked_logp"], gamma=0.02)[0]
    expected = 0.05 * papo.aggregate(h, b["mask"]) + 0.03 * papo.aggregate(hm, b["mask"])
    assert (precomputed - base).item() == pytest.approx(expected.item(), abs=1e-12)
    assert m1["entropy_orig"] == pytest.approx(papo.aggregate(h.detach(), b["mask"]).item())


def test_switches_come_one_way_options_a_run_sets():
    """The official switches are given as papo.Options only, not as keywords of papo_loss too;
    Options holds what a run sets, no tensor of a call and no count of a mini-batch."""
    b = make_batch()
    for switch in (dict(kl_prcp_clip=0.2), dict(entropy="exact"), dict(sft_coef=0.5)):
        with pytest.raises(TypeError, match=next(iter(switch))):
            call(b, masked_logp=b["masked_logp"], **switch)
    assert [f.name for f in dataclasses.fields(papo.Options)] == [
        "kl_prcp_clip", "kl_prcp_token_fraction", "sft_coef", "entropy"]


def test_missing_inputs_are_named():
    b = make_batch()
    cases = [
        (dict(gamma=0.02), {}, "masked_logp"),
        (dict(eta_mask=0.03), {}, "masked_logp"),
        (dict(beta=0.01), {}, "ref_logp"),
        (dict(eta_orig=0.05), dict(entropy="exact"), "entropy_orig"),
        (dict(eta_mask=0.05), dict(entropy="exact"), "entropy_mask"),
        ({}, dict(entropy="guess"), "entropy"),
        ({}, dict(sft_coef=0.5), "sft_rows"),
        (dict(kl_kind="k5"), {}, "k5"),
        (dict(agg_mode="mean"), {}, "token-mean"),
    ]
    for kwargs, switches, name in cases:
        with pytest.raises(ValueError, match=name):
            call(b, options=papo.Options(**switches), **kwargs)


def test_metrics_are_finite_python_floats():
    b = make_batch()
    _, metrics = call(b, masked_logp=b["masked_logp"], ref_logp=b["ref_logp"], beta=0.01,
                      normalizer=100.0)
    expected = {"loss", "pg_loss", "kl_ref", "kl_prcp", "entropy_orig", "entropy_mask", "clip_low",
                "clip_high", "clip_dual", "approx_kl_old", "ratio_mean"}
    assert set(metrics) == expected
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    # a GRPO run (gamma = 0) still monitors the perception KL when masked_logp is given
    assert metrics["kl_prcp"] == pytest.approx(
        papo.aggregate(papo.perception_kl(b["logp"], b["masked_logp"]), b["mask"]).item())
    # metrics are token means over this call, whatever the normaliser
    assert metrics["entropy_orig"] == pytest.approx(papo.aggregate(-b["logp"], b["mask"]).item())
    _, same_policy = papo.papo_loss(b["logp"], b["logp"].detach(), b["advantages"], b["mask"])
    assert same_policy["approx_kl_old"] == 0.0 and same_policy["ratio_mean"] == 1.0


def test_gamma_gradient_sign_raises_tokens_the_image_makes_likelier():
    logp = torch.tensor([[math.log(0.6), math.log(0.1), math.log(0.3)]], dtype=F64,
                        requires_grad=True)
    masked = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.3)]], dtype=F64)
    loss, _ = papo.papo_loss(logp, logp.detach(), torch.zeros(1, dtype=F64), torch.ones(1, 3),
                             masked_logp=masked, gamma=0.1)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0] < 0          # l > a: loss falls as l rises, so descent raises l
    assert grad[0, 1] > 0          # l < a: pushed down
    assert grad[0, 2] == 0         # no difference, no push
    # exact value: -gamma * (1 - exp(a - l)) / N_tokens
    assert grad[0, 0].item() == pytest.approx(-0.1 * (1 - 0.2 / 0.6) / 3, abs=1e-12)


def test_masked_branch_gets_gradient_only_when_not_detached():
    b = make_batch()
    w = b["masked_logits"].clone().requires_grad_()
    tokens = torch.zeros(3, 5, 1, dtype=torch.long)
    masked_logp = torch.log_softmax(w, -1).gather(-1, tokens).squeeze(-1)
    loss, _ = call(b, masked_logp=masked_logp.detach(), gamma=0.02, eta_mask=0.03)
    loss.backward()
    assert w.grad is None and b["logp"].grad is not None
    loss, _ = call(b, masked_logp=masked_logp, gamma=0.02, eta_mask=0.03)
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_detached_sample_h_mask_changes_the_loss_not_the_gradient():
    b = make_batch()
    without, _ = call(b, masked_logp=b["masked_logp"], gamma=0.02)
    with_h, _ = call(b, masked_logp=b["masked_logp"], gamma=0.02, eta_mask=0.5)
    (g1,) = torch.autograd.grad(without, b["logp"])
    (g2,) = torch.autograd.grad(with_h, b["logp"])
    assert with_h.item() != without.item()
    torch.testing.assert_close(g1, g2, atol=1e-15, rtol=0)


# ---------------------------------------------------------------------------------------------
# The official switches: KL_prcp clipping, the token-level KL_prcp mask, the SFT term
# ---------------------------------------------------------------------------------------------

# x = a - l per token: k3 gives D = exp(x) - x - 1 =
#     ln 2 -> 1 - ln 2 = 0.3069,  -ln 2 -> ln 2 - 0.5 = 0.1931,  1 -> e - 2 = 0.7183,  0 -> 0
X4 = torch.tensor([[LN2, -LN2, 1.0, 0.0]], dtype=F64)


def _perception_only(x, **kw):
    """papo_loss with A = 0 (no policy-gradient term) at l = 0, a = x: only KL_prcp acts."""
    logp = torch.zeros_like(x, requires_grad=True)
    loss, metrics = papo.papo_loss(logp, logp.detach(), torch.zeros(x.shape[0], dtype=F64),
                                   kw.pop("mask", torch.ones_like(x)), masked_logp=x, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad, metrics


def test_kl_prcp_clip_clamps_each_token_to_0_c_before_the_mean():
    d = [1 - LN2, LN2 - 0.5, math.e - 2, 0.0]
    loss, grad, metrics = _perception_only(X4, gamma=0.1, options=papo.Options(kl_prcp_clip=0.2))
    # closed form: -gamma * mean(min(D, 0.2)) = -0.1 * (0.2 + 0.1931 + 0.2 + 0) / 4
    assert loss == pytest.approx(-0.1 * (0.2 + (LN2 - 0.5) + 0.2 + 0.0) / 4, abs=1e-12)
    # gradient -gamma * (1 - exp(x)) / N where the clamp does not bind, exactly 0 where it does
    assert grad.tolist()[0] == pytest.approx([0.0, -0.1 * (1 - 0.5) / 4, 0.0, 0.0], abs=1e-15)
    assert metrics["kl_prcp"] == pytest.approx(sum(d) / 4, abs=1e-12)      # logged unclipped
    assert metrics["kl_prcp_clipped"] == 0.5                               # 2 of 4 tokens
    # a clip above every value changes nothing; off (None) logs no clip fraction
    same, _, _ = _perception_only(X4, gamma=0.1, options=papo.Options(kl_prcp_clip=1.0))
    assert same == pytest.approx(-0.1 * sum(d) / 4, abs=1e-12)
    assert "kl_prcp_clipped" not in _perception_only(X4, gamma=0.1)[2]


def test_kl_prcp_clip_lifts_negative_k1_values_to_zero():
    # k1 = l - a = -x: [-ln 2, ln 2, -1, 0] -> clamped [0, 0.2, 0, 0]
    loss, grad, metrics = _perception_only(X4, gamma=1.0, kl_kind="k1",
                                           options=papo.Options(kl_prcp_clip=0.2))
    assert loss == pytest.approx(-0.2 / 4, abs=1e-12)
    # the three changed tokens have no gradient; x = 0 sits ON the bound, unchanged: d(-k1)/dl = -1
    assert grad.tolist()[0] == [0.0, 0.0, 0.0, -1.0 / 4]
    assert metrics["kl_prcp_clipped"] == 0.75            # -ln 2, ln 2 and -1 were changed
    with pytest.raises(ValueError, match="kl_prcp_clip"):
        _perception_only(X4, gamma=1.0, options=papo.Options(kl_prcp_clip=0.0))


def _keep(rows, valid, fraction):
    d = torch.tensor(rows, dtype=F64)
    m = torch.tensor(valid)
    return papo.perception_token_mask(d, m, fraction).int().tolist()


def test_token_mask_keeps_the_values_at_or_above_the_row_quantile():
    # sorted 0.1 0.3 0.5 0.7 0.9; q(0.8) at position 3.2 = 0.74; q(0.6) at 2.4 = 0.58;
    # q(0.0) = the minimum: fraction 1 keeps every valid token
    row = [[0.5, 0.1, 0.9, 0.3, 0.7]]
    assert _keep(row, [[1] * 5], 0.2) == [[0, 0, 1, 0, 0]]
    assert _keep(row, [[1] * 5], 0.4) == [[0, 0, 1, 0, 1]]
    assert _keep(row, [[1] * 5], 1.0) == [[1] * 5]
    # rows are independent: the same values in a second row with 3 valid tokens
    # (0.5, 0.1, 0.9 -> q(0.8) at position 1.6 = 0.5 + 0.6 * 0.4 = 0.74)
    assert _keep(row * 2, [[1] * 5, [1, 1, 1, 0, 0]], 0.2) == [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0]]


def test_token_mask_keeps_every_tie_with_the_threshold():
    assert _keep([[0.2, 0.2, 0.2, 0.2]], [[1] * 4], 0.2) == [[1, 1, 1, 1]]   # q = 0.2: all tie
    # sorted 0.1 0.3 0.5 0.5 0.5: q(0.8) at 3.2 is 0.5, held by three tokens
    assert _keep([[0.1, 0.5, 0.5, 0.5, 0.3]], [[1] * 5], 0.2) == [[0, 1, 1, 1, 0]]


def test_token_mask_one_valid_token_empty_rows_and_padding():
    # one valid token is its own quantile: kept
    assert _keep([[0.3, 7.0, 7.0]], [[1, 0, 0]], 0.2) == [[1, 0, 0]]
    # padding holds large values (or NaN, inf): never kept, and not part of the quantile
    # (valid 0.1 and 0.2: q(0.8) = 0.18, so only 0.2 is kept)
    for pad in (9.0, math.nan, math.inf):
        assert _keep([[0.1, 0.2, pad, pad]], [[1, 1, 0, 0]], 0.2) == [[0, 1, 0, 0]]
    assert _keep([[0.1, 0.2, 0.3]], [[0, 0, 0]], 0.2) == [[0, 0, 0]]       # empty row
    with pytest.raises(ValueError, match="fraction"):
        _keep([[0.1]], [[1]], 0.0)


# KL_prcp given directly: with k1, l = 0 and a = -D give KL_prcp = l - a = D exactly
D2 = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7], [0.4, 0.6, 0.0, 0.0, 0.0]], dtype=F64)
M2 = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])


def test_token_mask_zeroes_dropped_tokens_and_divides_by_all_valid_tokens():
    """The official normaliser: sum over the KEPT tokens / the number of ALL valid tokens,
    computed here by hand (not a mean over the kept tokens, which is 7/2 = 3.5 times larger)."""
    # kept at p = 0.2: row 0 {0.9}; row 1 (0.4, 0.6: q = 0.56) {0.6}; 7 valid tokens in all
    loss, grad, metrics = _perception_only(-D2, mask=M2, gamma=0.1, kl_kind="k1",
                                           options=papo.Options(kl_prcp_token_fraction=0.2))
    assert loss == pytest.approx(-0.1 * (0.9 + 0.6) / 7, abs=1e-12)
    expected = torch.zeros_like(D2)
    expected[0, 2] = expected[1, 1] = -0.1 / 7            # d(-gamma * D)/dl = -gamma, / 7 valid
    torch.testing.assert_close(grad, expected, atol=1e-15, rtol=0)
    assert metrics["kl_prcp_kept"] == pytest.approx(2 / 7)
    assert metrics["kl_prcp"] == pytest.approx(3.5 / 7)   # still every token's value


@pytest.mark.parametrize("mode,expected", [
    # per row: row 0 keeps 0.9 of 5 tokens, row 1 keeps 0.6 of 2 tokens (T = 5)
    ("seq-mean-token-mean", (0.9 / 5 + 0.6 / 2) / 2),
    ("seq-mean-token-sum", (0.9 + 0.6) / 2),
    ("seq-mean-token-sum-norm", (0.9 / 5 + 0.6 / 5) / 2),
    ("micro-token-mean", (0.9 + 0.6) / 7)])
def test_token_mask_keeps_every_modes_own_normaliser(mode, expected):
    """In every aggregation mode the dropped tokens count as zeros under the mode's own
    normaliser (the official code aggregates the zeroed values over the response mask)."""
    loss, _, _ = _perception_only(-D2, mask=M2, gamma=1.0, kl_kind="k1", agg_mode=mode,
                                  options=papo.Options(kl_prcp_token_fraction=0.2))
    assert loss == pytest.approx(-expected, abs=1e-12)


def test_token_mask_selects_before_clipping():
    """Select on the raw values, then clamp: 0.5 alone is over q(0.8) = 0.3. Clamping first
    would tie 0.5, 0.25 and 0.22 at 0.2 and keep all three (a sum of 0.6, not 0.2)."""
    d = torch.tensor([[0.5, 0.25, 0.22, 0.1, 0.05]], dtype=F64)
    loss, _, metrics = _perception_only(-d, gamma=1.0, kl_kind="k1", agg_mode="seq-mean-token-sum",
                                        options=papo.Options(kl_prcp_token_fraction=0.2,
                                                             kl_prcp_clip=0.2))
    assert loss == pytest.approx(-0.2, abs=1e-12)
    assert metrics["kl_prcp_kept"] == metrics["kl_prcp_clipped"] == pytest.approx(0.2)


def test_token_mask_micro_batches_with_the_global_token_count_sum_to_the_full_batch():
    """Micro-batches (one row each), each divided by the GLOBAL count of valid tokens, sum to
    the full batch's loss and gradient: the selection is per rollout, so cutting the batch
    does not change which tokens are kept."""
    logp = torch.zeros_like(D2, requires_grad=True)
    kw = dict(masked_logp=-D2, gamma=0.1, kl_kind="k1",
              options=papo.Options(kl_prcp_token_fraction=0.2))
    zeros = lambda n: torch.zeros(n, dtype=F64)
    full, _ = papo.papo_loss(logp, logp.detach(), zeros(2), M2, **kw)
    (full_grad,) = torch.autograd.grad(full, logp)
    parts = [papo.papo_loss(logp[i:i + 1], logp[i:i + 1].detach(), zeros(1), M2[i:i + 1],
                            **{**kw, "masked_logp": -D2[i:i + 1]}, normalizer=M2.sum())[0]
             for i in (0, 1)]
    (grad,) = torch.autograd.grad(sum(parts), logp)
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-12)
    assert full.item() == pytest.approx(-0.1 * 1.5 / 7, abs=1e-12)
    torch.testing.assert_close(grad, full_grad, atol=1e-15, rtol=0)


SFT = papo.Options(sft_coef=0.5)


def test_sft_term_is_the_token_mean_nll_of_correct_rollouts():
    b = make_batch()
    rows = torch.tensor([True, False, True])           # rollouts 0 and 2: 5 + 1 tokens
    base, _ = call(b)
    loss, metrics = call(b, options=SFT, sft_rows=rows)
    nll = -(b["logp"][0].sum() + b["logp"][2, 0])
    assert (loss - base).item() == pytest.approx(0.5 * nll.item() / 6, abs=1e-12)
    assert metrics["sft_nll"] == pytest.approx(nll.item() / 6, abs=1e-12)
    (g_on,) = torch.autograd.grad(loss, b["logp"])
    (g_off,) = torch.autograd.grad(base, b["logp"])
    expected = torch.zeros(3, 5, dtype=F64)
    expected[0, :] = expected[2, 0] = -0.5 / 6           # -l pushed down: l pushed up
    torch.testing.assert_close(g_on - g_off, expected, atol=1e-15, rtol=0)
    # no correct rollout: nothing added, the metric is 0
    none, metrics = call(b, options=SFT, sft_rows=torch.zeros(3, dtype=torch.bool))
    assert none.item() == base.item() and metrics["sft_nll"] == 0.0
    with pytest.raises(ValueError, match="sft_rows"):
        call(b, options=SFT)


def test_sft_term_micro_batched_with_the_global_count_equals_the_full_batch():
    """Rows one by one with sft_normalizer = the batch's correct-token count sum to the full
    batch (value and gradient); a global normalizer without it is refused. In micro-token-mean
    each call's own mean / K is used instead."""
    b = make_batch()
    rows = torch.tensor([1.0, 0.0, 1.0], dtype=F64)       # accuracies as 0/1 floats work too
    full, _ = call(b, options=SFT, sft_rows=rows)
    (full_grad,) = torch.autograd.grad(full, b["logp"])
    count = (b["mask"] * rows[:, None]).sum()
    n = b["mask"].sum()

    def part(i, **kw):
        return papo.papo_loss(b["logp"][i:i + 1], b["old_logp"][i:i + 1], b["advantages"][i:i + 1],
                              b["mask"][i:i + 1], options=SFT, sft_rows=rows[i:i + 1], **kw)[0]
    total = sum(part(i, normalizer=n, sft_normalizer=count) for i in range(3))
    (grad,) = torch.autograd.grad(total, b["logp"])
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(grad, full_grad, atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="sft_normalizer"):
        part(0, normalizer=n)
    micro = sum(part(i, normalizer=3, agg_mode="micro-token-mean") for i in range(3))
    pg = sum(papo.aggregate(papo.clipped_policy_loss(b["logp"][i:i + 1], b["old_logp"][i:i + 1],
                                                     b["advantages"][i:i + 1])[0],
                            b["mask"][i:i + 1], "micro-token-mean", 3) for i in range(3))
    # row 0: mean of its 5 tokens; row 1: none correct, 0; row 2: its one token; over K = 3
    sft = (-b["logp"][0].mean() - b["logp"][2, 0]) / 3
    assert micro.item() == pytest.approx((pg + 0.5 * sft).item(), abs=1e-12)


def test_annealing_endpoints_and_midpoint_in_closed_form():
    """gamma 0.02 -> 0 over half of 200 steps, counted from 1: full at step 1, half at step 51,
    the end value from step 101 on; both etas follow the same factor gamma_t / gamma."""
    at = lambda step, **kw: papo.annealed_coefficients(step, 200, 0.02, 0.05, 0.03, **kw)
    assert at(1) == (0.02, 0.05, 0.03)                            # exactly the start values
    assert at(51) == pytest.approx((0.01, 0.025, 0.015), abs=1e-15)
    assert at(26) == pytest.approx((0.015, 0.0375, 0.0225), abs=1e-15)   # a quarter of the way
    assert at(101) == at(150) == at(200) == (0.0, 0.0, 0.0)
    # another end value and fraction: 0.02 -> 0.005 over all 200 steps; at step 101: 0.0125
    g, eo, em = at(101, gamma_end=0.005, fraction=1.0)
    assert (g, eo, em) == pytest.approx((0.0125, 0.05 * 0.625, 0.03 * 0.625), abs=1e-15)
    assert at(200, gamma_end=0.005, fraction=1.0)[0] == pytest.approx(0.02 - 0.015 * 199 / 200)
    # a ramp up and a fractional length: 0.5 * 5 = 2.5 steps is int(2.5) = 2 steps, as in the
    # official code, so step 2 is half-way (0.015, not 1/2.5 of the way: 0.014) and step 3 is
    # the end value (not 0.018)
    ramp = lambda step: papo.annealed_coefficients(step, 5, 0.01, gamma_end=0.02)[0]
    assert ramp(2) == pytest.approx(0.015, abs=1e-15)
    assert ramp(3) == ramp(4) == 0.02
    # int() of the product, with its float rounding: 0.29 * 100 = 28.999... -> 28 steps
    assert papo.annealed_coefficients(29, 100, 0.02, fraction=0.29)[0] == 0.0
    # a schedule shorter than one step still takes one: step 1 full, step 2 the end value
    assert [papo.annealed_coefficients(s, 3, 0.02, fraction=0.1)[0] for s in (1, 2)] == [0.02, 0.0]


def test_annealing_refuses_what_has_no_schedule():
    for kwargs, name in ((dict(step=0), "step"), (dict(gamma=0.0), "gamma > 0"),
                         (dict(fraction=0.0), "fraction"), (dict(gamma_end=-1.0), "gamma_end")):
        args = dict(step=1, total_steps=10, gamma=0.02) | kwargs
        with pytest.raises(ValueError, match=name):
            papo.annealed_coefficients(**args)


def test_papo_loss_dtypes():
    b = make_batch()
    assert call(b)[0].dtype == F64
    loss, _ = papo.papo_loss(b["logp"].float().bfloat16(), b["old_logp"].bfloat16(),
                             b["advantages"].float(), b["mask"])
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Image masking
# ---------------------------------------------------------------------------------------------

def noise_image(width, height, mode="RGB", seed=0):
    """Random pixels in 1..255, so that no unmasked pixel is black by chance."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(1, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels)


def expand(grid, patch, height, width):
    return grid.repeat(patch, 0).repeat(patch, 1)[:height, :width]


@pytest.mark.parametrize("size", [(140, 70), (30, 20), (50, 43)])
def test_masked_squares_are_black_and_the_rest_is_untouched(size):
    width, height = size
    image = noise_image(width, height)
    out = papo.mask_image(image, ratio=0.5, rng=11)
    grid = papo.patch_mask_grid(height, width, 14, 0.5, rng=11)     # the same first draw
    assert grid.shape == (math.ceil(height / 14), math.ceil(width / 14))
    assert 0 < grid.sum() < grid.size
    black = expand(grid, 14, height, width)
    before, after = np.array(image), np.array(out)
    assert (after[black] == 0).all()
    assert np.array_equal(after[~black], before[~black])


def test_ratio_zero_is_identity_and_ratio_one_is_black():
    image = noise_image(45, 31)
    assert np.array_equal(np.array(papo.mask_image(image, ratio=0.0, rng=0)), np.array(image))
    assert (np.array(papo.mask_image(image, ratio=1.0, rng=0)) == 0).all()


def test_masked_fraction_is_within_a_binomial_band():
    image = noise_image(700, 700)
    n, p = 50 * 50, 0.6
    out = np.array(papo.mask_image(image, rng=123))                 # defaults: 14 px, 0.6
    squares = out.reshape(50, 14, 50, 14, 3)
    masked = int((squares == 0).all(axis=(1, 3, 4)).sum())
    assert abs(masked - n * p) < 4 * math.sqrt(n * p * (1 - p))
    assert (out == 0).all(axis=2).sum() == masked * 14 * 14          # whole squares only


def test_exact_mode_masks_exactly_round_ratio_n():
    for ratio, size in ((0.6, (700, 700)), (0.5, (30, 20)), (0.25, (100, 60))):
        grid = papo.patch_mask_grid(size[1], size[0], 14, ratio, rng=5, mode="exact")
        assert grid.sum() == round(ratio * grid.size)
        out = np.array(papo.mask_image(noise_image(*size), ratio=ratio, rng=5, mode="exact"))
        assert (out == 0).all(axis=2).sum() == expand(grid, 14, size[1], size[0]).sum()


def test_seeded_rng_is_reproducible():
    image = noise_image(100, 80)
    a = np.array(papo.mask_image(image, rng=42))
    assert np.array_equal(a, np.array(papo.mask_image(image, rng=42)))
    b = np.array(papo.mask_image(image, rng=np.random.default_rng(42)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.array(papo.mask_image(image, rng=43)))


def test_size_and_mode_preserved_and_input_unmodified():
    for mode in ("RGB", "RGBA", "L"):
        image = noise_image(61, 37, mode)
        before = image.tobytes()
        out = papo.mask_image(image, ratio=0.6, rng=1)
        assert out is not image and out.size == image.size and out.mode == mode
        assert image.tobytes() == before
        if mode == "RGBA":
            assert np.array_equal(np.array(out)[..., 3], np.array(image)[..., 3])   # alpha kept
    palette = noise_image(20, 20, "RGB").convert("P")
    assert papo.mask_image(palette, rng=0).mode == "RGB"


def test_partial_edge_squares_are_masked_whole():
    image = noise_image(30, 20)                       # 3 x 2 squares, partial at right and bottom
    out = np.array(papo.mask_image(image, ratio=1.0, rng=0))
    assert out.shape == (20, 30, 3) and (out == 0).all()
    grid = np.array([[False, False, True], [False, False, False]])
    black = expand(grid, 14, 20, 30)
    assert black.sum() == 14 * 2                       # the top-right square is 2 px wide
    grid_b = papo.patch_mask_grid(20, 30, 14, 0.5, rng=3)
    out_b = np.array(papo.mask_image(image, ratio=0.5, rng=3))
    assert np.array_equal((out_b == 0).all(axis=2), expand(grid_b, 14, 20, 30))


def test_list_of_images_masked_independently():
    image = noise_image(140, 140)
    out = papo.mask_image([image, image], ratio=0.5, rng=9)
    assert isinstance(out, list) and len(out) == 2
    black = [(np.array(o) == 0).all(axis=2) for o in out]
    assert not np.array_equal(black[0], black[1])
    # one stream: the first image gets the same mask as when masked alone with the same seed
    assert np.array_equal(np.array(out[0]), np.array(papo.mask_image(image, ratio=0.5, rng=9)))


def test_mask_ratio_must_be_a_probability():
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            papo.mask_image(noise_image(20, 20), ratio=ratio)


# ---------------------------------------------------------------------------------------------
# Dynamic sampling
# ---------------------------------------------------------------------------------------------

def test_dynamic_sampling_drops_groups_that_all_agree():
    scores = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    assert papo.dynamic_sampling_keep(scores).tolist() == [False, False, True, True]
    near = torch.tensor([[0.995, 0.995], [0.005, 0.005], [0.5, 0.5]], dtype=F64)
    assert papo.dynamic_sampling_keep(near).tolist() == [False, False, True]
    assert papo.dynamic_sampling_keep(near, low=0.0, high=1.0).tolist() == [True, True, True]
