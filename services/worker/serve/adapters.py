"""LoRA-affine routing under Ray Serve: a request's adapter set as a multiplexed model id, and the set's weights
kept in a model replica's memory.

Ray Serve's model multiplexing (https://docs.ray.io/en/latest/serve/model-multiplexing.html) routes a request
that names a model id to a replica that has that id loaded, and each replica keeps its most recent ids (least
recently used evicted). Here the "model" is the set of LoRA files a request asks for (fal's `loras` field,
https://fal.ai/models/fal-ai/fast-sdxl/inpainting/api): requests for the same set go to the replica that already
read those files, which then hands diffusers the tensors from memory instead of reading them again. Requests
without LoRAs share the id `BASE` and go to any replica. Serve also never puts requests of two different ids in one
`@serve.batch` call, which matches the pipeline's own rule (requests with adapters run alone).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from services.worker.pipelines.base import LoraSpec, PipelineJob

#: the multiplexed model id of a request without LoRAs
BASE = "base"

#: adapter sets a model replica keeps in memory (Serve's `max_num_models_per_replica`)
SETS_PER_REPLICA = 4


def adapter_key(job: PipelineJob) -> str:
    """The multiplexed model id of a job: `BASE`, or a digest of its LoRA files and scales (the same set, in the
    same order, at the same scales, is the same id)."""
    if not job.loras:
        return BASE
    text = json.dumps([[str(lora.path), lora.scale] for lora in job.loras])
    return "lora-" + hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class AdapterSet:
    """The tensors of a set's LoRA files, by path, read once per replica while the set stays loaded."""

    key: str
    weights: Mapping[str, Mapping[str, Any]]

    def apply(self, job: PipelineJob) -> PipelineJob:
        """The job with its LoRAs carrying the in-memory tensors (the pipeline then reads no file)."""
        loras = tuple(replace(lora, weights=self.weights.get(str(lora.path))) for lora in job.loras)
        return replace(job, loras=loras)


def read_adapter_set(key: str, loras: tuple[LoraSpec, ...]) -> AdapterSet:
    """Read a set's LoRA files (safetensors) into CPU memory (blocking: call it in a thread)."""
    from safetensors.torch import load_file

    weights = {str(lora.path): load_file(str(lora.path)) for lora in loras}
    return AdapterSet(key, weights)
