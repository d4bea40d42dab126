"""A submitted request's body, read safely: what the worker's submit routes parse before the app's pydantic model
(`services.schema`) sees it, so that no body a client can send is a 500.

- the size is capped (`max_body_bytes`: two images as base64 data URIs and some room), by `Content-Length` and by
  the bytes actually read, so an endless body costs no more memory than the cap;
- it must be UTF-8 JSON (`parse_json`): numbers no longer than `MAX_NUMBER_CHARS` (the longest the schema has is a
  64-bit seed; Python refuses to convert an integer of more than 4,300 digits, and would raise past the parser),
  no `NaN`/`Infinity` (not JSON), nesting no deeper than `MAX_DEPTH` (fal's bodies are 4 deep; a deep one would
  exhaust the recursion limit), no lone UTF-16 surrogates in strings or keys (they can't be written back out as
  UTF-8, in a 422 that quotes them or anywhere else).

Each refusal is a `BodyError` with fal's 422 `detail` list (https://docs.fal.ai/model-apis/errors: `loc`, `msg`,
`type`), blamed on the whole body. Parsing a large body runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, NoReturn

from starlette.requests import ClientDisconnect, Request

MAX_DEPTH = 32
MAX_NUMBER_CHARS = 64
#: room in the body beyond the two images' data URIs: the prompt, the options, LoRAs, …
BODY_SLACK_BYTES = 1024 * 1024
#: bodies smaller than this are parsed on the event loop; larger ones (data URIs) in a thread
_THREAD_FROM_BYTES = 64 * 1024


class BodyError(ValueError):
    """A body the worker won't parse, as fal's 422 `detail` list."""

    def __init__(self, message: str, type_: str) -> None:
        super().__init__(message)
        self.detail: list[dict[str, Any]] = [{"loc": ["body"], "msg": message, "type": type_}]


def max_body_bytes(max_image_bytes: int) -> int:
    """The largest body the worker reads: an image and a mask of `max_image_bytes` each as base64 data URIs
    (4 characters per 3 bytes, plus their `data:…;base64,` heads), and `BODY_SLACK_BYTES` for the rest."""
    return 2 * (4 * -(-max_image_bytes // 3) + 100) + BODY_SLACK_BYTES


async def read_json_body(request: Request[Any], *, max_bytes: int) -> Any:
    """The request's body as parsed JSON (not validated yet), or `BodyError`."""
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > max_bytes:
        _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise BodyError("the body ended early (the client disconnected)", "json_invalid") from exc
    raw = b"".join(chunks)
    del chunks
    if size < _THREAD_FROM_BYTES:
        return parse_json(raw)
    return await asyncio.to_thread(parse_json, raw)


def parse_json(raw: bytes) -> Any:
    """`raw` as JSON within the limits above, or `BodyError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError("the body is not valid UTF-8", "json_invalid") from exc
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise BodyError(f"the body is not valid JSON ({exc.msg} at character {exc.pos})", "json_invalid") from exc
    except RecursionError as exc:
        raise BodyError(f"the body is nested more than {MAX_DEPTH} deep", "json_too_deep") from exc
    _check_shape(value)
    return value


def _too_large(max_bytes: int) -> NoReturn:
    raise BodyError(f"the body is larger than this worker's limit of {max_bytes} bytes (images count as their "
                    "data URIs)", "body_too_large")


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number in the body is longer than {MAX_NUMBER_CHARS} characters", "json_number")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number in the body is longer than {MAX_NUMBER_CHARS} characters", "json_number")
    return float(text)


def _parse_constant(text: str) -> NoReturn:
    raise BodyError(f"{text} is not a JSON number", "json_invalid")


def _check_shape(value: Any) -> None:
    """Depth at most `MAX_DEPTH`, and every string and key encodable as UTF-8 (no lone surrogates)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                raise BodyError(f"the body is nested more than {MAX_DEPTH} deep", "json_too_deep")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                pending.extend((v, depth + 1) for v in item.values())
            else:
                pending.extend((v, depth + 1) for v in item)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BodyError("a string in the body holds a lone UTF-16 surrogate (an escape like \\ud800 without "
                            "its pair)", "json_invalid") from exc
