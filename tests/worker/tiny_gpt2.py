"""A tiny random-weight GPT-2 (the architecture of MagicPrompt, the prompt expander fal's `expand_prompt` is modelled
on), saved with `save_pretrained` like a user's model folder for PROMPT_EXPANDER_PATH.

The tokenizer is a real GPT-2 byte-level BPE tokenizer with a byte-level vocabulary (every byte, no merges, plus
`<|endoftext|>`), built in code as `tests/helpers/tiny_sdxl.py` builds its CLIP tokenizer: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.tiny_sdxl import _byte_chars

END_OF_TEXT = "<|endoftext|>"


def build_tiny_gpt2(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny `GPT2LMHeadModel` and its tokenizer to `folder` (loadable with AutoModelForCausalLM and
    AutoTokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_byte_chars())}
    vocab[END_OF_TEXT] = len(vocab)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], unk_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                              eos_token=END_OF_TEXT)
    torch.manual_seed(seed)
    eos = vocab[END_OF_TEXT]
    config = GPT2Config(vocab_size=len(vocab), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
