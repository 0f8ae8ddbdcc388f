"""Instruction data: loading (MiniLLM / Dolly / Alpaca rows), prompts, tokenisation, collators.

Rows may come from a `.jsonl` file, a `.json` list of objects, a Hugging Face `datasets`
folder written by `save_to_disk`, or a Hub dataset `org/name[@revision][:split]` (`config.hub_id`;
split `train` unless given), whose files are fetched into the Hugging Face cache and read with
`datasets.load_dataset`. Three row formats are recognised, per row:

- MiniLLM processed: `instruction`, `input`, `output` (a string or a list of references),
  optional `prompt` (the template already applied);
- Dolly raw: `instruction`, `context`, `response`, `category` (when there is no `output`);
- Alpaca: `instruction`, `input`, `output`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from amid_ray.config import HubError, HubId, hub_download, hub_id

IGNORE_INDEX = -100
RESPONSE_CUE = "### Response:\n"
#: The split a Hub dataset id without `:split` stands for.
DEFAULT_HUB_SPLIT = "train"

_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n" + RESPONSE_CUE
)
_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n" + RESPONSE_CUE
)

T = TypeVar("T")


@dataclass(frozen=True)
class InstructionExample:
    """One instruction-following item.

    `response` is the training target (the first reference); `references` holds every
    reference, used for ROUGE-L; `source` says where the row came from ("file.jsonl:12").
    """

    prompt: str
    response: str
    references: tuple[str, ...]
    source: str


class DataError(ValueError):
    """A data file that cannot be read as instruction data; says where and what was expected."""

    def __init__(self, file: str, location: str, field: str | None, problem: str) -> None:
        self._parts = (file, location, field, problem)
        where = f"{file}: {location}" if location else file
        what = f"field '{field}': {problem}" if field else problem
        super().__init__(f"{where}: {what}")

    def __reduce__(self):
        # Raised inside Ray workers, it must survive pickling back to the driver.
        return type(self), self._parts


def build_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca template used by MiniLLM; the "### Input:" block only for a non-empty `input`."""
    if input:
        return _PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return _PROMPT_NO_INPUT.format(instruction=instruction)


def load_examples(path: str | Path, *, limit: int | None = None) -> list[InstructionExample]:
    """Read instruction examples from a `.jsonl` file, a `.json` list, a `datasets` folder or a
    Hub dataset id.

    The format is detected per row (see the module docstring). A row without `prompt` gets one
    from `build_prompt`. Optional fields that are null count as absent (datasets fill missing
    columns with None). `limit` keeps only the first `limit` rows. Raises `DataError` naming
    the file (or Hub id), the 1-based line (row for `datasets` folders and Hub datasets) and the
    field.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    name = source_name(path)
    examples = []
    for line, row in read_rows(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_parse_row(row, name, line))
    return examples


def source_name(path: str | Path) -> str:
    """How errors and examples name a data source: a file's name, or a Hub id as written."""
    hub = hub_id(str(path))
    return hub.text if hub is not None else Path(path).name


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs of a `.jsonl` file, a `.json` list, a `datasets` folder or a Hub
    dataset id (recognised in the text of `path`); the location ("line 12", "row 3") is what
    error messages name."""
    hub = hub_id(str(path))
    if hub is not None:
        return _hub_rows(hub)
    path = Path(path)
    if path.is_dir():
        return _dataset_rows(path)
    if not path.exists():
        raise DataError(str(path), "", None, "no such file or folder")
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".json":
        return _json_list_rows(path)
    raise DataError(
        path.name, "", None, "expected a .jsonl or .json file or a datasets save_to_disk folder"
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # Bytes, decoded line by line: an undecodable byte is reported on its own line.
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(path.name, f"line {number}", None,
                                _not_utf8(error, line)) from None
            if not text.strip():
                continue
            try:
                yield f"line {number}", json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    path.name, f"line {number}", None, f"malformed JSON ({error.msg})"
                ) from None


def _json_list_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Walk a top-level JSON list item by item so each row keeps the line it starts on."""
    content = path.read_bytes()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        raise DataError(path.name, f"line {line}", None, _not_utf8(error, content)) from None
    decoder = json.JSONDecoder()

    def line_at(offset: int) -> str:
        return f"line {text.count(chr(10), 0, offset) + 1}"

    def skip_space(offset: int) -> int:
        while offset < len(text) and text[offset].isspace():
            offset += 1
        return offset

    position = skip_space(0)
    if not text.startswith("[", position):
        raise DataError(path.name, line_at(position), None, "expected a JSON list of objects")
    position = skip_space(position + 1)
    if text.startswith("]", position):
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(
                path.name, f"line {error.lineno}", None, f"malformed JSON ({error.msg})"
            ) from None
        yield line_at(position), item
        position = skip_space(end)
        if text.startswith(",", position):
            position = skip_space(position + 1)
        elif text.startswith("]", position):
            return
        else:
            raise DataError(path.name, line_at(position), None, "malformed JSON (expected , or ])")


def _not_utf8(error: UnicodeDecodeError, data: bytes) -> str:
    """What is wrong with an undecodable byte of `data`, for a DataError."""
    return (f"not UTF-8 text (byte 0x{data[error.start]:02x}: {error.reason}); save the file "
            "as UTF-8")


def _dataset_rows(folder: Path) -> Iterator[tuple[str, Any]]:
    import datasets  # lazy: only needed for save_to_disk folders

    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise DataError(
            folder.name, "", None, f"not a datasets save_to_disk folder ({error})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise DataError(
                folder.name,
                "",
                None,
                f"expected one split, found {sorted(loaded)}; pass the split's folder instead",
            )
        (loaded,) = loaded.values()
    for number, row in enumerate(loaded, start=1):
        yield f"row {number}", row


def _hub_rows(hub: HubId) -> Iterator[tuple[str, Any]]:
    """Rows of a split of a Hub dataset. The repository's files are fetched into the Hugging
    Face cache (read from it alone when offline) and read with `datasets.load_dataset`, which
    maps files to splits as the Hub does; streamed, so nothing is converted or copied."""
    import datasets  # lazy: only needed for datasets

    split = hub.part or DEFAULT_HUB_SPLIT
    try:
        folder = hub_download(hub, "dataset")
    except HubError as error:
        raise DataError(hub.text, "", None, str(error)) from None
    try:
        rows = datasets.load_dataset(str(folder), split=split, streaming=True)
    except Exception as error:  # whatever datasets raises for a repository it cannot read
        raise DataError(hub.text, "", None, f"cannot be read as a dataset with split {split!r} "
                        f"({type(error).__name__}: {error})") from None

    def numbered() -> Iterator[tuple[str, Any]]:
        number = 0
        try:
            for row in rows:
                number += 1
                yield f"row {number}", row
        except Exception as error:  # a damaged file: pyarrow, json or datasets errors
            raise DataError(hub.text, f"after row {number}", None,
                            f"cannot be read ({type(error).__name__}: {error})") from None

    return numbered()


def _parse_row(row: Any, file: str, location: str) -> InstructionExample:
    if not isinstance(row, Mapping):
        raise DataError(file, location, None, f"expected a JSON object, got {type(row).__name__}")

    def text_field(name: str, *, required: bool) -> str:
        value = row.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            got = "nothing" if name not in row else type(value).__name__
            raise DataError(file, location, name, f"expected a string, got {got}")
        return value

    instruction = text_field("instruction", required=True)
    # Dolly raw rows carry the input as `context` and the answer as `response`.
    dolly_raw = "output" not in row and "response" in row
    input_text = text_field("context" if dolly_raw else "input", required=False)
    references = _references(
        row.get("response" if dolly_raw else "output"),
        file,
        location,
        "response" if dolly_raw else "output",
    )
    prompt = text_field("prompt", required=False) or build_prompt(instruction, input_text)
    if not prompt.endswith(RESPONSE_CUE):
        raise DataError(file, location, "prompt", f"expected the text to end with {RESPONSE_CUE!r}")
    return InstructionExample(
        prompt=prompt,
        response=references[0],
        references=references,
        source=f"{file}:{location.split()[-1]}",
    )


def _references(value: Any, file: str, location: str, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple):
        got = "nothing" if value is None else type(value).__name__
        raise DataError(
            file, location, field, f"expected a string or a non-empty list of strings, got {got}"
        )
    if not value:
        raise DataError(file, location, field, "expected at least one reference, got an empty list")
    for index, reference in enumerate(value):
        if not isinstance(reference, str):
            raise DataError(
                file,
                location,
                f"{field}[{index}]",
                f"expected a string, got {type(reference).__name__}",
            )
    return tuple(value)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, max_prompt_length: int
) -> list[int]:
    """Token ids of `prompt` (no special tokens), cut from the LEFT to `max_prompt_length`.

    Cutting the left end keeps the "### Response:" cue that ends every prompt.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    # verbose=False: prompts longer than the model context are expected here and cut below.
    ids = tokenizer.encode(prompt, add_special_tokens=False, verbose=False)
    return ids[-max_prompt_length:]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: InstructionExample,
    *,
    max_length: int,
    max_prompt_length: int,
) -> dict[str, list[int]]:
    """`input_ids` = prompt + response + EOS, `labels` = -100 on the prompt, ids elsewhere.

    Prompt and response are tokenised separately so the label boundary is exact. The prompt is
    cut from the left to `max_prompt_length`, the response from the right so that the whole
    sequence, EOS included, fits in `max_length`.
    """
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length "
            f"({max_length}) to leave room for the response and EOS"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; the response needs an end token")
    prompt_ids = encode_prompt(tokenizer, example.prompt, max_prompt_length)
    response_ids = tokenizer.encode(example.response, add_special_tokens=False, verbose=False)
    response_ids = response_ids[: max_length - len(prompt_ids) - 1] + [eos]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def split_train_dev(
    examples: Sequence[T], *, dev_size: int | float, seed: int
) -> tuple[list[T], list[T]]:
    """Shuffle with `random.Random(seed)` and cut off a dev part.

    `dev_size` is a count (int, 0..len) or a fraction (float in (0, 1), rounded to a count).
    Returns (train, dev); the same seed always gives the same split.
    """
    if isinstance(dev_size, bool):
        raise ValueError(f"dev_size must be an int or a float, got {dev_size!r}")
    if isinstance(dev_size, float):
        if not 0.0 < dev_size < 1.0:
            raise ValueError(f"a fractional dev_size must be in (0, 1), got {dev_size}")
        dev_count = round(len(examples) * dev_size)
    else:
        if not 0 <= dev_size <= len(examples):
            raise ValueError(f"dev_size must be in [0, {len(examples)}], got {dev_size}")
        dev_count = dev_size
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled[dev_count:], shuffled[:dev_count]


def _check_batch(batch: Sequence[Any]) -> None:
    if not batch:
        raise ValueError("cannot collate an empty batch")


@dataclass(frozen=True)
class TrainingCollator:
    """Right-pads encoded examples: `input_ids` with the pad id, `attention_mask` with 0,
    `labels` with -100 (so padding never enters the loss). Returns long tensors [batch, len]."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        _check_batch(features)
        width = max(len(feature["input_ids"]) for feature in features)
        input_ids, attention_mask, labels = [], [], []
        for feature in features:
            ids, target = list(feature["input_ids"]), list(feature["labels"])
            if len(ids) != len(target):
                raise ValueError(
                    f"input_ids and labels differ in length ({len(ids)} vs {len(target)})"
                )
            padding = width - len(ids)
            input_ids.append(ids + [self.pad_token_id] * padding)
            attention_mask.append([1] * len(ids) + [0] * padding)
            labels.append(target + [IGNORE_INDEX] * padding)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


@dataclass(frozen=True)
class GenerationCollator:
    """Left-pads prompt id lists so every prompt ends at the last column, where generation
    continues. Returns `input_ids` and `attention_mask` (0 on padding) as long tensors."""

    pad_token_id: int

    def __call__(self, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        _check_batch(prompts)
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("cannot generate from an empty prompt")
        width = max(len(prompt) for prompt in prompts)
        input_ids = [[self.pad_token_id] * (width - len(p)) + list(p) for p in prompts]
        attention_mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }


def response_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which logit positions predict a response token, and the token each predicts.

    The logits at position t predict token t+1, so position t counts when labels[t+1] is not
    ignored. Working on the unshifted logits avoids copying the `[batch, length, vocab]` tensor.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets != IGNORE_INDEX, targets
