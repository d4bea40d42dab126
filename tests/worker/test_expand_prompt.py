"""fal's `expand_prompt` on the worker: the prompt expander loaded from PROMPT_EXPANDER_PATH (a tiny random GPT-2
saved like a user's model), a fake one injected, how the continuation is joined to the prompt, and the 422 without
an expander."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from services.schema import InpaintOutput
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.expander import join_expansion, load_prompt_expander
from tests.helpers.imagegen import image_pair_uris
from tests.helpers.worker_harness import serve, serve_sync
from tests.worker.fakes import FakeExpander, FakePipeline

APP = "fal-ai/fast-sdxl/inpainting"
PROMPT = "a red door"


def _config(**overrides: Any) -> WorkerConfig:
    return WorkerConfig(_env_file=None, **{"pipeline": "classic", "warmup": False, **overrides})


def _body(**overrides: Any) -> dict[str, Any]:
    image, mask = image_pair_uris((64, 64))
    return {"image_url": image, "mask_url": mask, "prompt": PROMPT, "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 1, "enable_safety_checker": False, "seed": 3, "sync_mode": True,
            "expand_prompt": True, **overrides}


async def _run(http: httpx.AsyncClient, **overrides: Any) -> tuple[InpaintOutput, list[str]]:
    """Submit, follow to the end: the output and the log lines."""
    handle = (await http.post(f"/{APP}", json=_body(**overrides))).json()
    for _ in range(1500):
        status = (await http.get(handle["status_url"], params={"logs": 1})).json()
        if status["status"] == "COMPLETED":
            result = await http.get(handle["response_url"])
            assert result.status_code == 200, result.text
            return InpaintOutput.model_validate(result.json()), [log["message"] for log in status["logs"]]
        await asyncio.sleep(0.02)
    raise AssertionError("never completed")


def test_the_continuation_is_joined_as_one_clean_line() -> None:
    assert join_expansion("a door", " with roses, by artgerm\nanother prompt") == "a door with roses, by artgerm"
    assert join_expansion("a door", ", oil\r\npainting") == "a door, oil"
    assert join_expansion("a door ", "  with \t roses  ") == "a door with roses"
    assert join_expansion("a door", "\nanother prompt") == "a door"
    assert join_expansion("a door", "") == "a door"
    assert join_expansion("a door", " glow\x05ing\ufffd\u200b lights") == "a door glowing lights"
    assert join_expansion("two\nlines", " kept") == "two\nlines kept"  # the user's own prompt is never changed


@pytest.fixture
async def faked() -> AsyncIterator[tuple[str, FakePipeline, FakeExpander]]:
    pipeline, expander = FakePipeline(), FakeExpander()
    async with serve(create_app(_config(), pipeline=pipeline, expander=expander)) as base:
        yield base, pipeline, expander


async def test_the_pipeline_runs_with_the_expanded_prompt(faked: tuple[str, FakePipeline, FakeExpander]) -> None:
    base, pipeline, expander = faked
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        assert (await http.get("/health")).json()["expand_prompt"] is True
        out, logs = await _run(http, seed=42)
        assert out.prompt == f"{PROMPT}, by seed 42" and out.seed == 42
        assert pipeline.calls[-1][0].prompt == out.prompt
        assert expander.calls == [(PROMPT, 42)]
        assert "expanding the prompt" in logs and "expanded the prompt (+3 words)" in logs
        assert logs.index("expanded the prompt (+3 words)") < logs.index("step 1/1")
        assert not any(out.prompt in line for line in logs)  # the model's text is never logged

        plain, plain_logs = await _run(http, expand_prompt=False)
        assert plain.prompt == PROMPT and pipeline.calls[-1][0].prompt == PROMPT
        assert len(expander.calls) == 1 and not any("expand" in m for m in plain_logs)

        # without a seed, the expansion uses the one the request gets (and returns)
        unseeded, _ = await _run(http, seed=None)
        assert unseeded.prompt == f"{PROMPT}, by seed {unseeded.seed}"


async def test_a_failing_expander_fails_the_request() -> None:
    def broken(prompt: str, seed: int) -> str:
        raise RuntimeError("tokenizer missing")

    async with serve(create_app(_config(), pipeline=FakePipeline(), expander=broken)) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        resp = await http.post(f"/sync/{APP}", json=_body())
    assert resp.status_code == 500 and resp.json()["error_type"] == "runner_error"
    assert "tokenizer missing" in resp.json()["detail"]


async def test_without_an_expander_the_request_is_refused_naming_the_setting() -> None:
    async with serve(create_app(_config())) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        assert (await http.get("/health")).json()["expand_prompt"] is False
        resp = await http.post(f"/{APP}", json=_body())
        sync = await http.post(f"/sync/{APP}", json=_body())
        plain = await http.post(f"/sync/{APP}", json=_body(expand_prompt=False))
    for refused in (resp, sync):
        assert refused.status_code == 422
        detail = refused.json()["detail"]
        assert detail[0]["loc"] == ["body", "expand_prompt"] and "PROMPT_EXPANDER_PATH" in detail[0]["msg"]
    assert plain.status_code == 200 and plain.json()["prompt"] == PROMPT


@pytest.fixture(scope="module")
def expanding(tiny_prompt_expander: Path) -> Iterator[str]:
    """The classic pipeline with the tiny GPT-2 loaded from PROMPT_EXPANDER_PATH."""
    with serve_sync(create_app(_config(prompt_expander_path=tiny_prompt_expander))) as base:
        yield base


async def test_the_model_at_prompt_expander_path_expands_deterministically(expanding: str) -> None:
    async with httpx.AsyncClient(base_url=expanding, timeout=60) as http:
        assert (await http.get("/health")).json()["expand_prompt"] is True
        first, logs = await _run(http, seed=3)
        again, _ = await _run(http, seed=3)
        other, _ = await _run(http, seed=0)
        unseeded, _ = await _run(http, seed=None)
        replay, _ = await _run(http, seed=unseeded.seed)
    assert first.prompt.startswith(PROMPT) and len(first.prompt) > len(PROMPT)
    assert "\n" not in first.prompt and first.prompt == first.prompt.strip()
    assert any(line.startswith("expanded the prompt (+") for line in logs)
    assert not any(first.prompt in line for line in logs)
    assert again.prompt == first.prompt  # the same seed, the same expansion
    assert other.prompt.startswith(PROMPT) and other.prompt != first.prompt  # another seed, another one
    assert replay.prompt == unseeded.prompt


def test_the_loaded_expander_keeps_the_prompt_whatever_its_length(tiny_prompt_expander: Path) -> None:
    expand = load_prompt_expander(tiny_prompt_expander, "cpu")
    long_prompt = "door " * 400  # longer than the tiny model's context: only its end is read
    assert expand(long_prompt, 1).startswith(long_prompt)
    assert expand("", 1) == expand("", 1)
    # two threads at once get what each would get alone
    alone = [expand(PROMPT, seed) for seed in (1, 2)]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda s=seed: together.__setitem__(s, expand(PROMPT, s))) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [together[1], together[2]] == alone


def _image(out: InpaintOutput) -> np.ndarray[Any, Any]:
    data = base64.b64decode(out.images[0].url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)


async def test_sdxl_paints_the_expanded_prompt(tiny_inpaint_model: Path, tiny_prompt_expander: Path) -> None:
    config = _config(pipeline="sdxl", model_path=tiny_inpaint_model, prompt_expander_path=tiny_prompt_expander)
    steps = {"num_inference_steps": 4, "strength": 1.0, "format": "png", "seed": 3}
    async with serve(create_app(config)) as base, httpx.AsyncClient(base_url=base, timeout=120) as http:
        expanded, _ = await _run(http, **steps)
        plain, _ = await _run(http, expand_prompt=False, **steps)
        direct, _ = await _run(http, expand_prompt=False, prompt=expanded.prompt, **steps)
    assert expanded.prompt != PROMPT and direct.prompt == expanded.prompt
    # the image made with expand_prompt is the image of the expanded prompt, not of the user's
    assert np.abs(_image(expanded) - _image(direct)).mean() < 0.5
    assert np.abs(_image(expanded) - _image(plain)).mean() > 2.0
