"""Small models built in-process for tests."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_gpt2(tokenizer, vocab_size: int | None = None) -> GPT2LMHeadModel:
    """A 1-layer, 8-wide GPT-2 over `tokenizer` (or `vocab_size` logits), seeded."""
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab_size or len(tokenizer), n_positions=128, n_embd=8, n_layer=1, n_head=1,
        bos_token_id=eos, eos_token_id=eos))
