"""What every pipeline receives and returns, and how it reports progress and notices cancellation."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image


class Cancelled(Exception):
    """Raised inside a pipeline (between denoising steps) when its request was cancelled."""


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float
    #: the file's tensors, already read (a Ray Serve model replica keeps the LoRA sets it serves in memory:
    #: `services.worker.serve.adapters`); None: the pipeline reads `path`
    weights: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EmbeddingSpec:
    path: Path
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class PipelineJob:
    """One request, decoded: image and mask already at the output size (a multiple of 8)."""

    image: Image.Image
    mask: Image.Image
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    strength: float
    seeds: tuple[int, ...]  # one per image, so each image is reproducible on its own
    loras: tuple[LoraSpec, ...] = ()
    embeddings: tuple[EmbeddingSpec, ...] = ()

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass
class RunContext:
    """Handed to a running pipeline: `log()` appends a line clients see; `check()` raises if cancelled."""

    log: Callable[[str], None]
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()


class Pipeline(Protocol):
    name: str
    device: str
    model: str
    batches: bool  # whether run_batch shares one model call between requests

    def warmup(self) -> None: ...

    def run(self, job: PipelineJob, ctx: RunContext) -> list[Image.Image]: ...

    def run_batch(self, jobs: list[PipelineJob], ctxs: list[RunContext]) -> list[list[Image.Image]]: ...

