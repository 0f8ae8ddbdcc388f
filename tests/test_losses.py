"""The AMiD objective against an independent, linear-space float64 evaluation of its formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from amid_ray.losses import (
    PRESETS,
    AMiDSettings,
    amid_loss,
    amid_token_losses,
    assistant_logprobs,
    has_closed_form_gradient,
    is_degenerate,
    kl_pr_losses_and_gradient,
    preset,
    validate_settings,
)

ALPHAS = (-5.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
LAMBDAS = (0.0, 0.1, 0.5, 0.9, 1.0)
AB_PAIRS = ((0.2, 0.7), (0.8, 0.3))
ORDERS = ("pr", "qr", "rp", "rq", "js")


# ----------------------------------------------------------------------------- reference


def reference_assistant(p, q, alpha, lam):
    """r from the definition, in probability space."""
    if lam == 0:
        return q
    if lam == 1:
        return p
    if alpha == 1:
        r = p**lam * q ** (1 - lam)
    else:
        k = (1 - alpha) / 2
        r = (lam * p**k + (1 - lam) * q**k) ** (1 / k)
    return r / r.sum(-1, keepdim=True)


def reference_divergence(a, b, divergence, ab_alpha, ab_beta):
    if divergence == "kl":
        return (a * (a.log() - b.log())).sum(-1)
    s = ab_alpha + ab_beta
    terms = a**ab_alpha * b**ab_beta - ab_alpha / s * a**s - ab_beta / s * b**s
    return -terms.sum(-1) / (ab_alpha * ab_beta)


def reference_loss(
    student_logits,
    teacher_logits,
    mask,
    *,
    alpha,
    lam,
    divergence="kl",
    order="pr",
    ab_alpha=0.2,
    ab_beta=0.7,
    detach_assistant=False,
    cross_entropy=False,
):
    q = torch.softmax(student_logits.double(), -1)
    p = torch.softmax(teacher_logits.double(), -1)
    r = reference_assistant(p, q.detach() if detach_assistant else q, alpha, lam)
    if order == "js":
        per_token = lam * reference_divergence(p, r, divergence, ab_alpha, ab_beta) + (
            1 - lam
        ) * reference_divergence(q, r, divergence, ab_alpha, ab_beta)
    else:
        a, b = {"pr": (p, r), "qr": (q, r), "rp": (r, p), "rq": (r, q)}[order]
        per_token = reference_divergence(a, b, divergence, ab_alpha, ab_beta)
        if cross_entropy:  # H(a, b) = KL(a‖b) + H(a)
            per_token = per_token - (a * a.log()).sum(-1)
    return per_token[mask].sum() / mask.sum()


def random_batch(seed, batch=3, length=5, vocab=48, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(batch, length, generator=g) > 0.3
    mask[0, 0] = True
    return student.to(dtype), teacher.to(dtype), mask


def all_settings():
    for order, alpha, lam in itertools.product(ORDERS, ALPHAS, LAMBDAS):
        yield dict(divergence="kl", order=order, alpha=alpha, lam=lam)
        for ab_alpha, ab_beta in AB_PAIRS:
            yield dict(
                divergence="ab",
                order=order,
                alpha=alpha,
                lam=lam,
                ab_alpha=ab_alpha,
                ab_beta=ab_beta,
            )


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("dtype", "tolerance", "zero_floor"),
    [(torch.float64, 1e-6, 1e-12), (torch.float32, 1e-4, 1e-6)],
)
def test_loss_matches_direct_formulas_on_the_whole_grid(dtype, tolerance, zero_floor):
    # `zero_floor` is an absolute allowance for the degenerate settings whose true value is 0
    # (relative error is undefined there): rounding of O(1) terms in the working precision.
    student, teacher, mask = random_batch(0, dtype=dtype)
    failures = []
    count = 0
    for settings in all_settings():
        count += 1
        got = amid_loss(student, teacher, mask, **settings)
        want = reference_loss(student, teacher, mask, **settings)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        error = abs(got.double().item() - want.item())
        if error > tolerance * abs(want.item()) + zero_floor:
            failures.append((settings, got.item(), want.item()))
    assert count == 5 * 10 * 5 * 3
    assert not failures, failures[:5]


def test_chunking_does_not_change_value_or_gradient():
    student, teacher, mask = random_batch(1, batch=4, length=9, vocab=40)
    settings = dict(alpha=-0.5, lam=0.3, divergence="ab", order="rq")
    results = []
    for chunk_elements in (40, 3 * 40, 10_000):  # 1 row, 3 rows, everything in one chunk
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        loss = amid_loss(s, t, mask, chunk_elements=chunk_elements, **settings)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad))
    plain_s = student.clone().requires_grad_(True)
    plain_t = teacher.clone().requires_grad_(True)
    plain = amid_token_losses(plain_s, plain_t, **settings)[mask].mean()
    plain.backward()
    for loss, s_grad, t_grad in results:
        torch.testing.assert_close(loss, plain.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(s_grad, plain_s.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(t_grad, plain_t.grad, rtol=1e-10, atol=1e-14)
    # Tokens outside the mask get exactly zero gradient.
    assert torch.all(results[0][1][~mask] == 0)


def test_token_level_mean_over_the_whole_batch():
    student, teacher, _ = random_batch(2, batch=2, length=4)
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    per_token = amid_token_losses(student, teacher, alpha=0.0, lam=0.2)
    got = amid_loss(student, teacher, mask, alpha=0.0, lam=0.2)
    torch.testing.assert_close(got, per_token[mask].sum() / 5)
    per_sequence = (per_token[0, 0] + per_token[1].mean()) / 2
    assert not math.isclose(got.item(), per_sequence.item(), rel_tol=1e-3)


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    student, teacher, mask = random_batch(3)
    student.requires_grad_(True)
    loss = amid_loss(student, teacher, torch.zeros_like(mask), alpha=0.5, lam=0.5)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(student.grad) == 0


# ----------------------------------------------------------------------------- special cases


def _probs(seed, vocab=32):
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(4, vocab, generator=g, dtype=torch.float64) * 2
    zq = torch.randn(4, vocab, generator=g, dtype=torch.float64) * 2
    return zp, zq, torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)


def test_lambda_endpoints_are_exact():
    _, _, log_p, log_q = _probs(0)
    for alpha in ALPHAS:
        assert torch.equal(assistant_logprobs(log_p, log_q, alpha=alpha, lam=0.0), log_q)
        assert torch.equal(assistant_logprobs(log_p, log_q, alpha=alpha, lam=1.0), log_p)


def test_alpha_minus_one_is_the_arithmetic_mixture():
    _, _, log_p, log_q = _probs(1)
    r = assistant_logprobs(log_p, log_q, alpha=-1.0, lam=0.3).exp()
    torch.testing.assert_close(r, 0.3 * log_p.exp() + 0.7 * log_q.exp(), rtol=1e-12, atol=1e-15)


def test_alpha_one_is_softmax_of_blended_logits():
    zp, zq, log_p, log_q = _probs(2)
    r = assistant_logprobs(log_p, log_q, alpha=1.0, lam=0.3).exp()
    torch.testing.assert_close(r, torch.softmax(0.3 * zp + 0.7 * zq, -1), rtol=1e-12, atol=1e-15)


def test_alpha_three_is_the_normalised_harmonic_mean():
    _, _, log_p, log_q = _probs(3)
    p, q = log_p.exp(), log_q.exp()
    harmonic = 1 / (0.4 / p + 0.6 / q)
    r = assistant_logprobs(log_p, log_q, alpha=3.0, lam=0.4).exp()
    torch.testing.assert_close(r, harmonic / harmonic.sum(-1, keepdim=True), rtol=1e-12, atol=0)


def test_extreme_alphas_approach_max_and_min():
    _, _, log_p, log_q = _probs(4)
    p, q = log_p.exp(), log_q.exp()
    upper, lower = torch.maximum(p, q), torch.minimum(p, q)
    r_neg = assistant_logprobs(log_p, log_q, alpha=-4000.0, lam=0.5).exp()
    r_pos = assistant_logprobs(log_p, log_q, alpha=4000.0, lam=0.5).exp()
    torch.testing.assert_close(r_neg, upper / upper.sum(-1, keepdim=True), rtol=2e-3, atol=0)
    torch.testing.assert_close(r_pos, lower / lower.sum(-1, keepdim=True), rtol=2e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alpha_near_one_is_continuous(dtype):
    _, _, log_p, log_q = _probs(5)
    log_p, log_q = log_p.to(dtype), log_q.to(dtype)
    geometric = assistant_logprobs(log_p, log_q, alpha=1.0, lam=0.3)
    for alpha in (1 - 1e-7, 1 + 1e-7, 1 - 1e-4, 1 + 1e-4):
        near = assistant_logprobs(log_p, log_q, alpha=alpha, lam=0.3)
        torch.testing.assert_close(
            near, geometric, rtol=0, atol=5e-4 if abs(alpha - 1) > 1e-5 else 2e-6
        )
    # Inside the near-geometric band, still the exact power mean (float64 reference).
    p, q = log_p.double().exp(), log_q.double().exp()
    want = reference_assistant(p, q, 1.02, 0.3)
    got = assistant_logprobs(log_p, log_q, alpha=1.02, lam=0.3).double().exp()
    torch.testing.assert_close(got, want, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=0)


def test_supports_union_below_one_and_intersection_from_one():
    _, _, log_p, log_q = _probs(6, vocab=8)
    log_p = torch.log_softmax(log_p.clone().index_fill(-1, torch.tensor([0, 1]), -math.inf), -1)
    log_q = torch.log_softmax(log_q.clone().index_fill(-1, torch.tensor([1, 2]), -math.inf), -1)
    for alpha in (-3.0, -1.0, 0.5):
        r = assistant_logprobs(log_p, log_q, alpha=alpha, lam=0.4).exp()
        assert torch.all(r[:, 1] == 0) and torch.all(r[:, [0, 2]] > 0)
        want = reference_assistant(log_p.exp(), log_q.exp(), alpha, 0.4)
        torch.testing.assert_close(r, want, rtol=1e-10, atol=1e-300)
    for alpha in (1.0, 2.0, 5.0):
        r = assistant_logprobs(log_p, log_q, alpha=alpha, lam=0.4).exp()
        assert torch.all(r[:, :3] == 0) and torch.all(r[:, 3:] > 0)
        torch.testing.assert_close(r.sum(-1), torch.ones(4, dtype=torch.float64))


def test_presets_are_the_classic_objectives():
    student, teacher, mask = random_batch(7)
    p = torch.softmax(teacher, -1)
    q = torch.softmax(student, -1)

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)[mask].mean()

    def ab(a, b, x=0.2, y=0.7):
        s = x + y
        return (-(a**x * b**y - x / s * a**s - y / s * b**s).sum(-1) / (x * y))[mask].mean()

    def cross_entropy(a, b):
        return -(a * b.log()).sum(-1)[mask].mean()

    m = 0.1 * p + 0.9 * q
    expected = {
        "kd": kl(p, q),
        "rkl": kl(q, p),
        "skl": kl(p, 0.1 * p + 0.9 * q),
        "srkl": kl(q, 0.9 * p + 0.1 * q),
        "gkd": 0.1 * kl(p, m) + 0.9 * kl(q, m),
        "taid": cross_entropy(torch.softmax(0.4 * teacher + 0.6 * student, -1), q),
        "abkd": ab(p, q),
    }
    assert set(expected) == set(PRESETS)
    for name, want in expected.items():
        got = amid_loss(student, teacher, mask, **preset(name).as_kwargs())
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0, msg=name)


def distillm_js_distance(student_logits, teacher_logits, mask, lam=0.9):
    """DistiLLM's `js_distance` (distillm/losses.py, GKD's `--type mixed-jsd`), from its formula:
    m = (1 - lam)·p + lam·q, loss = lam·KL(q‖m) + (1 - lam)·KL(p‖m), token mean over the mask."""
    p = torch.softmax(teacher_logits, -1)
    q = torch.softmax(student_logits, -1)
    log_m = ((1 - lam) * p + lam * q).log()
    student_part = (q * (log_m - q.log())).sum(-1)
    teacher_part = (p * (log_m - p.log())).sum(-1)
    return -(lam * student_part + (1 - lam) * teacher_part)[mask].sum() / mask.sum()


def test_gkd_preset_is_distillm_js_distance_in_value_and_gradient():
    for seed in range(3):
        student, teacher, mask = random_batch(20 + seed, scale=3.0)
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        got = amid_loss(s, t, mask, **preset("gkd").as_kwargs())
        got_grads = torch.autograd.grad(got, (s, t))
        s_ref = student.clone().requires_grad_(True)
        t_ref = teacher.clone().requires_grad_(True)
        want = distillm_js_distance(s_ref, t_ref, mask)
        want_grads = torch.autograd.grad(want, (s_ref, t_ref))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)
    # Not the AMiD copy's default (lam=0.1 there, i.e. m = 0.9·p + 0.1·q): GKD is DistiLLM's.
    assert not math.isclose(got.item(), distillm_js_distance(student, teacher, mask, lam=0.1))


def test_cross_entropy_form_adds_the_entropy_of_the_first_argument_only():
    student, teacher, mask = random_batch(21)
    p = torch.softmax(teacher, -1)
    entropy = -(p * p.log()).sum(-1)[mask].mean()
    s_kl = student.clone().requires_grad_(True)
    s_ce = student.clone().requires_grad_(True)
    kl = amid_loss(s_kl, teacher, mask, alpha=-1.0, lam=0.1, order="pr")
    ce = amid_loss(s_ce, teacher, mask, alpha=-1.0, lam=0.1, order="pr", cross_entropy=True)
    torch.testing.assert_close(ce, kl + entropy, rtol=1e-12, atol=0)
    (kl_grad,) = torch.autograd.grad(kl, s_kl)
    (ce_grad,) = torch.autograd.grad(ce, s_ce)
    torch.testing.assert_close(ce_grad, kl_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(order="qr"), "cross_entropy drops the entropy of the first argument"),
        (dict(order="rq"), "cross_entropy drops .* got order 'rq' with detach_assistant=False"),
        (dict(order="js"), "cross_entropy drops the entropy"),
        (dict(order="pr", divergence="ab"), "cross_entropy is a form of the kl divergence"),
    ],
)
def test_cross_entropy_form_refuses_settings_where_it_changes_the_gradient(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_settings(alpha=0.0, lam=0.5, cross_entropy=True, **kwargs)


def test_taid_preset_stops_gradient_through_the_assistant():
    student, teacher, mask = random_batch(8)
    s = student.clone().requires_grad_(True)
    amid_loss(s, teacher, mask, **preset("taid").as_kwargs()).backward()
    s_ref = student.clone().requires_grad_(True)
    r = torch.softmax(0.4 * teacher + 0.6 * s_ref.detach(), -1)
    log_q = torch.log_softmax(s_ref, -1)
    (r * (r.log() - log_q)).sum(-1)[mask].mean().backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-10, atol=1e-15)


def test_degenerate_settings_are_flagged_and_zero():
    student, teacher, mask = random_batch(9)
    for order, lam in (("pr", 1.0), ("rp", 1.0), ("qr", 0.0), ("rq", 0.0), ("js", 0.0),
                       ("js", 1.0)):
        assert is_degenerate(order, lam)
        assert amid_loss(student, teacher, mask, alpha=0.0, lam=lam, order=order).item() == 0.0
    assert not is_degenerate("pr", 0.0) and not is_degenerate("qr", 1.0)
    assert not is_degenerate("js", 0.5)


# ----------------------------------------------------------------------------- gradients

GRADCHECK_SETTINGS = [
    dict(alpha=-3.0, lam=0.3, divergence="kl", order="pr"),
    dict(alpha=0.5, lam=0.7, divergence="kl", order="qr"),
    dict(alpha=1.0, lam=0.5, divergence="kl", order="rp"),
    dict(alpha=2.0, lam=0.4, divergence="kl", order="rq"),
    dict(alpha=1.0 + 1e-3, lam=0.6, divergence="kl", order="qr"),
    dict(alpha=-1.0, lam=0.1, divergence="ab", order="pr", ab_alpha=0.2, ab_beta=0.7),
    dict(alpha=5.0, lam=0.9, divergence="ab", order="qr", ab_alpha=0.8, ab_beta=0.3),
    dict(alpha=0.0, lam=0.5, divergence="ab", order="rq", ab_alpha=0.2, ab_beta=0.7),
    dict(alpha=-1.0, lam=0.1, divergence="kl", order="js"),
    dict(alpha=-3.0, lam=0.6, divergence="ab", order="js", ab_alpha=0.2, ab_beta=0.7),
    dict(alpha=-0.5, lam=0.3, divergence="kl", order="pr", cross_entropy=True),
]


@pytest.mark.parametrize(
    "settings", GRADCHECK_SETTINGS, ids=lambda s: "-".join(map(str, s.values()))
)
def test_gradcheck_and_gradient_matches_direct_formulas(settings):
    student, teacher, mask = random_batch(10, batch=2, length=3, vocab=7)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: amid_loss(a, b, mask, chunk_elements=14, **settings), (s, t)
    )
    got = torch.autograd.grad(amid_loss(s, t, mask, **settings), (s, t))
    want = torch.autograd.grad(reference_loss(s, t, mask, **settings), (s, t))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-14)


def _assert_finite_gradient(student, teacher, mask, **settings):
    s = student.clone().requires_grad_(True)
    loss = amid_loss(s, teacher, mask, **settings)
    loss.backward()
    assert torch.isfinite(loss), settings
    assert torch.isfinite(s.grad).all(), settings


@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_gradients_finite_under_extreme_inputs(divergence):
    student, teacher, mask = random_batch(11, dtype=torch.float32)
    big_student, big_teacher = student * 1e4, teacher * 1e4
    masked_student = student.clone()
    masked_student[..., :5] = -math.inf
    masked_teacher = teacher.clone()
    masked_teacher[..., 3:8] = -math.inf
    for order in ORDERS:
        for alpha in torch.linspace(-10, 10, 9).tolist() + [1.0]:
            for lam in (1e-6, 0.5, 1 - 1e-6):
                settings = dict(alpha=alpha, lam=lam, divergence=divergence, order=order)
                _assert_finite_gradient(big_student, big_teacher, mask, **settings)
                _assert_finite_gradient(masked_student, masked_teacher, mask, **settings)


def test_masked_vocabulary_entries_contribute_zero():
    student, teacher, mask = random_batch(12, vocab=10)
    masked_teacher = teacher.clone()
    masked_teacher[..., 9] = -math.inf
    got = amid_loss(student, masked_teacher, mask, alpha=-1.0, lam=0.5, order="qr")
    q = torch.softmax(student, -1)
    p = torch.softmax(masked_teacher, -1)
    r = 0.5 * p + 0.5 * q
    per_entry = q * (q.log() - r.log())
    want = per_entry[..., :9].sum(-1)[mask].mean()  # entry 9 dropped from the sum
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    student, teacher, mask = random_batch(13)
    s = student.to(dtype).requires_grad_(True)
    settings = dict(alpha=-0.5, lam=0.1, divergence="ab", order="pr")
    loss = amid_loss(s, teacher.to(dtype), mask, **settings)
    assert loss.dtype == torch.float32
    want = reference_loss(student.to(dtype), teacher.to(dtype), mask, **settings)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    loss.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=float("nan"), lam=0.1), "alpha must be a finite real number, got nan"),
        (dict(alpha=0.0, lam=1.5), "lam must be a number in [0, 1]"),
        (
            dict(alpha=0.0, lam=0.1, divergence="js"),
            "divergence must be one of ('kl', 'ab'), got 'js'",
        ),
        (dict(alpha=0.0, lam=0.1, order="pq"), "order must be one of"),
        (
            dict(alpha=0.0, lam=0.1, divergence="ab", ab_alpha=0.0),
            "ab_alpha must be a finite non-zero",
        ),
        (
            dict(alpha=0.0, lam=0.1, divergence="ab", ab_alpha=0.5, ab_beta=-0.5),
            "ab_alpha + ab_beta",
        ),
    ],
)
def test_invalid_settings_name_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match="^" + __import__("re").escape(message)):
        validate_settings(**kwargs)
    student, teacher, mask = random_batch(14)
    with pytest.raises(ValueError):
        amid_loss(student, teacher, mask, **kwargs)


def test_shape_errors_are_clear():
    student, teacher, mask = random_batch(15)
    with pytest.raises(ValueError, match="same shape"):
        amid_loss(student, teacher[..., :-1], mask, alpha=0.0, lam=0.1)
    with pytest.raises(ValueError, match="mask shape"):
        amid_loss(student, teacher, mask[:, :-1], alpha=0.0, lam=0.1)
    with pytest.raises(ValueError, match="unknown preset 'minillm'"):
        preset("minillm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("alpha", [-5.0, -3.0, -0.5, 0.5, 0.85, 3.0])
def test_the_closed_form_kl_pr_gradient_is_autograds(alpha, lam, dtype):
    g = torch.Generator().manual_seed(11)
    student = (torch.randn(6, 40, generator=g, dtype=torch.float64) * 3).to(dtype)
    teacher = (torch.randn(6, 40, generator=g, dtype=torch.float64) * 3).to(dtype)
    leaf = student.clone().requires_grad_()
    expected = amid_token_losses(leaf, teacher, alpha=alpha, lam=lam, divergence="kl",
                                 order="pr")
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    losses, grad = kl_pr_losses_and_gradient(student, teacher, alpha=alpha, lam=lam)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(losses, expected.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad, expected_grad, rtol=tolerance, atol=tolerance)
    assert losses.dtype == grad.dtype == dtype


def test_the_closed_form_leaves_zero_probabilities_and_other_settings_to_autograd():
    teacher = torch.randn(2, 8)
    teacher[1, 3] = -math.inf
    assert kl_pr_losses_and_gradient(torch.randn(2, 8), teacher, alpha=-3.0, lam=0.1) is None
    assert has_closed_form_gradient(AMiDSettings(alpha=-3.0, lam=0.1))
    for settings in (AMiDSettings(alpha=1.0, lam=0.1),  # geometric mean: k = 0
                     AMiDSettings(alpha=0.95, lam=0.1),  # the series form near it
                     AMiDSettings(alpha=-3.0, lam=0.0),  # an endpoint
                     AMiDSettings(alpha=-3.0, lam=0.1, order="qr"),
                     AMiDSettings(alpha=-3.0, lam=0.1, divergence="ab")):
        assert not has_closed_form_gradient(settings)
