"""The embedded demo: synthetic task generator (fast) and the demo teacher/student build (slow)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from amid_ray.data import (
    InstructionExample,
    TrainingCollator,
    build_prompt,
    encode_example,
    load_examples,
)
from amid_ray.demo import (
    DEMO_RECIPE,
    TASK_FAMILIES,
    DemoRecipe,
    ModelShape,
    TrainingRun,
    build_demo_assets,
    evaluate_demo_models,
    fresh_gpt2,
    generate_examples,
    load_gpt2_tokenizer,
    response_loss,
    train_on_responses,
    write_demo_splits,
)
from amid_ray.demo import build as demo_build
from amid_ray.demo import models as demo_models
from amid_ray.models import save_model

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return load_gpt2_tokenizer(tmp_path_factory.mktemp("tokenizer"))


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


def test_every_answer_survives_the_no_repeat_ngram_rule(tokenizer: PreTrainedTokenizerBase):
    """The protocol bans any 6-gram already seen in prompt + response: no answer may need one."""
    for row in generate_examples(20 * len(TASK_FAMILIES), seed=6):
        prompt = tokenizer.encode(row["prompt"])
        tokens = prompt + tokenizer.encode(row["output"]) + [tokenizer.eos_token_id]
        for end in range(len(prompt) + 1, len(tokens) + 1):
            earlier = {tuple(tokens[i:i + 6]) for i in range(end - 6)}
            assert tuple(tokens[end - 6:end]) not in earlier, row


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


# --- the demo's GPT-2s ---------------------------------------------------------------------------


def test_fresh_gpt2_uses_tokenizer_vocabulary_and_seed(tokenizer: PreTrainedTokenizerBase):
    state = torch.random.get_rng_state()
    first = fresh_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = fresh_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=7)
    other = fresh_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=8)
    assert first.config.vocab_size == len(tokenizer) == 50257
    eos = tokenizer.eos_token_id
    assert (first.config.eos_token_id, first.config.bos_token_id) == (eos, eos)
    assert first.config.pad_token_id == first.generation_config.pad_token_id == eos
    weight = first.transformer.wte.weight
    assert torch.equal(weight, again.transformer.wte.weight)
    assert not torch.equal(weight, other.transformer.wte.weight)


def test_fresh_gpt2_without_dropout_has_the_same_weights(tokenizer: PreTrainedTokenizerBase):
    shape = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32, "seed": 3}
    plain, quiet = fresh_gpt2(tokenizer, **shape), fresh_gpt2(tokenizer, **shape, dropout=False)
    rates = [module.p for module in quiet.modules() if isinstance(module, torch.nn.Dropout)]
    assert len(rates) == 4 and set(rates) == {0.0}  # embeddings, attention x2, MLP
    assert {plain.config.resid_pdrop, quiet.config.resid_pdrop} == {0.1, 0.0}
    assert (quiet.config.embd_pdrop, quiet.config.attn_pdrop) == (0.0, 0.0)
    for (name, tensor), other in zip(plain.state_dict().items(), quiet.state_dict().values(),
                                     strict=True):
        assert torch.equal(tensor, other), name
    ids = torch.tensor([[15496, 995, 13]])
    quiet.train()  # training mode: only dropout could make two passes differ
    assert torch.equal(quiet(ids).logits, quiet(ids).logits)


def test_tokenizer_folder_is_complete_once_its_config_exists(tmp_path: Path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_models, "write_text_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        load_gpt2_tokenizer(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    monkeypatch.undo()
    assert load_gpt2_tokenizer(tmp_path).encode("Hello world") == [15496, 995]
    (tmp_path / "merges.txt").write_text("damaged")  # a complete folder is not rewritten
    assert demo_models.gpt2_tokenizer_dir(tmp_path) == tmp_path
    assert (tmp_path / "merges.txt").read_text() == "damaged"


# --- the demo teacher and student --------------------------------------------------------------

TINY_RECIPE = DemoRecipe(
    n_train=28, n_dev=14, n_test=14,
    teacher=ModelShape(n_layer=1, n_embd=16, n_head=2),
    teacher_training=TrainingRun(steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=1, seed=1),
    student=ModelShape(n_layer=1, n_embd=8, n_head=1),
    student_warmup=TrainingRun(steps=2, batch_size=4, learning_rate=1e-3, warmup_steps=1, seed=2),
)


def build_dirs(cache: Path) -> list[Path]:
    return sorted(cache.glob("*demo-*"))


def test_tiny_build_layout_and_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch):
    assets = build_demo_assets(tmp_path, recipe=TINY_RECIPE)
    assert "teacher: step 3/3 loss" in capsys.readouterr().out
    for path in (assets.train_file, assets.dev_file, assets.test_file):
        assert path.parent == assets.data_dir and path.is_file()
    assert len(load_examples(assets.test_file)) == 14
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(assets.student_dir)
    assert (teacher.config.n_layer, teacher.config.n_embd) == (1, 16)
    assert (student.config.n_layer, student.config.n_embd) == (1, 8)
    assert teacher.config.vocab_size == student.config.vocab_size == 50257
    assert AutoTokenizer.from_pretrained(assets.tokenizer_dir).encode("Hello world") == [15496, 995]
    assert assets.manifest["recipe"]["n_train"] == 28

    def no_rebuild(*args):
        raise AssertionError("a cached build was rebuilt")

    monkeypatch.setattr(demo_build, "_build_into", no_rebuild)
    assert build_demo_assets(tmp_path, recipe=TINY_RECIPE, progress=False) == assets
    assert capsys.readouterr().out == ""
    assert len(build_dirs(tmp_path)) == 1


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch):
    def crash_on_student(model, tokenizer, folder):
        if Path(folder).name == "student":
            raise KeyboardInterrupt
        return save_model(model, tokenizer, folder)

    monkeypatch.setattr(demo_build, "save_model", crash_on_student)
    with pytest.raises(KeyboardInterrupt):
        build_demo_assets(tmp_path, recipe=TINY_RECIPE, progress=False)
    assert build_dirs(tmp_path) == []

    monkeypatch.setattr(demo_build, "save_model", save_model)
    stale = tmp_path / f".demo-{TINY_RECIPE.fingerprint()}.partial-killed"
    (stale / "teacher").mkdir(parents=True)
    assets = build_demo_assets(tmp_path, recipe=TINY_RECIPE, progress=False)
    assert build_dirs(tmp_path) == [assets.data_dir.parent]


def test_concurrent_callers_share_one_build(tmp_path: Path, monkeypatch):
    builds = []

    def counted_build(*args, **kwargs):
        builds.append(threading.current_thread().name)
        return real_build(*args, **kwargs)

    real_build = demo_build._build_into
    monkeypatch.setattr(demo_build, "_build_into", counted_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_demo_assets(
        tmp_path, recipe=TINY_RECIPE, progress=False))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(results) == 3 and results[0] == results[1] == results[2]


def test_another_recipe_or_build_format_gets_its_own_folder(monkeypatch):
    fingerprint = TINY_RECIPE.fingerprint()
    assert dataclasses.replace(TINY_RECIPE, n_train=30).fingerprint() != fingerprint
    assert dataclasses.replace(TINY_RECIPE, n_train=28).fingerprint() == fingerprint
    monkeypatch.setattr(demo_build, "BUILD_FORMAT", demo_build.BUILD_FORMAT + 1)
    assert TINY_RECIPE.fingerprint() != fingerprint


def encoded_examples(tokenizer: PreTrainedTokenizerBase, n: int) -> list[dict[str, list[int]]]:
    return [
        encode_example(tokenizer, InstructionExample(row["prompt"], row["output"],
                                                     (row["output"],), "demo"),
                       max_length=96, max_prompt_length=80)
        for row in generate_examples(n, seed=0)
    ]


def test_response_loss_matches_the_models_own_loss(tokenizer: PreTrainedTokenizerBase):
    model = fresh_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=0).eval()
    batch = TrainingCollator(tokenizer.eos_token_id)(encoded_examples(tokenizer, 4))
    assert torch.allclose(response_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_training_is_repeatable(tokenizer: PreTrainedTokenizerBase):
    encoded = encoded_examples(tokenizer, 8)
    run = TrainingRun(steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=1, seed=5)

    def trained() -> torch.Tensor:
        model = fresh_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=0)
        train_on_responses(model, encoded, run, tokenizer.eos_token_id, lambda line: None)
        return model.transformer.h[0].mlp.c_fc.weight.detach().clone()

    first = trained()
    assert torch.equal(first, trained())
    untrained = fresh_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=0)
    assert not torch.equal(first, untrained.transformer.h[0].mlp.c_fc.weight)


SMALL_RECIPE = dataclasses.replace(
    DEMO_RECIPE, n_train=3000, n_dev=28, n_test=56,
    teacher_training=dataclasses.replace(DEMO_RECIPE.teacher_training, steps=700),
    student_warmup=dataclasses.replace(DEMO_RECIPE.student_warmup, steps=50),
)


@pytest.mark.slow
def test_a_smaller_build_gives_a_teacher_far_better_than_a_random_student(tmp_path: Path):
    assets = build_demo_assets(tmp_path, recipe=SMALL_RECIPE, progress=False)
    for folder in (assets.teacher_dir, assets.student_dir):
        assert AutoModelForCausalLM.from_pretrained(folder).config.vocab_size == 50257
    scores = evaluate_demo_models(assets, n_test=56)
    assert scores["n_test"] == 56
    teacher, random_student = scores["teacher"], scores["random_student"]
    assert teacher["greedy"] > random_student["greedy"] + 10.0
    # Sampling at temperature 1 from a briefly trained teacher scores far lower than greedy.
    assert teacher["sampled"] > random_student["sampled"] + 3.0
