"""The chunking mechanism alone (amid_ray.chunked_loss), against plain autograd on the same loss.

The per-row loss here is not AMiD: a soft cross-entropy between two row-wise softmaxes plus a
term in the second input alone, so both inputs get a gradient that depends on both.
"""

from __future__ import annotations

import math

import pytest
import torch

from amid_ray.chunked_loss import DEFAULT_CHUNK_ELEMENTS, chunked_token_loss, rows_per_chunk

TOKENS, WIDTH = 9, 5


def row_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row `-Σ_v softmax(teacher)_v log softmax(student)_v + mean_v teacher_v²`."""
    soft_targets = teacher.softmax(-1)
    return -(soft_targets * student.log_softmax(-1)).sum(-1) + teacher.pow(2).mean(-1)


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(TOKENS, WIDTH, generator=generator, dtype=torch.float64)
    teacher = torch.randn(TOKENS, WIDTH, generator=generator, dtype=torch.float64)
    return student.requires_grad_(), teacher.requires_grad_()


ROWS = torch.tensor([0, 2, 3, 4, 7, 8])  # rows 1, 5 and 6 do not count


def plain(student, teacher, rows=ROWS) -> torch.Tensor:
    return row_loss(student[rows], teacher[rows]).sum()


def gradients(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_rows", [1, 2, 4, 6, 50])
def test_value_and_gradients_equal_plain_autograd(chunk_rows: int):
    student, teacher = inputs()
    chunked = chunked_token_loss(row_loss, student, teacher, rows=ROWS, chunk_rows=chunk_rows)
    expected = plain(student, teacher)
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(gradients(chunked, student, teacher), gradients(expected, student,
                                                                          teacher), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert got[[1, 5, 6]].abs().max() == 0.0  # unselected rows get exactly zero
    assert chunked.shape == ()


@pytest.mark.parametrize("upstream", [
    lambda total: 3.5 * total,
    lambda total: total / 6,  # amid_loss's mean over the counted tokens
    lambda total: -0.25 * total,
    lambda total: total.pow(2),  # an upstream gradient that depends on the value: 2 * total
    lambda total: torch.stack([total, 2 * total]).sum(),  # two paths into one backward: 3
])
def test_upstream_gradient_scales_the_input_gradients(upstream):
    student, teacher = inputs(1)
    chunked = upstream(chunked_token_loss(row_loss, student, teacher, rows=ROWS, chunk_rows=4))
    expected = upstream(plain(student, teacher))
    for got, want in zip(gradients(chunked, student, teacher), gradients(expected, student,
                                                                          teacher), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradient_is_formed_during_forward_and_recomputed_for_a_retained_graph():
    student, teacher = inputs(2)
    calls = []

    def counted(*chunks):
        calls.append(chunks[0].shape[0])
        return row_loss(*chunks)

    total = chunked_token_loss(counted, student, teacher, rows=ROWS, chunk_rows=4)
    assert calls == [4, 2]  # forward: one call per chunk, loss and gradient together
    want_student, want_teacher = gradients(plain(student, teacher), student, teacher)

    (2.0 * total).backward(retain_graph=True)
    assert calls == [4, 2]  # the first backward only scales what forward computed
    torch.testing.assert_close(student.grad, 2.0 * want_student, rtol=1e-12, atol=1e-12)

    (-0.5 * total).backward()  # a second backward through the retained graph
    assert calls == [4, 2, 4, 2]  # recomputed, since the first backward handed its buffers over
    torch.testing.assert_close(student.grad, 1.5 * want_student, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(teacher.grad, 1.5 * want_teacher, rtol=1e-12, atol=1e-12)


def test_only_inputs_that_require_grad_get_one():
    student, teacher = inputs(3)
    teacher = teacher.detach()
    chunked = chunked_token_loss(row_loss, student, teacher, rows=ROWS, chunk_rows=3)
    chunked.backward()
    (want,) = gradients(plain(student, teacher), student)
    torch.testing.assert_close(student.grad, want, rtol=1e-12, atol=1e-12)
    assert teacher.grad is None


def test_no_rows_is_an_empty_sum_with_zero_gradients():
    student, teacher = (t.detach().to(torch.bfloat16).requires_grad_() for t in inputs(4))
    total = chunked_token_loss(row_loss, student, teacher, rows=torch.tensor([], dtype=torch.long),
                               chunk_rows=2)
    assert total.item() == 0.0 and total.shape == ()
    assert total.dtype == torch.float32  # an empty sum is at least float32, like the AMiD loss
    (5.0 * total).backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert torch.equal(teacher.grad, torch.zeros_like(teacher))


def test_a_repeated_row_counts_twice():
    student, teacher = inputs(5)
    rows = torch.tensor([1, 1, 2])
    chunked = chunked_token_loss(row_loss, student, teacher, rows=rows, chunk_rows=2)
    expected = plain(student, teacher, rows)
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradients(chunked, student)[0], gradients(expected, student)[0])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"chunk_rows": 0}, "chunk_rows must be >= 1, got 0"),
    ({"shapes": [(9,), (9, 5)]}, r"needs 2-D inputs \[tokens, features\]"),
    ({"shapes": [(9, 5), (8, 5)]}, r"disagree on the token count: \[\(9, 5\), \(8, 5\)\]"),
])
def test_bad_arguments_are_named(kwargs, message):
    shapes = kwargs.get("shapes", [(9, 5), (9, 5)])
    tensors = [torch.zeros(shape) for shape in shapes]
    with pytest.raises(ValueError, match=message):
        chunked_token_loss(row_loss, *tensors, rows=ROWS, chunk_rows=kwargs.get("chunk_rows", 2))


def test_rows_per_chunk():
    assert rows_per_chunk(40, 100) == 2
    assert rows_per_chunk(40, 39) == 1  # never less than one row
    assert rows_per_chunk(50257) == math.floor(DEFAULT_CHUNK_ELEMENTS / 50257) == 41
