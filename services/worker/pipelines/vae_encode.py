"""One VAE encoder call per batch for the SDXL inpainting pipeline.

diffusers' `StableDiffusionXLInpaintPipeline._encode_vae_image` encodes one row at a time whenever it is given a
list of generators (the worker always gives one per image, so each image of a batch matches the same seed run
alone). `encode_vae_image_batched` replaces it on a loaded pipeline: the distinct rows of the batch go through the
encoder in one call (the rows of one request are the same image: it is encoded once), then each row's latents are
sampled from its own distribution with its own generator — the random numbers diffusers draws, in the same order,
so the images equal the stock path's within float tolerance. `force_upcast` is honoured as diffusers does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def install_batched_vae_encode(pipe: Any) -> None:
    """Make `pipe` (a StableDiffusionXLInpaintPipeline) encode its init and masked images with one VAE call."""
    pipe._encode_vae_image = functools.partial(encode_vae_image_batched, pipe)


def _distinct_rows(image: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The distinct rows of `image` (in first-seen order) and, per row, the index of its distinct row."""
    kept: list[int] = []
    index: list[int] = []
    for row in range(image.shape[0]):
        match = next((k for k, first in enumerate(kept) if torch.equal(image[row], image[first])), None)
        if match is None:
            kept.append(row)
            match = len(kept) - 1
        index.append(match)
    distinct = image if len(kept) == image.shape[0] else image[kept]
    return distinct, index


def encode_vae_image_batched(pipe: Any, image: torch.Tensor,
                             generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """`_encode_vae_image` with one encoder call: scaled latents, one row per image row."""
    from diffusers.utils.torch_utils import randn_tensor

    vae = pipe.vae
    dtype = image.dtype
    if vae.config.force_upcast:
        image = image.float()
        vae.to(dtype=torch.float32)
    distinct, index = _distinct_rows(image)
    encoded = vae.encode(distinct)
    dist = getattr(encoded, "latent_dist", None)
    if dist is None:  # a VAE that returns latents directly (no sampling, nothing random)
        latents = encoded.latents[index]
    else:
        mean, std = dist.mean[index], dist.std[index]
        param = dist.parameters
        if isinstance(generator, list):
            row_shape = (1, *mean.shape[1:])
            noise = torch.cat([randn_tensor(row_shape, generator=g, device=param.device, dtype=param.dtype)
                               for g in generator])
        else:
            noise = randn_tensor(mean.shape, generator=generator, device=param.device, dtype=param.dtype)
        latents = mean + std * noise
    if vae.config.force_upcast:
        vae.to(dtype)
    scaled: torch.Tensor = vae.config.scaling_factor * latents.to(dtype)
    return scaled
