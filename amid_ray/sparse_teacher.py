"""The teacher known sparsely: its top-k log-probabilities, their token ids, and the tail mass.

At one position the teacher distribution p over a vocabulary of V tokens is stored as

    S      the k ids of its largest probabilities (the head),
    log p_v for v in S,
    log T  with T = Σ_{v ∉ S} p_v, the mass of the other m = V - k tokens (the tail),

computed from the full float32 log-softmax (T as a log-sum-exp over the tail, not 1 - Σ_S p_v,
which cancels catastrophically when the head holds nearly all the mass).

Reconstruction. The objective sees the dense distribution

    p̂_v = p_v            for v in S,
    p̂_v = T / m          for v ∉ S      (the tail spread uniformly),

and with T = 0 the tail entries are -inf, which the AMiD loss masks (they add 0). p̂ is a
distribution with the teacher's exact head and exact tail mass. Uniform is the maximum-entropy
spread of a known mass, needs one number per position, is the same whatever α, λ, divergence
and order a trial uses, and every p̂_v = T/m lies in the range [0, min_S p] that the true tail
values occupy, so p̂ is itself a distribution the cache cannot tell apart from the truth. Hence:

- Exact at k = V: there is no tail, p̂ = p, and loss and gradients equal the live teacher's.
- Error bound for k < V (derived in `sparse_teacher_bound`): with π = min_S p_v, let C be the
  set of distributions that agree with p on S, have tail mass T and every tail value in [0, π].
  Both p and p̂ lie in C, so for every token |ℓ(p̂) - ℓ(p)| ≤ sup_C ℓ - inf_C ℓ, and
  `sparse_teacher_bound.loss_interval` computes an interval [ℓ_lo, ℓ_hi] ⊇ ℓ(C) per token from
  the cached values and the student alone. For order `pr` with the KL divergence it reduces to

      |ℓ(p̂) - ℓ(p)| ≤ T·(ρ + log(z_hi/T)) + log((Z_S + z_hi)/(Z_S + z_lo)),
      ρ = max_{v∉S} log(π / M(π, q_v)),

  with M the unnormalised α-mixture, Z_S its (exact) head sum and [z_lo, z_hi] an interval
  for its tail sum, of width at most λ^(1/κ)·T for α ≤ -1 (κ = (1-α)/2), O(T^κ) for
  -1 < α < 1 and O(T^λ) for α ≥ 1: the error vanishes as the head takes the teacher's mass,
  like T·log(1/T) for α ≤ -1 and more slowly above. The batch objective, a token mean, is off
  by at most the mean of the per-token bounds. Where the loss weighs log p at single tail
  tokens (KL: `rp` with α < 1 or λ = 0, `qr` and `js` with α ≥ 1 or λ = 1) no finite bound
  exists in terms of the cache (the exact loss grows without limit as one tail value goes to
  0) and the bound is inf (as it is for `rp` at α = 1, where one exists but is not derived).
  The gradient is not bounded here, only measured (benchmarks/teacher_cache_fidelity.py).
- Storage: log-probs kept in float16 / bfloat16 add their rounding (about |log p|·2^-11 and
  |log p|·2^-8 in log space); the bound assumes float32 storage. The loss applies log_softmax
  to what `SparseTeacherRows.logits` returns, so the rounded head is renormalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopKRows:
    """The teacher at n positions, sparsely: `logprobs` [n, k] (float16/bfloat16/float32, in
    descending order per row), `ids` [n, k] (int32 or int64), `tail_logmass` [n] (float32,
    log of the mass outside the k ids; -inf where there is none)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    tail_logmass: torch.Tensor

    def __post_init__(self) -> None:
        n, k = self.logprobs.shape
        if self.ids.shape != (n, k) or self.tail_logmass.shape != (n,):
            raise ValueError(
                f"TopKRows parts disagree: logprobs {tuple(self.logprobs.shape)}, ids "
                f"{tuple(self.ids.shape)}, tail_logmass {tuple(self.tail_logmass.shape)}; "
                "expected [n, k], [n, k], [n]"
            )

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    @property
    def top_k(self) -> int:
        return self.logprobs.shape[1]

    def select(self, index: torch.Tensor) -> TopKRows:
        return TopKRows(self.logprobs.index_select(0, index), self.ids.index_select(0, index),
                        self.tail_logmass.index_select(0, index))

    def to(self, device: torch.device | str) -> TopKRows:
        return TopKRows(self.logprobs.to(device), self.ids.to(device),
                        self.tail_logmass.to(device))

    @staticmethod
    def cat(parts: Sequence[TopKRows]) -> TopKRows:
        if not parts:
            raise ValueError("cannot concatenate an empty list of TopKRows")
        return TopKRows(torch.cat([p.logprobs for p in parts]), torch.cat([p.ids for p in parts]),
                        torch.cat([p.tail_logmass for p in parts]))


def sparsify(logits: torch.Tensor, top_k: int) -> TopKRows:
    """The top-k of `log_softmax(logits)` ([n, V], computed in float32 or float64) per row, with
    int64 ids and the exact tail log-mass logsumexp_{v ∉ top-k} log p_v (-inf when k = V)."""
    vocab = logits.shape[-1]
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}] (the vocabulary size), got {top_k}")
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    values, ids = logprobs.topk(top_k, dim=-1)
    tail = logprobs.scatter(-1, ids, -math.inf).logsumexp(-1)
    return TopKRows(values, ids, tail)


def reconstruct_logprobs(rows: TopKRows, vocab_size: int) -> torch.Tensor:
    """log p̂ as [n, V] float32 (float64 if stored so): stored log-probs at the stored ids,
    log T - log(V - k) everywhere else (-inf where T = 0)."""
    tail_entries = vocab_size - rows.top_k
    if tail_entries < 0:
        raise ValueError(f"top_k {rows.top_k} exceeds the vocabulary size {vocab_size}")
    dtype = torch.promote_types(rows.logprobs.dtype, torch.float32)
    if tail_entries == 0:
        fill = torch.full_like(rows.tail_logmass, -math.inf, dtype=dtype)
    else:
        fill = rows.tail_logmass.to(dtype) - math.log(tail_entries)
    dense = fill.unsqueeze(1).expand(len(rows), vocab_size).clone()
    return dense.scatter_(1, rows.ids.long(), rows.logprobs.to(dtype))


class SparseTeacherRows:
    """A micro-batch's teacher from cached `TopKRows`: implements `logits(rows)` for the flat
    positions of a `[batch, length]` batch that predict a response token.

    `entries[b]` holds example b's rows in position order, one per True of `mask[b]` (the
    response mask of the collated batch), so the concatenation lines up with the flattened
    mask's True positions in order.
    """

    def __init__(self, entries: Sequence[TopKRows], mask: torch.Tensor, vocab_size: int) -> None:
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a [batch, length] bool tensor, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        if len(entries) != mask.shape[0]:
            raise ValueError(f"{len(entries)} cached examples for a batch of {mask.shape[0]}")
        counts = mask.sum(1).tolist()
        wrong = [(b, len(e), c) for b, (e, c) in enumerate(zip(entries, counts, strict=True))
                 if len(e) != c]
        if wrong:
            b, cached, expected = wrong[0]
            raise ValueError(
                f"batch example {b} has {expected} positions predicting a response token but "
                f"its cached teacher has {cached} rows ({len(wrong)} example(s) disagree): the "
                "cache was built from differently encoded data"
            )
        self.vocab_size = vocab_size
        self.mask_shape = tuple(mask.shape)
        self.rows = TopKRows.cat(entries).to(mask.device)
        flat = mask.reshape(-1).nonzero().squeeze(1)
        self._row_of_position = torch.full((mask.numel(),), -1, dtype=torch.long,
                                           device=mask.device)
        self._row_of_position[flat] = torch.arange(flat.numel(), device=mask.device)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Reconstructed teacher log-probabilities `[len(rows), V]` (float32) at flat positions
        `rows`; every position asked for must predict a response token."""
        index = self._row_of_position[rows]
        missing = index < 0
        if bool(missing.any()):
            raise ValueError(
                f"flat positions {rows[missing][:8].tolist()} of the {self.mask_shape} batch do "
                "not predict a response token; the cached teacher holds only positions that do"
            )
        return reconstruct_logprobs(self.rows.select(index), self.vocab_size)

    def dense(self) -> torch.Tensor:
        """`[batch, length, V]` teacher log-probs for `losses.amid_loss`: reconstructed at the
        response-predicting positions, 0 (read by nothing: amid_loss reads masked rows only)
        elsewhere. Small batches only: it holds the whole tensor."""
        out = torch.zeros(math.prod(self.mask_shape), self.vocab_size,
                          device=self._row_of_position.device)
        flat = (self._row_of_position >= 0).nonzero().squeeze(1)
        out[flat] = self.logits(flat)
        return out.reshape(*self.mask_shape, self.vocab_size)
