"""Prompt expansion, for requests that ask for fal's `expand_prompt`: a causal text-generation model (a
MagicPrompt-style GPT-2) continues the user's prompt, and the pipeline runs with the longer prompt.

What the worker calls an expander (`PromptExpander`) is a function of the prompt and the request's seed, so tests
can inject one and the queue does not care how it works. The one it loads (`load_prompt_expander`) is a local
`transformers` folder (`PROMPT_EXPANDER_PATH`); nothing is downloaded. It is deterministic: the continuation is
sampled (top-k, with a temperature, as MagicPrompt is meant to be used: greedy decoding makes such models repeat
themselves) from a `torch.Generator` seeded with the request's seed, so the same seed gives the same expanded prompt
and the images stay reproducible. The generator is the expander's own, so it never touches torch's global random
state, which other threads use. At most `MAX_NEW_TOKENS` tokens are added.

The expanded prompt always starts with the user's prompt, unchanged; only the first line of the continuation is
kept (MagicPrompt writes one prompt per line), its whitespace collapsed and control characters dropped.

torch and transformers are imported only when an expander is loaded, so the CPU-only worker can import this module.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: (prompt, seed) → the expanded prompt, which starts with the prompt. Blocking: call it in a thread.
PromptExpander = Callable[[str, int], str]

MAX_NEW_TOKENS = 60
TOP_K = 40
TEMPERATURE = 0.9
_SEED_SPACE = 2**64


def join_expansion(prompt: str, continuation: str) -> str:
    """The user's prompt followed by the first line of what the model wrote after it, as one clean line."""
    first_line = re.split(r"[\r\n\u2028\u2029]", continuation, maxsplit=1)[0]
    text = "".join(ch for ch in re.sub(r"\s+", " ", first_line) if ch.isprintable() and ch != "\ufffd")
    text = text.rstrip()
    if prompt[-1:].isspace():
        text = text.lstrip()
    return prompt + text


def load_prompt_expander(path: Path, device: str) -> PromptExpander:
    """Load the tokenizer and model from `path` onto `device` (blocking: call it in a thread)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = str(Path(path).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device).eval()
    end_id = tokenizer.eos_token_id
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else end_id
    context = max(1, int(getattr(model.config, "max_position_embeddings", 0) or 1024) - MAX_NEW_TOKENS)
    lock = threading.Lock()  # one generation at a time: the requests of a batch expand one after another

    def expand(prompt: str, seed: int) -> str:
        ids: list[int] = tokenizer(prompt, add_special_tokens=False).input_ids or (
            [start_id] if start_id is not None else [])
        if not ids:
            return prompt
        input_ids = torch.tensor([ids[-context:]], device=device)
        sampler = SeededSampler(seed % _SEED_SPACE)
        with lock, torch.no_grad():
            output = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, num_beams=1,
                max_new_tokens=MAX_NEW_TOKENS, logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=end_id if end_id is not None else 0)
        continuation = tokenizer.decode(output[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)
        return join_expansion(prompt, continuation)

    return expand


class SeededSampler:
    """A logits processor that samples the next token itself (top-k, temperature) from its own seeded generator
    and leaves only that token possible, so `generate`'s greedy search picks it: seeded sampling with all of
    `generate`'s handling of caches and stopping, without torch's global random state."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        logits = scores.float() / TEMPERATURE
        top = torch.topk(logits, min(TOP_K, logits.shape[-1]), dim=-1)
        finite = torch.where(torch.isfinite(top.values), top.values, torch.full_like(top.values, -1e9))
        choice = torch.multinomial(torch.softmax(finite, dim=-1), 1, generator=self.generator)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, top.indices.gather(-1, choice), 0.0)
