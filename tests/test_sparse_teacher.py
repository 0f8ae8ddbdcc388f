"""The objective from a sparse teacher: exact at k = V, and within its certified interval below."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from amid_ray.fused_loss import fused_amid_loss
from amid_ray.losses import AMiDSettings, amid_loss, amid_token_losses
from amid_ray.sparse_teacher import (
    SparseTeacherRows,
    TopKRows,
    reconstruct_logprobs,
    sparsify,
)
from amid_ray.sparse_teacher_bound import loss_error_bound, loss_interval

VOCAB = 97
ORDERS = ("pr", "qr", "rp", "rq", "js")
ALPHAS = (-3.0, -1.0, 0.5, 1.0, 2.0)


def batch_of(seed: int, *, batch: int = 3, length: int = 9, temperature: float = 3.0):
    """Student and teacher logits [batch, length, V] and a response mask with ragged rows."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, VOCAB, generator=generator) * 2.0
    teacher = torch.randn(batch, length, VOCAB, generator=generator) * temperature
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, (first, last) in enumerate([(2, 8), (0, 5), (4, 9)][:batch]):
        mask[row, first:last] = True
    return student, teacher, mask


def cached_teacher(teacher_logits: torch.Tensor, mask: torch.Tensor, top_k: int,
                   storage: torch.dtype = torch.float32) -> SparseTeacherRows:
    """What the cache holds for a batch: each example's top-k rows at its masked positions."""
    entries = []
    for logits, row_mask in zip(teacher_logits, mask, strict=True):
        top = sparsify(logits[row_mask], top_k)
        entries.append(TopKRows(top.logprobs.to(storage), top.ids.to(torch.int32),
                                top.tail_logmass.float()))
    return SparseTeacherRows(entries, mask, VOCAB)


def loss_and_grad(student, teacher_logits, mask, **settings):
    student = student.clone().requires_grad_(True)
    loss = amid_loss(student, teacher_logits, mask, **settings)
    loss.backward()
    return loss.detach(), student.grad


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("divergence", ["kl", "ab"])
@pytest.mark.parametrize("order", ORDERS)
def test_full_vocabulary_cache_gives_the_live_loss_and_gradient(divergence, order):
    student, teacher, mask = batch_of(0)
    sparse = cached_teacher(teacher, mask, top_k=VOCAB)
    for alpha, lam in itertools.product(ALPHAS, (0.1, 0.5)):
        settings = dict(alpha=alpha, lam=lam, divergence=divergence, order=order)
        live_loss, live_grad = loss_and_grad(student, teacher, mask, **settings)
        cached_loss, cached_grad = loss_and_grad(student, sparse.dense(), mask, **settings)
        torch.testing.assert_close(cached_loss, live_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(cached_grad, live_grad, rtol=1e-5,
                                   atol=1e-5 * live_grad.abs().max().item())


@pytest.mark.parametrize("order", ORDERS)
def test_the_cached_teacher_feeds_the_fused_student_path(order):
    # The fused loss reads the cached teacher a chunk of rows at a time: with k = V it gives the
    # live teacher's loss and gradients (hidden states and head), here through a 16-wide head.
    student, teacher, mask = batch_of(1)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(mask.numel(), 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 16, generator=generator, dtype=torch.float64) * 0.3
    rows = mask.reshape(-1).nonzero().squeeze(1)
    settings = AMiDSettings(alpha=0.5, lam=0.4, divergence="kl", order=order)
    sparse = cached_teacher(teacher, mask, top_k=VOCAB)
    live = _TeacherLogits(teacher.reshape(-1, VOCAB))
    results = []
    for source in (live, sparse):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fused_amid_loss(h, w, None, source, rows, None, settings=settings,
                               chunk_rows=5).total
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for cached, exact in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(cached, exact, rtol=1e-5, atol=1e-9)


class _TeacherLogits:
    """The live teacher's logits behind the fused loss's teacher protocol."""

    def __init__(self, logits: torch.Tensor):
        self.flat = logits

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.flat.index_select(0, rows)


def test_rows_protocol_serves_reconstructed_rows_and_refuses_other_positions():
    _, teacher, mask = batch_of(1)
    sparse = cached_teacher(teacher, mask, top_k=VOCAB)
    rows = mask.reshape(-1).nonzero().squeeze(1)[[4, 0, 7]]
    expected = torch.log_softmax(teacher.reshape(-1, VOCAB)[rows], -1)
    torch.testing.assert_close(sparse.logits(rows), expected, rtol=0, atol=1e-6)
    prompt_position = (~mask).reshape(-1).nonzero()[0]
    with pytest.raises(ValueError, match="do not predict a response token"):
        sparse.logits(prompt_position)


def test_cached_rows_must_match_the_batch_positions():
    _, teacher, mask = batch_of(2)
    top = sparsify(teacher[0][mask[0]], 5)
    with pytest.raises(ValueError, match="batch example 1 has 5 positions .* has 6 rows"):
        SparseTeacherRows([top, top, top], mask, VOCAB)


# --------------------------------------------------------------------------- reconstruction


def test_reconstruction_keeps_the_head_and_spreads_the_exact_tail_mass():
    logits = torch.randn(6, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    top = sparsify(logits, 10)
    log_p = torch.log_softmax(logits, -1)
    torch.testing.assert_close(top.logprobs, log_p.gather(1, top.ids))
    assert torch.equal(top.ids, log_p.topk(10, dim=-1).indices)
    tail_mass = 1.0 - top.logprobs.exp().sum(-1)
    torch.testing.assert_close(top.tail_logmass.exp(), tail_mass)
    dense = reconstruct_logprobs(top, VOCAB)
    torch.testing.assert_close(dense.logsumexp(-1), torch.zeros(6, dtype=torch.float64))
    tail = torch.ones_like(dense, dtype=torch.bool).scatter(1, top.ids, False)
    torch.testing.assert_close(dense[tail].reshape(6, -1),
                               (tail_mass.log() - math.log(VOCAB - 10)).unsqueeze(1).expand(6, 87))


def test_zero_tail_mass_leaves_the_tail_masked_and_the_loss_exact():
    student, teacher, mask = batch_of(4)
    teacher[..., 20:] = -math.inf  # the teacher's support is 20 tokens; k = 20 < V holds all of it
    sparse = cached_teacher(teacher, mask, top_k=20)
    assert torch.isneginf(sparse.rows.tail_logmass).all()
    dense = sparse.dense()
    assert torch.isneginf(dense[mask][:, 20:]).all()
    for order in ORDERS:
        settings = dict(alpha=-3.0, lam=0.1, divergence="kl", order=order)
        live_loss, live_grad = loss_and_grad(student, teacher, mask, **settings)
        cached_loss, cached_grad = loss_and_grad(student, dense, mask, **settings)
        torch.testing.assert_close(cached_loss, live_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(cached_grad, live_grad, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- the error bound


def consistent_teachers(top: TopKRows, generator: torch.Generator) -> list[torch.Tensor]:
    """Log-probs [n, V] of teachers the cache cannot tell apart: the same head, the same tail
    mass T, every tail value in (0, π]: a random spread, the mass piled at π, one near-zero."""
    n, k = top.logprobs.shape
    tail_count = VOCAB - k
    mass, pi = top.tail_logmass.exp(), top.logprobs.amin(-1).exp()
    tail_mask = torch.ones(n, VOCAB, dtype=torch.bool).scatter(1, top.ids, False)
    shapes = []
    weights = torch.distributions.Dirichlet(torch.full((tail_count,), 0.3, dtype=torch.float64))
    shapes.append(weights.sample((n,)))
    piled = torch.full((n, tail_count), 1e-12, dtype=torch.float64)
    for i in range(n):
        full = int(mass[i] / pi[i])
        piled[i, :full] = pi[i]
        if full < tail_count:
            piled[i, full] = mass[i] - full * pi[i]
    shapes.append(piled)
    shapes.append(torch.ones(n, tail_count, dtype=torch.float64).index_fill(1, torch.tensor([0]),
                                                                            1e-200))
    teachers = []
    for shape in shapes:
        tail = _clip_at(shape / shape.sum(-1, keepdim=True) * mass.unsqueeze(1), pi)
        log_p = torch.empty(n, VOCAB, dtype=torch.float64)
        log_p[tail_mask] = tail.log().reshape(-1)
        teachers.append(log_p.scatter(1, top.ids, top.logprobs))
    return teachers


def _clip_at(tail: torch.Tensor, ceiling: torch.Tensor) -> torch.Tensor:
    """Cap each row at its ceiling, handing the excess to the entries below it (same sum)."""
    tail = tail.clone()
    for row, cap in zip(tail, ceiling, strict=True):
        for _ in range(100):
            excess = (row - cap).clamp(min=0).sum()
            if excess <= 1e-14 * row.sum():
                break
            row.clamp_(max=cap)
            room = cap - row
            row += excess * room / room.sum()
    return tail


@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_every_teacher_consistent_with_the_cache_lies_in_the_interval(divergence):
    generator = torch.Generator().manual_seed(5)
    violations, finite = [], 0
    for temperature, top_k in itertools.product((1.0, 4.0), (3, 12, 40)):
        teacher = torch.randn(16, VOCAB, dtype=torch.float64, generator=generator) * temperature
        teacher[:4, 60:] -= 30.0  # a few rows with a far-out tail
        student = torch.randn(16, VOCAB, dtype=torch.float64, generator=generator) * 2.0
        top = sparsify(teacher, top_k)
        candidates = [teacher, reconstruct_logprobs(top, VOCAB)]
        candidates += consistent_teachers(top, generator)
        for alpha, lam, order in itertools.product((-3.0, 0.0, 0.5, 1.0, 2.0),
                                                   (0.0, 0.1, 0.5, 0.9, 1.0), ORDERS):
            settings = dict(alpha=alpha, lam=lam, divergence=divergence, order=order)
            lo, hi = loss_interval(student, top, **settings)
            finite += int(torch.isfinite(hi).all())
            for log_p in candidates:
                value = amid_token_losses(student, log_p, **settings)
                slack = 1e-9 * (1.0 + value.abs())
                if ((value < lo - slack) | (value > hi + slack)).any():
                    violations.append((temperature, top_k, settings))
    assert violations == []
    assert finite > 0


def test_the_bound_holds_for_random_logits_and_is_zero_at_full_vocabulary():
    generator = torch.Generator().manual_seed(6)
    teacher = torch.randn(32, VOCAB, dtype=torch.float64, generator=generator) * 3.0
    student = torch.randn(32, VOCAB, dtype=torch.float64, generator=generator) * 2.0
    for top_k in (4, 16, 48, VOCAB):
        top = sparsify(teacher, top_k)
        estimate_teacher = reconstruct_logprobs(top, VOCAB)
        for alpha, divergence in itertools.product((-3.0, 0.5, 1.0), ("kl", "ab")):
            settings = dict(alpha=alpha, lam=0.1, divergence=divergence, order="pr")
            bound = loss_error_bound(student, top, **settings)
            error = (amid_token_losses(student, estimate_teacher, **settings)
                     - amid_token_losses(student, teacher, **settings)).abs()
            assert torch.isfinite(bound).all()
            assert (error <= bound + 1e-10).all()
            if top_k == VOCAB:
                assert torch.equal(bound, torch.zeros_like(bound))
            else:  # informative, not vacuous
                assert bound.mean() < 50 * error.mean()


@pytest.mark.parametrize(("order", "alpha", "lam", "finite"), [
    ("pr", 1.0, 0.1, True), ("rq", 0.5, 0.1, True), ("qr", 0.5, 0.1, True),
    ("rp", 2.0, 0.1, True), ("qr", 1.0, 0.1, False), ("qr", 0.5, 1.0, False),
    ("rp", 0.5, 0.1, False), ("rp", 2.0, 0.0, False), ("js", 2.0, 0.5, False),
])
def test_the_bound_is_infinite_exactly_where_the_loss_depends_on_single_tail_values(
        order, alpha, lam, finite):
    generator = torch.Generator().manual_seed(7)
    teacher = torch.randn(8, VOCAB, dtype=torch.float64, generator=generator) * 3.0
    student = torch.randn(8, VOCAB, dtype=torch.float64, generator=generator)
    top = sparsify(teacher, 10)
    bound = loss_error_bound(student, top, alpha=alpha, lam=lam, order=order)
    assert bool(torch.isfinite(bound).all()) is finite
    if not finite:  # and truly so: the loss grows without limit as one tail value goes to 0
        tail = torch.ones(VOCAB, dtype=torch.bool).scatter(0, top.ids[0], False)
        token = int(torch.where(tail, student[0], -math.inf).argmax())
        far = teacher[:1].clone()
        losses = []
        for shift in (10.0, 10_000.0):
            far[0, token] = teacher[0, token] - shift
            losses.append(amid_token_losses(student[:1], far, alpha=alpha, lam=lam,
                                            order=order).item())
        assert losses[1] > losses[0] + 1.0


def test_cross_entropy_and_the_bound_refusals():
    generator = torch.Generator().manual_seed(8)
    teacher = torch.randn(8, VOCAB, dtype=torch.float64, generator=generator) * 3.0
    student = torch.randn(8, VOCAB, dtype=torch.float64, generator=generator)
    top = sparsify(teacher, 10)
    settings = dict(alpha=-3.0, lam=0.1, order="pr", cross_entropy=True)
    lo, hi = loss_interval(student, top, **settings)
    for log_p in [teacher, *consistent_teachers(top, generator)]:
        value = amid_token_losses(student, log_p, **settings)
        assert ((lo - 1e-9 <= value) & (value <= hi + 1e-9)).all()
    with pytest.raises(ValueError, match="positive ab_alpha and ab_beta"):
        loss_interval(student, top, alpha=0.5, lam=0.1, divergence="ab", ab_alpha=-0.5)
