"""`python -m services.worker`: serve the fal queue protocol with the pipeline the configuration chooses."""

from __future__ import annotations

import logging

import uvicorn

from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.memory import map_large_blocks


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    map_large_blocks()  # large request buffers go back to the OS when freed (services.worker.memory)
    config = WorkerConfig()
    if config.pipeline == "sdxl" and config.model_path is None:
        raise SystemExit("PIPELINE=sdxl needs MODEL_PATH: a local diffusers folder or a .safetensors file "
                         "(weights are never downloaded). For a CPU-only machine set PIPELINE=classic.")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")


if __name__ == "__main__":
    main()
