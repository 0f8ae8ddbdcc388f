"""One whole distillation step, materialised logits (the current worker path) vs the fused loss.

A step is what a worker does per micro-batch: teacher forward under no_grad, student forward,
loss, backward. The *materialised* step is `worker.distillation_losses` as it stands before the
fused loss: both models' full `[batch, length, vocab]` logits, `amid_loss` on them, and the CE
term on a float32 copy of the response rows. The *fused* step takes both models' last hidden
states (`hidden_and_head`) and calls `fused_amid_loss`, which forms logits only at the response
rows, a chunk at a time. Student: 2 layers, teacher: 4 layers, both Qwen2-shaped (hidden 256,
tied student head), sequences of 512 tokens whose second half is the response.

Each measurement runs in a fresh subprocess with a cap on its address space, so an
out-of-memory cell is reported rather than taking the machine down:

    extra peak memory = peak RSS during a step - RSS with models and batch in place

measured on the step after a warm-up step (peak RSS reset through /proc/self/clear_refs);
time = best of that step and `--repeats` more. On CUDA memory comes from
`torch.cuda.max_memory_allocated`, the student runs under bf16 autocast and the teacher in bf16,
as in the worker.

Run: `python benchmarks/fused_loss.py [--tokens 2048 8192] [--vocab 50257 151936] [--device cpu]`.
The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SEQUENCE_LENGTH = 512
SETTINGS = dict(alpha=-3.0, lam=0.1, divergence="kl", order="pr")  # the demo's AMiD point
GIB = 2**30


def build_models(vocab: int, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def model(layers: int, tied: bool, seed: int):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQUENCE_LENGTH,
            tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
        )
        return Qwen2ForCausalLM(config).to(device)

    student = model(2, tied=True, seed=1).train()
    teacher = model(4, tied=False, seed=2).eval().requires_grad_(False)
    if device == "cuda":
        teacher = teacher.to(torch.bfloat16)
    return student, teacher


def make_batch(tokens: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    """Random sequences whose second half is the response: the logits at position t predict
    token t+1, so positions L/2 - 1 … L - 2 count (as `worker.response_mask` finds them)."""
    batch = tokens // SEQUENCE_LENGTH
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, SEQUENCE_LENGTH), generator=generator)
    predicts_response = torch.zeros(batch, SEQUENCE_LENGTH, dtype=torch.bool)
    predicts_response[:, SEQUENCE_LENGTH // 2 - 1 : SEQUENCE_LENGTH - 1] = True
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "predicts_response": predicts_response, "targets": torch.roll(input_ids, -1, 1)}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def materialised_step(student, teacher, batch, kd_ratio: float, autocast: bool) -> float:
    """`worker.distillation_losses` before the fused loss, then backward."""
    from amid_ray.losses import amid_loss

    mask, targets = batch["predicts_response"], batch["targets"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    device_type = batch["input_ids"].device.type
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        student_logits = student(**inputs).logits
    distil = amid_loss(student_logits, teacher_logits, mask, **SETTINGS)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    flat = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, rows)
    ce = F.cross_entropy(flat.float(), targets.reshape(-1).index_select(0, rows))
    total = (1.0 - kd_ratio) * ce + kd_ratio * distil
    total.backward()
    return total.item()


def fused_step(student, teacher, batch, kd_ratio: float, autocast: bool) -> float:
    """The same objective through `hidden_and_head` + `fused_amid_loss`, then backward."""
    from amid_ray.fused_loss import TeacherHead, fused_amid_loss, hidden_and_head
    from amid_ray.losses import AMiDSettings

    inputs = (batch["input_ids"], batch["attention_mask"])
    device_type = batch["input_ids"].device.type
    with torch.no_grad():
        teacher_hidden, teacher_weight, teacher_bias = hidden_and_head(teacher, *inputs)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        hidden, weight, bias = hidden_and_head(student, *inputs)
        losses = fused_amid_loss(
            hidden.flatten(0, 1), weight, bias,
            TeacherHead(teacher_hidden.flatten(0, 1), teacher_weight, teacher_bias),
            batch["predicts_response"].reshape(-1).nonzero().squeeze(1),
            batch["targets"].reshape(-1),
            settings=AMiDSettings(**SETTINGS), kd_ratio=kd_ratio,
        )
    losses.total.backward()
    return losses.total.item()


STEPS = {"materialised": materialised_step, "fused": fused_step}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_one(path: str, tokens: int, vocab: int, kd_ratio: float, repeats: int, device: str,
                budget_bytes: int) -> dict:
    """One path at one size, in this process: extra peak memory of a step and its time."""
    student, teacher = build_models(vocab, device)
    batch = make_batch(tokens, vocab, device)
    step = STEPS[path]
    on_gpu = device == "cuda"

    def timed_step() -> tuple[float, float]:
        student.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = step(student, teacher, batch, kd_ratio, autocast=on_gpu)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start, loss

    try:
        if not on_gpu:  # the cap counts address space from here on: warm-up and steps included
            limit = _status_kib("VmSize") * 1024 + budget_bytes
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        timed_step()  # warm-up: one-time allocations (thread pools, kernels) stay out of the peak
        student.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
            base = _status_kib("VmRSS") * 1024
        seconds, loss = timed_step()
    except (MemoryError, RuntimeError) as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if "memory" not in str(error).lower():
            raise
        return {"oom": True, "budget_bytes": budget_bytes}
    if on_gpu:
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = _status_kib("VmHWM") * 1024 - base
    times = [seconds] + [timed_step()[0] for _ in range(repeats)]
    return {"oom": False, "extra_bytes": extra, "seconds": min(times), "loss": loss}


def versus_liger(tokens: int, vocab: int, hidden: int, repeats: int, device: str) -> None:
    """Liger-Kernel's fused linear JSD against `fused_amid_loss` at the same objective:
    JSD(β = 0.5) is AMiD with alpha = -1, lam = 0.5, order `js`. bf16 hidden states and heads
    (hidden size `hidden` for both models); loss, then gradients of the student's hidden states
    and head. Counted rows: all, then half (Liger forms the logits of ignored rows too). Extra
    memory is measured on CUDA only."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    from amid_ray.fused_loss import TeacherHead, fused_amid_loss
    from amid_ray.losses import AMiDSettings

    on_gpu = device == "cuda"
    generator = torch.Generator(device).manual_seed(0)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=device) * scale).bfloat16()

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize()

    student_hidden = draw(tokens, hidden).requires_grad_()
    student_weight = draw(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    teacher = TeacherHead(draw(tokens, hidden), draw(vocab, hidden, scale=hidden**-0.5))
    targets = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    jsd = AMiDSettings(alpha=-1.0, lam=0.5, divergence="kl", order="js")
    liger = LigerFusedLinearJSD(jsd_beta=0.5)
    where = torch.cuda.get_device_name() if on_gpu else device
    print(f"Liger fused linear JSD vs fused_amid_loss (alpha=-1, lam=0.5, order js), "
          f"B·T={tokens}, V={vocab}, H={hidden}, bf16, {where}, best of {repeats}")
    print(f"{'counted':>8} {'':>6} {'loss':>10} {'ms':>8} {'extra MiB':>10}")
    for fraction in (1.0, 0.5):
        counted = torch.arange(tokens, device=device) % 512 >= 512 * (1 - fraction)
        rows = counted.nonzero().squeeze(1)
        labels = torch.where(counted, targets, -100)
        runs = {
            "liger": lambda labels=labels: liger(student_hidden, student_weight, teacher.hidden,
                                                 teacher.weight, labels),
            "ours": lambda rows=rows: fused_amid_loss(student_hidden, student_weight, None,
                                                      teacher, rows, None, settings=jsd).total,
        }
        for name, run in runs.items():
            student_hidden.grad = student_weight.grad = None
            synchronize()
            if on_gpu:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            loss = run()
            loss.backward()
            synchronize()
            extra = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}" if on_gpu else "-"
            times = []
            for _ in range(repeats):
                student_hidden.grad = student_weight.grad = None
                synchronize()
                start = time.perf_counter()
                run().backward()
                synchronize()
                times.append(time.perf_counter() - start)
            print(f"{fraction:>8.1f} {name:>6} {loss.item():>10.5f} {min(times) * 1e3:>8.1f} "
                  f"{extra:>10}")


def run_isolated(path, tokens, vocab, kd_ratio, repeats, device, budget_bytes) -> dict:
    """`measure_one` in a fresh interpreter; a process that died is reported as such."""
    command = [sys.executable, __file__, "--_one", path, str(tokens), str(vocab), str(kd_ratio),
               str(repeats), device, str(budget_bytes)]
    # A fixed mmap threshold makes glibc return freed large blocks to the OS at once, so peak RSS
    # follows live tensors rather than the allocator's cache (same setting for both paths).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = (done.stderr.strip() or f"exit {done.returncode}").splitlines()
        return {"oom": False, "failed": f"exit {done.returncode}: {lines[-1][:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 16 * GIB


def _cell(result: dict, field: str, scale: float, digits: int) -> str:
    if "failed" in result:
        return "failed"
    if result["oom"]:
        return f">{result['budget_bytes'] / GIB:.1f}GiB" if field == "extra_bytes" else "OOM"
    return f"{result[field] / scale:.{digits}f}"


def _ratio(fused: dict, materialised: dict, field: str) -> float | None:
    if "failed" in fused or "failed" in materialised or fused["oom"]:
        return None
    if materialised["oom"]:  # an upper bound: the materialised step needed more than its budget
        return fused[field] / materialised["budget_bytes"] if field == "extra_bytes" else None
    return fused[field] / materialised[field]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192],
                        help=f"tokens per micro-batch, B·T (multiples of {SEQUENCE_LENGTH})")
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 151936])
    parser.add_argument("--kd-ratio", type=float, default=0.5,
                        help="(1 - kd_ratio)·CE + kd_ratio·AMiD; below 1 the CE term runs too")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after the measured one")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-extra-gib", type=float, default=16.0,
                        help="address-space budget of one step on CPU (capped at 80%% of the "
                             "memory available at start)")
    parser.add_argument("--versus-liger", type=int, metavar="HIDDEN",
                        help="instead: Liger-Kernel's fused linear JSD against ours at the largest "
                             "--tokens and --vocab, hidden size HIDDEN")
    parser.add_argument("--_one", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.versus_liger:
        versus_liger(max(args.tokens), max(args.vocab), args.versus_liger, max(args.repeats, 3),
                     args.device)
        return
    if args._one:
        path, tokens, vocab, kd_ratio, repeats, device, budget = args._one
        print(json.dumps(measure_one(path, int(tokens), int(vocab), float(kd_ratio),
                                     int(repeats), device, int(budget))))
        return
    for tokens in args.tokens:
        if tokens % SEQUENCE_LENGTH:
            parser.error(f"--tokens {tokens} is not a multiple of {SEQUENCE_LENGTH}")

    budget = int(min(args.max_extra_gib * GIB, 0.8 * _available_bytes()))
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else platform.processor() or platform.machine())
    print(f"distillation step, materialised logits vs fused, device={args.device} ({where}), "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"{'bf16 autocast, bf16 teacher' if args.device == 'cuda' else 'float32'}, "
          f"kd_ratio={args.kd_ratio}, response fraction 0.5, "
          f"{'' if args.device == 'cuda' else f'budget {budget / GIB:.1f} GiB per step, '}"
          f"best of {args.repeats}")
    header = (f"{'vocab':>7} {'B·T':>5} {'mat. s':>8} {'fused s':>8} {'time x':>7} "
              f"{'mat. MiB':>9} {'fused MiB':>9} {'mem x':>6} {'loss diff':>9}")
    print(header)
    print("-" * len(header))
    cells = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            results = {path: run_isolated(path, tokens, vocab, args.kd_ratio, args.repeats,
                                          args.device, budget) for path in STEPS}
            mat, fused = results["materialised"], results["fused"]
            time_ratio = _ratio(fused, mat, "seconds")
            mem_ratio = _ratio(fused, mat, "extra_bytes")
            comparable = "loss" in mat and "loss" in fused
            loss_diff = abs(fused["loss"] - mat["loss"]) / abs(mat["loss"]) if comparable else None
            mem_text = "-" if mem_ratio is None else (
                f"<{mem_ratio:.2f}" if mat.get("oom") else f"{mem_ratio:.2f}")
            print(f"{vocab:>7} {tokens:>5} {_cell(mat, 'seconds', 1, 2):>8} "
                  f"{_cell(fused, 'seconds', 1, 2):>8} "
                  f"{'-' if time_ratio is None else f'{time_ratio:.2f}':>7} "
                  f"{_cell(mat, 'extra_bytes', 2**20, 0):>9} "
                  f"{_cell(fused, 'extra_bytes', 2**20, 0):>9} {mem_text:>6} "
                  f"{'-' if loss_diff is None else f'{loss_diff:.1e}':>9}")
            for path, result in results.items():
                if "failed" in result:
                    print(f"    {path} failed: {result['failed']}")
            cells.append({"vocab": vocab, "tokens": tokens, "time_ratio": time_ratio,
                          "mem_ratio": mem_ratio, "materialised_oom": mat.get("oom", False),
                          "fused_mib": None if "extra_bytes" not in fused
                          else round(fused["extra_bytes"] / 2**20),
                          "fused_s": fused.get("seconds"), "materialised_s": mat.get("seconds")})
    headline = max(cells, key=lambda c: (c["tokens"] * c["vocab"]))
    print(json.dumps({"benchmark": "fused_loss", "device": args.device,
                      "headline": headline, "cells": cells}))


if __name__ == "__main__":
    main()
