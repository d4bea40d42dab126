"""Every bad input to the worker is a 422 with fal's `detail` list, never a 500: hostile bodies (huge numbers, deep
nesting, bad UTF-8, oversized), bad URLs, fuzzed JSON of any shape; and image URLs pointing inside the worker's
network are refused with the one public text, without the worker ever connecting to them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.schema import INPAINT_APP_ID, MAX_URL_CHARS, NSFW_APP_ID
from services.url_fetch import PUBLIC_MESSAGE
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.request_body import MAX_DEPTH, max_body_bytes
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.raw_http import RawServer, body_answer, head, redirect_answer
from tests.helpers.worker_harness import serve, serve_sync
from tests.worker.fakes import IMAGE_URI, MASK_URI, FakePipeline, flag_red

MAX_IMAGE_BYTES = 1024 * 1024
#: each example is one HTTP round trip to the worker (about 45 ms on the 2-core test machine, whatever the route)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {"pipeline": "classic", "warmup": False, "max_queue": 100_000,
                              "max_image_bytes": MAX_IMAGE_BYTES, **overrides}
    return WorkerConfig(_env_file=None, **values)


def _valid(**overrides: Any) -> dict[str, Any]:
    return {"image_url": IMAGE_URI, "mask_url": MASK_URI, "prompt": "a red door",
            "image_size": {"width": 64, "height": 64}, "enable_safety_checker": False, **overrides}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One strict worker (no FETCH_ALLOW) for the whole module, with a fake pipeline and a checker, and a LoRA
    folder so paths are resolved."""
    loras = tmp_path_factory.mktemp("loras")
    app = create_app(_config(lora_dir=loras, embedding_dir=loras, fetch_deadline_s=2), pipeline=FakePipeline(),
                     safety=flag_red)
    with serve_sync(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client


def _assert_detail(resp: httpx.Response) -> list[dict[str, Any]]:
    """A 422 whose body is fal's `detail` list: each item a `loc` from `body`, a `msg` and a `type`."""
    assert resp.status_code == 422, (resp.status_code, resp.text[:500])
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and detail
    for item in detail:
        assert set(item) == {"loc", "msg", "type"}, item
        assert isinstance(item["loc"], list) and item["loc"][:1] == ["body"]
        assert all(isinstance(part, (str, int)) for part in item["loc"])
        assert isinstance(item["msg"], str) and isinstance(item["type"], str)
    return detail


def _post(client: httpx.Client, content: bytes | Iterator[bytes], app: str = INPAINT_APP_ID,
          sync: bool = False) -> httpx.Response:
    return client.post(f"/sync/{app}" if sync else f"/{app}", content=content,
                       headers={"Content-Type": "application/json"})


# --- hostile bodies -------------------------------------------------------------------------------------------

def _json(**fields: Any) -> bytes:
    return json.dumps(_valid(**fields)).encode()


HOSTILE: dict[str, tuple[bytes, str]] = {
    "100,000-digit integer": (b'{"seed": ' + b"1" * 100_000 + b"}", "json_number"),
    "100,000-digit float": (b'{"guidance_scale": 0.' + b"1" * 100_000 + b"}", "json_number"),
    "arrays 50,000 deep": (b"[" * 50_000 + b"]" * 50_000, "json_too_deep"),
    "objects 50,000 deep": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "json_too_deep"),
    f"objects {MAX_DEPTH + 1} deep": (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "json_too_deep"),
    "NaN": (b'{"guidance_scale": NaN}', "json_invalid"),
    "-Infinity": (b'{"seed": -Infinity}', "json_invalid"),
    "not UTF-8": (b'{"prompt": "\xff\xfe"}', "json_invalid"),
    "a lone surrogate in a value": (_json(prompt="x").replace(b'"x"', b'"\\ud800"'), "json_invalid"),
    "a lone surrogate in a key": (b'{"\\udfff": 1}', "json_invalid"),
    "truncated": (b'{"prompt": "a', "json_invalid"),
    "empty": (b"", "json_invalid"),
    "a URL with CRLF": (_json(image_url="http://example.com/a.png\r\nX-Injected: 1"), "value_error"),
    "a URL with a tab": (_json(mask_url="http://example.com/\ta.png"), "value_error"),
    "a URL with a line separator": (_json(image_url="http://example.com/\u2028a.png"), "value_error"),
    "a URL with NUL": (_json(image_url="http://example.com/\u0000.png"), "value_error"),
    "a 1 MB URL": (_json(image_url="http://example.com/" + "a" * 1_000_000), "value_error"),
    "a URL one over the limit": (_json(image_url="https://e.com/" + "a" * (MAX_URL_CHARS - 13)), "value_error"),
    "a LoRA path with NUL": (_json(loras=[{"path": "a\u0000b.safetensors"}]), "value_error"),
    "a LoRA path with a 300-character name": (_json(loras=[{"path": "a" * 300}]), "value_error"),
    "an embedding path with LF": (_json(embeddings=[{"path": "x\ny", "tokens": ["<s0>"]}]), "value_error"),
    "a 1e999 guidance scale": (_json().replace(b'"prompt"', b'"guidance_scale": 1e999, "prompt"'),
                               "less_than_equal"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bodies_are_422s_with_fals_detail(worker: httpx.Client, name: str) -> None:
    body, type_ = HOSTILE[name]
    # the NSFW estimator reads only image_url: other fields' faults are no concern of its
    nsfw_too = type_.startswith("json_") or b'"image_url": "http://example.com/' in body
    for app, sync in ((INPAINT_APP_ID, False), (INPAINT_APP_ID, True), (NSFW_APP_ID, False))[:3 if nsfw_too else 2]:
        detail = _assert_detail(_post(worker, body, app, sync))
        assert detail[0]["type"] == type_, (app, detail)


def test_a_body_over_the_cap_is_refused_declared_or_streamed(worker: httpx.Client) -> None:
    cap = max_body_bytes(MAX_IMAGE_BYTES)
    declared = _post(worker, b"{" + b" " * cap + b"}")
    assert _assert_detail(declared)[0]["type"] == "body_too_large"

    def endless() -> Iterator[bytes]:  # chunked, no Content-Length: refused once the cap is read
        yield b'{"prompt": "'
        for _ in range(cap // 65536 + 2):
            yield b"a" * 65536

    streamed = _post(worker, endless())
    assert _assert_detail(streamed)[0]["type"] == "body_too_large"
    # a body of two data URIs of the largest image the worker takes fits under the cap
    big = "data:image/png;base64," + "A" * (4 * MAX_IMAGE_BYTES // 3)
    assert len(_json(image_url=big, mask_url=big)) < cap


def test_an_image_url_at_the_length_limit_and_a_large_data_uri_are_taken(worker: httpx.Client) -> None:
    at_limit = "https://e.com/" + "a" * (MAX_URL_CHARS - 14)
    assert len(at_limit) == MAX_URL_CHARS
    assert _post(worker, _json(image_url=at_limit)).status_code == 200
    assert _post(worker, _json(image_url=IMAGE_URI + "A" * (MAX_URL_CHARS * 4))).status_code == 200


# --- fuzz: JSON of any shape, URL strings ---------------------------------------------------------------------

#: any text, lone surrogates, controls and separators included (JSON escapes them, as a hostile client would send)
_TEXT = st.text(st.characters(categories=["Cs", "Cc", "Cf", "Zs", "Zl", "Zp", "L", "M", "N", "P", "S"]), max_size=24)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**80), max_value=10**80)
    | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=12)
_FIELDS = st.sampled_from(["image_url", "mask_url", "prompt", "negative_prompt", "image_size", "num_inference_steps",
                           "guidance_scale", "strength", "seed", "num_images", "sync_mode", "loras", "embeddings",
                           "enable_safety_checker", "safety_checker_version", "expand_prompt", "format",
                           "request_id", "unknown"])
_SPECIALS = st.sampled_from([{"path": "x"}, {"width": 64, "height": 0}, "square", 2**64, -1, 1e308, "", [{}]])


@FUZZ
@given(value=_JSON, app=st.sampled_from([INPAINT_APP_ID, NSFW_APP_ID]))
def test_json_of_any_shape_is_never_a_500(worker: httpx.Client, value: Any, app: str) -> None:
    resp = _post(worker, json.dumps(value).encode(), app)
    if resp.status_code != 200:
        _assert_detail(resp)


@FUZZ
@given(changes=st.dictionaries(_FIELDS, _JSON | _SPECIALS, max_size=4))
def test_a_valid_body_with_fields_of_any_shape_is_never_a_500(worker: httpx.Client, changes: dict[str, Any]) -> None:
    resp = _post(worker, json.dumps(_valid(**changes)).encode())
    if resp.status_code != 200:
        _assert_detail(resp)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_as_a_body_are_never_a_500(worker: httpx.Client, raw: bytes) -> None:
    resp = _post(worker, raw)
    if resp.status_code != 200:
        _assert_detail(resp)


#: URL-like strings whose hosts are address literals (refused at once, never looked up) or that aren't http(s)
_URLS = st.one_of(
    _TEXT.filter(lambda t: not t.lower().startswith(("http", "data"))),
    st.builds(lambda head, tail: head + tail,
              st.sampled_from(["http://127.0.0.1:1/", "https://[::1]/", "http://0x7f000001/", "http://10.1.2.3/",
                               "http://[::ffff:169.254.169.254]/", "http://127.1", "http://[", "https://:80/",
                               "data:", "data:image/png;base64,", "ftp://127.0.0.1/", "HTTP://0/"]),
              _TEXT))


@FUZZ
@given(image_url=_URLS, where=st.sampled_from(["image_url", "mask_url"]))
def test_any_url_through_the_fetch_path_is_a_200_or_a_422(worker: httpx.Client, image_url: str, where: str) -> None:
    """Through the synchronous route: the fetch has happened (or the submit was refused) when it answers."""
    resp = _post(worker, json.dumps(_valid(**{where: image_url})).encode(), sync=True)
    assert resp.status_code != 500
    if resp.status_code != 200:
        detail = _assert_detail(resp)
        if detail[0]["type"] == "image_error.download_failed":
            assert detail[0]["msg"] == PUBLIC_MESSAGE and detail[0]["loc"] == ["body", where]


# --- image URLs into the worker's own network -----------------------------------------------------------------

PNG = encode(photo(64, 64))
MASK_PNG = encode(box_mask((64, 64), (8, 8, 40, 40)))


@pytest.fixture
async def target() -> AsyncIterator[RawServer]:
    """An image server on loopback that a strict worker must never reach."""
    async with RawServer(body_answer(PNG)) as server:
        yield server


async def _result(http: httpx.AsyncClient, body: dict[str, Any], app: str = INPAINT_APP_ID) -> httpx.Response:
    handle = (await http.post(f"/{app}", json=body)).json()
    for _ in range(1500):
        if (await http.get(handle["status_url"])).json()["status"] == "COMPLETED":
            return await http.get(handle["response_url"])
        await asyncio.sleep(0.02)
    raise AssertionError("the request never completed")


async def test_loopback_image_urls_are_a_generic_422_and_never_reached(target: RawServer) -> None:
    async with serve(create_app(_config(), pipeline=FakePipeline(), safety=flag_red)) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        for field, url in (("image_url", f"{target.base_url}/a.png"), ("mask_url", f"http://127.1:{target.port}/m"),
                           ("image_url", f"http://[::ffff:127.0.0.1]:{target.port}/"),
                           ("mask_url", f"http://2130706433:{target.port}/")):
            resp = await _result(http, _valid(**{field: url}))
            assert _assert_detail(resp) == [{"loc": ["body", field], "msg": PUBLIC_MESSAGE,
                                             "type": "image_error.download_failed"}]
        check = await _result(http, {"image_url": f"http://localhost:{target.port}/a.png"}, NSFW_APP_ID)
        assert _assert_detail(check)[0]["msg"] == PUBLIC_MESSAGE
        # the closed port next door reads the same as the open one
        closed = await _result(http, _valid(image_url="http://127.0.0.1:9/a.png"))
        assert _assert_detail(closed)[0]["msg"] == PUBLIC_MESSAGE
    assert target.connections == 0


async def test_a_redirect_to_loopback_is_refused_even_from_an_allowed_server(target: RawServer) -> None:
    async with RawServer(redirect_answer(f"{target.base_url}/a.png")) as bouncer, \
            serve(create_app(_config(fetch_allow=[f"127.0.0.1:{bouncer.port}"]), pipeline=FakePipeline())) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        resp = await _result(http, _valid(image_url=f"{bouncer.base_url}/x"))
        assert _assert_detail(resp)[0]["msg"] == PUBLIC_MESSAGE
        assert bouncer.requests == ["GET /x HTTP/1.1"]
    assert target.connections == 0


async def test_fetch_allow_lets_the_worker_reach_a_trusted_server() -> None:
    async def files(path: str, writer: asyncio.StreamWriter) -> None:
        data = PNG if path == "/image.png" else MASK_PNG
        writer.write(head("200 OK", {"Content-Type": "image/png", "Content-Length": str(len(data))}) + data)

    async with RawServer(files) as server, \
            serve(create_app(_config(fetch_allow=["127.0.0.0/8"]), pipeline=FakePipeline())) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        resp = await _result(http, _valid(image_url=f"{server.base_url}/image.png",
                                          mask_url=f"{server.base_url}/mask.png"))
        assert resp.status_code == 200 and len(resp.json()["images"]) == 1
    assert sorted(server.requests) == ["GET /image.png HTTP/1.1", "GET /mask.png HTTP/1.1"]


async def test_a_trickling_image_fails_at_the_workers_fetch_deadline() -> None:
    async def trickle(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head("200 OK", {"Content-Length": "100000"}))
        for _ in range(100_000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with RawServer(trickle) as server, \
            serve(create_app(_config(fetch_allow=["127.0.0.1"], fetch_deadline_s=0.5),
                             pipeline=FakePipeline())) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as http:
        resp = await _result(http, _valid(image_url=f"{server.base_url}/slow.png"))
        assert _assert_detail(resp)[0]["msg"] == PUBLIC_MESSAGE
