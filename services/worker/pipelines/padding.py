"""Batch padding for the compiled UNet: every call's batch is padded up to a power of two and the output sliced back.

A compiled UNet (`torch.compile(..., dynamic=False)`) specialises on its input shapes. The worker batches 1 to
`MAX_BATCH_IMAGES` images, and classifier-free guidance doubles the UNet's batch, so without padding each count
would be a graph of its own. Padded to {1, 2, 4, 8, 16, …} the compiled graph sees only those batches: images
{1, 2, 4, 8} with guidance are UNet batches {2, 4, 8, 16}, without guidance {1, 2, 4, 8}.

The UNet treats batch rows independently (group norms, attention and convolutions are per sample), so the real rows
of a padded call equal those of the unpadded call; the padding rows repeat the last real row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def batch_bucket(batch: int) -> int:
    """The padded batch: the next power of two at or above `batch`."""
    if batch < 1:
        raise ValueError(f"a batch has at least one row, not {batch}")
    return 1 << (batch - 1).bit_length()


def batch_buckets(max_batch: int) -> list[int]:
    """Every padded batch up to (and including) the bucket of `max_batch`: 1, 2, 4, …"""
    top = batch_bucket(max_batch)
    return [1 << i for i in range(top.bit_length())]


def _pad(value: Any, batch: int, padded: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        extra = value[-1:].expand(padded - batch, *value.shape[1:])
        return torch.cat([value, extra]).contiguous(memory_format=_memory_format(value))
    if isinstance(value, dict):
        return {key: _pad(item, batch, padded) for key, item in value.items()}
    return value


def _memory_format(value: torch.Tensor) -> torch.memory_format:
    if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) and not value.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _slice(value: Any, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:batch]
    if isinstance(value, tuple):
        return tuple(_slice(item, batch) for item in value)
    if hasattr(value, "sample") and isinstance(value.sample, torch.Tensor):  # UNet2DConditionOutput
        value.sample = value.sample[:batch]
        return value
    return value


#: the UNet forward's arguments that carry a batch dimension (positional: sample, timestep, encoder_hidden_states)
_BATCHED_KWARGS = ("encoder_hidden_states", "added_cond_kwargs", "timestep_cond", "timestep")


def padded_call(unet: Callable[..., Any], sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Call `unet(sample, *args, **kwargs)` with the batch padded to its bucket; the output has the real rows only.

    Padded: `sample`, a batched `timestep`, `encoder_hidden_states`, `timestep_cond` and every tensor in
    `added_cond_kwargs` (SDXL's `text_embeds` and `time_ids`) whose first dimension is the batch.
    """
    batch = sample.shape[0]
    padded = batch_bucket(batch)
    if padded == batch:
        return unet(sample, *args, **kwargs)
    args = tuple(_pad(a, batch, padded) for a in args)
    kwargs = {k: (_pad(v, batch, padded) if k in _BATCHED_KWARGS else v) for k, v in kwargs.items()}
    return _slice(unet(_pad(sample, batch, padded), *args, **kwargs), batch)
