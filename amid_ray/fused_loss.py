"""The AMiD objective fused with the output head: hidden states in, no `[tokens, vocab]` logits.

The plain path multiplies every position's last hidden state by the head weight, holds the
student's and the teacher's `[batch, length, vocab]` logits, and lets autograd keep the student's
until backward. `fused_amid_loss` instead walks the positions that count (`rows`: those that
predict a response token) in chunks; for each chunk it forms both models' logits, the loss, and
the gradient with respect to the student's logits, and folds that gradient straight into the
gradients of the student's hidden states, head weight and bias (the weight's accumulated in
float32). Backward then only scales those buffers. Nothing `[rows, vocab]`-sized outlives a
chunk; the per-token math is `losses.amid_token_losses`, unchanged, with autograd for its
gradient, or for KL(p‖r) the closed form `losses.kl_pr_losses_and_gradient` (the same values in
about half the passes over the logits). On CPU each chunk's per-token loss is evaluated a few
rows at a time (`CPU_LOSS_PART_ELEMENTS`).

`hidden_and_head` gets a causal LM's last hidden states (after its final norm) and its output
head from the model's own forward (so a DDP wrapper still synchronises gradients), asking the
model for the logits of the last position only.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from amid_ray.chunked_loss import rows_per_chunk
from amid_ray.losses import (
    AMiDSettings,
    amid_token_losses,
    has_closed_form_gradient,
    kl_pr_losses_and_gradient,
)

#: Default logits per chunk (rows × vocabulary), 64 MB per float32 `[rows, V]` tensor: each chunk
#: reads the head weights three times, so fewer, larger chunks are faster (on 2 CPU cores at
#: V = 151936, 2^24 took 15 % less time than 2^23, 2^25 another 10 %). On CUDA a chunk's dozen
#: float32 intermediates (about 0.8 GB there) are what the step's extra memory mostly is.
DEFAULT_FUSED_CHUNK_ELEMENTS = 1 << 24

#: On CPU the per-token loss walks each chunk a few rows at a time (about 2 MB per float32
#: intermediate, an L2 cache's worth), while the head's matmuls keep the whole chunk. A 64 MB
#: temporary is above glibc's largest mmap threshold (32 MB), so each of the loss's thirty-odd
#: temporaries was mapped and zero-filled afresh by the kernel: on 2 cores at V = 49152 the AMiD
#: loss and its gradient over 340 rows took 0.55 s in one piece, 0.19 s in pieces of 42 rows
#: and 0.14 s in pieces of 8 to 10 (2^19 elements: 10 rows here). On CUDA the caching
#: allocator reuses blocks and larger kernels are better, so the chunk stays whole.
CPU_LOSS_PART_ELEMENTS = 1 << 19


class TeacherRows(Protocol):
    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Teacher logits (or log-probabilities: the loss applies log_softmax, which leaves
        normalised log-probs unchanged) at flat positions `rows` (1-D long), shape
        `[len(rows), V]`, no grad."""
        ...


@dataclass
class TeacherHead:
    """The live teacher: its last hidden states `[N, H_t]` (flattened positions, no grad) and
    output head; logits are formed only for the rows asked, in the teacher's own dtype."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        # Outside any autocast region: the teacher's logits come out as its own forward makes them.
        with torch.no_grad(), torch.autocast(self.hidden.device.type, enabled=False):
            return F.linear(self.hidden.index_select(0, rows), self.weight, self.bias)


class FusedLosses(NamedTuple):
    """`total` is differentiable; `distil` and `ce` are its parts, detached, for reporting."""

    total: torch.Tensor  # (1 - kd_ratio)·ce + kd_ratio·distil
    distil: torch.Tensor  # AMiD token mean over `rows`
    ce: torch.Tensor  # cross-entropy token mean over `rows` (zeros(()) when kd_ratio == 1)


@dataclass
class _Plan:
    """Everything about one call except the differentiable tensors."""

    teacher: TeacherRows | None  # None: cross-entropy only (kd_ratio 0)
    rows: torch.Tensor
    targets: torch.Tensor | None
    settings: AMiDSettings | None
    kd_ratio: float
    chunk_rows: int
    part_rows: int  # rows per evaluation of the per-token loss within a chunk
    matmul_dtype: torch.dtype
    closed_form: bool = False  # the AMiD gradient by `kl_pr_losses_and_gradient`, not autograd


def fused_amid_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher: TeacherRows,
    rows: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    settings: AMiDSettings,
    kd_ratio: float = 1.0,
    chunk_rows: int | None = None,
) -> FusedLosses:
    """(1 - kd_ratio)·CE + kd_ratio·AMiD at `rows`, from hidden states, never holding all logits.

    With student logits z_n = W·h_n + b and teacher logits t_n = teacher.logits([n]):

        distil = (1/R) Σ_{n ∈ rows} amid_token_losses(z_n, t_n; settings)
        ce     = (1/R) Σ_{n ∈ rows} -log softmax(z_n)[targets_n]
        total  = (1 - kd_ratio)·ce + kd_ratio·distil,        R = len(rows)

    equal to `amid_loss` (+ `F.cross_entropy`) on the materialised logits, the published
    per-micro-batch token mean. `student_hidden` is `[N, H]` (flattened positions), the head
    `student_weight` `[V, H]` and `student_bias` `[V]` or None; `rows` are the flat positions
    that count; `targets` `[N]` the next-token ids (needed when kd_ratio < 1). Logits are formed
    `chunk_rows` rows at a time in the autocast dtype when autocast is on (as the model's own
    head would), and the loss is computed in float32 (float64 stays float64). Gradients reach
    the student's hidden states (zero off `rows`), head weight and bias; `total`'s upstream
    gradient (e.g. 1/grad_accum) scales them. No rows: every value and gradient is 0.
    """
    _check_inputs(student_hidden, student_weight, student_bias, rows, targets, kd_ratio)
    return _fused(student_hidden, student_weight, student_bias, teacher, rows,
                  targets if kd_ratio < 1.0 else None, settings, float(kd_ratio), chunk_rows)


def fused_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """(1/R) Σ_{n ∈ rows} -log softmax(W·h_n + b)[targets_n], from hidden states, a chunk of
    rows at a time, with the gradients formed inside the chunk loop as `fused_amid_loss` does
    (its kd_ratio = 0 case without a teacher): the language-modelling loss without
    `[tokens, vocab]` logits. Differentiable; 0 for no rows."""
    _check_inputs(hidden, weight, bias, rows, targets, 0.0)
    return _fused(hidden, weight, bias, None, rows, targets, None, 0.0, chunk_rows).total


def _fused(hidden, weight, bias, teacher, rows, targets, settings, kd_ratio,
           chunk_rows) -> FusedLosses:
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(weight.shape[0], DEFAULT_FUSED_CHUNK_ELEMENTS)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        matmul_dtype = torch.get_autocast_dtype(device_type)
    else:
        matmul_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    part_rows = chunk_rows
    if device_type == "cpu":
        part_rows = min(chunk_rows, rows_per_chunk(weight.shape[0], CPU_LOSS_PART_ELEMENTS))
    plan = _Plan(teacher, rows, targets, settings, kd_ratio, chunk_rows, part_rows, matmul_dtype,
                 closed_form=settings is not None and has_closed_form_gradient(settings))
    tensors = (hidden, weight, bias)
    wants_grad = tuple(
        t is not None and t.requires_grad and torch.is_grad_enabled() for t in tensors
    )
    if not any(wants_grad):  # evaluation: values only, no gradient buffers
        total, distil, ce, _ = _losses_and_gradients(plan, *tensors, wants_grad=wants_grad)
        return FusedLosses(total, distil, ce)
    return FusedLosses(*_FusedAMiD.apply(plan, *tensors))


def _check_inputs(hidden, weight, bias, rows, targets, kd_ratio) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"student_hidden {tuple(hidden.shape)} must be [N, H] and student_weight "
            f"{tuple(weight.shape)} [V, H] with the same H"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"student_bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")
    if rows.dim() != 1 or rows.dtype != torch.long:
        raise ValueError(f"rows must be a 1-D long tensor, got {rows.dtype} {tuple(rows.shape)}")
    if rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < hidden.shape[0]:
        raise ValueError(
            f"rows must index the {hidden.shape[0]} positions of student_hidden, got values in "
            f"[{int(rows.min())}, {int(rows.max())}]"
        )
    if not isinstance(kd_ratio, int | float) or not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be a number in [0, 1], got {kd_ratio!r}")
    if kd_ratio < 1.0 and (targets is None or targets.shape != hidden.shape[:1]):
        shape = None if targets is None else tuple(targets.shape)
        raise ValueError(
            f"kd_ratio={kd_ratio} < 1 needs targets of shape [N] = [{hidden.shape[0]}] for the "
            f"cross-entropy term, got {shape}"
        )


def _losses_and_gradients(
    plan: _Plan,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    wants_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """total, distil, ce (token means) and the gradient of total for each input that wants one."""
    loss_dtype = torch.promote_types(plan.matmul_dtype, torch.float32)
    head_weight = weight.detach().to(plan.matmul_dtype)
    head_bias = None if bias is None else bias.detach().to(plan.matmul_dtype)
    grad_hidden = torch.zeros_like(hidden) if wants_grad[0] else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                    device=weight.device)
        if wants_grad[1] else None
    )
    grad_bias = torch.zeros(weight.shape[0], dtype=loss_dtype, device=weight.device) \
        if wants_grad[2] else None
    any_grad = any(wants_grad)
    kd_ratio, rows = plan.kd_ratio, plan.rows
    scale = 1.0 / max(rows.numel(), 1)
    distil_sum = torch.zeros((), dtype=loss_dtype, device=hidden.device)
    ce_sum = torch.zeros((), dtype=loss_dtype, device=hidden.device)

    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, rows.numel(), plan.chunk_rows):
            index = rows[start : start + plan.chunk_rows]
            chunk_hidden = hidden.detach().index_select(0, index).to(plan.matmul_dtype)
            student_logits = F.linear(chunk_hidden, head_weight, head_bias).to(loss_dtype)
            teacher_logits = _teacher_logits(plan, index, student_logits)
            targets = None if plan.targets is None else plan.targets.index_select(0, index)
            grad_logits = torch.empty_like(student_logits) if any_grad else None
            for part_start in range(0, index.numel(), plan.part_rows):
                part = slice(part_start, part_start + plan.part_rows)
                distil, ce = _part_losses(
                    plan,
                    student_logits[part],
                    None if teacher_logits is None else teacher_logits[part],
                    None if targets is None else targets[part],
                    None if grad_logits is None else grad_logits[part],
                    scale,
                )
                distil_sum += distil
                ce_sum += ce
            if any_grad:
                _fold_chunk_gradient(grad_logits, chunk_hidden, head_weight, index,
                                     grad_hidden, grad_weight, grad_bias)

    distil_mean, ce_mean = distil_sum * scale, ce_sum * scale
    total = (1.0 - kd_ratio) * ce_mean + kd_ratio * distil_mean
    return total, distil_mean, ce_mean, [grad_hidden, grad_weight, grad_bias]


def _teacher_logits(plan: _Plan, index, student_logits) -> torch.Tensor | None:
    """The teacher's logits (or log-probabilities) at one chunk's rows; None without a teacher."""
    if plan.teacher is None:
        return None
    teacher_logits = plan.teacher.logits(index)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher.logits gave {tuple(teacher_logits.shape)} for {index.numel()} "
            f"rows; the student's head gives {tuple(student_logits.shape)}"
        )
    return teacher_logits


def _part_losses(plan: _Plan, student_logits, teacher_logits, targets, grad_out,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The AMiD and cross-entropy sums over a few rows (zeros where not asked for), detached;
    with `grad_out` given, the gradient of their share of the scaled total is written to it."""
    closed = None
    if grad_out is not None and plan.closed_form and teacher_logits is not None \
            and plan.kd_ratio > 0.0:
        closed = kl_pr_losses_and_gradient(student_logits, teacher_logits,
                                           alpha=plan.settings.alpha, lam=plan.settings.lam)
    if closed is None:
        return _autograd_part_losses(plan, student_logits, teacher_logits, targets, grad_out,
                                     scale)
    losses, grad = closed
    grad_out.copy_(grad.mul_(plan.kd_ratio * scale))
    ce = losses.new_zeros(())
    if targets is not None:  # the cross-entropy's share, by autograd, into `grad` (now free)
        ce_only = replace(plan, teacher=None, kd_ratio=0.0)
        _, ce = _autograd_part_losses(ce_only, student_logits, None, targets, grad,
                                      (1.0 - plan.kd_ratio) * scale)
        grad_out.add_(grad)
    return losses.sum(), ce


def _autograd_part_losses(plan: _Plan, student_logits, teacher_logits, targets, grad_out,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_part_losses` with the gradient by autograd through `amid_token_losses`."""
    with_grad = grad_out is not None
    logits = student_logits.detach().requires_grad_(with_grad)
    distil = ce = logits.new_zeros(())
    with torch.set_grad_enabled(with_grad):
        terms = []
        if teacher_logits is not None:
            with torch.set_grad_enabled(with_grad and plan.kd_ratio > 0.0):
                distil = amid_token_losses(logits, teacher_logits,
                                           **plan.settings.as_kwargs()).sum()
            if plan.kd_ratio > 0.0:
                terms.append(plan.kd_ratio * distil)
        if targets is not None:
            ce = F.cross_entropy(logits, targets, reduction="sum")
            terms.append((1.0 - plan.kd_ratio) * ce)
        if with_grad:
            (grad,) = torch.autograd.grad(sum(terms) * scale, logits)
            grad_out.copy_(grad)
    return distil.detach(), ce.detach()


def _fold_chunk_gradient(grad_logits, chunk_hidden, head_weight, index,
                         grad_hidden, grad_weight, grad_bias) -> None:
    """Chain rule through z = W·h + b for one chunk: ∂h = g·W, ∂W += gᵀ·h, ∂b += Σ g."""
    grad_chunk = grad_logits.to(head_weight.dtype)
    if grad_hidden is not None:
        grad_hidden.index_add_(0, index, (grad_chunk @ head_weight).to(grad_hidden.dtype))
    if grad_weight is not None:
        if grad_chunk.dtype == grad_weight.dtype:  # in place: no [V, H] temporary per chunk
            grad_weight.addmm_(grad_chunk.T, chunk_hidden)
        else:
            grad_weight.add_(grad_chunk.T @ chunk_hidden)
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))


class _FusedAMiD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, hidden, weight, bias):
        wants_grad = (hidden.requires_grad, weight.requires_grad,
                      bias is not None and bias.requires_grad)
        total, distil, ce, grads = _losses_and_gradients(plan, hidden, weight, bias,
                                                         wants_grad=wants_grad)
        # Handed over by the first backward; a backward through a retained graph recomputes.
        ctx.grad_buffers = grads
        ctx.plan, ctx.wants_grad = plan, wants_grad
        ctx.save_for_backward(hidden, weight, bias)
        ctx.mark_non_differentiable(distil, ce)
        return total, distil, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_distil, _grad_ce):
        grads, ctx.grad_buffers = ctx.grad_buffers, None
        hidden, weight, bias = ctx.saved_tensors
        if grads is None:
            grads = _losses_and_gradients(ctx.plan, hidden, weight, bias,
                                          wants_grad=ctx.wants_grad)[3]
        if not torch.equal(grad_total, torch.ones_like(grad_total)):
            grads = [g if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]
        grads = [g if g is None else g.to(t.dtype)
                 for g, t in zip(grads, (hidden, weight, bias), strict=True)]
        return None, *grads


# --------------------------------------------------------------------------- models


class HiddenAndHead(NamedTuple):
    hidden: torch.Tensor  # [batch, length, H]: last hidden states, after the final norm
    weight: torch.Tensor  # [V, H]: the output head (the input embedding itself when tied)
    bias: torch.Tensor | None


#: Config fields of transformers models that change logits after the head, and the value that
#: leaves them unchanged; a fused loss on W·h + b would silently drop them.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,
}


def hidden_and_head(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> HiddenAndHead:
    """A causal LM's last hidden states and output head, without its `[batch, length, V]` logits.

    Runs `model` (a transformers causal LM, or a DDP wrapper of one: the call goes through the
    wrapper, so gradients are synchronised) with `logits_to_keep=1`, captures the output of its
    backbone (`base_model`, whose `last_hidden_state` is after the final norm), and checks that
    `hidden[:, -1] @ W.T + b` reproduces the logits the model returned. Models that scale or
    soft-cap logits after the head are refused. Gradients flow as through the model's own head
    (a tied head's weight is the input embedding, so both uses reach the same parameter).
    """
    bare = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    name = type(bare).__name__
    head = bare.get_output_embeddings() if hasattr(bare, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{name} has no linear output head (get_output_embeddings() -> {head!r})")
    if "logits_to_keep" not in inspect.signature(bare.forward).parameters:
        raise ValueError(f"{name}.forward takes no `logits_to_keep`: it would build all logits")
    config = bare.config.get_text_config()
    for field, identity in LOGIT_TRANSFORMS.items():
        value = getattr(config, field, identity)
        if value not in (identity, None):
            raise ValueError(
                f"{name} applies {field}={value!r} to its logits after the head; the fused loss "
                f"needs logits = hidden @ W.T + b (use amid_loss on the model's logits instead)"
            )
    captured: list[torch.Tensor] = []
    backbone = bare.base_model
    if backbone is bare:
        raise ValueError(f"{name} has no separate backbone (base_model) whose output to capture")
    hook = backbone.register_forward_hook(
        lambda _module, _args, output: captured.append(output[0])  # last_hidden_state
    )
    try:
        output = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise ValueError(f"{name}'s backbone ran {len(captured)} times in one forward, not once")
    hidden = captured[0]
    _check_head_reproduces(name, hidden[:, -1], head, output.logits[:, -1])
    return HiddenAndHead(hidden, head.weight, head.bias)


def _check_head_reproduces(name, last_hidden, head, logits) -> None:
    """Refuse unless W·h + b equals the model's logits up to rounding: a few units in the last
    place of the logits' dtype, plus the float32 accumulation error of a length-H dot product."""
    with torch.no_grad():
        ours = head(last_hidden)  # under the caller's autocast, as the model's own head ran
        with torch.autocast(last_hidden.device.type, enabled=False):
            magnitude = F.linear(last_hidden.abs().float(), head.weight.abs().float(),
                                 None if head.bias is None else head.bias.abs().float())
        ulp = max(torch.finfo(ours.dtype).eps, torch.finfo(logits.dtype).eps)
        ours, logits = ours.float(), logits.float()
        largest = torch.maximum(ours.abs(), logits.abs()).amax(-1, keepdim=True)
        accumulation = 4 * torch.finfo(torch.float32).eps * math.sqrt(last_hidden.shape[-1])
        bound = accumulation * magnitude + 4 * ulp * largest + 1e-6
        excess = ((ours - logits).abs() - bound).max()
    if excess > 0:
        raise ValueError(
            f"{name}'s logits are not hidden @ W.T + b (off by up to {float(excess):.3g} beyond "
            f"rounding): it transforms logits after its head, which the fused loss cannot follow"
        )
