"""A least-recently-used cache of SDXL prompt embeddings: rerolls and variations of a request repeat its prompt,
so its text-encoder outputs (`encode_prompt`) are kept, PROMPT_CACHE_SIZE entries at most (0: no cache).

Only requests without LoRAs or embeddings use it (both change what the text encoders produce). Keys are the
prompt, the negative prompt (None: diffusers' zeroed negative) and whether classifier-free guidance is on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PromptKey = tuple[str, str | None, bool]


@dataclass(frozen=True)
class PromptEmbeds:
    """One prompt's embeddings (batch of 1), as `encode_prompt` returns them; negatives None without guidance."""

    prompt: Any
    negative: Any | None
    pooled: Any
    negative_pooled: Any | None


class PromptCache:
    """LRU of `PromptEmbeds` by `PromptKey` (not thread-safe: the pipeline uses it under its lock)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[PromptKey, PromptEmbeds] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: PromptKey, encode: Callable[[], PromptEmbeds]) -> PromptEmbeds:
        """The cached embeddings for `key`, or `encode()`'s (kept, the oldest entry dropped when full)."""
        if self.size <= 0:
            return encode()
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        embeds = encode()
        self._entries[key] = embeds
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return embeds

    def __contains__(self, key: object) -> bool:
        return self.size > 0 and key in self._entries

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
