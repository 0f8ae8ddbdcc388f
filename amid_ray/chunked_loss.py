"""Token-chunked evaluation of a per-token loss, with memory bounded by one chunk.

Distillation losses run over `[tokens, vocabulary]` tensors; written plainly, autograd keeps a
dozen full-size intermediates alive until backward. `chunked_token_loss` instead walks the tokens
in chunks and, for each chunk, computes the loss *and its gradient* right away (during forward),
writing the gradient into one buffer per differentiable input. Backward then only scales those
buffers. Extra memory: the gradient buffers (the size of the inputs, which any backward needs)
plus the intermediates of a single chunk.

The mechanism knows nothing about the loss: it takes any function mapping row-aligned chunks of
its inputs to per-row losses, so a later variant that fuses the output projection (hidden states
in, logits computed per chunk) can reuse it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RowLoss = Callable[..., torch.Tensor]

#: Default number of elements (rows × vocabulary) per chunk: large enough to keep the
#: elementwise kernels efficient, small enough that a chunk's intermediates stay in the tens of MB.
DEFAULT_CHUNK_ELEMENTS = 1 << 21


def rows_per_chunk(row_width: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """How many rows of `row_width` entries make one chunk of about `chunk_elements`."""
    return max(1, chunk_elements // max(1, row_width))


def _loss_and_gradients(
    row_loss: RowLoss,
    rows: torch.Tensor,
    chunk_rows: int,
    inputs: tuple[torch.Tensor, ...],
    wants_grad: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The summed loss over `rows` and its gradient for each input that wants one."""
    grads = [torch.zeros_like(t) if w else None for t, w in zip(inputs, wants_grad, strict=True)]
    total = None
    for start in range(0, rows.numel(), chunk_rows):
        chunk_index = rows[start : start + chunk_rows]
        chunks = [
            t.detach().index_select(0, chunk_index).requires_grad_(w)
            for t, w in zip(inputs, wants_grad, strict=True)
        ]
        with torch.enable_grad():
            chunk_loss = row_loss(*chunks).sum()
            leaves = [c for c, w in zip(chunks, wants_grad, strict=True) if w]
            chunk_grads = iter(torch.autograd.grad(chunk_loss, leaves) if leaves else ())
        for grad in grads:
            if grad is not None:
                grad.index_add_(0, chunk_index, next(chunk_grads))
        chunk_loss = chunk_loss.detach()
        total = chunk_loss if total is None else total + chunk_loss
    if total is None:  # no rows selected: the loss is an empty sum
        dtype = torch.promote_types(inputs[0].dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=inputs[0].device)
    return total, grads


class _ChunkedTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, row_loss: RowLoss, rows: torch.Tensor, chunk_rows: int, *inputs):
        wants_grad = [t.requires_grad for t in inputs]
        total, grads = _loss_and_gradients(row_loss, rows, chunk_rows, inputs, wants_grad)
        # The buffers are held on ctx rather than saved for backward: the first backward hands
        # them over, and an unshared buffer becomes the input's .grad without a copy.
        ctx.grad_buffers = grads
        ctx.recompute = (row_loss, rows, chunk_rows, wants_grad)
        ctx.save_for_backward(*inputs)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        input_grads, ctx.grad_buffers = ctx.grad_buffers, None
        if input_grads is None:  # a further backward through a retained graph: recompute
            row_loss, rows, chunk_rows, wants_grad = ctx.recompute
            _, input_grads = _loss_and_gradients(
                row_loss, rows, chunk_rows, ctx.saved_tensors, wants_grad
            )
        if not torch.equal(grad_total, torch.ones_like(grad_total)):
            input_grads = [g if g is None else g.mul_(grad_total.to(g.dtype)) for g in input_grads]
        return (None, None, None, *input_grads)


def chunked_token_loss(
    row_loss: RowLoss,
    *inputs: torch.Tensor,
    rows: torch.Tensor,
    chunk_rows: int,
) -> torch.Tensor:
    """Σ over `rows` of `row_loss(*(t[rows] for t in inputs))`, evaluated `chunk_rows` at a time.

    `inputs` are 2-D tensors sharing their first (token) dimension; `rows` is a 1-D long tensor of
    the token indices that count; `row_loss` maps chunks `[c, …]` to per-row losses `[c]`.
    Gradients reach every input that requires grad (once differentiable), and are zero on the
    rows not selected.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if not inputs or any(t.dim() != 2 for t in inputs):
        raise ValueError("chunked_token_loss needs 2-D inputs [tokens, features]")
    if len({t.shape[0] for t in inputs}) != 1:
        raise ValueError(f"inputs disagree on the token count: {[tuple(t.shape) for t in inputs]}")
    return _ChunkedTokenLoss.apply(row_loss, rows, chunk_rows, *inputs)
