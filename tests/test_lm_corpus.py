"""The language-modelling corpus: documents from each format, EOS-joined, cut into blocks."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from amid_ray.data import DataError
from amid_ray.demo import load_gpt2_tokenizer
from amid_ray.lm_corpus import load_lm_blocks

DOCUMENTS = [
    "The heron waits in the shallows.\nIt does not move.",
    "Rivers carry silt to the delta, where it settles into new land.",
    "Café prices rose 3% in 2024 — again.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_gpt2_tokenizer(tmp_path_factory.mktemp("tok"))


def expected_stream(tokenizer) -> list[int]:
    ids = []
    for document in DOCUMENTS:
        ids += tokenizer.encode(document) + [tokenizer.eos_token_id]
    return ids


def write_formats(folder) -> dict[str, object]:
    txt = folder / "corpus.txt"
    txt.write_text("\n\n".join(DOCUMENTS) + "\n\n\n")
    jsonl = folder / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in DOCUMENTS))
    as_json = folder / "corpus.json"
    as_json.write_text(json.dumps([{"text": d} for d in DOCUMENTS], indent=1))
    saved = folder / "corpus_ds"
    datasets.Dataset.from_dict({"text": DOCUMENTS}).save_to_disk(str(saved))
    return {"txt": txt, "jsonl": jsonl, "json": as_json, "datasets": saved}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "datasets"])
def test_blocks_are_the_eos_joined_stream_cut_in_order(tokenizer, tmp_path, kind):
    path = write_formats(tmp_path)[kind]
    stream = expected_stream(tokenizer)
    blocks = load_lm_blocks(path, tokenizer, 8)
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(stream) // 8, 8)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert tokenizer.eos_token_id in blocks.flatten().tolist()  # documents are separated


def test_max_blocks_stops_reading_early(tokenizer, tmp_path):
    path = write_formats(tmp_path)["jsonl"]
    blocks = load_lm_blocks(path, tokenizer, 4, max_blocks=2)
    assert blocks.flatten().tolist() == expected_stream(tokenizer)[:8]


def test_a_corpus_too_short_for_one_block_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Two words.\n")
    with pytest.raises(DataError, match=r"short\.txt.*cannot fill one block of 64"):
        load_lm_blocks(path, tokenizer, 64)


def test_a_row_without_text_names_file_line_and_field(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: field 'text'"):
        load_lm_blocks(path, tokenizer, 4)
