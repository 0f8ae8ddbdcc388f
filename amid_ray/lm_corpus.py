"""The plain-text corpus of the optional language-modelling loss.

The paper's released scripts add a language-modelling loss on OpenWebText (weight 1.0) to the
distillation loss (spec §4). Documents come from a `.txt` file (documents separated by blank
lines), or from `.jsonl` / `.json` rows or a `datasets` folder with a `text` field. Each document
is tokenised and ended with EOS, the documents are joined into one stream, and the stream is cut
into blocks of `block_size` tokens; the tail that does not fill a block is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from amid_ray.data import DataError, read_rows

TEXT_FIELD = "text"


def load_lm_blocks(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    max_blocks: int | None = None,
) -> torch.Tensor:
    """`[blocks, block_size]` token ids of the corpus at `path`.

    Reading stops once `max_blocks` blocks are filled, so a large corpus costs only what a run
    consumes. Raises `DataError` naming the file (and line) when a row has no text or the corpus
    cannot fill one block.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end documents with")
    path = Path(path)
    wanted = None if max_blocks is None else max_blocks * block_size
    stream: list[int] = []
    for document in _documents(path):
        # verbose=False: long documents are expected here (they are cut into blocks below).
        stream.extend(tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
        if wanted is not None and len(stream) >= wanted:
            break
    blocks = len(stream) // block_size
    if max_blocks is not None:
        blocks = min(blocks, max_blocks)
    if blocks == 0:
        raise DataError(path.name, "", None,
                        f"{len(stream)} tokens cannot fill one block of {block_size}")
    return torch.tensor(stream[: blocks * block_size], dtype=torch.long).view(blocks, block_size)


def _documents(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _paragraph_documents(path)
        return
    for location, row in read_rows(path):
        text = row.get(TEXT_FIELD) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(path.name, location, TEXT_FIELD, "missing or not a string")
        if text.strip():
            yield text


def _paragraph_documents(path: Path) -> Iterator[str]:
    """Documents of a text file: runs of non-blank lines, separated by blank lines."""
    lines: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)
