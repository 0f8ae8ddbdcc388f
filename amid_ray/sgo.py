"""Student-generated outputs (SGO): DistiLLM's adaptive off-policy scheme, as used by AMiD.

Each training step the scheduler picks one of three data sources (spec §4):

- "ground_truth": the dataset batch as it is;
- "generate": the student answers the batch's prompts by sampling; the encoded answers are
  trained on and pushed to the replay buffer;
- "replay": a batch is drawn uniformly from the replay buffer.

A step uses student-generated data with probability τ (the adaptive threshold). τ starts at
`init_threshold` and rises by `step_size` (capped at `max_threshold`) after every evaluation
whose dev loss exceeds the first evaluation's dev loss by more than `loss_eps`.
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

SGOChoice = Literal["ground_truth", "generate", "replay"]
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
    """Chooses each step's data source; raises the threshold τ when the dev loss worsens.

    Schedule per `choose` call: draw u ~ U(0, 1) and v ~ U(0, 1) from the seeded generator
    (always both, so the sequence of u does not depend on the buffer). If u >= τ the step uses
    the ground truth. Otherwise it uses student-generated data: "replay" when replay is
    possible and v < ρ, else "generate". So with a usable buffer P(generate) = τ (1 - ρ) and
    P(replay) = τ ρ.

    The replay ratio ρ follows `replay_schedule` over the run's progress t ∈ [0, 1]: "constant"
    (ρ = `replay_ratio`), "increasing" (ρ = `replay_ratio`·t: fresh answers early, when the
    buffer holds only the first, weakest student's outputs) or "decreasing"
    (ρ = `replay_ratio`·(1 - t)). `replay_ratio` is not fixed by the spec; 0.5 splits student
    steps evenly between fresh and replayed outputs.
    """

    def __init__(
        self,
        init_threshold: float,
        *,
        seed: int,
        loss_eps: float = 0.1,
        step_size: float = 0.1,
        max_threshold: float = 1.0,
        replay_ratio: float = 0.5,
        replay_schedule: str = "constant",
    ) -> None:
        _check_range("max_threshold", max_threshold, 0.0, 1.0)
        _check_range("init_threshold", init_threshold, 0.0, max_threshold)
        _check_range("loss_eps", loss_eps, 0.0, math.inf)
        _check_range("step_size", step_size, 0.0, 1.0)
        _check_range("replay_ratio", replay_ratio, 0.0, 1.0)
        if replay_schedule not in REPLAY_SCHEDULES:
            raise ValueError(f"replay_schedule must be one of {list(REPLAY_SCHEDULES)}, "
                             f"got {replay_schedule!r}")
        _check_int("seed", seed, 0)
        self.loss_eps = loss_eps
        self.step_size = step_size
        self.max_threshold = max_threshold
        self.replay_ratio = replay_ratio
        self.replay_schedule = replay_schedule
        self.threshold = float(init_threshold)
        self.reference_loss: float | None = None
        self._rng = random.Random(seed)

    def replay_ratio_at(self, progress: float) -> float:
        """ρ at `progress` (optimizer steps done / all steps, in [0, 1])."""
        _check_range("progress", progress, 0.0, 1.0)
        if self.replay_schedule == "increasing":
            return self.replay_ratio * progress
        if self.replay_schedule == "decreasing":
            return self.replay_ratio * (1.0 - progress)
        return self.replay_ratio

    def choose(self, can_replay: bool, progress: float = 0.0) -> SGOChoice:
        """This step's data source. `can_replay`: the buffer can fill a batch (the trainer passes
        `len(buffer) >= batch_size`); without it a student step always generates. `progress`:
        the run's progress, for the replay-ratio schedule."""
        ratio = self.replay_ratio_at(progress)
        use_student = self._rng.random() < self.threshold
        replay = self._rng.random() < ratio
        if not use_student:
            return "ground_truth"
        return "replay" if can_replay and replay else "generate"

    def observe_eval(self, dev_loss: float) -> float:
        """Record an evaluation's dev loss and return the (possibly raised) threshold.

        The first call only sets the reference loss. Later calls raise τ by `step_size`, capped
        at `max_threshold`, when dev_loss > reference + `loss_eps`; the reference stays fixed.
        """
        _check_range("dev_loss", dev_loss, -math.inf, math.inf)
        if self.reference_loss is None:
            self.reference_loss = float(dev_loss)
        elif dev_loss > self.reference_loss + self.loss_eps:
            self.threshold = min(self.threshold + self.step_size, self.max_threshold)
        return self.threshold

    def state_dict(self) -> dict[str, Any]:
        """Threshold, reference loss and generator state, as plain Python data."""
        return {
            "threshold": self.threshold,
            "reference_loss": self.reference_loss,
            "rng": _rng_state(self._rng),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; later choices continue the saved sequence exactly."""
        _check_range("threshold", state["threshold"], 0.0, self.max_threshold)
        self.threshold = float(state["threshold"])
        reference = state["reference_loss"]
        self.reference_loss = None if reference is None else float(reference)
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
