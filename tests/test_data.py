"""Instruction data: prompt template, loaders, errors, tokenisation, split, collators."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from amid_ray.data import (
    IGNORE_INDEX,
    DataError,
    GenerationCollator,
    InstructionExample,
    TrainingCollator,
    build_prompt,
    encode_example,
    encode_prompt,
    load_examples,
    split_train_dev,
)
from amid_ray.demo import load_gpt2_tokenizer

INSTRUCT_DIR = Path(__file__).resolve().parents[2] / "shared/data/instruct"
needs_instruct_data = pytest.mark.skipif(
    not INSTRUCT_DIR.is_dir(),
    reason=f"MiniLLM evaluation files not present at {INSTRUCT_DIR} (shared test data)",
)
EOS = "<|endoftext|>"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return load_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def example(prompt: str, response: str) -> InstructionExample:
    return InstructionExample(prompt, response, (response,), "test:1")


# --- prompt template ----------------------------------------------------------------------


def test_build_prompt_without_input():
    assert build_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )


def test_build_prompt_with_input():
    assert build_prompt("Summarise.", "Some text.") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise.\n\n### Input:\nSome text.\n\n### Response:\n"
    )


@needs_instruct_data
def test_build_prompt_matches_minillm_files_byte_for_byte():
    rows = [json.loads(line) for line in (INSTRUCT_DIR / "dolly_valid.jsonl").open()]
    with_input = [row for row in rows if row["input"]]
    without_input = [row for row in rows if not row["input"]]
    assert len(with_input) > 50 and len(without_input) > 50
    for row in with_input + without_input:
        built = build_prompt(row["instruction"], row["input"])
        assert built.encode() == row["prompt"].encode()


# --- loaders ------------------------------------------------------------------------------


@needs_instruct_data
def test_load_minillm_jsonl_with_list_references():
    examples = load_examples(INSTRUCT_DIR / "sinst_11__valid.jsonl", limit=50)
    assert len(examples) == 50
    first = json.loads((INSTRUCT_DIR / "sinst_11__valid.jsonl").open().readline())
    assert examples[0].references == tuple(first["output"])
    assert examples[0].response == first["output"][0]
    assert examples[0].prompt == first["prompt"]
    assert examples[0].source == "sinst_11__valid.jsonl:1"
    assert any(len(item.references) > 1 for item in examples)


@needs_instruct_data
def test_load_vicuna_rows_without_input_field():
    examples = load_examples(INSTRUCT_DIR / "vicuna_valid.jsonl")
    assert len(examples) == 80
    assert all(item.prompt.endswith("### Response:\n") for item in examples)


def test_load_minillm_jsonl_builds_missing_prompt_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text(
        json.dumps({"instruction": "Add 2 and 2.", "input": "", "output": "4"})
        + "\n\n"  # a blank line is skipped but still counted
        + json.dumps({"instruction": "Pick one.", "input": "a or b", "output": ["a", "b"]})
        + "\n"
    )
    first, second = load_examples(path)
    assert first == InstructionExample(build_prompt("Add 2 and 2."), "4", ("4",), "mini.jsonl:1")
    assert second.prompt == build_prompt("Pick one.", "a or b")
    assert second.response == "a"
    assert second.references == ("a", "b")
    assert second.source == "mini.jsonl:3"


def test_load_alpaca_json_list(tmp_path):
    path = tmp_path / "alpaca.json"
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
    ]
    path.write_text(json.dumps(rows, indent=2))
    first, second = load_examples(path)
    assert first.prompt == build_prompt("Say hi.")
    assert first.references == ("Hi!",)
    assert second.prompt == build_prompt("Translate.", "chat")
    assert second.response == "cat"
    # indent=2: "[" on line 1, the first object starts on line 2, the second on line 7.
    assert (first.source, second.source) == ("alpaca.json:2", "alpaca.json:7")


def test_load_empty_json_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(" [ ] ")
    assert load_examples(path) == []


def test_load_dolly_raw_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {
                "instruction": "Who wrote it?",
                "context": "Dune was written by Frank Herbert.",
                "response": "Frank Herbert",
                "category": "closed_qa",
            },
            {"instruction": "Name a fruit.", "context": "", "response": "Apple", "category": "x"},
        ],
    )
    first, second = load_examples(path)
    assert first.prompt == build_prompt("Who wrote it?", "Dune was written by Frank Herbert.")
    assert first.references == ("Frank Herbert",)
    assert second.prompt == build_prompt("Name a fruit.")


def test_load_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {
        "instruction": ["Pick one.", "Say hi."],
        "input": ["a or b", ""],
        "output": [["a", "b"], ["Hi!"]],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    first, second = load_examples(tmp_path / "ds")
    assert first.prompt == build_prompt("Pick one.", "a or b")
    assert first.references == ("a", "b")
    assert second.prompt == build_prompt("Say hi.")
    assert second.source == "ds:2"


def test_load_datasets_dict_with_one_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_dict({"instruction": ["Q"], "input": [""], "output": ["A"]})
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "dd"))
    (only,) = load_examples(tmp_path / "dd")
    assert only.response == "A"


def test_limit_keeps_first_rows(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "five.jsonl", rows)
    assert [item.response for item in load_examples(path, limit=2)] == ["a0", "a1"]
    assert load_examples(path, limit=0) == []


# --- malformed input ----------------------------------------------------------------------

GOOD = {"instruction": "Q", "input": "", "output": "A"}


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        (
            {"input": "", "output": "A"},
            "line 2: field 'instruction': expected a string, got nothing",
        ),
        ({**GOOD, "instruction": 3}, "line 2: field 'instruction': expected a string, got int"),
        ({**GOOD, "input": ["x"]}, "line 2: field 'input': expected a string, got list"),
        ({"instruction": "Q", "input": ""}, "line 2: field 'output': expected a string or a non"),
        ({**GOOD, "output": []}, "line 2: field 'output': expected at least one reference"),
        ({**GOOD, "output": ["a", 7]}, "line 2: field 'output[1]': expected a string, got int"),
        ({**GOOD, "output": {"a": 1}}, "line 2: field 'output': expected a string or a non-empty"),
        ({**GOOD, "prompt": "no cue"}, "line 2: field 'prompt': expected the text to end with"),
        (
            {"instruction": "Q", "context": "", "response": 5},
            "line 2: field 'response': expected a string or a non-empty list of strings, got int",
        ),
        (["not", "an", "object"], "line 2: expected a JSON object, got list"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path, bad_row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad_row])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert str(caught.value).startswith(f"bad.jsonl: {expected}")


def test_malformed_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{'instruction': 1}\n")
    with pytest.raises(DataError, match=r"^broken\.jsonl: line 3: malformed JSON"):
        load_examples(path)


def test_malformed_json_list(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "Q", "output": "A"},\n  {"instruction": }\n]')
    with pytest.raises(DataError, match=r"^broken\.json: line 3: malformed JSON"):
        load_examples(path)


def test_json_not_a_list(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps(GOOD))
    with pytest.raises(DataError, match=r"^object\.json: line 1: expected a JSON list of objects"):
        load_examples(path)


def test_json_list_row_error_names_its_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "output": None}], indent=1))
    with pytest.raises(DataError, match=r"^rows\.json: line 7: field 'output'"):
        load_examples(path)


def test_datasets_row_error_names_its_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["Q", "Q"], "output": [["A"], []]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"^ds: row 2: field 'output': expected at least one"):
        load_examples(tmp_path / "ds")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_text_that_is_not_utf8_names_its_line_and_byte(tmp_path, suffix):
    good = json.dumps(GOOD).encode()
    bad = b'{"instruction": "caf\xe9", "output": "A"}'  # Latin-1 é
    content = (good + b"\n" + bad + b"\n" if suffix == ".jsonl"
               else b"[" + good + b",\n" + bad + b"]")
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert str(caught.value) == (f"latin1{suffix}: line 2: not UTF-8 text (byte 0xe9: invalid "
                                 "continuation byte); save the file as UTF-8")


def test_jsonl_lines_ending_in_crlf_are_read(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\r\n").encode() * 2 + b"\r\n")
    assert [e.source for e in load_examples(path)] == ["windows.jsonl:1", "windows.jsonl:2"]


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl: no such file or folder"):
        load_examples(tmp_path / "nowhere.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"^data\.csv: expected a \.jsonl or \.json file"):
        load_examples(tmp_path / "data.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"^folder: not a datasets save_to_disk folder"):
        load_examples(tmp_path / "folder")


# --- tokenisation -------------------------------------------------------------------------


def test_label_mask_covers_exactly_response_and_eos(tokenizer):
    item = example(build_prompt("Name a colour."), "Blue, like the sky.")
    encoded = encode_example(tokenizer, item, max_length=128, max_prompt_length=64)
    ids, labels = encoded["input_ids"], encoded["labels"]
    prompt_ids = tokenizer.encode(item.prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(item.response, add_special_tokens=False)
    assert ids == prompt_ids + response_ids + [50256]
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [50256]
    labelled = [token for token in labels if token != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Blue, like the sky.<|endoftext|>"
    assert tokenizer.decode(ids[: len(prompt_ids)]) == item.prompt


def test_long_response_is_cut_on_the_right_and_keeps_eos(tokenizer):
    item = example(build_prompt("Count."), " ".join(str(n) for n in range(200)))
    encoded = encode_example(tokenizer, item, max_length=48, max_prompt_length=40)
    prompt_length = len(tokenizer.encode(item.prompt, add_special_tokens=False))
    assert prompt_length == 32  # fits in 40, so 48 - 32 - 1 = 15 response tokens remain
    assert len(encoded["input_ids"]) == 48
    assert encoded["labels"][:32] == [IGNORE_INDEX] * 32
    assert encoded["labels"][-1] == 50256
    expected = " ".join(str(n) for n in range(15)) + "<|endoftext|>"
    assert tokenizer.decode(encoded["labels"][32:]) == expected


def test_left_truncation_keeps_response_cue(tokenizer):
    prompt = build_prompt("Summarise.", "word " * 500)
    ids = encode_prompt(tokenizer, prompt, 16)
    assert len(ids) == 16
    assert tokenizer.decode(ids).endswith("word word \n\n### Response:\n")
    encoded = encode_example(
        tokenizer, example(prompt, "Words."), max_length=24, max_prompt_length=16
    )
    assert encoded["labels"][:16] == [IGNORE_INDEX] * 16
    assert tokenizer.decode(encoded["input_ids"][:16]) == tokenizer.decode(ids)
    assert tokenizer.decode(encoded["input_ids"][16:]) == "Words.<|endoftext|>"


def test_short_prompt_is_not_truncated(tokenizer):
    assert encode_prompt(tokenizer, "### Response:\n", 16) == [21017, 18261, 25, 198]


def test_prompt_budget_must_leave_room_for_response(tokenizer):
    with pytest.raises(ValueError, match=r"max_prompt_length \(32\) must be smaller"):
        encode_example(tokenizer, example("p", "r"), max_length=32, max_prompt_length=32)
    with pytest.raises(ValueError, match="max_prompt_length must be >= 1, got 0"):
        encode_prompt(tokenizer, "p", 0)


# --- split --------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    items = list(range(20))
    train, dev = split_train_dev(items, dev_size=5, seed=7)
    assert (train, dev) == split_train_dev(items, dev_size=5, seed=7)
    assert len(train) == 15 and len(dev) == 5
    assert sorted(train + dev) == items
    assert split_train_dev(items, dev_size=5, seed=8)[1] != dev


def test_split_fraction_and_bounds():
    train, dev = split_train_dev(list(range(10)), dev_size=0.25, seed=0)
    assert (len(train), len(dev)) == (8, 2)  # round(2.5) == 2
    assert split_train_dev([1, 2], dev_size=0, seed=0)[1] == []
    with pytest.raises(ValueError, match=r"dev_size must be in \[0, 2\], got 3"):
        split_train_dev([1, 2], dev_size=3, seed=0)
    with pytest.raises(ValueError, match=r"fractional dev_size must be in \(0, 1\), got 1.5"):
        split_train_dev([1, 2], dev_size=1.5, seed=0)


# --- collators ----------------------------------------------------------------------------


def test_training_collator_right_pads():
    batch = TrainingCollator(pad_token_id=50256)(
        [
            {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
            {"input_ids": [4], "labels": [4]},
        ]
    )
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 50256, 50256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_training_collator_rejects_mismatched_lengths_and_empty_batch():
    collate = TrainingCollator(pad_token_id=0)
    with pytest.raises(ValueError, match=r"differ in length \(2 vs 1\)"):
        collate([{"input_ids": [1, 2], "labels": [2]}])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_generation_collator_left_pads():
    batch = GenerationCollator(pad_token_id=9)([[1, 2, 3], [4]])
    assert batch["input_ids"].shape == (2, 3)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="empty prompt"):
        GenerationCollator(pad_token_id=9)([[1], []])


def test_data_errors_survive_pickling():
    # Workers raise them on Ray's side; the driver must get the same error back.
    error = DataError("train.jsonl", "line 3", "output", "missing")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is DataError and str(copy) == str(error)
