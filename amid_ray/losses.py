"""The AMiD objective: α-mixture assistant distribution, divergences, and the token-level loss.

Notation (per token position): teacher distribution `p`, student distribution `q` over one
vocabulary, mixing weight `lam` ∈ [0, 1] on the teacher and shape `alpha` ∈ ℝ. The assistant is
the normalised power mean

    k = (1 - alpha) / 2
    alpha ≠ 1:  r ∝ (lam·p^k + (1 - lam)·q^k)^(1/k)
    alpha = 1:  r ∝ p^lam · q^(1 - lam)

and the loss is a divergence between one of p, q and r (the `order`; `js` weighs both p and q
against r), summed over the vocabulary and averaged over the tokens that count. Everything is
computed in log space in float32 (float64 stays float64). Entries where either model's logit
is -inf contribute 0 to the per-token sum.

This module imports only torch. The math lives in plain tensor functions; memory-bounded
evaluation over tokens is the separate mechanism in `chunked_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from amid_ray.chunked_loss import DEFAULT_CHUNK_ELEMENTS, chunked_token_loss, rows_per_chunk

Divergence = Literal["kl", "ab"]
Order = Literal["pr", "qr", "rp", "rq", "js"]

DIVERGENCES: tuple[str, ...] = ("kl", "ab")
#: `js` is the generalized Jensen-Shannon form lam·D(p‖r) + (1-lam)·D(q‖r) (GKD's loss).
ORDERS: tuple[str, ...] = ("pr", "qr", "rp", "rq", "js")

# Below this |k| the plain power-mean formula loses precision to cancellation (it divides a
# log-sum-exp of size O(k) by k); a series-stable form is used instead.
_SMALL_K = 0.05


# --------------------------------------------------------------------------- validation


def validate_settings(
    *,
    alpha: float,
    lam: float,
    divergence: str = "kl",
    order: str = "pr",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    detach_assistant: bool = False,
    cross_entropy: bool = False,
) -> None:
    """Raise `ValueError` naming the argument, its value and what is allowed."""
    if not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
    if not isinstance(lam, int | float) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1] (weight on the teacher), got {lam!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if divergence == "ab":
        for name, value in (("ab_alpha", ab_alpha), ("ab_beta", ab_beta)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value == 0:
                raise ValueError(f"{name} must be a finite non-zero number, got {value!r}")
        if ab_alpha + ab_beta == 0:
            raise ValueError(f"ab_alpha + ab_beta must be non-zero, got {ab_alpha!r} + {ab_beta!r}")
    if cross_entropy:
        if divergence != "kl":
            raise ValueError(f"cross_entropy is a form of the kl divergence, got divergence "
                             f"{divergence!r}")
        if not (order == "pr" or (order in ("rp", "rq") and detach_assistant)):
            raise ValueError(
                "cross_entropy drops the entropy of the first argument, which must carry no "
                "student gradient (order 'pr', or 'rp'/'rq' with detach_assistant), got "
                f"order {order!r} with detach_assistant={detach_assistant!r}"
            )


def is_degenerate(order: str, lam: float) -> bool:
    """True when the loss is identically 0 (nothing to learn): the assistant equals the model
    it is compared with (`pr`/`rp` with lam = 1, `qr`/`rq` with lam = 0, `js` with either)."""
    return (
        (order in ("pr", "rp", "js") and lam == 1.0)
        or (order in ("qr", "rq", "js") and lam == 0.0)
    )


# --------------------------------------------------------------------------- the mixture


def has_neginf(*log_values: torch.Tensor) -> bool:
    """Whether any entry of any of the tensors is -inf: one reduction each and a single read of
    the result (one device sync on a GPU), no `[rows, V]` mask. The masks are built only where a
    zero probability is present, which with dense logits it rarely is."""
    least = [t.amin() for t in log_values if t.numel() > 0]
    return bool(least) and bool(torch.stack(least).min() == -math.inf)


def assistant_logprobs(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    *,
    alpha: float,
    lam: float,
) -> torch.Tensor:
    """log r, the α-mixture of p (teacher) and q (student), normalised over the last dimension.

        alpha ≠ 1:  log r̃ = (1/k) · logaddexp(log lam + k·log p, log(1-lam) + k·log q)
        alpha = 1:  log r̃ = lam·log p + (1-lam)·log q
        log r = log_softmax(log r̃)

    Exact endpoints: lam = 0 gives q and lam = 1 gives p. For alpha < 1 the support of r is the
    union of the supports of p and q; for alpha ≥ 1 it is their intersection. Gradients are
    finite where p or q is 0 (-inf log-probabilities).
    """
    if lam == 0.0:
        return student_logprobs
    if lam == 1.0:
        return teacher_logprobs
    log_p, log_q = teacher_logprobs, student_logprobs
    any_zero = has_neginf(log_p, log_q)
    if any_zero:  # finite stand-ins keep every branch's gradient finite; `where` picks the truth
        p_zero, q_zero = torch.isneginf(log_p), torch.isneginf(log_q)
        log_p = log_p.masked_fill(p_zero, 0.0)
        log_q = log_q.masked_fill(q_zero, 0.0)

    k = (1.0 - alpha) / 2.0
    if k == 0.0:
        mixed = lam * log_p + (1.0 - lam) * log_q
    elif abs(k) < _SMALL_K:
        mixed = _power_mean_near_geometric(log_p, log_q, k=k, lam=lam)
    else:
        mixed = torch.logaddexp(math.log(lam) + k * log_p, math.log1p(-lam) + k * log_q) / k

    if any_zero:
        if k > 0:  # union support: where only one is 0, r̃ = (weight · the other^k)^(1/k)
            mixed = torch.where(q_zero, log_p + math.log(lam) / k, mixed)
            mixed = torch.where(p_zero, log_q + math.log1p(-lam) / k, mixed)
            mixed = mixed.masked_fill(p_zero & q_zero, -math.inf)
        else:  # intersection support
            mixed = mixed.masked_fill(p_zero | q_zero, -math.inf)
    return torch.log_softmax(mixed, dim=-1)


def _power_mean_near_geometric(
    log_p: torch.Tensor, log_q: torch.Tensor, *, k: float, lam: float
) -> torch.Tensor:
    """The power mean for small |k|, written around the geometric mean m = lam·log p +
    (1-lam)·log q so nothing of size O(1) is divided by k:

        log r̃ = m + log1p( lam·expm1(k(1-lam)d) + (1-lam)·expm1(-k·lam·d) ) / k,  d = log p - log q

    The log1p argument is ≥ 0 (weighted AM–GM). Where |k·d| is large the plain log-sum-exp form
    is accurate and the exponentials could overflow, so that form is used there.
    """
    geometric = lam * log_p + (1.0 - lam) * log_q
    d = log_p - log_q
    small = (k * d).abs() < 1.0
    d_small = torch.where(small, d, torch.zeros_like(d))
    series = (
        geometric
        + torch.log1p(
            lam * torch.expm1(k * (1.0 - lam) * d_small)
            + (1.0 - lam) * torch.expm1(-k * lam * d_small)
        )
        / k
    )
    plain = torch.logaddexp(math.log(lam) + k * log_p, math.log1p(-lam) + k * log_q) / k
    return torch.where(small, series, plain)


# --------------------------------------------------------------------------- divergences


def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-entry terms of KL(a‖b) = Σ_v a_v (log a_v - log b_v)."""
    return log_a.exp() * (log_a - log_b)


def cross_entropy_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-entry terms of the cross-entropy H(a, b) = -Σ_v a_v log b_v = KL(a‖b) + H(a)."""
    return -log_a.exp() * log_b


def ab_terms(
    log_a: torch.Tensor, log_b: torch.Tensor, *, ab_alpha: float, ab_beta: float
) -> torch.Tensor:
    """Per-entry terms of the alpha-beta divergence

        D_AB(a‖b) = -1/(α β) · Σ_v ( a^α b^β - α/(α+β) a^(α+β) - β/(α+β) b^(α+β) )

    with (α, β) = (ab_alpha, ab_beta); both and their sum must be non-zero.
    """
    total = ab_alpha + ab_beta
    return (
        torch.exp(ab_alpha * log_a + ab_beta * log_b)
        - (ab_alpha / total) * torch.exp(total * log_a)
        - (ab_beta / total) * torch.exp(total * log_b)
    ) / (-ab_alpha * ab_beta)


# --------------------------------------------------------------------------- per-token loss


def amid_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float,
    lam: float,
    divergence: str = "kl",
    order: str = "pr",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    detach_assistant: bool = False,
    cross_entropy: bool = False,
) -> torch.Tensor:
    """Per-token AMiD divergence `[...]` for logits `[..., V]` (no chunking, no masking).

    `order` picks the arguments: pr → D(p‖r), qr → D(q‖r), rp → D(r‖p), rq → D(r‖q), and
    js → lam·D(p‖r) + (1-lam)·D(q‖r) (each model weighted by its share of the mixture: with
    alpha = -1 the generalized Jensen-Shannon divergence of GKD), with D = KL (`kl`) or the
    alpha-beta divergence (`ab`). With `detach_assistant` the student enters r without gradient
    (TAID's stop-gradient); the student still gets gradient through q in the `qr`/`rq` orders.
    `cross_entropy` (kl only, and only where the first argument carries no student gradient)
    returns H(a, b) = KL(a‖b) + H(a) instead: the same gradient, the value TAID's and DistiLLM's
    code report (TAID's adaptive schedule reads that value). Computed in float32, or float64 if
    either input is float64. Entries where either logit is -inf add 0.
    """
    compute_dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    log_q = torch.log_softmax(student_logits.to(compute_dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(compute_dtype), dim=-1)
    log_r = assistant_logprobs(
        log_p, log_q.detach() if detach_assistant else log_q, alpha=alpha, lam=lam
    )
    has_masked = has_neginf(log_p, log_q)
    masked = torch.isneginf(log_p) | torch.isneginf(log_q) if has_masked else None

    def divergence_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        if has_masked:  # finite stand-ins, so the discarded entries cannot send NaN gradients
            log_a, log_b = log_a.masked_fill(masked, 0.0), log_b.masked_fill(masked, 0.0)
        if cross_entropy:
            return cross_entropy_terms(log_a, log_b)
        if divergence == "kl":
            return kl_terms(log_a, log_b)
        return ab_terms(log_a, log_b, ab_alpha=ab_alpha, ab_beta=ab_beta)

    if order == "js":
        terms = lam * divergence_terms(log_p, log_r) + (1.0 - lam) * divergence_terms(log_q, log_r)
    else:
        log_a, log_b = {
            "pr": (log_p, log_r),
            "qr": (log_q, log_r),
            "rp": (log_r, log_p),
            "rq": (log_r, log_q),
        }[order]
        terms = divergence_terms(log_a, log_b)
    if has_masked:
        terms = terms.masked_fill(masked, 0.0)
    return terms.sum(-1)


def has_closed_form_gradient(settings: AMiDSettings) -> bool:
    """Whether `kl_pr_losses_and_gradient` evaluates these settings (KL(p‖r) with a mixture
    that is neither endpoint, away from the geometric mean's series form, no stop-gradient)."""
    return (settings.divergence == "kl" and settings.order == "pr"
            and not settings.detach_assistant and not settings.cross_entropy
            and 0.0 < settings.lam < 1.0 and abs((1.0 - settings.alpha) / 2.0) >= _SMALL_K)


def kl_pr_losses_and_gradient(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-token KL(p‖r) `[n]` and its gradient with respect to the student's logits `[n, V]`,
    in closed form: what `amid_token_losses` and autograd give for the settings
    `has_closed_form_gradient` accepts, in about half the passes over `[n, V]`.

    With A = log lam + k·log p, B = log(1-lam) + k·log q, M = logaddexp(A, B), log r̃ = M/k and
    log r = log_softmax(log r̃), the loss is Σ_v p_v (log p_v - log r_v), and

        ∂L/∂log r̃_v = r_v·Σp - p_v,    ∂log r̃_v/∂log q_v = w_v = exp(B_v - M_v)

    (w: the student's share of the mixture at v), so with g = (r·Σp - p)·w the gradient with
    respect to the logits z is g - q·Σ_v g_v (through log q = log_softmax(z)). Returns None
    where either distribution has a zero entry: that case is left to autograd.
    """
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    if has_neginf(log_p, log_q):
        return None
    k = (1.0 - alpha) / 2.0
    teacher_share = torch.add(math.log(lam), log_p, alpha=k)
    student_share = torch.add(math.log1p(-lam), log_q, alpha=k)
    mixed = torch.logaddexp(teacher_share, student_share)
    weight = student_share.sub_(mixed).exp_()
    log_r = torch.log_softmax(mixed.div_(k), dim=-1)
    p = log_p.exp()
    losses = (p * (log_p - log_r)).sum(-1)
    grad = log_r.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p).mul_(weight)
    grad.sub_(log_q.exp_().mul_(grad.sum(-1, keepdim=True)))
    return losses, grad


def amid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float,
    lam: float,
    divergence: str = "kl",
    order: str = "pr",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    detach_assistant: bool = False,
    cross_entropy: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The AMiD objective: mean over the masked-in tokens of the per-token divergence.

    `student_logits`, `teacher_logits`: `[..., V]`, any float dtype; `mask`: `[...]` bool, True
    where the token counts (a token-level mean over the whole batch, not a per-sequence mean).
    Tokens are processed in chunks of about `chunk_elements` logits, and the gradient is formed
    chunk by chunk during forward, so extra memory is bounded by one chunk (plus the gradient of
    the inputs). See `amid_token_losses` for the formula and the other arguments.
    """
    settings = AMiDSettings(  # validated once, then passed on whole
        alpha=alpha, lam=lam, divergence=divergence, order=order, ab_alpha=ab_alpha,
        ab_beta=ab_beta, detach_assistant=detach_assistant, cross_entropy=cross_entropy,
    )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (one shared vocabulary)"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits shape without the vocabulary "
            f"dimension, {tuple(student_logits.shape[:-1])}"
        )
    vocab = student_logits.shape[-1]
    rows = mask.reshape(-1).nonzero().squeeze(1)
    total = chunked_token_loss(
        partial(amid_token_losses, **settings.as_kwargs()),
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        rows=rows,
        chunk_rows=rows_per_chunk(vocab, chunk_elements),
    )
    return total / max(rows.numel(), 1)


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class AMiDSettings:
    """One point of the AMiD space: the keyword arguments of `amid_loss`."""

    alpha: float
    lam: float
    divergence: str = "kl"
    order: str = "pr"
    ab_alpha: float = 0.2
    ab_beta: float = 0.7
    detach_assistant: bool = False
    cross_entropy: bool = False

    def __post_init__(self) -> None:
        validate_settings(**self.as_kwargs())

    def as_kwargs(self) -> dict:
        return dict(self.__dict__)


#: Classic distillation objectives as points of the AMiD space (AMID_SPEC §3). Where lam is 0 or 1
#: the assistant is q or p whatever alpha is; alpha = -1 (arithmetic mixture) is set for clarity.
PRESETS: dict[str, AMiDSettings] = {
    "kd": AMiDSettings(alpha=-1.0, lam=0.0, divergence="kl", order="pr"),
    "rkl": AMiDSettings(alpha=-1.0, lam=1.0, divergence="kl", order="qr"),
    "skl": AMiDSettings(alpha=-1.0, lam=0.1, divergence="kl", order="pr"),
    "srkl": AMiDSettings(alpha=-1.0, lam=0.9, divergence="kl", order="qr"),
    # DistiLLM's js_distance (lam=0.9 on the student there): m = 0.1·p + 0.9·q,
    # loss = 0.1·KL(p‖m) + 0.9·KL(q‖m).
    "gkd": AMiDSettings(alpha=-1.0, lam=0.1, divergence="kl", order="js"),
    # TAID: r = softmax(t·z_p + (1-t)·sg(z_q)), loss -Σ r log q. lam is t, which the trainer
    # replaces every step with `taid.TAIDSchedule.t`; 0.4 is TAID's default t_start.
    "taid": AMiDSettings(
        alpha=1.0, lam=0.4, divergence="kl", order="rq", detach_assistant=True,
        cross_entropy=True,
    ),
    "abkd": AMiDSettings(alpha=-1.0, lam=0.0, divergence="ab", order="pr"),
}


def preset(name: str) -> AMiDSettings:
    """The AMiD settings of a classic objective by name (`kd`, `rkl`, `skl`, `srkl`, `gkd`,
    `taid`, `abkd`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
