"""The fused-linear AMiD objective against `amid_loss` + cross-entropy on materialised logits."""

from __future__ import annotations

import datetime
import gc
import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from amid_ray import fused_loss
from amid_ray.fused_loss import (
    TeacherHead,
    fused_amid_loss,
    fused_cross_entropy,
    hidden_and_head,
)
from amid_ray.losses import (
    DIVERGENCES,
    ORDERS,
    PRESETS,
    AMiDSettings,
    amid_loss,
    is_degenerate,
)

ALPHAS = (-3.0, -1.0, 0.5, 1.0, 3.0)
LAMBDAS = (0.0, 0.5, 1.0)
#: The issue's criterion: float32, max error ≤ 1e-5 × the reference's largest magnitude.
RTOL = 1e-5


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str):
    """max |actual - expected| ≤ rtol · max |expected| (plus a floor for an all-zero reference)."""
    assert actual.shape == expected.shape, what
    actual, expected = actual.detach().double(), expected.detach().double()
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert error <= rtol * scale + 1e-12, f"{what}: error {error:.3g} vs scale {scale:.3g}"


class Problem:
    """A random student (hidden states, head) and teacher (hidden states, head) on N positions."""

    def __init__(self, seed=0, positions=30, width=8, vocab=40, teacher_width=6,
                 dtype=torch.float32, bias=True):
        g = torch.Generator().manual_seed(seed)

        def draw(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

        self.hidden = draw(positions, width).requires_grad_()
        self.weight = draw(vocab, width, scale=0.8).requires_grad_()
        self.bias = draw(vocab, scale=0.5).requires_grad_() if bias else None
        self.teacher = TeacherHead(draw(positions, teacher_width),
                                   draw(vocab, teacher_width, scale=0.8), draw(vocab))
        self.mask = torch.rand(positions, generator=g) > 0.4
        self.rows = self.mask.nonzero().squeeze(1)
        self.targets = torch.randint(0, vocab, (positions,), generator=g)

    @property
    def leaves(self):
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]

    def student_logits(self):
        logits = self.hidden @ self.weight.T
        return logits if self.bias is None else logits + self.bias

    def teacher_logits(self):
        return self.teacher.logits(torch.arange(self.hidden.shape[0]))

    def reference(self, settings, kd_ratio=1.0, scale=1.0, student_logits=None,
                  teacher_logits=None):
        """(total, distil, ce, gradients) from materialised logits and plain autograd."""
        logits = self.student_logits() if student_logits is None else student_logits
        teacher = self.teacher_logits() if teacher_logits is None else teacher_logits
        distil = amid_loss(logits, teacher, self.mask, **settings.as_kwargs())
        loss_dtype = torch.promote_types(logits.dtype, torch.float32)
        ce = F.cross_entropy(logits[self.rows].to(loss_dtype), self.targets[self.rows])
        total = (1 - kd_ratio) * ce + kd_ratio * distil
        grads = torch.autograd.grad(total * scale, self.leaves)
        return total.detach(), distil.detach(), ce.detach(), grads

    def fused(self, settings, kd_ratio=1.0, scale=1.0, chunk_rows=4, teacher=None):
        out = fused_amid_loss(self.hidden, self.weight, self.bias, teacher or self.teacher,
                              self.rows, self.targets, settings=settings, kd_ratio=kd_ratio,
                              chunk_rows=chunk_rows)
        grads = torch.autograd.grad(out.total * scale, self.leaves)
        return out, grads


def assert_matches(problem, settings, kd_ratio=1.0, scale=1.0, rtol=RTOL, chunk_rows=4, **ref):
    total, distil, ce, ref_grads = problem.reference(settings, kd_ratio, scale, **ref)
    out, grads = problem.fused(settings, kd_ratio, scale, chunk_rows)
    assert_relative(out.total, total, rtol, "total")
    assert_relative(out.distil, distil, rtol, "distil")
    assert_relative(out.ce, ce if kd_ratio < 1 else torch.zeros(()), rtol, "ce")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.dtype == want.dtype, name
        assert_relative(got, want, rtol, f"grad {name}")


GRID = [
    AMiDSettings(alpha=alpha, lam=lam, divergence=divergence, order=order)
    for divergence, order, alpha, lam in itertools.product(DIVERGENCES, ORDERS, ALPHAS, LAMBDAS)
    if not is_degenerate(order, lam)
]


@pytest.mark.parametrize("settings", GRID,
                         ids=lambda s: f"{s.divergence}-{s.order}-a{s.alpha}-l{s.lam}")
def test_loss_and_gradients_match_materialised_logits(settings):
    assert_matches(Problem(seed=3), settings)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_matches(name):
    assert_matches(Problem(seed=4), PRESETS[name], kd_ratio=0.7)


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("settings", [
    AMiDSettings(alpha=-1.0, lam=0.1, order="pr"),
    AMiDSettings(alpha=2.0, lam=0.4, divergence="ab", order="rq", ab_alpha=0.8, ab_beta=0.3),
])
def test_cross_entropy_mix_and_upstream_scaling(kd_ratio, settings):
    # 0.25 stands for loss / grad_accum: the gradients must carry it.
    assert_matches(Problem(seed=5, bias=False), settings, kd_ratio=kd_ratio, scale=0.25)


def test_gradient_is_zero_off_rows_and_independent_of_chunking():
    problem = Problem(seed=6)
    settings = AMiDSettings(alpha=0.5, lam=0.3, order="qr")
    results = [problem.fused(settings, 0.5, chunk_rows=chunk) for chunk in (1, 3, 1000, None)]
    for out, grads in results[1:]:
        assert_relative(out.total, results[0][0].total, RTOL, "total")
        for got, want in zip(grads, results[0][1], strict=True):
            assert_relative(got, want, RTOL, "gradient")
    grad_hidden = results[0][1][0]
    assert grad_hidden[~problem.mask].abs().max() == 0
    assert grad_hidden[problem.mask].abs().amax(1).min() > 0


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize(("settings", "evaluator"), [
    (AMiDSettings(alpha=-3.0, lam=0.1), "kl_pr_losses_and_gradient"),  # closed form
    (AMiDSettings(alpha=2.0, lam=0.4, divergence="ab", order="rq"), "amid_token_losses"),
])
def test_loss_parts_smaller_than_a_chunk_match_materialised_logits(monkeypatch, kd_ratio,
                                                                   settings, evaluator):
    # On CPU the per-token loss walks each chunk a few rows at a time; at the tests' small
    # vocabularies a part is a whole chunk unless the part size is made tiny.
    problem = Problem(seed=9)
    vocab = problem.weight.shape[0]
    monkeypatch.setattr(fused_loss, "CPU_LOSS_PART_ELEMENTS", 2 * vocab)  # 2-row parts
    part_sizes = []
    original = getattr(fused_loss, evaluator)

    def counted(student_logits, *args, **kwargs):
        part_sizes.append(student_logits.shape[0])
        return original(student_logits, *args, **kwargs)

    monkeypatch.setattr(fused_loss, evaluator, counted)
    for chunk_rows in (5, 1000):
        assert_matches(problem, settings, kd_ratio=kd_ratio, scale=0.5, chunk_rows=chunk_rows)
    if kd_ratio > 0 or evaluator == "amid_token_losses":  # kd_ratio 0: no AMiD gradient to form
        assert max(part_sizes) == 2 and sum(part_sizes) == 2 * problem.rows.numel()


def test_masked_vocabulary_entries_behave_as_in_amid_loss():
    problem = Problem(seed=7)
    vocab = problem.weight.shape[0]
    with torch.no_grad():  # the student never emits entries 3 and 11; the teacher never 5 and 11
        problem.bias[[3, 11]] = -torch.inf
    problem.targets = torch.where(torch.isin(problem.targets, torch.tensor([3, 11])),
                                  torch.zeros_like(problem.targets), problem.targets)
    teacher_table = problem.teacher_logits().index_fill(1, torch.tensor([5, 11]), -torch.inf)

    class TableTeacher:
        def logits(self, rows):
            return teacher_table.index_select(0, rows)

    for settings in (AMiDSettings(alpha=-3.0, lam=0.3, order="pr"),  # union support
                     AMiDSettings(alpha=3.0, lam=0.6, order="rq"),  # intersection support
                     AMiDSettings(alpha=1.0, lam=0.5, divergence="ab", order="qr")):
        total, distil, _, ref_grads = problem.reference(settings, 0.5,
                                                        teacher_logits=teacher_table)
        out, grads = problem.fused(settings, 0.5, teacher=TableTeacher())
        assert torch.isfinite(total) and torch.isfinite(out.total)
        assert_relative(out.total, total, RTOL, "total")
        for got, want in zip(grads, ref_grads, strict=True):
            assert torch.isfinite(got).all()
            assert_relative(got, want, RTOL, "gradient")
        assert grads[2][[3, 11]].abs().max() == 0  # no gradient into the masked bias entries
    assert vocab == teacher_table.shape[1]


def test_teacher_log_probabilities_give_the_same_loss():
    problem = Problem(seed=8)
    settings = AMiDSettings(alpha=-1.0, lam=0.5, order="rp")
    log_probs = torch.log_softmax(problem.teacher_logits(), -1)

    class LogProbTeacher:
        def logits(self, rows):
            return log_probs.index_select(0, rows)

    plain, plain_grads = problem.fused(settings)
    normalised, grads = problem.fused(settings, teacher=LogProbTeacher())
    assert_relative(normalised.total, plain.total, RTOL, "total")
    for got, want in zip(grads, plain_grads, strict=True):
        assert_relative(got, want, RTOL, "gradient")


def test_empty_rows_give_zero_losses_and_zero_gradients():
    problem = Problem(seed=9)
    problem.rows = problem.rows[:0]
    out, grads = problem.fused(AMiDSettings(alpha=0.5, lam=0.5), kd_ratio=0.5)
    assert out.total.item() == out.distil.item() == out.ce.item() == 0.0
    for grad, leaf in zip(grads, problem.leaves, strict=True):
        assert grad.shape == leaf.shape and grad.abs().max() == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_cross_entropy_alone_matches_materialised_logits(bias, chunk_rows):
    problem = Problem(seed=15, bias=bias)
    logits = problem.student_logits()
    ce = F.cross_entropy(logits[problem.rows], problem.targets[problem.rows])
    want = torch.autograd.grad(ce * 0.5, problem.leaves)
    got_ce = fused_cross_entropy(problem.hidden, problem.weight, problem.bias, problem.rows,
                                 problem.targets, chunk_rows=chunk_rows)
    got = torch.autograd.grad(got_ce * 0.5, problem.leaves)
    assert_relative(got_ce, ce, RTOL, "ce")
    for name, g, w in zip(("hidden", "weight", "bias"), got, want, strict=False):
        assert_relative(g, w, RTOL, f"grad {name}")
    # The same number as the AMiD path's own cross-entropy part.
    out = fused_amid_loss(problem.hidden, problem.weight, problem.bias, problem.teacher,
                          problem.rows, problem.targets, settings=PRESETS["kd"], kd_ratio=0.0)
    assert_relative(got_ce, out.ce, RTOL, "ce of fused_amid_loss")
    with pytest.raises(ValueError, match="needs targets"):
        fused_cross_entropy(problem.hidden, problem.weight, problem.bias, problem.rows,
                            problem.targets[:3])


def test_retained_graph_backward_twice_accumulates_twice():
    problem = Problem(seed=10)
    settings = AMiDSettings(alpha=-1.0, lam=0.2)
    _, once = problem.fused(settings, 0.5)
    out = fused_amid_loss(problem.hidden, problem.weight, problem.bias, problem.teacher,
                          problem.rows, problem.targets, settings=settings, kd_ratio=0.5)
    out.total.backward(retain_graph=True)
    out.total.backward()
    for leaf, grad in zip(problem.leaves, once, strict=True):
        assert_relative(leaf.grad, 2 * grad, RTOL, "twice")


def test_without_grad_values_only():
    problem = Problem(seed=11)
    settings = AMiDSettings(alpha=0.5, lam=0.5, divergence="ab", order="pr")
    total, distil, ce, _ = problem.reference(settings, 0.5)
    with torch.no_grad():
        out = fused_amid_loss(problem.hidden, problem.weight, problem.bias, problem.teacher,
                              problem.rows, problem.targets, settings=settings, kd_ratio=0.5)
    assert not out.total.requires_grad
    assert_relative(out.total, total, RTOL, "total")
    assert_relative(out.distil, distil, RTOL, "distil")
    assert_relative(out.ce, ce, RTOL, "ce")


def test_float64_stays_float64():
    problem = Problem(seed=12, dtype=torch.float64)
    settings = AMiDSettings(alpha=3.0, lam=0.5, divergence="ab", order="qr")
    out, _ = problem.fused(settings, 0.5)
    assert out.total.dtype == torch.float64
    assert_matches(problem, settings, kd_ratio=0.5, rtol=1e-12)


#: Under bf16 autocast both paths round logits and logit gradients to 8 bits, at different
#: points (chunk vs whole matmuls): the loss agrees to 1e-3, gradients to about 2^-7 (measured
#: 0.4-0.9 %) of their largest entry.
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 1e-3, 2e-2


def test_bf16_autocast_computes_the_loss_in_float32():
    problem = Problem(seed=13, positions=40, width=16, vocab=64)
    settings = AMiDSettings(alpha=-1.0, lam=0.3, order="pr")
    exact_total, *_ = problem.reference(settings, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, distil, _, ref_grads = problem.reference(settings, 0.5)
        out, grads = problem.fused(settings, 0.5)
    assert out.total.dtype == out.distil.dtype == torch.float32
    assert_relative(out.total, total, BF16_LOSS_RTOL, "total")
    assert_relative(out.distil, distil, BF16_LOSS_RTOL, "distil")
    assert_relative(out.total, exact_total, 1e-2, "total vs no autocast")
    for got, want, leaf in zip(grads, ref_grads, problem.leaves, strict=True):
        assert got.dtype == leaf.dtype == torch.float32
        assert_relative(got, want, BF16_GRAD_RTOL, "gradient")


def test_invalid_inputs_name_the_value():
    problem = Problem(seed=14)
    settings = AMiDSettings(alpha=0.5, lam=0.5)

    def call(**overrides):
        kwargs = dict(student_hidden=problem.hidden, student_weight=problem.weight,
                      student_bias=problem.bias, teacher=problem.teacher, rows=problem.rows,
                      targets=problem.targets, settings=settings, kd_ratio=0.5)
        fused_amid_loss(**(kwargs | overrides))

    with pytest.raises(ValueError, match="needs targets"):
        call(targets=None)
    with pytest.raises(ValueError, match=r"rows must index the 30 positions.*\[0, 30\]"):
        call(rows=torch.tensor([0, 30]))
    with pytest.raises(ValueError, match="kd_ratio must be a number in \\[0, 1\\], got 1.5"):
        call(kd_ratio=1.5)
    with pytest.raises(ValueError, match="same H"):
        call(student_weight=problem.weight[:, :5])
    with pytest.raises(ValueError, match="teacher.logits gave"):
        call(teacher=TeacherHead(problem.teacher.hidden, problem.teacher.weight[:7]))


# --------------------------------------------------------------------------- transformers models

VOCAB = 48


def gpt2(tied: bool) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    ))


def llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
        bos_token_id=0, eos_token_id=0,
    ))


def qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(2)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
    ))


def token_batch(seed=0, batch=3, length=9):
    """input ids, attention mask (left padding in row 1), next-token targets and the flat
    positions predicting a response token (the last five tokens of each row)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    targets = torch.roll(input_ids, -1, dims=1)
    predicts_response = torch.zeros(batch, length, dtype=torch.bool)
    predicts_response[:, length - 6 : length - 1] = True
    return input_ids, attention_mask, targets.reshape(-1), predicts_response


MODELS = {
    "gpt2-tied": lambda: gpt2(True),
    "gpt2-untied": lambda: gpt2(False),
    "llama": lambda: llama(False),
    "llama-tied": lambda: llama(True),
    "qwen2": qwen2,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hidden_and_head_reproduce_the_model_logits(name):
    model = MODELS[name]()
    input_ids, attention_mask, *_ = token_batch()
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask)
    tied = weight is model.get_input_embeddings().weight
    assert tied == name.endswith("-tied")
    assert hidden.shape == (*input_ids.shape, model.config.hidden_size) and hidden.requires_grad
    assert_relative(F.linear(hidden, weight, bias), expected, RTOL, "logits")


@pytest.mark.parametrize("name", ["gpt2-tied", "llama"])
def test_hidden_and_head_accept_bf16_autocast(name):
    model = MODELS[name]()
    input_ids, attention_mask, *_ = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask)
        logits = F.linear(hidden, weight, bias)
    assert logits.dtype == expected.dtype == torch.bfloat16
    assert_relative(logits, expected, 2**-7, "bf16 logits")


def distillation_grads(student, teacher, settings, kd_ratio, fused: bool, wrapped=None):
    """Parameter gradients of one distillation step, the materialised or the fused way."""
    input_ids, attention_mask, targets, predicts_response = token_batch(seed=1)
    mask = predicts_response.reshape(-1)
    rows = mask.nonzero().squeeze(1)
    student.zero_grad(set_to_none=True)
    model = wrapped or student
    if fused:
        with torch.no_grad():
            t_hidden, t_weight, t_bias = hidden_and_head(teacher, input_ids, attention_mask)
        hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask)
        out = fused_amid_loss(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                              TeacherHead(t_hidden.reshape(-1, t_hidden.shape[-1]), t_weight,
                                          t_bias),
                              rows, targets, settings=settings, kd_ratio=kd_ratio)
        total = out.total
    else:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        flat = logits.reshape(-1, VOCAB)
        distil = amid_loss(flat, teacher_logits.reshape(-1, VOCAB), mask, **settings.as_kwargs())
        total = (1 - kd_ratio) * F.cross_entropy(flat[rows], targets[rows]) + kd_ratio * distil
    (total / 2).backward()  # as with grad_accum = 2
    return total.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_parameter_gradients_match_through_the_model(tied):
    student, teacher = gpt2(tied), llama(False)
    assert (student.lm_head.weight is student.transformer.wte.weight) == tied
    settings = AMiDSettings(alpha=0.5, lam=0.3, divergence="kl", order="rq")
    ref_total, ref = distillation_grads(student, teacher, settings, 0.5, fused=False)
    total, got = distillation_grads(student, teacher, settings, 0.5, fused=True)
    assert_relative(total, ref_total, RTOL, "total")
    assert got.keys() == ref.keys() and "transformer.wte.weight" in got
    for name in ref:
        assert_relative(got[name], ref[name], RTOL, name)


def test_gradients_match_through_a_ddp_wrapper():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    # An in-memory store: one rank needs no rendezvous (and no file another test run could sweep).
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    wrapped = None
    try:
        student, teacher = gpt2(True), gpt2(False)
        wrapped = torch.nn.parallel.DistributedDataParallel(student)
        settings = PRESETS["skl"]
        _, ref = distillation_grads(student, teacher, settings, 0.5, fused=False)
        _, got = distillation_grads(student, teacher, settings, 0.5, fused=True, wrapped=wrapped)
    finally:
        # The wrapper's reducer holds the process group: freed after destroy_process_group, the
        # group's destructor can deadlock (seen once in ~10 runs, torch 2.13 gloo), so free it
        # first.
        del wrapped
        gc.collect()
        dist.destroy_process_group()
    for name in ref:
        assert_relative(got[name], ref[name], RTOL, name)


class DoubledLogitsGPT2(GPT2LMHeadModel):
    """A head transform no config field announces: only the numerical check can see it."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                 logits_to_keep=logits_to_keep, **kwargs)
        output.logits = 2 * output.logits
        return output


def test_models_that_transform_logits_are_refused():
    input_ids, attention_mask, *_ = token_batch()
    softcapped = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        hidden_and_head(softcapped, input_ids, attention_mask)
    doubled = DoubledLogitsGPT2(gpt2(True).config)
    with pytest.raises(ValueError, match="not hidden @ W.T \\+ b"):
        hidden_and_head(doubled, input_ids, attention_mask)
