"""The v1 safety checker's verdict computed on the device from image tensors: diffusers'
`StableDiffusionSafetyChecker` used for its modules only (CLIP vision tower, projection, concept embeddings and
thresholds), with the CLIP image preprocessing (shortest-edge bicubic resize, centre crop, normalisation) done by
torch on the device instead of PIL on the CPU.

The flags follow `StableDiffusionSafetyChecker.forward` exactly (scores rounded to 3 decimals, the 0.01 adjustment
once a "special care" concept matched), minus what the worker never uses: no float copy of the images to black
out, no per-image Python loop, one host sync per batch (the flags).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClipPreprocess:
    """What CLIP's image processor does to an image, as numbers (from the checker's processor config)."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor: Any) -> ClipPreprocess:
        size = processor.size
        edge = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
        crop = processor.crop_size or {"height": edge, "width": edge}
        return cls(shortest_edge=int(edge), crop_height=int(crop["height"]), crop_width=int(crop["width"]),
                   mean=tuple(float(v) for v in processor.image_mean),  # type: ignore[arg-type]
                   std=tuple(float(v) for v in processor.image_std))  # type: ignore[arg-type]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`images`: N×3×H×W, uint8 (0–255) or float (0–1), on any device; returns the float32 CLIP input
        (N×3×crop_h×crop_w) on the same device."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        height, width = x.shape[-2:]
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        size = (new_short, new_long) if height <= width else (new_long, new_short)
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top = max((size[0] - self.crop_height) // 2, 0)
        left = max((size[1] - self.crop_width) // 2, 0)
        x = x[..., top:top + self.crop_height, left:left + self.crop_width].clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _cosine(image_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> torch.Tensor:
    return F.normalize(image_embeds) @ F.normalize(concept_embeds).t()


@torch.no_grad()
def nsfw_flags(checker: Any, clip_input: torch.Tensor) -> torch.Tensor:
    """One bool per image (on the device): `StableDiffusionSafetyChecker.forward`'s `has_nsfw_concepts`, from
    the preprocessed CLIP input, run in the checker's own dtype; scores compared in float32 as diffusers does."""
    dtype = checker.visual_projection.weight.dtype
    pooled = checker.vision_model(clip_input.to(dtype))[1]
    embeds = checker.visual_projection(pooled).float()
    special = _cosine(embeds, checker.special_care_embeds.float()) - checker.special_care_embeds_weights.float()
    concept = _cosine(embeds, checker.concept_embeds.float()) - checker.concept_embeds_weights.float()
    # diffusers rounds each score to 3 decimals before comparing with 0; any special-care match adds 0.01
    special_care = (torch.round(special, decimals=3) > 0).any(dim=1, keepdim=True)
    adjustment = special_care.float() * 0.01
    return (torch.round(concept + adjustment, decimals=3) > 0).any(dim=1)
