"""From pipeline images to the output body: encoding, data URIs or served files, and the safety checker's verdict."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from services.schema import InpaintOutput
from services.worker.outputs import build_output, encode_output
from services.worker.records import InpaintRecord
from services.worker.storage import RequestStorage
from tests.worker.fakes import flag_all, inpaint_input, must_not_run


def _record(**overrides: Any) -> InpaintRecord:
    record = InpaintRecord(id="r1", input=inpaint_input(**overrides), seed=11, base_url="http://worker:8000")
    record.started_at = 0.0
    record.inference_time = 1.5
    return record


@pytest.fixture
def storage(tmp_path: Path) -> RequestStorage:
    return RequestStorage(tmp_path)


def _images(n: int = 2) -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), (200, 40 * i, 10)) for i in range(n)]


def test_sync_mode_gives_data_uris(storage: RequestStorage) -> None:
    record = _record(sync_mode=True, format="jpeg", prompt="a lamp")
    out = InpaintOutput.model_validate(encode_output(record, _images(), [False, False], storage))
    assert [(i.width, i.height, i.content_type) for i in out.images] == [(64, 48, "image/jpeg")] * 2
    prefix = "data:image/jpeg;base64,"
    assert all(i.url.startswith(prefix) for i in out.images) and not record.files
    decoded = Image.open(io.BytesIO(base64.b64decode(out.images[0].url[len(prefix):])))
    assert (decoded.format, decoded.size) == ("JPEG", (64, 48))
    assert (out.seed, out.prompt, out.has_nsfw_concepts) == (11, "a lamp", [False, False])
    assert out.timings["inference"] == 1.5 and out.timings["total"] > 0


@pytest.mark.parametrize(("fmt", "name", "magic"), [("png", "0.png", b"\x89PNG"), ("jpeg", "0.jpg", b"\xff\xd8")])
def test_otherwise_the_images_are_files_the_worker_serves(fmt: str, name: str, magic: bytes,
                                                          storage: RequestStorage) -> None:
    record = _record(format=fmt)
    out = InpaintOutput.model_validate(encode_output(record, _images(), [False, False], storage))
    second = name.replace("0", "1")
    assert [i.url for i in out.images] == [f"http://worker:8000/files/r1/{name}", f"http://worker:8000/files/r1/{second}"]
    assert set(record.files) == {name, second}
    path, content_type = record.files[name]  # on disk, in the worker's storage
    assert path.parent == storage.results / "r1"
    assert path.read_bytes().startswith(magic) and content_type == out.images[0].content_type


async def test_flagged_images_are_replaced_with_black(storage: RequestStorage) -> None:
    record = _record(enable_safety_checker=True, sync_mode=True, format="png")

    def flag_second(images: list[Image.Image]) -> list[bool]:
        return [False, True]

    out = InpaintOutput.model_validate(await build_output(record, _images(), flag_second, storage))
    assert out.has_nsfw_concepts == [False, True]
    pixels = [Image.open(io.BytesIO(base64.b64decode(i.url.split(",", 1)[1]))).convert("RGB") for i in out.images]
    assert pixels[0].getpixel((0, 0)) == (200, 0, 10) and pixels[1].getextrema() == ((0, 0), (0, 0), (0, 0))
    assert [(line["message"], line["level"]) for line in record.logs] == [
        ("safety checker flagged 1 of 2 image(s); replaced with black", "WARN")]


async def test_checker_v2_falls_back_to_v1_and_says_so(storage: RequestStorage) -> None:
    record = _record(enable_safety_checker=True, safety_checker_version="v2")
    out = InpaintOutput.model_validate(await build_output(record, _images(1), flag_all, storage))
    assert out.has_nsfw_concepts == [True]
    assert record.logs[0]["message"] == "safety checker v2 is not installed on this worker; using v1"


async def test_no_check_unless_the_request_asks(storage: RequestStorage) -> None:
    record = _record(enable_safety_checker=False)
    out = InpaintOutput.model_validate(await build_output(record, _images(), must_not_run, storage))
    assert out.has_nsfw_concepts == [False, False] and record.logs == []
