"""Fidelity of the AMiD objective from a cached top-k teacher, on real logits.

Teacher SmolLM2-135M-Instruct (the shipped GGUF), student derived from it (every
`--keep-every`-th layer), `--examples` Dolly prompts encoded as the worker encodes them. At every
response-predicting position the exact objective (live teacher logits) is compared with the one
from the sparse teacher (top-k log-probs, ids and tail mass; the tail spread uniformly):

    loss rel. error  |L_k - L| / L                        (token mean, order --order, λ = --lam)
    grad cosine      cos(∂L_k/∂z, ∂L/∂z) over the student logits of all positions
    bound / loss     mean per-token certified bound (sparse_teacher_bound) / L

for k in --top-k, α in --alphas, both divergences, with float32 storage; then the same at one k
for each storage dtype; then the cache size per million response tokens for each k and dtype
(from the layout, checked against one cache built with `build_cache`). Ends with one JSON line.

Run: `python benchmarks/teacher_cache_fidelity.py [--examples 16] [--top-k 16 64 256]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

from amid_ray.data import TrainingCollator, encode_example, load_examples, response_mask
from amid_ray.losses import ORDERS, amid_loss
from amid_ray.models import derive_student, freeze_teacher, load_causal_lm, smollm2_gguf_path
from amid_ray.sparse_teacher import TopKRows, reconstruct_logprobs, sparsify
from amid_ray.sparse_teacher_bound import loss_error_bound
from amid_ray.teacher_cache import (
    STORAGE_DTYPES,
    build_cache,
    cache_identity,
    teacher_fingerprint,
)

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "dolly_valid.jsonl"


def response_logits(teacher, student, encoded, pad_token_id: int, batch_size: int):
    """Teacher and student logits [N, V] (float32) at every response-predicting position."""
    collate = TrainingCollator(pad_token_id)
    teacher_rows, student_rows = [], []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size])
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mask = response_mask(batch["labels"])[0]
            teacher_rows.append(teacher(**inputs).logits[mask].float())
            student_rows.append(student(**inputs).logits[mask].float())
    return torch.cat(teacher_rows), torch.cat(student_rows)


def loss_and_grad(student_rows, teacher_rows, settings):
    student = student_rows.clone().requires_grad_(True)
    mask = torch.ones(student.shape[0], dtype=torch.bool)
    loss = amid_loss(student, teacher_rows, mask, **settings)
    loss.backward()
    return loss.item(), student.grad


def stored(top: TopKRows, dtype: str) -> TopKRows:
    return TopKRows(top.logprobs.to(STORAGE_DTYPES[dtype]), top.ids.to(torch.int32),
                    top.tail_logmass.float())


def bytes_per_position(top_k: int, dtype: str) -> int:
    """Layout of a shard row: k log-probs, k int32 ids, one float32 tail log-mass."""
    return top_k * (STORAGE_DTYPES[dtype].itemsize + 4) + 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DOLLY))
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--keep-every", type=int, default=3)
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--alphas", type=float, nargs="+", default=[-3.0, 0.5, 1.0])
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--order", default="pr", choices=ORDERS)
    parser.add_argument("--dtype-k", type=int, default=64, help="k of the storage-dtype table")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()

    began = time.perf_counter()
    teacher, tokenizer = load_causal_lm(smollm2_gguf_path())
    teacher = freeze_teacher(teacher)
    layers = teacher.config.num_hidden_layers
    student = derive_student(teacher, list(range(0, layers, args.keep_every))).eval()
    examples = load_examples(args.data, limit=args.examples)
    encoded = [encode_example(tokenizer, e, max_length=args.max_length,
                              max_prompt_length=args.max_prompt_length) for e in examples]
    teacher_rows, student_rows = response_logits(teacher, student, encoded,
                                                 tokenizer.pad_token_id, args.batch_size)
    tokens, vocab = teacher_rows.shape
    print(f"SmolLM2-135M-Instruct teacher ({layers} layers), student keeps every "
          f"{args.keep_every}-th layer; {len(examples)} Dolly prompts, {tokens} response "
          f"tokens, V = {vocab}; "
          f"order {args.order}, λ = {args.lam}; loaded in {time.perf_counter() - began:.0f} s\n")

    settings = [dict(alpha=alpha, lam=args.lam, divergence=divergence, order=args.order)
                for divergence in ("kl", "ab") for alpha in args.alphas]
    exact = [loss_and_grad(student_rows, teacher_rows, s) for s in settings]
    cosine = torch.nn.functional.cosine_similarity

    def compare(top: TopKRows, *, with_bound: bool) -> list[dict]:
        dense = reconstruct_logprobs(top, vocab)
        out = []
        for setting, (loss, grad) in zip(settings, exact, strict=True):
            cached_loss, cached_grad = loss_and_grad(student_rows, dense, setting)
            row = {"divergence": setting["divergence"], "alpha": setting["alpha"],
                   "loss": loss, "rel_loss_error": abs(cached_loss - loss) / abs(loss),
                   "grad_cosine": cosine(cached_grad.flatten(), grad.flatten(), dim=0).item()}
            if with_bound:
                row["bound_over_loss"] = loss_error_bound(student_rows, top,
                                                          **setting).mean().item() / abs(loss)
            out.append(row)
        return out

    header = (f"{'k':>5} {'dtype':>8} {'div':>4} {'alpha':>6} {'loss':>8} {'rel err':>9} "
              f"{'cos(grad)':>10} {'bound/loss':>10} {'tail mass':>9}")
    print(header)
    print("-" * len(header))
    fidelity, storage = [], []
    for top_k in args.top_k:
        top = sparsify(teacher_rows, top_k)
        tail = top.tail_logmass.exp().mean().item()
        for row in compare(stored(top, "float32"), with_bound=True):
            row.update(top_k=top_k, dtype="float32", mean_tail_mass=tail)
            fidelity.append(row)
            print(f"{top_k:>5} {'float32':>8} {row['divergence']:>4} {row['alpha']:>6} "
                  f"{row['loss']:>8.4f} {row['rel_loss_error']:>9.2e} {row['grad_cosine']:>10.6f}"
                  f" {row['bound_over_loss']:>10.3f} {tail:>9.4f}")
    print()
    top = sparsify(teacher_rows, args.dtype_k)
    for dtype in STORAGE_DTYPES:
        for row in compare(stored(top, dtype), with_bound=False):
            row.update(top_k=args.dtype_k, dtype=dtype)
            storage.append(row)
            print(f"{args.dtype_k:>5} {dtype:>8} {row['divergence']:>4} {row['alpha']:>6} "
                  f"{row['loss']:>8.4f} {row['rel_loss_error']:>9.2e} "
                  f"{row['grad_cosine']:>10.6f}")

    size_ks = sorted({*args.top_k, args.dtype_k})
    sizes = {f"k{k}_{dtype}": bytes_per_position(k, dtype) for k in size_ks
             for dtype in STORAGE_DTYPES}
    with tempfile.TemporaryDirectory() as root:
        identity = cache_identity(teacher_fingerprint(teacher), tokenizer, encoded,
                                  vocab_size=vocab, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length,
                                  top_k=args.dtype_k, dtype="float16")
        build_began = time.perf_counter()
        cache = build_cache(teacher, encoded, identity, root, pad_token_id=tokenizer.pad_token_id,
                            batch_size=args.batch_size, log=None)
        build_s = time.perf_counter() - build_began
        measured = cache.size_bytes / cache.num_positions
    print(f"\ncache size per million response tokens (MB = 10^6 bytes; layout k·(dtype + 4) + 4"
          f" bytes a token; a built k = {args.dtype_k} float16 cache measured "
          f"{measured:.1f} bytes/token against {sizes[f'k{args.dtype_k}_float16']} from the "
          f"layout, built in {build_s:.1f} s for {tokens} tokens on this machine):")
    print(f"{'k':>5} " + " ".join(f"{dtype:>9}" for dtype in STORAGE_DTYPES))
    for k in size_ks:
        print(f"{k:>5} " + " ".join(f"{sizes[f'k{k}_{dtype}']:>7} MB" for dtype in STORAGE_DTYPES))
    print(json.dumps({
        "benchmark": "teacher_cache_fidelity", "teacher": "SmolLM2-135M-Instruct",
        "student_keep_every": args.keep_every, "examples": len(examples),
        "response_tokens": tokens, "vocab": vocab, "order": args.order, "lam": args.lam,
        "fidelity": fidelity, "storage": storage, "mb_per_million_tokens": sizes,
        "measured_bytes_per_token": round(measured, 2), "build_seconds": round(build_s, 2),
    }))


if __name__ == "__main__":
    main()
