"""Shared fixtures: tiny SDXL model folders and assets, built once per test session (on CPU, in seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.imagegen import box_mask, encode, photo

DATA_URI_PREFIX = "data:image/png;base64,"


def _needs_worker_extra() -> None:
    pytest.importorskip("diffusers", reason="SDXL tests need the [worker] extra (pip install -e '.[dev,worker]')")


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 9-channel (inpainting checkpoint) SDXL pipeline folder, saved with save_pretrained."""
    _needs_worker_extra()
    from tests.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-inpaint-9ch"), in_channels=9)


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-channel (base checkpoint) SDXL pipeline folder."""
    _needs_worker_extra()
    from tests.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-base-4ch"), in_channels=4)


@pytest.fixture(scope="session")
def checker_flags_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_worker_extra()
    from tests.tiny_sdxl import build_tiny_safety_checker

    return build_tiny_safety_checker(tmp_path_factory.mktemp("checker-all"), flag_everything=True)


@pytest.fixture(scope="session")
def checker_flags_none(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_worker_extra()
    from tests.tiny_sdxl import build_tiny_safety_checker

    return build_tiny_safety_checker(tmp_path_factory.mktemp("checker-none"), flag_everything=False)


def image_pair_uris(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] | None = None) -> tuple[str, str]:
    """A photo and a box mask as PNG data URIs (what the bot sends)."""
    from services.images import to_data_uri

    w, h = size
    box = box or (w // 4, h // 4, 3 * w // 4 - 1, 3 * h // 4 - 1)
    return (to_data_uri(encode(photo(w, h)), "image/png"), to_data_uri(encode(box_mask(size, box)), "image/png"))
