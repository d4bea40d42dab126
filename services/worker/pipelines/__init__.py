"""Inference pipelines behind one interface (`base.Pipeline`)."""

from __future__ import annotations

from services.worker.pipelines.base import Pipeline
from services.worker.settings import WorkerSettings


def load_pipeline(settings: WorkerSettings) -> Pipeline:
    """Build the pipeline the settings choose; heavy imports happen only for the one chosen."""
    if settings.pipeline == "classic":
        from services.worker.pipelines.classic import ClassicPipeline

        return ClassicPipeline()
    from services.worker.pipelines.sdxl import SDXLPipeline

    if settings.model_path is None:
        raise RuntimeError("PIPELINE=sdxl needs MODEL_PATH (a diffusers folder or a .safetensors file)")
    return SDXLPipeline.load(settings)
