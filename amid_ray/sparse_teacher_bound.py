"""A certified interval for the AMiD loss when the teacher is known only by its top-k and tail mass.

Per position the cache keeps the head S (k ids) with p_v exact, the tail mass T = Σ_{v∉S} p_v, and
(implicitly) π = min_S p_v; the tail R has m = V - k tokens. Every tail value lies in [0, π]. Let

    C = { distributions with p on S as cached, Σ_R p_v = T, 0 ≤ p_v ≤ π on R }.

The true teacher and the reconstruction p̂ (the tail spread uniformly, p̂_v = T/m ≤ π) both lie in
C. For a fixed student q, `loss_interval` returns per token [ℓ_lo, ℓ_hi] ⊇ {ℓ(p') : p' ∈ C}, so

    |ℓ(p̂) - ℓ(p)| ≤ max(ℓ_hi - ℓ(p̂), ℓ(p̂) - ℓ_lo)               (`loss_error_bound`)

and the token-mean objective is off by at most the mean of that. At k = V, or T = 0, C is one
point, and in a degenerate setting (loss ≡ 0) ℓ is constant: the bound is 0. Below, each sum
over the tail is bounded separately from elementwise facts (valid, somewhat loose: the worst
tail for one sum need not be the worst for another). Sums over the assistant move with its
tail sum Z_R, so Z_R's range is cut into `Z_PIECES` pieces over which Z = Z_S + Z_R grows
geometrically, and everything is bounded per piece (the true Z_R lies in one; the interval is
the union); within a piece the normaliser Z, which enters every term, is optimised exactly
(each loss is a one-turning-point function of Z).

The mixture. κ = (1-α)/2, M(x, y) = (λx^κ + (1-λ)y^κ)^(1/κ) (x^λ y^(1-λ) at κ = 0; y at λ = 0, x
at λ = 1) is the unnormalised assistant, r = M(p, q)/Z, Z = Z_S + Z_R (head and tail sums). M is
non-decreasing in each argument and 1-homogeneous, so x/M(x, y) = 1/M(1, y/x) rises with x and
y/M(x, y) falls. Z_S is exact; Z_R ∈ [z_lo, z_hi], the intersection of
    Σ_R M(0, q_v) ≤ Z_R ≤ Σ_R M(π, q_v)                          (monotonicity, p_v ∈ [0, π])
with, for Q = Σ_R q_v, c_p = λ^(1/κ), c_q = (1-λ)^(1/κ):
    κ ≥ 1:     max(c_q Q, c_p T) ≤ Z_R ≤ c_q Q + c_p T            (Minkowski: ‖·‖_κ ≤ ‖·‖_1)
    0 < κ < 1: Z_R ≤ c_q Q + (λ/κ)(λT + (1-λ)Q)^(1-κ) T^κ,
        from M(x,y) - M(0,y) ≤ (1/κ) M(x,y)^(1-κ) λx^κ (t ↦ t^(1/κ) is convex), M ≤ λx + (1-λ)y
        (power-mean inequality) and Hölder with exponents 1/(1-κ), 1/κ;
    κ ≤ 0:     Z_R ≤ T^λ Q^(1-λ)                                   (M_κ ≤ M_0, then Hölder);
    κ ≤ 1:     x ↦ M(x, y) is concave, so Σ_R M(p_v, q_v) is smallest at a vertex of C:
               Z_R ≥ Σ_R M(0, q_v) + the ⌊T/π⌋ smallest of M(π, q_v) - M(0, q_v).

KL. With ã, b̃ the unnormalised arguments (p, q or M(p, q)), D(a‖r) = Σ a log(a/M) + log Z and
D(r‖b) = (Σ M log(M/b))/Z - log Z. The head sum is exact; the tail sum G = Σ_R ã log(ã/b̃) obeys
    G ≥ m_a log(m_a/m_b)            (log-sum inequality; m_a, m_b the tail masses: T, Q or Z_R)
    G ≤ m_a · ρ,  ρ = sup over tail entries and x ∈ [0, π] of log(ã/b̃):
        pr: log(π/M(π, q_v))   qr: log(q_v/M(0, q_v))   rq: log(M(π, q_v)/q_v)
        rp: lim_{x→0} log(M(x, q)/x) = (1/κ)·log λ for κ < 0, 0 at λ = 1, +inf otherwise.
For `pr` this gives the closed form quoted in `sparse_teacher`. For `rp` with α < 1 or λ = 0
and `qr` with α ≥ 1 or λ = 1, ρ = +inf and no finite bound exists: the exact loss grows without
limit as one tail probability goes to 0. `rp` at α = 1 also gets inf (a finite bound exists
there but is not derived); `js` = λ·pr + (1-λ)·qr inherits `qr`'s. D(r‖b) = N/Z - log Z with
N in its interval is rising up to Z = -N and falling after, which gives its exact range over
Z. With `cross_entropy` the entropy of the first
argument is added: Σ_R p log p ∈ [T log(T/m), T log π], and Σ_R M log M ∈
[Z_R log(Z_R/m), Z_R · max_v log M(π, q_v)] (H(r) = log Z - (Σ M log M)/Z).

AB (ab_alpha = a > 0, ab_beta = b > 0, s = a + b). D = -X/(ab) + Y_a/(bs) + Y_b/(as) with
X = Σ a^a b^b, Y = Σ (·)^s, the normalised argument r = M/Z contributing Z^(-its exponent), so
D = const - A·Z^(-e) + B·Z^(-s) (e < s), which falls to one minimum and rises: exact over Z.
Tail pieces: Σ_R p^s ∈ [T π^(s-1), m^(1-s) T^s] for s ≤ 1 (p^s ≥ p·π^(s-1); concavity) and the
reverse for s ≥ 1; Σ_R M^s ∈ [max(z_lo^s, Σ M(0,q)^s), min(m^(1-s) z_hi^s, Σ M(π,q)^s)] for
s ≤ 1 (resp. [max(m^(1-s) z_lo^s, Σ M(0,q)^s), min(z_hi^s, Σ M(π,q)^s)]); X_R between its
entrywise values at x = 0 and x = π, and below Hölder's (Σ ã^s)^(a/s) (Σ b̃^s)^(b/s) and, for
s ≤ 1, m_a^a m_b^b m^(1-s). Negative exponents are not covered (a ValueError).

Assumes finite teacher logits (no tail value exactly 0, which the loss would mask) and exact
(float32) storage. Computed in float64, `chunk_elements` entries at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from amid_ray.chunked_loss import DEFAULT_CHUNK_ELEMENTS, rows_per_chunk
from amid_ray.losses import AMiDSettings, amid_token_losses, is_degenerate
from amid_ray.sparse_teacher import TopKRows, reconstruct_logprobs

Interval = tuple[torch.Tensor, torch.Tensor]
#: A loss interval as a function of the range of Z_R (the assistant's unnormalised tail sum).
Bound = Callable[[Interval], Interval]

#: Pieces Z_R's range is cut into: sums that move together with Z_R are bounded per piece.
Z_PIECES = 32

_F64 = torch.float64


def loss_interval(
    student_logits: torch.Tensor,
    teacher: TopKRows,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    **settings,
) -> Interval:
    """Per-token `(lo, hi)` (float64, [n]) containing the AMiD loss of every teacher consistent
    with the cached `teacher` rows, for student logits `[n, V]`. `settings` are
    `losses.AMiDSettings`' fields (`amid_loss`'s keyword arguments). See the module docstring.
    `detach_assistant` changes gradients only, never the value."""
    lo, hi, _ = _intervals(student_logits, teacher, AMiDSettings(**settings), chunk_elements)
    return lo, hi


def loss_error_bound(student_logits: torch.Tensor, teacher: TopKRows, *,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, **settings) -> torch.Tensor:
    """Per-token bound [n] on |ℓ(p̂) - ℓ(p)| for the reconstruction p̂ of `teacher`:
    max(ℓ_hi - ℓ(p̂), ℓ(p̂) - ℓ_lo) with `loss_interval`'s interval (inf where none is finite).
    Takes `loss_interval`'s keyword arguments."""
    lo, hi, estimate = _intervals(student_logits, teacher, AMiDSettings(**settings),
                                  chunk_elements)
    return torch.maximum(hi - estimate, estimate - lo)


def _intervals(student_logits: torch.Tensor, teacher: TopKRows, settings: AMiDSettings,
               chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, hi, ℓ(p̂)) per token, chunk by chunk."""
    if settings.divergence == "ab" and (settings.ab_alpha <= 0 or settings.ab_beta <= 0):
        raise ValueError(f"the sparse-teacher bound is derived for positive ab_alpha and ab_beta, "
                         f"got {settings.ab_alpha!r} and {settings.ab_beta!r}")
    if student_logits.dim() != 2 or student_logits.shape[0] != len(teacher):
        raise ValueError(f"student_logits must be [{len(teacher)}, V] (one row per cached row), "
                         f"got {tuple(student_logits.shape)}")
    value_settings = settings.as_kwargs()
    del value_settings["detach_assistant"]  # gradients only
    chunk = rows_per_chunk(student_logits.shape[1], chunk_elements)
    parts = [torch.zeros((3, 0), dtype=_F64, device=student_logits.device)]
    for start in range(0, len(teacher), chunk):
        index = torch.arange(start, min(start + chunk, len(teacher)), device=teacher.ids.device)
        parts.append(torch.stack(_chunk_interval(student_logits[start : start + chunk],
                                                 teacher.select(index), **value_settings)))
    lo, hi, estimate = torch.cat(parts, dim=1)
    return lo, hi, estimate


# --------------------------------------------------------------------------- per-chunk facts


@dataclass
class _Facts:
    """What the cache and the student say about C, for a chunk of rows (float64)."""

    kappa: float
    lam: float
    tail: torch.Tensor  # [c, V] bool
    log_p: torch.Tensor  # [c, V] the reconstruction; exact on the head
    log_q: torch.Tensor  # [c, V]
    log_r_head: torch.Tensor  # [c, V] log M(p, q), meaningful on the head
    log_m_pi: torch.Tensor  # [c, V] log M(π, q_v)
    log_m_0: torch.Tensor  # [c, V] log M(0, q_v)
    mass_t: torch.Tensor  # [c] T
    log_pi: torch.Tensor  # [c] log π
    mass_q: torch.Tensor  # [c] Q
    tail_count: int  # m
    z_head: torch.Tensor  # [c] Z_S
    z_tail: Interval  # Z_R ∈ [lo, hi]: what every C member's tail sum satisfies

    def head_sum(self, values: torch.Tensor) -> torch.Tensor:
        return torch.where(self.tail, 0.0, values).sum(-1)

    def tail_sum(self, values: torch.Tensor) -> torch.Tensor:
        return torch.where(self.tail, values, 0.0).sum(-1)

    def tail_max(self, values: torch.Tensor) -> torch.Tensor:
        return torch.where(self.tail, values, -math.inf).amax(-1)

    def z(self, z_tail: Interval) -> Interval:
        return self.z_head + z_tail[0], self.z_head + z_tail[1]

    def mass(self, kind: str, z_tail: Interval) -> Interval:
        """Tail mass of the unnormalised argument `kind` (T, Q or Z_R)."""
        return {"p": (self.mass_t, self.mass_t), "q": (self.mass_q, self.mass_q),
                "r": z_tail}[kind]

    def log_head(self, kind: str) -> torch.Tensor:
        return {"p": self.log_p, "q": self.log_q, "r": self.log_r_head}[kind]


def _log_mix(log_x: torch.Tensor, log_y: torch.Tensor, kappa: float, lam: float) -> torch.Tensor:
    """log M(x, y), elementwise, -inf arguments allowed."""
    if lam == 0.0:
        return log_y.expand(torch.broadcast_shapes(log_x.shape, log_y.shape))
    if lam == 1.0:
        return log_x.expand(torch.broadcast_shapes(log_x.shape, log_y.shape))
    if kappa == 0.0:
        return lam * log_x + (1.0 - lam) * log_y
    return torch.logaddexp(math.log(lam) + kappa * log_x,
                           math.log1p(-lam) + kappa * log_y) / kappa


def _facts(student_logits: torch.Tensor, teacher: TopKRows, alpha: float, lam: float) -> _Facts:
    vocab = student_logits.shape[1]
    kappa = (1.0 - alpha) / 2.0
    log_q = torch.log_softmax(student_logits.to(_F64), -1)
    rows = TopKRows(teacher.logprobs.to(_F64), teacher.ids.long(), teacher.tail_logmass.to(_F64))
    log_p = reconstruct_logprobs(rows, vocab).to(log_q.device)
    tail = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, rows.ids.to(log_q.device), False)
    log_pi = rows.logprobs.amin(-1).to(log_q.device).unsqueeze(1)
    mass_t = rows.tail_logmass.to(log_q.device).exp()
    mass_q = torch.where(tail, log_q.exp(), 0.0).sum(-1)
    log_r_head = _log_mix(log_p, log_q, kappa, lam)
    log_m_pi = _log_mix(log_pi, log_q, kappa, lam)
    log_m_0 = _log_mix(torch.full_like(log_pi, -math.inf), log_q, kappa, lam)
    z_head = torch.where(tail, 0.0, log_r_head.exp()).sum(-1)
    z_lo = torch.where(tail, log_m_0.exp(), 0.0).sum(-1)
    z_hi = torch.where(tail, log_m_pi.exp(), 0.0).sum(-1)
    if lam in (0.0, 1.0):  # M is q or p: the tail sum is Q or T exactly
        exact = mass_q if lam == 0.0 else mass_t
        z_lo, z_hi = exact, exact
    elif kappa > 0:
        c_p, c_q = lam ** (1 / kappa), (1 - lam) ** (1 / kappa)
        z_lo = torch.maximum(z_lo, torch.maximum(c_q * mass_q, c_p * mass_t))
        arithmetic = lam * mass_t + (1 - lam) * mass_q
        if kappa >= 1:
            z_hi = torch.minimum(z_hi, c_q * mass_q + c_p * mass_t)
        else:
            holder = c_q * mass_q + (lam / kappa) * arithmetic ** (1 - kappa) * mass_t**kappa
            z_hi = torch.minimum(z_hi, torch.minimum(arithmetic, holder))
    else:
        z_hi = torch.minimum(z_hi, mass_t**lam * mass_q ** (1 - lam))
    if 0.0 < lam < 1.0 and kappa <= 1:
        z_lo = torch.maximum(z_lo, _vertex_minimum(tail, log_m_pi, log_m_0, mass_t / log_pi.exp()
                                                   .squeeze(1)))
    return _Facts(kappa, lam, tail, log_p, log_q, log_r_head, log_m_pi, log_m_0, mass_t,
                  log_pi.squeeze(1), mass_q, vocab - teacher.top_k, z_head, (z_lo, z_hi))


def _vertex_minimum(tail: torch.Tensor, log_m_pi: torch.Tensor, log_m_0: torch.Tensor,
                    piles: torch.Tensor) -> torch.Tensor:
    """A lower bound on Z_R for κ ≤ 1, where x ↦ M(x, y) is concave: the minimum over C is at a
    vertex, ⌊T/π⌋ tail values at π and at most one other non-zero, so Z_R ≥ Σ_R M(0, q_v) plus
    the ⌊T/π⌋ smallest increments M(π, q_v) - M(0, q_v)."""
    base = torch.where(tail, log_m_0.exp(), 0.0).sum(-1)
    increments = torch.where(tail, log_m_pi.exp() - log_m_0.exp(), math.inf).sort(-1).values
    # Rounding may only lower the count: fewer piles at π is still a lower bound.
    count = torch.floor(piles * (1 - 1e-9)).long().clamp(0, int(tail.sum(-1).min()))
    running = torch.cat([torch.zeros_like(base).unsqueeze(1),
                         increments.nan_to_num(posinf=0.0).cumsum(-1)], dim=1)
    return base + running.gather(1, count.unsqueeze(1)).squeeze(1)


# --------------------------------------------------------------------------- interval pieces


def _add(*intervals: Interval) -> Interval:
    return sum(i[0] for i in intervals), sum(i[1] for i in intervals)


def _scale(c: float, interval: Interval) -> Interval:
    lo, hi = c * interval[0], c * interval[1]
    return (lo, hi) if c >= 0 else (hi, lo)


def _ratio_minus_log(numerator: Interval, z: Interval) -> Interval:
    """Range of h(Z) = N/Z - log Z over N in `numerator`, Z in `z` (Z > 0). h' = -(N + Z)/Z²:
    for fixed N, h rises up to Z = -N and falls after, so its minimum is at an end of `z` and
    its maximum at -N clamped into `z`."""
    def h(n: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
        return n / zz - zz.log()

    low = torch.minimum(h(numerator[0], z[0]), h(numerator[0], z[1]))
    high = h(numerator[1], torch.minimum(torch.maximum(-numerator[1], z[0]), z[1]))
    return low, high


def _power_difference_range(pull: Interval, push: Interval, e: float, s: float,
                            z: Interval) -> Interval:
    """Range of g(Z) = -A·Z^(-e) + B·Z^(-s) (0 < e < s; A in `pull`, B in `push`, both ≥ 0)
    over Z in `z`. g' = Z^(-s-1)(e·A·Z^(s-e) - s·B): g falls up to Z* = (sB/(eA))^(1/(s-e))
    and rises after, so its minimum is at Z* clamped into `z` and its maximum at an end."""
    def g(pull_: torch.Tensor, push_: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
        return -pull_ * zz ** (-e) + push_ * zz ** (-s)

    turning = (s * push[0] / (e * pull[1])) ** (1 / (s - e))  # nan only where A = B = 0: g ≡ 0
    turning = torch.where(turning.isnan(), z[0], turning)
    low = g(pull[1], push[0], torch.minimum(torch.maximum(turning, z[0]), z[1]))
    high = torch.maximum(g(pull[0], push[1], z[0]), g(pull[0], push[1], z[1]))
    return low, high


def _times_mass(rho: torch.Tensor, mass: Interval) -> torch.Tensor:
    """sup of rho·x over x in `mass` (x ≥ 0), 0 where the mass is 0 whatever rho is."""
    lo, hi = (torch.where(m == 0, 0.0, rho * m) for m in mass)
    return torch.maximum(lo, hi)


def _min_xlogx_over_y(mass_x: Interval, y: torch.Tensor) -> torch.Tensor:
    """min over x in `mass_x` of x·log(x/y): convex in x, lowest at y/e."""
    x = torch.minimum(torch.maximum(y / math.e, mass_x[0]), mass_x[1])
    return torch.xlogy(x, x) - torch.xlogy(x, y)


def _log_ratio_sup(facts: _Facts, order: str) -> torch.Tensor:
    """ρ: sup over tail entries and tail values in [0, π] of log(ã/b̃)."""
    if order == "pr":
        return facts.tail_max(facts.log_pi.unsqueeze(1) - facts.log_m_pi)
    if order == "qr":
        return facts.tail_max(facts.log_q - facts.log_m_0)
    if order == "rq":
        return facts.tail_max(facts.log_m_pi - facts.log_q)
    if facts.lam == 1.0:  # rp with M = p
        limit = 0.0
    elif facts.kappa < 0 and facts.lam > 0.0:
        limit = math.log(facts.lam) / facts.kappa
    else:
        limit = math.inf
    return torch.full_like(facts.mass_t, limit)


def _kl_interval(facts: _Facts, order: str) -> Bound:
    a_kind, b_kind = order[0], order[1]
    log_a, log_b = facts.log_head(a_kind), facts.log_head(b_kind)
    head = facts.head_sum(log_a.exp() * (log_a - log_b))
    rho = _log_ratio_sup(facts, order)

    def bound(z_tail: Interval) -> Interval:
        mass_a, mass_b = facts.mass(a_kind, z_tail), facts.mass(b_kind, z_tail)
        numerator = (head + _min_xlogx_over_y(mass_a, mass_b[1]),
                     head + _times_mass(rho, mass_a))
        z_lo, z_hi = facts.z(z_tail)
        if a_kind == "r":  # (Σ M log(M/b))/Z - log Z
            return _ratio_minus_log(numerator, (z_lo, z_hi))
        return numerator[0] + z_lo.log(), numerator[1] + z_hi.log()

    return bound


def _entropy_interval(facts: _Facts, kind: str) -> Bound:
    """H of the first argument (p or r), for `cross_entropy`."""
    t, m = facts.mass_t, facts.tail_count
    if kind == "p":
        head = facts.head_sum(facts.log_p.exp() * facts.log_p)
        fixed = (-head - t * facts.log_pi, -head - torch.xlogy(t, t / m))
        return lambda z_tail: fixed
    head = facts.head_sum(facts.log_r_head.exp() * facts.log_r_head)
    rho = facts.tail_max(facts.log_m_pi)

    def bound(z_tail: Interval) -> Interval:
        numerator = (head + _min_xlogx_over_y(z_tail, torch.full_like(t, float(m))),
                     head + _times_mass(rho, z_tail))
        ratio = _ratio_minus_log(numerator, facts.z(z_tail))  # H(r) = -(that)
        return -ratio[1], -ratio[0]

    return bound


def _power_sum(facts: _Facts, kind: str, e: float) -> Bound:
    """Σ over the tail of the unnormalised argument to the power e > 0, given Z_R's range."""
    m, t = facts.tail_count, facts.mass_t
    if kind == "q":
        exact = facts.tail_sum((e * facts.log_q).exp())
        return lambda z_tail: (exact, exact)
    if kind == "p":
        spread, peaked = m ** (1 - e) * t**e, t * (facts.log_pi * (e - 1)).exp()
        fixed = (peaked, spread) if e <= 1 else (spread, peaked)
        return lambda z_tail: fixed
    low = facts.tail_sum((e * facts.log_m_0).exp())
    high = facts.tail_sum((e * facts.log_m_pi).exp())

    def bound(z_tail: Interval) -> Interval:
        z_lo, z_hi = z_tail
        if e <= 1:
            return torch.maximum(low, z_lo**e), torch.minimum(high, m ** (1 - e) * z_hi**e)
        return torch.maximum(low, m ** (1 - e) * z_lo**e), torch.minimum(high, z_hi**e)

    return bound


def _entry_bounds(facts: _Facts, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry log lower and upper values of an argument on the tail (x ∈ [0, π])."""
    if kind == "q":
        return facts.log_q, facts.log_q
    if kind == "p":
        return torch.full_like(facts.log_q, -math.inf), facts.log_pi.unsqueeze(1).expand_as(
            facts.log_q)
    return facts.log_m_0, facts.log_m_pi


def _ab_interval(facts: _Facts, order: str, a: float, b: float) -> Bound:
    s = a + b
    a_kind, b_kind = order[0], order[1]
    log_a, log_b = facts.log_head(a_kind), facts.log_head(b_kind)
    tail_a, tail_b = _power_sum(facts, a_kind, s), _power_sum(facts, b_kind, s)
    (a_lo, a_hi), (b_lo, b_hi) = _entry_bounds(facts, a_kind), _entry_bounds(facts, b_kind)
    cross_entry = (facts.tail_sum((a * a_lo + b * b_lo).exp()),
                   facts.tail_sum((a * a_hi + b * b_hi).exp()))
    head_cross = facts.head_sum((a * log_a + b * log_b).exp())
    head_a, head_b = facts.head_sum((s * log_a).exp()), facts.head_sum((s * log_b).exp())
    # D = Y_other/(·s) - Z^(-e)·X/(ab) + Z^(-s)·Y_r/(·s), e the exponent of r in X.
    exponent, weight_a, weight_b = (a if a_kind == "r" else b), 1 / (b * s), 1 / (a * s)

    def bound(z_tail: Interval) -> Interval:
        power_a, power_b = tail_a(z_tail), tail_b(z_tail)
        cross_hi = torch.minimum(cross_entry[1],
                                 power_a[1] ** (a / s) * power_b[1] ** (b / s))
        if s <= 1:
            cross_hi = torch.minimum(cross_hi, facts.mass(a_kind, z_tail)[1] ** a
                                     * facts.mass(b_kind, z_tail)[1] ** b
                                     * facts.tail_count ** (1 - s))
        cross = (head_cross + cross_entry[0], head_cross + cross_hi)
        power_a = (head_a + power_a[0], head_a + power_a[1])
        power_b = (head_b + power_b[0], head_b + power_b[1])
        (power_r, weight_r), (power_other, weight_other) = (
            ((power_a, weight_a), (power_b, weight_b)) if a_kind == "r"
            else ((power_b, weight_b), (power_a, weight_a)))
        return _add(_scale(weight_other, power_other),
                    _power_difference_range(_scale(1 / (a * b), cross),
                                            _scale(weight_r, power_r), exponent, s,
                                            facts.z(z_tail)))

    return bound


def _order_interval(facts: _Facts, order: str, divergence: str, ab_alpha: float,
                    ab_beta: float, cross_entropy: bool) -> Bound:
    if order == "js":
        parts = [_order_interval(facts, part, divergence, ab_alpha, ab_beta, cross_entropy)
                 for part in ("pr", "qr")]
        return lambda z_tail: _add(_scale(facts.lam, parts[0](z_tail)),
                                   _scale(1 - facts.lam, parts[1](z_tail)))
    if divergence == "ab":
        return _ab_interval(facts, order, ab_alpha, ab_beta)
    kl = _kl_interval(facts, order)
    if not cross_entropy:
        return kl
    entropy = _entropy_interval(facts, order[0])
    return lambda z_tail: _add(kl(z_tail), entropy(z_tail))


def _pieces(z_head: torch.Tensor, z_tail: Interval, count: int) -> list[Interval]:
    """`z_tail` cut into `count` consecutive pieces on which Z = Z_S + Z_R grows by the same
    factor: a tail sum bounded by c·Z_R^e at a piece's top, divided by Z^e at its bottom, is
    then at most c times that factor^e (on an even cut it is unbounded when Z_S ≪ Z_R)."""
    low, high = z_head + z_tail[0], z_head + z_tail[1]
    steps = torch.linspace(0.0, 1.0, count + 1, dtype=_F64, device=low.device).unsqueeze(1)
    points = low * (high / low) ** steps - z_head
    points[0], points[-1] = z_tail  # exactly the ends, whatever the rounding
    return [(points[i], points[i + 1]) for i in range(count)]


def _chunk_interval(student_logits: torch.Tensor, teacher: TopKRows, *, alpha: float, lam: float,
                    divergence: str, order: str, ab_alpha: float, ab_beta: float,
                    cross_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    facts = _facts(student_logits, teacher, alpha, lam)
    bound = _order_interval(facts, order, divergence, ab_alpha, ab_beta, cross_entropy)
    # The true Z_R lies in one piece, and each piece's interval holds for Z_R in that piece.
    pieces = _pieces(facts.z_head, facts.z_tail, Z_PIECES)
    lows, highs = zip(*(bound(piece) for piece in pieces), strict=True)
    lo, hi = torch.stack(lows).amin(0), torch.stack(highs).amax(0)
    estimate = amid_token_losses(student_logits.to(_F64), facts.log_p, alpha=alpha, lam=lam,
                                 divergence=divergence, order=order, ab_alpha=ab_alpha,
                                 ab_beta=ab_beta, cross_entropy=cross_entropy)
    # No tail (k = V) or no tail mass: C is the reconstruction itself; a degenerate setting's
    # loss is 0 whatever the teacher.
    exact = (facts.mass_t == 0) | (facts.tail_count == 0) | is_degenerate(order, lam)
    return torch.where(exact, estimate, lo), torch.where(exact, estimate, hi), estimate
