"""Evaluation: sampled generation under the paper protocol, ROUGE-L and exact match over seeds."""

from __future__ import annotations

import math
import statistics
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from amid_ray.data import GenerationCollator, InstructionExample, encode_prompt

PAPER_SEEDS = (10, 20, 30, 40, 50)
END_OF_TEXT = "<|endoftext|>"

Reference = str | list[str] | tuple[str, ...]


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    # Building the scorer loads the Porter stemmer; do it once per process.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _reference_lists(
    predictions: Sequence[str], references: Sequence[Reference]
) -> list[tuple[str, ...]]:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("cannot score an empty list of predictions")
    lists = [(item,) if isinstance(item, str) else tuple(item) for item in references]
    for index, item in enumerate(lists):
        if not item:
            raise ValueError(f"item {index} has no reference")
    return lists


def rouge_l(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean over items of 100 * max over the item's references of the ROUGE-L F-measure.

    Google's `rouge-score` with `use_stemmer=True` (its tokenizer lowercases and keeps only
    [a-z0-9] words). Each reference entry is a string or a list/tuple of strings.
    """
    scorer = _rouge_scorer()
    lists = _reference_lists(predictions, references)
    scores = [
        max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in refs)
        for prediction, refs in zip(predictions, lists, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores)


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The answer as exact match compares it, as released (`rouge_metric.normalize_answer` of
    AMiD / DistiLLM / MiniLLM, SQuAD's without removing articles): lower-cased, ASCII
    punctuation (`string.punctuation`) removed, runs of whitespace collapsed to one space and
    the ends stripped."""
    lowered = text.lower()
    without_punctuation = "".join(char for char in lowered if char not in _PUNCTUATION)
    return " ".join(without_punctuation.split())


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Percentage of items whose normalised prediction equals any normalised reference
    (`normalize_answer`)."""
    lists = _reference_lists(predictions, references)
    hits = [
        any(normalize_answer(prediction) == normalize_answer(reference) for reference in refs)
        for prediction, refs in zip(predictions, lists, strict=True)
    ]
    return 100.0 * sum(hits) / len(hits)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; the defaults are the paper protocol (sampling at temperature 1,
    top-p 1, top-k off (0), no-repeat-ngram 6, up to 256 new tokens after a left-cut prompt of
    at most 256 tokens). `do_sample=False` (see `as_greedy`) decodes greedily."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    max_new_tokens: int = 256
    max_prompt_length: int = 256
    batch_size: int = 8

    def __post_init__(self) -> None:
        def check(name: str, valid: bool, expected: str) -> None:
            if not valid:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        def number(value: object) -> bool:
            # bool is an int subclass; True is never meant as a temperature or a count.
            return isinstance(value, int | float) and not isinstance(value, bool)

        check("do_sample", isinstance(self.do_sample, bool), "a bool")
        temperature, top_p = self.temperature, self.top_p
        check(
            "temperature",
            number(temperature) and math.isfinite(temperature) and temperature > 0,
            "a finite number > 0",
        )
        check("top_p", number(top_p) and 0 < top_p <= 1, "a number in (0, 1]")
        for name, lowest in [
            ("top_k", 0),
            ("no_repeat_ngram_size", 0),
            ("max_new_tokens", 1),
            ("max_prompt_length", 1),
            ("batch_size", 1),
        ]:
            value = getattr(self, name)
            check(
                name,
                number(value) and isinstance(value, int) and value >= lowest,
                f"an int >= {lowest}",
            )

    def as_greedy(self) -> GenerationSettings:
        """The same settings with greedy decoding (seed-independent)."""
        return replace(self, do_sample=False)

    def generation_config(self, pad_token_id: int, stop_token_ids: list[int]) -> GenerationConfig:
        """The `GenerationConfig` for `model.generate`.

        The protocol fields are always explicit and repetition_penalty is pinned to 1 (off), so
        a checkpoint's own generation defaults (e.g. an instruct model's temperature) cannot
        change the protocol; sampling fields are only set when sampling.
        """
        sampling = (
            {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
            if self.do_sample
            else {}
        )
        return GenerationConfig(
            do_sample=self.do_sample,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            repetition_penalty=1.0,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=stop_token_ids,
            **sampling,
        )


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The EOS id plus the "<|endoftext|>" id when the vocabulary has it (chat models stop on
    their own EOS but may still emit end-of-text)."""
    candidates = [tokenizer.eos_token_id, tokenizer.get_vocab().get(END_OF_TEXT)]
    stops = sorted({token for token in candidates if token is not None})
    if not stops:
        raise ValueError("the tokenizer has neither an EOS token nor <|endoftext|>")
    return stops


def _cut_at_stop(token_ids: list[int], stop_token_ids: list[int]) -> list[int]:
    for position, token in enumerate(token_ids):
        if token in stop_token_ids:
            return token_ids[:position]
    return token_ids


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    seed: int,
    progress: bool = False,
) -> list[str]:
    """Generate one response per prompt, in the prompts' order.

    Prompts are cut from the left to `settings.max_prompt_length` tokens and left-padded into
    batches of `settings.batch_size`. `torch.manual_seed(seed)` is set once before the first
    batch. Only the new tokens are decoded; each response is cut at the first EOS /
    end-of-text token and stripped. The model runs in eval mode and gets its
    previous mode back afterwards.
    """
    stop_ids = _stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = settings.generation_config(pad_id, stop_ids)
    collate = GenerationCollator(pad_id)
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt, settings.max_prompt_length) for prompt in prompts]
    # Longest first: similar lengths share a batch (less padding) and memory peaks at once.
    order = sorted(range(len(encoded)), key=lambda index: -len(encoded[index]))
    responses: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    try:
        starts = range(0, len(order), settings.batch_size)
        for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
            batch_indices = order[start : start + settings.batch_size]
            batch = collate([encoded[index] for index in batch_indices])
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            output = model.generate(**batch, generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
            for index, tokens in zip(batch_indices, new_tokens, strict=True):
                text = tokenizer.decode(_cut_at_stop(tokens, stop_ids), skip_special_tokens=True)
                responses[index] = text.strip()
    finally:
        # Evaluation inside a training loop must hand the model back in the mode it came in.
        model.train(was_training)
    return responses


@dataclass(frozen=True)
class SetScores:
    """Scores of one evaluation set, one value per seed (in `EvalReport.seeds` order)."""

    size: int
    rouge_l: tuple[float, ...]
    exact_match: tuple[float, ...]

    @staticmethod
    def _summary(values: tuple[float, ...]) -> dict[str, float | list[float]]:
        return {
            "mean": statistics.fmean(values),
            "std": statistics.pstdev(values),
            "per_seed": list(values),
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.size,
            "rouge_l": self._summary(self.rouge_l),
            "exact_match": self._summary(self.exact_match),
        }


@dataclass(frozen=True)
class EvalReport:
    """Per-set ROUGE-L and exact match over seeds.

    Means are plain means over seeds; std is the POPULATION standard deviation (ddof=0,
    like `numpy.std`'s default), so a single seed has std 0.
    """

    seeds: tuple[int, ...]
    sets: dict[str, SetScores]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: {"seeds": [...], "sets": {name: {"n", "rouge_l", "exact_match"}}},
        each metric as {"mean", "std", "per_seed"}."""
        return {
            "seeds": list(self.seeds),
            "sets": {name: scores.to_dict() for name, scores in self.sets.items()},
        }

    def format_table(self) -> str:
        """A plain-text table: set, n, ROUGE-L mean ± std, EM mean ± std (2 decimals)."""
        rows = [("set", "n", "ROUGE-L", "EM")]
        for name, scores in self.sets.items():
            summary = scores.to_dict()
            cells = [
                f"{summary[metric]['mean']:.2f} ± {summary[metric]['std']:.2f}"
                for metric in ("rouge_l", "exact_match")
            ]
            rows.append((name, str(scores.size), *cells))
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        lines = [
            "  ".join(
                cell.ljust(width) if column == 0 else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        seeds = ", ".join(str(seed) for seed in self.seeds)
        return "\n".join(lines) + f"\n(mean ± population std over seeds {seeds})"


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_sets: Mapping[str, Sequence[InstructionExample]],
    settings: GenerationSettings,
    seeds: Sequence[int] = PAPER_SEEDS,
    *,
    progress: bool = False,
) -> EvalReport:
    """Generate for every set and seed and score ROUGE-L and exact match against `references`.

    Greedy decoding does not depend on the seed, so it generates once per set and repeats the
    scores for each seed (std 0).
    """
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    sets: dict[str, SetScores] = {}
    for name, examples in eval_sets.items():
        if not examples:
            raise ValueError(f"eval set {name!r} is empty")
        prompts = [example.prompt for example in examples]
        references = [example.references for example in examples]
        rouge, match = [], []
        for seed in seeds if settings.do_sample else seeds[:1]:
            predictions = generate_responses(
                model, tokenizer, prompts, settings, seed=seed, progress=progress
            )
            rouge.append(rouge_l(predictions, references))
            match.append(exact_match(predictions, references))
        if not settings.do_sample:
            rouge, match = rouge * len(seeds), match * len(seeds)
        sets[name] = SetScores(len(examples), tuple(rouge), tuple(match))
    return EvalReport(seeds=seeds, sets=sets)
