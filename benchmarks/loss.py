"""Forward+backward time and extra peak memory of `amid_loss` versus a naive implementation.

The naive version has the published code's structure: it materialises p, q, log p, log q, r and
log r as full `[tokens, vocabulary]` tensors and lets autograd keep what it needs. Each
measurement runs in a fresh subprocess so peak RSS belongs to that measurement alone:

    extra peak memory = peak RSS during forward+backward - RSS with the inputs allocated

Run: `python benchmarks/loss.py [--tokens 512 2048 8192] [--vocab 50257] [--repeats 3]`.
On CUDA (`--device cuda`) memory comes from `torch.cuda.max_memory_allocated` instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import torch

SETTINGS = {
    "kl": dict(alpha=-3.0, lam=0.1, divergence="kl", order="pr"),
    "ab": dict(alpha=0.5, lam=0.1, divergence="ab", order="pr", ab_alpha=0.2, ab_beta=0.7),
}


def naive_amid_loss(
    student_logits,
    teacher_logits,
    mask,
    *,
    alpha,
    lam,
    divergence,
    order,
    ab_alpha=0.2,
    ab_beta=0.7,
):
    """Everything as full tensors, the way the published code is written."""
    log_q = torch.log_softmax(student_logits.float(), -1)
    log_p = torch.log_softmax(teacher_logits.float(), -1)
    q, p = log_q.exp(), log_p.exp()
    if alpha == 1:
        log_r = torch.log_softmax(lam * log_p + (1 - lam) * log_q, -1)
    else:
        k = (1 - alpha) / 2
        mixed = torch.logaddexp(math.log(lam) + k * log_p, math.log(1 - lam) + k * log_q) / k
        log_r = torch.log_softmax(mixed, -1)
    r = log_r.exp()
    a, log_a, b, log_b = {
        "pr": (p, log_p, r, log_r),
        "qr": (q, log_q, r, log_r),
        "rp": (r, log_r, p, log_p),
        "rq": (r, log_r, q, log_q),
    }[order]
    inf_mask = torch.isinf(student_logits) | torch.isinf(teacher_logits)
    if divergence == "kl":
        terms = a * (log_a - log_b)
    else:
        s = ab_alpha + ab_beta
        terms = -(a**ab_alpha * b**ab_beta - ab_alpha / s * a**s - ab_beta / s * b**s) / (
            ab_alpha * ab_beta
        )
    per_token = terms.masked_fill(inf_mask, 0.0).sum(-1)
    return (per_token * mask).sum() / mask.sum()


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure_one(impl: str, tokens: int, vocab: int, setting: str, repeats: int, device: str):
    """One implementation at one size, in this process: extra peak memory, then timings."""
    from amid_ray.losses import amid_loss

    torch.manual_seed(0)
    # In-place scaling: a temporary here would inflate the baseline peak RSS.
    student = torch.randn(tokens, vocab, device=device).mul_(3)
    teacher = torch.randn(tokens, vocab, device=device).mul_(3)
    mask = torch.ones(tokens, dtype=torch.bool, device=device)
    loss_fn = amid_loss if impl == "amid_loss" else naive_amid_loss
    kwargs = SETTINGS[setting]

    def step():
        logits = student.detach().requires_grad_(True)
        loss = loss_fn(logits, teacher, mask, **kwargs)
        loss.backward()
        return logits.grad

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = _current_rss_bytes()
        step()
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"extra_bytes": extra, "seconds": min(times)}


def run_isolated(impl, tokens, vocab, setting, repeats, device) -> dict | None:
    """`measure_one` in a fresh interpreter; None if it died (e.g. out of memory)."""
    command = [
        sys.executable,
        __file__,
        "--_one",
        impl,
        str(tokens),
        str(vocab),
        setting,
        str(repeats),
        device,
    ]
    # A fixed mmap threshold makes glibc return freed large blocks to the OS at once, so peak RSS
    # follows live tensors rather than the allocator's cache (same setting for both sides).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--settings", nargs="+", default=["kl", "ab"], choices=sorted(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--_one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        impl, tokens, vocab, setting, repeats, device = args._one
        print(json.dumps(measure_one(impl, int(tokens), int(vocab), setting, int(repeats), device)))
        return

    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or (platform.machine())
    )
    print(
        f"amid_loss vs naive, float32, V={args.vocab}, device={args.device} ({where}), "
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, best of {args.repeats}"
    )
    header = (
        f"{'setting':8} {'N':>6} {'naive s':>9} {'amid s':>9} {'time ratio':>10} "
        f"{'naive MiB':>10} {'amid MiB':>9} {'mem ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    mib = 2**20
    for setting in args.settings:
        for tokens in args.tokens:
            naive = run_isolated("naive", tokens, args.vocab, setting, args.repeats, args.device)
            ours = run_isolated("amid_loss", tokens, args.vocab, setting, args.repeats, args.device)
            if ours is None:
                print(f"{setting:8} {tokens:>6} amid_loss failed")
                continue
            if naive is None:
                print(
                    f"{setting:8} {tokens:>6} {'OOM':>9} {ours['seconds']:>9.3f} {'-':>10} "
                    f"{'OOM':>10} {ours['extra_bytes'] / mib:>9.0f} {'-':>9}"
                )
                continue
            print(
                f"{setting:8} {tokens:>6} {naive['seconds']:>9.3f} {ours['seconds']:>9.3f} "
                f"{ours['seconds'] / naive['seconds']:>10.2f} "
                f"{naive['extra_bytes'] / mib:>10.0f} {ours['extra_bytes'] / mib:>9.0f} "
                f"{ours['extra_bytes'] / naive['extra_bytes']:>9.2f}"
            )


if __name__ == "__main__":
    main()
