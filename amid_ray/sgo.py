"""Student-generated outputs (SGO): DistiLLM's off-policy schemes, as AMiD's released code runs
them.

Each training micro-batch comes from one of these sources (AMID_SPEC §4):

- "ground_truth": the dataset batch as it is;
- "generate": the student answers the batch's prompts by sampling; the encoded answers are
  trained on and pushed to the per-worker replay buffer;
- "replay": a batch drawn uniformly from the replay buffer;
- "generate_and_replay" (the `mixed` scheme of GKD / ImitKD only): fresh answers are pushed to
  the buffer and the step trains on a batch drawn from the buffer.

`AdaptiveSGOScheduler` is the `adaptive` scheme (AMiD's and DistiLLM's main scripts);
`MixedSGOScheduler` is the `mixed` scheme (DistiLLM's GKD and ImitKD scripts). Both follow
`finetune.py` of github.com/aailab-kaist/AMiD (identical in github.com/jongwooko/distillm).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from amid_ray.config import REPLAY_SCHEDULES
from amid_ray.data import InstructionExample, encode_example
from amid_ray.evaluation import GenerationSettings, generate_responses

SGOChoice = Literal["ground_truth", "generate", "replay", "generate_and_replay"]
EncodedSequence = dict[str, list[int]]

_SEQUENCE_KEYS = ("input_ids", "labels")


def _rng_state(rng: random.Random) -> dict[str, Any]:
    """The state of `rng` as plain lists and numbers (JSON-able, unlike `getstate()`'s tuples)."""
    version, internal, gauss_next = rng.getstate()
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _restore_rng(rng: random.Random, state: Mapping[str, Any]) -> None:
    """Inverse of `_rng_state`: `rng` continues exactly where the saved generator stopped."""
    rng.setstate((state["version"], tuple(state["internal"]), state["gauss_next"]))


def _is_number(value: object) -> bool:
    # bool is an int subclass; True is never meant as a probability or a loss.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(name: str, value: object, low: float, high: float) -> None:
    """Raise ValueError unless `value` is a finite number in [low, high]."""
    if not (_is_number(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")


def _check_int(name: str, value: object, lowest: int) -> None:
    """Raise ValueError unless `value` is an int >= `lowest`."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= lowest):
        raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")


def _encoded_copy(item: Mapping[str, Sequence[int]]) -> EncodedSequence:
    """A fresh `{"input_ids", "labels"}` dict of lists; both keys present and equally long."""
    missing = [key for key in _SEQUENCE_KEYS if key not in item]
    if missing:
        raise ValueError(f"an encoded sequence needs {list(_SEQUENCE_KEYS)}, missing {missing}")
    input_ids, labels = list(item["input_ids"]), list(item["labels"])
    if len(input_ids) != len(labels):
        raise ValueError(
            f"input_ids and labels differ in length ({len(input_ids)} vs {len(labels)})"
        )
    return {"input_ids": input_ids, "labels": labels}


class ReplayBuffer:
    """A first-in-first-out store of encoded student outputs with seeded uniform sampling.

    Holds at most `capacity` sequences; pushing past it evicts the oldest first. Items are
    copied on the way in and out, so callers cannot change what is stored.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        _check_int("capacity", capacity, 1)
        _check_int("seed", seed, 0)
        self.capacity = capacity
        self._items: deque[EncodedSequence] = deque(maxlen=capacity)
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        """Whether the buffer holds `capacity` sequences (adaptive SGO replays only then)."""
        return len(self._items) >= self.capacity

    def push(self, items: Iterable[Mapping[str, Sequence[int]]]) -> None:
        """Append `items` in order (each with `input_ids` and `labels`), evicting the oldest."""
        self._items.extend(_encoded_copy(item) for item in items)

    def sample(self, n: int) -> list[EncodedSequence]:
        """`n` distinct stored sequences drawn uniformly (without replacement), 1 <= n <= len."""
        _check_int("n", n, 1)
        if n > len(self._items):
            raise ValueError(f"n must be <= the buffer size {len(self._items)}, got {n}")
        indices = self._rng.sample(range(len(self._items)), n)
        return [_encoded_copy(self._items[index]) for index in indices]

    def state_dict(self) -> dict[str, Any]:
        """Capacity, stored sequences (oldest first) and sampler state, as plain Python data."""
        return {
            "capacity": self.capacity,
            "items": [_encoded_copy(item) for item in self._items],
            "rng": _rng_state(self._rng),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; the buffer then samples exactly as the saved one would.

        The capacity is configuration, not state: it must match this buffer's.
        """
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"capacity in the state ({state['capacity']}) differs from this buffer's "
                f"({self.capacity})"
            )
        if len(state["items"]) > self.capacity:
            raise ValueError(
                f"the state holds {len(state['items'])} items, more than capacity {self.capacity}"
            )
        self._items = deque((_encoded_copy(item) for item in state["items"]), maxlen=self.capacity)
        _restore_rng(self._rng, state["rng"])


class AdaptiveSGOScheduler:
    """DistiLLM's adaptive SGO as released: picks each step's source, raises τ when the dev
    cross-entropy worsens.

    Per `choose` call, with one draw u ~ U(0, 1) and the run's progress t ∈ [0, 1]:

        g(t) = 1 - t (`decreasing`, the released default), t (`increasing`), 0.5 (`constant`)
        "generate"      if u < τ·g(t), or if u < τ while the replay buffer is not full
        "replay"        else if u < τ
        "ground_truth"  otherwise

    So a student-generated step happens with probability τ; until the buffer first fills every
    such step generates, afterwards a share g(t) of them generates and the rest replays
    (`decreasing`: generation falls and replay rises over the run).

    τ (`threshold`) starts at `init_threshold`. `observe_eval` takes the student's plain
    next-token cross-entropy on the dev ground truth; its first call (the evaluation before the
    first step) sets the reference. After that, when dev_ce >= reference + `loss_eps`, τ rises by
    `step_size` (capped at `max_threshold`) and the reference becomes this dev_ce.

    Source (github.com/aailab-kaist/AMiD, `finetune.py`, `finetune()`): `prev_avg_loss` is
    `evaluate()`'s return (mean dev cross-entropy) measured before the epoch loop; after each
    evaluation `if curr_avg_loss >= prev_avg_loss + args.loss_eps: adaptive_threshold += 0.1;
    adaptive_threshold = min(adaptive_threshold, 1.0); prev_avg_loss = curr_avg_loss`; per step
    `samp_threshold = adaptive_threshold * g(global_step / args.total_iters)` and `r =
    np.random.uniform(0, 1)` choose the source as above with `len(replay_buffer) <
    args.capacity`. `step_size` and `max_threshold` are the hard-coded 0.1 and 1.0 there.
    """

    def __init__(
        self,
        init_threshold: float,
        *,
        seed: int,
        loss_eps: float = 0.1,
        step_size: float = 0.1,
        max_threshold: float = 1.0,
        replay_schedule: str = "decreasing",
    ) -> None:
        _check_range("max_threshold", max_threshold, 0.0, 1.0)
        _check_range("init_threshold", init_threshold, 0.0, max_threshold)
        _check_range("loss_eps", loss_eps, 0.0, math.inf)
        _check_range("step_size", step_size, 0.0, 1.0)
        if replay_schedule not in REPLAY_SCHEDULES:
            raise ValueError(f"replay_schedule must be one of {list(REPLAY_SCHEDULES)}, "
                             f"got {replay_schedule!r}")
        _check_int("seed", seed, 0)
        self.loss_eps = loss_eps
        self.step_size = step_size
        self.max_threshold = max_threshold
        self.replay_schedule = replay_schedule
        self.threshold = float(init_threshold)
        self.reference_ce: float | None = None
        self._rng = random.Random(seed)

    def generation_share(self, progress: float) -> float:
        """g(t): the share of student steps that generate once the buffer is full."""
        _check_range("progress", progress, 0.0, 1.0)
        if self.replay_schedule == "increasing":
            return progress
        if self.replay_schedule == "decreasing":
            return 1.0 - progress
        return 0.5

    def choose(self, buffer_full: bool, progress: float) -> SGOChoice:
        """This step's source. `buffer_full`: the replay buffer holds `capacity` items.
        `progress`: t = optimizer step / all steps (the released code uses the 1-based index of
        the step being taken, so t = 1/total on the first step and 1 on the last)."""
        generate_below = self.threshold * self.generation_share(progress)
        u = self._rng.random()
        if u < generate_below or (u < self.threshold and not buffer_full):
            return "generate"
        if u < self.threshold:
            return "replay"
        return "ground_truth"

    def observe_eval(self, dev_ce: float) -> float:
        """Record an evaluation's dev cross-entropy and return the (possibly raised) τ.

        The first call (the pre-training evaluation) only sets the reference.
        """
        _check_range("dev_ce", dev_ce, -math.inf, math.inf)
        if self.reference_ce is None:
            self.reference_ce = float(dev_ce)
        elif dev_ce >= self.reference_ce + self.loss_eps:
            self.threshold = min(self.threshold + self.step_size, self.max_threshold)
            self.reference_ce = float(dev_ce)
        return self.threshold

    def state_dict(self) -> dict[str, Any]:
        """τ, reference cross-entropy and generator state, as plain Python data."""
        return {
            "threshold": self.threshold,
            "reference_ce": self.reference_ce,
            "rng": _rng_state(self._rng),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; later choices continue the saved sequence exactly."""
        _check_range("threshold", state["threshold"], 0.0, self.max_threshold)
        self.threshold = float(state["threshold"])
        reference = state["reference_ce"]
        self.reference_ce = None if reference is None else float(reference)
        _restore_rng(self._rng, state["rng"])


class MixedSGOScheduler:
    """DistiLLM's `mixed` scheme (its GKD and ImitKD scripts, `--type mixed-*`): with
    probability `mixed_alpha` a step generates fresh answers, pushes them to the replay buffer
    and trains on a batch drawn from the buffer ("generate_and_replay"); otherwise it trains on
    the ground truth. Nothing adapts: `observe_eval` leaves `threshold` (= `mixed_alpha`) as is.

    Source: `finetune.py`, `if "mixed" in args.type and r < args.mixed_alpha:` (generate,
    `move_to_memory`, then `replay_buffer.sample()`).
    """

    def __init__(self, mixed_alpha: float, *, seed: int) -> None:
        _check_range("mixed_alpha", mixed_alpha, 0.0, 1.0)
        _check_int("seed", seed, 0)
        self.threshold = float(mixed_alpha)
        self._rng = random.Random(seed)

    def choose(self, buffer_full: bool, progress: float) -> SGOChoice:
        """This step's source; `buffer_full` and `progress` do not matter to this scheme (they
        keep the call the same as `AdaptiveSGOScheduler.choose`)."""
        _check_range("progress", progress, 0.0, 1.0)
        return "generate_and_replay" if self._rng.random() < self.threshold else "ground_truth"

    def observe_eval(self, dev_ce: float) -> float:
        """The scheme does not adapt; returns `mixed_alpha`."""
        _check_range("dev_ce", dev_ce, -math.inf, math.inf)
        return self.threshold

    def state_dict(self) -> dict[str, Any]:
        """Generator state, as plain Python data."""
        return {"threshold": self.threshold, "rng": _rng_state(self._rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; `mixed_alpha` is configuration and must match."""
        if state["threshold"] != self.threshold:
            raise ValueError(f"mixed_alpha in the state ({state['threshold']}) differs from this "
                             f"scheduler's ({self.threshold})")
        _restore_rng(self._rng, state["rng"])


def student_generation_settings(
    *, max_prompt_length: int, max_new_tokens: int, batch_size: int
) -> GenerationSettings:
    """Pure sampling from the student: temperature 1, top-p 1, top-k off and, unlike the
    evaluation protocol, no n-gram blocking, so the outputs follow the student's distribution."""
    return GenerationSettings(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
    )


def generate_student_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[InstructionExample],
    *,
    max_length: int,
    max_prompt_length: int,
    max_new_tokens: int,
    seed: int,
) -> list[EncodedSequence]:
    """The student's answers to the prompts of `examples`, encoded as training sequences.

    Generation goes through `evaluation.generate_responses` (eval mode, no grad, training mode
    restored, `torch.manual_seed(seed)`, answers cut at end-of-text and stripped). Each answer
    is then encoded exactly like a ground-truth response by `data.encode_example`: prompt +
    answer + EOS, labels -100 on the prompt only, so the position predicting the first answer
    token is trained. Re-tokenising the decoded text keeps this identical to the ground-truth
    path at the cost of occasionally differing from the sampled ids (e.g. stripped spaces).
    """
    if not examples:
        raise ValueError("examples must hold at least one example, got none")
    if max_prompt_length >= max_length:  # checked before generating, not after
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length "
            f"({max_length}) to leave room for the response and EOS"
        )
    settings = student_generation_settings(
        max_prompt_length=max_prompt_length,
        max_new_tokens=max_new_tokens,
        batch_size=len(examples),
    )
    answers = generate_responses(
        model, tokenizer, [example.prompt for example in examples], settings, seed=seed
    )
    return [
        encode_example(
            tokenizer,
            replace(example, response=answer),
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for example, answer in zip(examples, answers, strict=True)
    ]
