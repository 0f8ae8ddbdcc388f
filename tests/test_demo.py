"""The embedded demo: synthetic task generator (fast) and the demo teacher/student build (slow)."""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from pathlib import Path

from amid_ray.data import build_prompt, load_examples
from amid_ray.demo_tasks import TASK_FAMILIES, generate_examples, write_demo_splits

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def rows_of(topic: str, n: int = 400, seed: int = 3) -> list[dict[str, str]]:
    return [row for row in generate_examples(n, seed) if row["topic"] == topic]


def numbers_in(text: str) -> list[int]:
    return [int(token) for token in re.findall(r"\d+", text)]


def test_same_seed_same_examples_other_seed_other_examples():
    assert generate_examples(60, seed=7) == generate_examples(60, seed=7)
    assert generate_examples(60, seed=7) != generate_examples(60, seed=8)


def test_a_shorter_request_is_a_prefix_of_a_longer_one():
    assert generate_examples(100, seed=1)[:40] == generate_examples(40, seed=1)


def test_at_least_ten_families_all_present_and_balanced():
    assert len(TASK_FAMILIES) >= 10
    counts = Counter(row["topic"] for row in generate_examples(10 * len(TASK_FAMILIES) + 3, 0))
    assert set(counts) == set(TASK_FAMILIES)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_every_row_is_a_valid_minillm_row():
    rows = generate_examples(5 * len(TASK_FAMILIES), seed=2)
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "prompt", "topic"}
        assert row["instruction"] and row["output"]
        assert row["prompt"] == build_prompt(row["instruction"], row["input"])
        assert row["prompt"].endswith("### Response:\n")
        assert len(row["output"].split()) <= 8
    assert len({row["prompt"] for row in rows}) == len(rows)


def test_arithmetic_answers():
    for row in rows_of("arithmetic"):
        first, second = numbers_in(row["instruction"] + " " + row["input"])
        expected = first + second if "more" in row["instruction"] + row["input"] else first - second
        assert row["output"] == str(expected)


def test_sort_numbers_answers():
    for row in rows_of("sort_numbers"):
        numbers = numbers_in(row["input"])
        descending = "largest to smallest" in row["instruction"]
        assert numbers_in(row["output"]) == sorted(numbers, reverse=descending)


def test_weekday_answers():
    for row in rows_of("weekday_arithmetic"):
        today = next(day for day in WEEKDAYS if day in row["instruction"])
        (days,) = numbers_in(row["instruction"])
        step = -days if "ago" in row["instruction"] else days
        assert row["output"] == WEEKDAYS[(WEEKDAYS.index(today) + step) % 7]


def test_date_answers():
    for row in rows_of("date_format"):
        date = datetime.date.fromisoformat(row["input"])
        if "DD/MM/YYYY" in row["instruction"]:
            assert row["output"] == f"{date.day:02d}/{date.month:02d}/{date.year}"
        else:
            assert datetime.datetime.strptime(row["output"], "%d %B %Y").date() == date


def test_list_answers():
    for row in rows_of("count_items"):
        assert row["output"] == str(len(row["input"].split(", ")))
    for row in rows_of("reverse_list"):
        assert row["output"].split(", ") == row["input"].split(", ")[::-1]
    for row in rows_of("compare_numbers"):
        pick = max if "larger" in row["instruction"] else min
        assert row["output"] == str(pick(numbers_in(row["instruction"])))
    for row in rows_of("extract_email"):
        assert row["output"] in row["input"] and "@" in row["output"]


def test_unit_conversion_answers():
    factors = {"meters": 1000, "centimeters": 100, "grams": 1000, "milliliters": 1000,
               "minutes": 60, "seconds": 60, "hours": 24, "days": 7, "months": 12,
               "kilograms": 1000}
    for row in rows_of("unit_conversion"):
        value, unit = row["output"].split()
        assert int(value) == numbers_in(row["instruction"])[0] * factors[unit]


def test_splits_are_disjoint_balanced_and_load(tmp_path: Path):
    paths = write_demo_splits(tmp_path, n_train=130, n_dev=28, n_test=28, seed=5)
    assert sorted(paths) == ["dev", "test", "train"]
    rows = {split: [json.loads(line) for line in path.read_text().splitlines()]
            for split, path in paths.items()}
    assert {split: len(split_rows) for split, split_rows in rows.items()} == {
        "train": 130, "dev": 28, "test": 28}
    prompts = {split: {row["prompt"] for row in split_rows} for split, split_rows in rows.items()}
    assert not prompts["train"] & prompts["dev"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["dev"] & prompts["test"]
    assert Counter(row["topic"] for row in rows["test"]) == Counter(
        {family: 2 for family in TASK_FAMILIES})
    examples = load_examples(paths["test"])
    assert [example.response for example in examples] == [row["output"] for row in rows["test"]]
    assert not list(tmp_path.glob(".*tmp"))


def test_test_split_does_not_depend_on_train_size(tmp_path: Path):
    small = write_demo_splits(tmp_path / "a", n_train=20, n_dev=10, n_test=30, seed=4)
    large = write_demo_splits(tmp_path / "b", n_train=90, n_dev=10, n_test=30, seed=4)
    assert small["test"].read_text() == large["test"].read_text()
