"""The worker's configuration comes from environment variables named after its fields: these names are what
self-hosters set, so they are pinned here."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.images import IntakeLimits
from services.worker.config import WorkerConfig

ENVIRONMENT = {
    "PIPELINE": "classic", "MODEL_PATH": "/models/sdxl", "MODEL_CONFIG_PATH": "/models/config",
    "SAFETY_CHECKER_PATH": "/models/checker", "CHECK_INPUTS": "false", "LORA_DIR": "/loras",
    "EMBEDDING_DIR": "/embeddings", "DEVICE": "cuda:1", "DTYPE": "float16", "FAST_PATH": "on", "FAST_COMPILE": "auto",
    "MAX_BATCH_IMAGES": "4", "HOST": "0.0.0.0", "PORT": "9000", "PUBLIC_URL": "https://worker.example",
    "WORKER_KEY": "id:secret", "MAX_QUEUE": "5", "RESULT_TTL_S": "90", "MAX_OUTPUT_PIXELS": "1048576",
    "MAX_IMAGE_BYTES": "1000000", "SSE_PING_S": "2.5", "WARMUP": "0", "PROMPT_EXPANDER_PATH": "/models/magicprompt",
    "FETCH_ALLOW": "10.0.0.0/8, images.internal:8443,*.lan", "FETCH_DEADLINE_S": "7.5",
}
ENVIRONMENT |= {"WORKER_DATA_DIR": "/var/lib/worker", "MAX_QUEUE_BYTES": "2097152", "MAX_REQUEST_COST": "1000000",
                "PREPARE_CONCURRENCY": "3", "PROMPT_CACHE_SIZE": "0"}
ENVIRONMENT |= {"COMPILE_MODE": "reduce-overhead", "COMPILE_CACHE_DIR": "/var/cache/compile",
                "COMPILE_SIZES": "1024x1024, 768x1024", "FAST_FP8": "on"}


def test_every_field_is_read_from_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {name.lower() for name in ENVIRONMENT} == set(WorkerConfig.model_fields)
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    config = WorkerConfig(_env_file=None)
    assert config.worker_key is not None and config.worker_key.get_secret_value() == "id:secret"
    assert config.model_dump(exclude={"worker_key"}) == {
        "pipeline": "classic", "model_path": Path("/models/sdxl"), "model_config_path": Path("/models/config"),
        "safety_checker_path": Path("/models/checker"), "check_inputs": False,
        "prompt_expander_path": Path("/models/magicprompt"), "lora_dir": Path("/loras"),
        "embedding_dir": Path("/embeddings"), "device": "cuda:1", "dtype": "float16", "fast_path": "on",
        "fast_compile": "auto", "max_batch_images": 4, "host": "0.0.0.0", "port": 9000,
        "public_url": "https://worker.example", "max_queue": 5, "result_ttl_s": 90.0, "max_output_pixels": 1048576,
        "max_image_bytes": 1000000, "sse_ping_s": 2.5, "warmup": False,
        "fetch_allow": ["10.0.0.0/8", "images.internal:8443", "*.lan"], "fetch_deadline_s": 7.5,
        "worker_data_dir": Path("/var/lib/worker"), "max_queue_bytes": 2097152, "max_request_cost": 1000000,
        "prepare_concurrency": 3, "compile_mode": "reduce-overhead", "compile_cache_dir": Path("/var/cache/compile"),
        "compile_sizes": [(1024, 1024), (768, 1024)], "fast_fp8": "on", "prompt_cache_size": 0}


def test_the_image_size_limit_defaults_to_the_intake_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAX_IMAGE_BYTES", raising=False)
    assert WorkerConfig(_env_file=None).max_image_bytes == IntakeLimits().max_bytes


@pytest.mark.parametrize("allow", ["10.0.0.0/33", "http://host/", "a b"])
def test_a_bad_fetch_allow_entry_fails_at_start(monkeypatch: pytest.MonkeyPatch, allow: str) -> None:
    monkeypatch.setenv("FETCH_ALLOW", allow)
    with pytest.raises(ValueError, match="not a host name"):
        WorkerConfig(_env_file=None)


@pytest.mark.parametrize("sizes", ["1024", "1024x", "axb", "4x4"])
def test_a_bad_compile_size_fails_at_start(monkeypatch: pytest.MonkeyPatch, sizes: str) -> None:
    monkeypatch.setenv("COMPILE_SIZES", sizes)
    with pytest.raises(ValueError, match="COMPILE_SIZES"):
        WorkerConfig(_env_file=None)
