"""Fixtures for the worker's tests beyond the shared ones in tests/conftest.py: a tiny prompt expander model."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_prompt_expander(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 folder for PROMPT_EXPANDER_PATH (built once per session, on CPU, in a second)."""
    pytest.importorskip("transformers", reason="the prompt expander needs the [worker] extra")
    from tests.worker.tiny_gpt2 import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("prompt-expander"))
