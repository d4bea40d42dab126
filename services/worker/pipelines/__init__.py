"""Inference pipelines behind one interface (`base.Pipeline`)."""

from __future__ import annotations

from services.worker.config import WorkerConfig
from services.worker.pipelines.base import Pipeline


def load_pipeline(config: WorkerConfig) -> Pipeline:
    """Build the pipeline the configuration chooses; heavy imports happen only for the one chosen."""
    if config.pipeline == "classic":
        from services.worker.pipelines.classic import ClassicPipeline

        return ClassicPipeline()
    from services.worker.pipelines.sdxl import SDXLPipeline

    if config.model_path is None:
        raise RuntimeError("PIPELINE=sdxl needs MODEL_PATH (a diffusers folder or a .safetensors file)")
    return SDXLPipeline.load(config)
