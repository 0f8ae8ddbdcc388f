"""Student-generated outputs: replay buffer, adaptive scheduler, generated-batch encoding."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
from collections import Counter
from dataclasses import replace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from amid_ray.data import IGNORE_INDEX, InstructionExample, build_prompt, encode_example
from amid_ray.data import encode_prompt as encode_prompt_ids
from amid_ray.demo import load_gpt2_tokenizer
from amid_ray.evaluation import generate_responses
from amid_ray.sgo import (
    AdaptiveSGOScheduler,
    MixedSGOScheduler,
    ReplayBuffer,
    generate_student_batch,
    student_generation_settings,
)

EOS_ID = 50256
MAX_LENGTH = 96
MAX_PROMPT_LENGTH = 64
MAX_NEW_TOKENS = 12
EXAMPLES = [
    InstructionExample(build_prompt("Name a colour."), "Blue.", ("Blue.",), "t:1"),
    InstructionExample(
        build_prompt("Summarise the text.", "The quick brown fox jumps. " * 4),
        "A fox jumps.",
        ("A fox jumps.",),
        "t:2",
    ),
    InstructionExample(build_prompt("Say hi."), "Hi!", ("Hi!",), "t:3"),
]


def sequence(token: int, length: int = 3) -> dict[str, list[int]]:
    """An encoded sequence whose ids all equal `token`, so items are easy to tell apart."""
    return {"input_ids": [token] * length, "labels": [IGNORE_INDEX] + [token] * (length - 1)}


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


# --- ReplayBuffer ------------------------------------------------------------------------


def test_buffer_evicts_oldest_past_capacity():
    buffer = ReplayBuffer(capacity=3, seed=0)
    buffer.push([sequence(1), sequence(2)])
    assert len(buffer) == 2
    buffer.push([sequence(3), sequence(4), sequence(5)])
    assert len(buffer) == 3
    assert buffer.state_dict()["items"] == [sequence(3), sequence(4), sequence(5)]


def test_buffer_is_full_at_capacity_sequences():
    # The released buffer counts sequences (deque(maxlen=capacity) of single items), not batches.
    buffer = ReplayBuffer(capacity=3, seed=0)
    fullness = []
    for token in range(4):
        fullness.append(buffer.full)
        buffer.push([sequence(token)])
    assert fullness == [False, False, False, True] and buffer.full


def test_buffer_sampling_is_seeded_distinct_and_copied():
    def samples(seed: int) -> list[list[dict]]:
        buffer = ReplayBuffer(capacity=10, seed=seed)
        buffer.push(sequence(token) for token in range(10))
        return [buffer.sample(4) for _ in range(5)]

    first = samples(seed=7)
    assert first == samples(seed=7)
    assert first != samples(seed=8)
    for draw in first:
        tokens = [item["input_ids"][0] for item in draw]
        assert len(set(tokens)) == 4  # without replacement

    buffer = ReplayBuffer(capacity=2, seed=0)
    buffer.push([sequence(1)])
    buffer.sample(1)[0]["input_ids"].append(99)
    assert buffer.sample(1) == [sequence(1)]


def test_buffer_sampling_is_uniform():
    # 8000 single draws over 4 items: each count is Binomial(8000, 1/4), mean 2000,
    # sd sqrt(8000 * 0.25 * 0.75) ~ 38.7; 5 sd (~194) fails by chance with p < 1e-5.
    buffer = ReplayBuffer(capacity=4, seed=3)
    buffer.push(sequence(token) for token in range(4))
    counts = Counter(buffer.sample(1)[0]["input_ids"][0] for _ in range(8000))
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(abs(count - 2000) < 5 * math.sqrt(8000 * 0.25 * 0.75) for count in counts.values())


@pytest.mark.parametrize("n", [0, 3])
def test_buffer_sample_size_must_fit(n):
    buffer = ReplayBuffer(capacity=5, seed=0)
    buffer.push([sequence(1), sequence(2)])
    with pytest.raises(ValueError, match=f"n must be .*got {n}"):
        buffer.sample(n)


@pytest.mark.parametrize(
    "item, message",
    [
        ({"input_ids": [1, 2]}, "missing \\['labels'\\]"),
        ({"input_ids": [1, 2], "labels": [2]}, "differ in length"),
    ],
)
def test_buffer_rejects_malformed_sequences(item, message):
    with pytest.raises(ValueError, match=message):
        ReplayBuffer(capacity=2, seed=0).push([item])


@pytest.mark.parametrize("capacity", [0, -1, 2.5, True])
def test_buffer_capacity_validated(capacity):
    with pytest.raises(ValueError, match=f"capacity must be an int >= 1, got {capacity!r}"):
        ReplayBuffer(capacity=capacity, seed=0)


@pytest.mark.parametrize("serialise", [json_round_trip, lambda s: pickle.loads(pickle.dumps(s))])
def test_buffer_state_round_trip_continues_sampling(serialise):
    original = ReplayBuffer(capacity=6, seed=1)
    original.push(sequence(token) for token in range(8))
    original.sample(3)
    state = serialise(original.state_dict())
    restored = ReplayBuffer(capacity=6, seed=999)
    restored.load_state_dict(state)
    assert len(restored) == len(original) == 6
    assert [restored.sample(3) for _ in range(10)] == [original.sample(3) for _ in range(10)]
    restored.push([sequence(50)])
    original.push([sequence(50)])
    assert restored.state_dict() == original.state_dict()


def test_buffer_state_capacity_must_match():
    state = ReplayBuffer(capacity=4, seed=0).state_dict()
    with pytest.raises(ValueError, match="capacity in the state \\(4\\) differs .*\\(5\\)"):
        ReplayBuffer(capacity=5, seed=0).load_state_dict(state)


# --- AdaptiveSGOScheduler ----------------------------------------------------------------
#
# The reference below is written from the released code (AMiD / DistiLLM `finetune.py`), not
# from amid_ray.sgo: `samp_threshold` per `--replay-ratio`, one uniform draw `r` per step, and the
# threshold update after each evaluation.

SCHEDULES = ("constant", "increasing", "decreasing")
DRAWS = 10_000


def released_source(r: float, tau: float, t: float, schedule: str, buffer_len: int,
                    capacity: int) -> str:
    if schedule == "constant":
        samp_threshold = tau * 0.5
    elif schedule == "increasing":
        samp_threshold = tau * t
    else:
        samp_threshold = tau * (1 - t)
    if r < samp_threshold or (r < tau and buffer_len < capacity):
        return "generate"
    if r < tau:
        return "replay"
    return "ground_truth"


def released_thresholds(dev_ces: list[float], init_threshold: float, loss_eps: float) -> list:
    """`prev_avg_loss` from the pre-training evaluation (dev_ces[0]), then one τ per evaluation."""
    adaptive_threshold, prev_avg_loss = init_threshold, dev_ces[0]
    trace = []
    for curr_avg_loss in dev_ces[1:]:
        if curr_avg_loss >= prev_avg_loss + loss_eps:
            adaptive_threshold += 0.1
            adaptive_threshold = min(adaptive_threshold, 1.0)
            prev_avg_loss = curr_avg_loss
        trace.append(adaptive_threshold)
    return trace


def released_probabilities(tau: float, t: float, schedule: str, full: bool) -> dict[str, float]:
    share = {"constant": 0.5, "increasing": t, "decreasing": 1 - t}[schedule]
    generate = tau * share if full else tau
    return {"generate": generate, "replay": tau - generate, "ground_truth": 1 - tau}


def within_5_sigma(count: int, probability: float, draws: int = DRAWS) -> bool:
    """A correct scheduler misses this by chance with p < 1e-6 per check (any seed)."""
    sigma = math.sqrt(probability * (1 - probability) / draws)
    return abs(count / draws - probability) <= 5 * sigma + 1e-12


def scheduler_at(tau: float, schedule: str, seed: int) -> AdaptiveSGOScheduler:
    return AdaptiveSGOScheduler(tau, replay_schedule=schedule, seed=seed)


def test_worked_example_of_the_issue():
    scheduler = AdaptiveSGOScheduler(0.0, seed=0)
    assert scheduler.observe_eval(2.00) == 0.0  # the evaluation before the first step
    trace = [scheduler.observe_eval(ce)
             for ce in [1.8, 1.78, 1.85, 2.01, 2.05, 2.08, 2.12, 2.15, 2.3, 2.32]]
    assert trace == [0, 0, 0, 0, 0, 0, 0.1, 0.1, 0.2, 0.2]
    assert scheduler.reference_ce == 2.3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("init_threshold", "loss_eps"), [(0.0, 0.1), (0.3, 0.05), (0.0, 0.0)])
def test_threshold_trace_matches_the_released_update(seed, init_threshold, loss_eps):
    # A random walk of dev CE long enough to hit the cap at 1.0 in some runs.
    rng = random.Random(seed)
    dev_ces = [2.0]
    for _ in range(40):
        dev_ces.append(dev_ces[-1] + rng.uniform(-0.1, 0.15))
    scheduler = AdaptiveSGOScheduler(init_threshold, loss_eps=loss_eps, seed=seed)
    trace = [scheduler.observe_eval(ce) for ce in dev_ces]
    assert trace[0] == init_threshold
    assert trace[1:] == released_thresholds(dev_ces, init_threshold, loss_eps)  # exact floats


def test_reference_moves_on_every_raise_even_at_the_cap():
    scheduler = AdaptiveSGOScheduler(0.9, max_threshold=1.0, seed=0)
    assert [scheduler.observe_eval(ce) for ce in (1.0, 1.5, 1.55, 2.0)] == [0.9, 1.0, 1.0, 1.0]
    # 1.5 raised τ to the cap and became the reference, so 1.55 (< 1.6) is no longer a raise;
    # 2.0 >= 1.6 is a raise at the cap and moves the reference again.
    assert scheduler.reference_ce == 2.0


def test_raise_is_inclusive_and_improvements_never_lower_tau():
    scheduler = AdaptiveSGOScheduler(0.25, loss_eps=0.5, step_size=0.25, seed=0)
    assert scheduler.observe_eval(1.0) == 0.25
    assert scheduler.observe_eval(1.5) == 0.5  # exactly reference + eps counts
    assert scheduler.observe_eval(0.1) == 0.5
    assert scheduler.reference_ce == 1.5


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("full", [False, True])
def test_choices_equal_the_released_rule_draw_for_draw(schedule, full):
    # Same seed, same uniform stream: the scheduler must make the released choice every time.
    taus, progresses = (0.0, 0.2, 0.55, 1.0), (0.0, 0.3, 0.75, 1.0)
    for tau, t in itertools.product(taus, progresses):
        scheduler = scheduler_at(tau, schedule, seed=17)
        stream = random.Random(17)
        got = [scheduler.choose(buffer_full=full, progress=t) for _ in range(300)]
        want = [released_source(stream.random(), tau, t, schedule, 1000 if full else 999, 1000)
                for _ in range(300)]
        assert got == want, (tau, t)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize(("tau", "t"), [(0.1, 0.0), (0.35, 0.25), (0.8, 0.9), (1.0, 0.5)])
def test_choice_frequencies_match_the_released_probabilities(schedule, full, tau, t):
    scheduler = scheduler_at(tau, schedule, seed=int(100 * tau + 10 * t))
    counts = Counter(scheduler.choose(buffer_full=full, progress=t) for _ in range(DRAWS))
    expected = released_probabilities(tau, t, schedule, full)
    assert set(counts) <= {name for name, p in expected.items() if p > 0}
    for source, probability in expected.items():
        assert within_5_sigma(counts[source], probability), (source, counts)


def test_decreasing_moves_student_steps_from_generation_to_replay():
    early, late = scheduler_at(0.6, "decreasing", 1), scheduler_at(0.6, "decreasing", 1)
    early_counts = Counter(early.choose(buffer_full=True, progress=0.1) for _ in range(DRAWS))
    late_counts = Counter(late.choose(buffer_full=True, progress=0.9) for _ in range(DRAWS))
    assert within_5_sigma(early_counts["generate"], 0.6 * 0.9)
    assert within_5_sigma(late_counts["replay"], 0.6 * 0.9)


def test_generation_share_per_schedule():
    for schedule, share in [("constant", 0.5), ("increasing", 0.3), ("decreasing", 0.7)]:
        assert scheduler_at(0.5, schedule, 0).generation_share(0.3) == pytest.approx(share)
    with pytest.raises(ValueError, match="progress must be a finite number in \\[0.0, 1.0\\], "
                                         "got 1.5"):
        scheduler_at(0.5, "constant", 0).choose(buffer_full=True, progress=1.5)


def test_released_defaults():
    scheduler = AdaptiveSGOScheduler(0.0, seed=0)
    assert (scheduler.loss_eps, scheduler.step_size, scheduler.max_threshold) == (0.1, 0.1, 1.0)
    assert scheduler.replay_schedule == "decreasing"
    assert scheduler.reference_ce is None


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ({"init_threshold": 1.5}, "init_threshold must be a finite number in [0.0, 1.0], got 1.5"),
        (
            {"init_threshold": True},
            "init_threshold must be a finite number in [0.0, 1.0], got True",
        ),
        (
            {"init_threshold": 0.5, "max_threshold": 0.4},
            "init_threshold must be a finite number in [0.0, 0.4], got 0.5",
        ),
        ({"max_threshold": 1.2}, "max_threshold must be a finite number in [0.0, 1.0], got 1.2"),
        ({"loss_eps": -0.1}, "loss_eps must be a finite number in [0.0, inf], got -0.1"),
        ({"step_size": float("nan")}, "step_size must be a finite number in [0.0, 1.0], got nan"),
        ({"seed": -1}, "seed must be an int >= 0, got -1"),
        ({"replay_schedule": "cyclic"},
         "replay_schedule must be one of ['constant', 'increasing', 'decreasing'], got 'cyclic'"),
    ],
)
def test_scheduler_arguments_validated(arguments, expected):
    arguments = {"init_threshold": 0.2, "seed": 0} | arguments
    with pytest.raises(ValueError) as error:
        AdaptiveSGOScheduler(**arguments)
    assert str(error.value) == expected


def test_replay_ratio_is_gone():
    with pytest.raises(TypeError, match="replay_ratio"):
        AdaptiveSGOScheduler(0.2, seed=0, replay_ratio=0.5)


def test_dev_ce_must_be_finite():
    with pytest.raises(ValueError, match="dev_ce must be .*got nan"):
        AdaptiveSGOScheduler(0.2, seed=0).observe_eval(float("nan"))


@pytest.mark.parametrize("serialise", [json_round_trip, lambda s: pickle.loads(pickle.dumps(s))])
def test_scheduler_state_round_trip_continues_exactly(serialise):
    original = AdaptiveSGOScheduler(0.3, seed=5)
    for step in range(100):
        original.choose(buffer_full=step > 10, progress=step / 100)
    original.observe_eval(2.0)
    original.observe_eval(2.5)
    state = serialise(original.state_dict())
    restored = AdaptiveSGOScheduler(0.3, seed=123)
    restored.load_state_dict(state)
    assert (restored.threshold, restored.reference_ce) == pytest.approx((0.4, 2.5))
    assert [restored.choose(True, 0.5) for _ in range(300)] == [
        original.choose(True, 0.5) for _ in range(300)
    ]
    assert restored.observe_eval(2.6) == original.observe_eval(2.6) == pytest.approx(0.5)
    assert restored.state_dict() == original.state_dict()


# --- MixedSGOScheduler -------------------------------------------------------------------


@pytest.mark.parametrize("mixed_alpha", [0.0, 0.5, 0.8, 1.0])
def test_mixed_choices_equal_the_released_rule(mixed_alpha):
    scheduler = MixedSGOScheduler(mixed_alpha, seed=9)
    stream = random.Random(9)
    got = [scheduler.choose(buffer_full=False, progress=0.5) for _ in range(DRAWS)]
    want = ["generate_and_replay" if stream.random() < mixed_alpha else "ground_truth"
            for _ in range(DRAWS)]
    assert got == want
    assert within_5_sigma(got.count("generate_and_replay"), mixed_alpha)


def test_mixed_scheduler_does_not_adapt_and_resumes_exactly():
    scheduler = MixedSGOScheduler(0.5, seed=3)
    assert [scheduler.observe_eval(ce) for ce in (2.0, 9.0, 20.0)] == [0.5, 0.5, 0.5]
    for _ in range(50):
        scheduler.choose(buffer_full=True, progress=0.0)
    restored = MixedSGOScheduler(0.5, seed=0)
    restored.load_state_dict(json_round_trip(scheduler.state_dict()))
    assert [restored.choose(True, 0.1) for _ in range(200)] == [
        scheduler.choose(True, 0.1) for _ in range(200)
    ]
    with pytest.raises(ValueError, match="mixed_alpha in the state \\(0.5\\) differs .*\\(0.4\\)"):
        MixedSGOScheduler(0.4, seed=0).load_state_dict(scheduler.state_dict())
    with pytest.raises(ValueError, match="mixed_alpha must be a finite number in \\[0.0, 1.0\\]"):
        MixedSGOScheduler(1.5, seed=0)


# --- generate_student_batch --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def student_batch(model, tokenizer, seed: int, max_length: int = MAX_LENGTH) -> list[dict]:
    return generate_student_batch(
        model,
        tokenizer,
        EXAMPLES,
        max_length=max_length,
        max_prompt_length=MAX_PROMPT_LENGTH,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=seed,
    )


def test_sampling_settings_are_pure_student_sampling():
    settings = student_generation_settings(max_prompt_length=8, max_new_tokens=5, batch_size=3)
    assert settings.do_sample
    assert (settings.temperature, settings.top_p, settings.top_k) == (1.0, 1.0, 0)
    assert settings.no_repeat_ngram_size == 0
    assert (settings.max_prompt_length, settings.max_new_tokens, settings.batch_size) == (8, 5, 3)


def test_generated_batch_is_encoded_like_ground_truth(tiny_model, tokenizer):
    batch = student_batch(tiny_model, tokenizer, seed=11)
    settings = student_generation_settings(
        max_prompt_length=MAX_PROMPT_LENGTH, max_new_tokens=MAX_NEW_TOKENS, batch_size=3
    )
    answers = generate_responses(
        tiny_model, tokenizer, [example.prompt for example in EXAMPLES], settings, seed=11
    )
    assert all(answers)  # a random 50k-token model almost never stops at once
    expected = [
        encode_example(
            tokenizer,
            replace(example, response=answer),
            max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
        )
        for example, answer in zip(EXAMPLES, answers, strict=True)
    ]
    assert batch == expected


def test_generated_labels_train_first_response_token_and_eos(tiny_model, tokenizer):
    for example, item in zip(EXAMPLES, student_batch(tiny_model, tokenizer, seed=3), strict=True):
        ids, labels = item["input_ids"], item["labels"]
        prompt = encode_prompt_ids(tokenizer, example.prompt, MAX_PROMPT_LENGTH)
        start = len(prompt)
        assert ids[:start] == prompt
        assert labels[:start] == [IGNORE_INDEX] * start
        assert len(ids) > start + 1  # at least one response token before EOS
        assert labels[start] == ids[start] != IGNORE_INDEX  # the first response token
        assert labels[start:] == ids[start:]
        assert ids[-1] == labels[-1] == EOS_ID
        assert ids.count(EOS_ID) == 1


def test_generated_batch_respects_max_length(tiny_model, tokenizer):
    longest_prompt = max(
        len(encode_prompt_ids(tokenizer, example.prompt, MAX_PROMPT_LENGTH)) for example in EXAMPLES
    )
    max_length = longest_prompt + 4
    for item in student_batch(tiny_model, tokenizer, seed=3, max_length=max_length):
        assert len(item["input_ids"]) <= max_length
        assert item["input_ids"][-1] == item["labels"][-1] == EOS_ID


def test_generated_batch_is_seeded(tiny_model, tokenizer):
    first = student_batch(tiny_model, tokenizer, seed=21)
    assert first == student_batch(tiny_model, tokenizer, seed=21)
    assert first != student_batch(tiny_model, tokenizer, seed=22)


@pytest.mark.parametrize("training", [True, False])
def test_generation_runs_in_eval_mode_without_grad_and_restores_mode(
    tiny_model, tokenizer, training
):
    seen: list[tuple[bool, bool]] = []
    hook = tiny_model.register_forward_hook(
        lambda module, inputs, output: seen.append((module.training, torch.is_grad_enabled()))
    )
    tiny_model.train(training)
    try:
        student_batch(tiny_model, tokenizer, seed=1)
    finally:
        hook.remove()
    assert seen and set(seen) == {(False, False)}
    assert all(module.training == training for module in tiny_model.modules())
    assert torch.is_grad_enabled()


def test_generation_arguments_checked_before_generating(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="at least one example"):
        generate_student_batch(
            tiny_model, tokenizer, [], max_length=8, max_prompt_length=4, max_new_tokens=2, seed=0
        )
    with pytest.raises(ValueError, match="max_prompt_length \\(8\\) must be smaller"):
        generate_student_batch(
            tiny_model,
            tokenizer,
            EXAMPLES,
            max_length=8,
            max_prompt_length=8,
            max_new_tokens=2,
            seed=0,
        )
