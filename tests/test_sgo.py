"""Student-generated outputs: replay buffer, adaptive scheduler, generated-batch encoding."""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from dataclasses import replace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from amid_ray.data import IGNORE_INDEX, InstructionExample, build_prompt, encode_example
from amid_ray.data import encode_prompt as encode_prompt_ids
from amid_ray.evaluation import generate_responses
from amid_ray.models import load_gpt2_tokenizer
from amid_ray.sgo import (
    AdaptiveSGOScheduler,
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

STEPS = 10_000


def tolerance(probability: float) -> float:
    """5 standard deviations of a frequency over STEPS Bernoulli(probability) draws: a correct
    scheduler misses it by chance with p < 1e-6 for any seed (about 0.023 at p = 0.3)."""
    return 5 * math.sqrt(probability * (1 - probability) / STEPS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choice_frequencies_follow_threshold_and_replay_ratio(seed):
    scheduler = AdaptiveSGOScheduler(0.3, replay_ratio=0.4, seed=seed)
    counts = Counter(scheduler.choose(can_replay=True) for _ in range(STEPS))
    expected = {"ground_truth": 0.7, "generate": 0.3 * 0.6, "replay": 0.3 * 0.4}
    for choice, probability in expected.items():
        assert abs(counts[choice] / STEPS - probability) < tolerance(probability), choice


@pytest.mark.parametrize(
    ("schedule", "progress", "ratio"),
    [("constant", 0.9, 0.4), ("increasing", 0.0, 0.0), ("increasing", 0.5, 0.2),
     ("increasing", 1.0, 0.4), ("decreasing", 0.0, 0.4), ("decreasing", 0.75, 0.1)],
)
def test_replay_ratio_schedule_sets_the_replay_frequency(schedule, progress, ratio):
    scheduler = AdaptiveSGOScheduler(0.5, replay_ratio=0.4, replay_schedule=schedule, seed=3)
    assert scheduler.replay_ratio_at(progress) == pytest.approx(ratio)
    counts = Counter(scheduler.choose(can_replay=True, progress=progress) for _ in range(STEPS))
    assert abs(counts["replay"] / STEPS - 0.5 * ratio) < tolerance(0.5 * ratio) + 1e-12
    assert abs(counts["ground_truth"] / STEPS - 0.5) < tolerance(0.5)


def test_without_replay_every_student_step_generates():
    scheduler = AdaptiveSGOScheduler(0.3, replay_ratio=1.0, seed=0)
    counts = Counter(scheduler.choose(can_replay=False) for _ in range(STEPS))
    assert set(counts) == {"ground_truth", "generate"}
    assert abs(counts["generate"] / STEPS - 0.3) < tolerance(0.3)


def test_student_steps_do_not_depend_on_replay_availability():
    def student_steps(can_replay: bool) -> list[bool]:
        scheduler = AdaptiveSGOScheduler(0.5, seed=4)
        return [scheduler.choose(can_replay) != "ground_truth" for _ in range(200)]

    assert student_steps(True) == student_steps(False)


@pytest.mark.parametrize("threshold, only", [(0.0, "ground_truth"), (1.0, "generate")])
def test_extreme_thresholds(threshold, only):
    scheduler = AdaptiveSGOScheduler(threshold, replay_ratio=0.0, seed=0)
    assert {scheduler.choose(can_replay=True) for _ in range(500)} == {only}


def test_threshold_rises_only_past_reference_plus_eps_and_is_capped():
    scheduler = AdaptiveSGOScheduler(0.2, loss_eps=0.1, step_size=0.1, max_threshold=0.45, seed=0)
    observed = [
        (1.0, 0.2),  # sets the reference, no change
        (1.1, 0.2),  # equal to reference + eps: not above it
        (1.05, 0.2),
        (1.2, 0.3),
        (0.5, 0.3),  # improving never lowers it, and the reference stays 1.0
        (1.15, 0.4),
        (2.0, 0.45),  # capped
        (2.0, 0.45),
    ]
    for dev_loss, threshold in observed:
        assert scheduler.observe_eval(dev_loss) == pytest.approx(threshold)
        assert scheduler.threshold == pytest.approx(threshold)
    assert scheduler.reference_loss == 1.0


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ({"init_threshold": 1.5}, "init_threshold must be a finite number in [0.0, 1.0], got 1.5"),
        (
            {"init_threshold": -0.1},
            "init_threshold must be a finite number in [0.0, 1.0], got -0.1",
        ),
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
        ({"replay_ratio": 2}, "replay_ratio must be a finite number in [0.0, 1.0], got 2"),
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


def test_dev_loss_must_be_finite():
    with pytest.raises(ValueError, match="dev_loss must be .*got nan"):
        AdaptiveSGOScheduler(0.2, seed=0).observe_eval(float("nan"))


@pytest.mark.parametrize("serialise", [json_round_trip, lambda s: pickle.loads(pickle.dumps(s))])
def test_scheduler_state_round_trip_continues_choices(serialise):
    original = AdaptiveSGOScheduler(0.3, seed=5)
    for step in range(100):
        original.choose(can_replay=step > 10)
    original.observe_eval(2.0)
    original.observe_eval(2.5)
    state = serialise(original.state_dict())
    restored = AdaptiveSGOScheduler(0.3, seed=123)
    restored.load_state_dict(state)
    assert (restored.threshold, restored.reference_loss) == pytest.approx((0.4, 2.0))
    assert [restored.choose(True) for _ in range(300)] == [
        original.choose(True) for _ in range(300)
    ]
    assert restored.observe_eval(2.2) == original.observe_eval(2.2) == pytest.approx(0.5)


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
