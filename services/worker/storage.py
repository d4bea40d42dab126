"""Where the worker keeps request data that must not sit in memory: the image and mask sources of waiting requests
(data URIs are up to MAX_IMAGE_BYTES × 4/3 each), and the results of finished ones (their image files, and output
bodies too large to keep in memory: `sync_mode` data URIs) until they expire.

Everything lives in one folder (WORKER_DATA_DIR, or a fresh temporary folder): `inputs/{request id}` for sources
(written at submit, read back and deleted once the request is prepared), `results/{request id}/` for results
(deleted when the request expires). Requests live in memory only, so what a previous run left there is deleted at
start; `close()` deletes it at stop (and the temporary folder with it).

Writing and reading are blocking: async callers run them in threads (`asyncio.to_thread`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

#: sources shorter than this (URLs) stay in memory; longer ones (data URIs) wait on disk
SPOOL_ABOVE_BYTES = 16 * 1024
#: output bodies larger than this (`sync_mode` data URIs) are kept on disk, smaller ones in memory
BODY_IN_MEMORY_MAX_BYTES = 64 * 1024
RESULT_BODY_NAME = "result.json"
WRITE_SLICE_CHARS = 1024 * 1024


@dataclass(frozen=True)
class WaitingSources:
    """A waiting request's `image_url` and `mask_url`: in memory when both are short, else in one file."""

    image_url: str | None
    mask_url: str | None
    path: Path | None
    image_bytes: int  # UTF-8 bytes of image_url
    mask_bytes: int

    @property
    def nbytes(self) -> int:
        """What the sources count against MAX_QUEUE_BYTES."""
        return self.image_bytes + self.mask_bytes


class RequestStorage:
    """The worker's data folder: waiting requests' sources, finished requests' files and large output bodies."""

    def __init__(self, root: Path | None) -> None:
        """`root`: the folder to use (created if missing; its `inputs/` and `results/` emptied); None: a fresh
        temporary folder, removed by `close()`."""
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix="fal-worker-"))
            removals = [self.root]
        else:
            self.root = root.expanduser()
            removals = [self.root / "inputs", self.root / "results"]
        self.inputs = self.root / "inputs"
        self.results = self.root / "results"
        _remove(removals)  # what a previous run left: nothing refers to it any more
        for folder in (self.inputs, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        # also at interpreter exit, or when an unclosed storage is collected (tests that build queues directly)
        self._finalizer = weakref.finalize(self, _remove, removals)

    def close(self) -> None:
        """Delete everything this storage holds."""
        self._finalizer()

    # --- waiting requests' sources ------------------------------------------------------------------

    def put_sources(self, request_id: str, image_url: str, mask_url: str) -> WaitingSources:
        """Keep a request's sources until it is prepared: short ones in memory, else written to disk."""
        if len(image_url) + len(mask_url) <= SPOOL_ABOVE_BYTES // 4:  # 4: the most UTF-8 bytes per character
            return WaitingSources(image_url, mask_url, None, len(image_url.encode()), len(mask_url.encode()))
        path = self.inputs / request_id
        with path.open("wb") as f:
            image_bytes, mask_bytes = _write_utf8(f, image_url), _write_utf8(f, mask_url)
        return WaitingSources(None, None, path, image_bytes, mask_bytes)

    def take_sources(self, sources: WaitingSources) -> tuple[str, str]:
        """The sources back (`image_url`, `mask_url`), deleting their file."""
        if sources.path is None:
            assert sources.image_url is not None and sources.mask_url is not None
            return sources.image_url, sources.mask_url
        try:
            data = sources.path.read_bytes()
        finally:
            sources.path.unlink(missing_ok=True)
        image = data[:sources.image_bytes].decode()
        mask = data[sources.image_bytes:].decode()
        return image, mask

    @staticmethod
    def drop_sources(sources: WaitingSources) -> None:
        """Delete the sources of a request that will not be prepared (cancelled, failed)."""
        if sources.path is not None:
            sources.path.unlink(missing_ok=True)

    # --- results ------------------------------------------------------------------------------------

    def write_file(self, request_id: str, name: str, data: bytes) -> Path:
        """Keep one result file (an output image) until the request expires."""
        folder = self.results / request_id
        folder.mkdir(exist_ok=True)
        path = folder / name
        path.write_bytes(data)
        return path

    def keep_body(self, request_id: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, Path | None]:
        """Keep an output body: small ones in memory (returned as is), large ones on disk (their path)."""
        encoded = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        if len(encoded) <= BODY_IN_MEMORY_MAX_BYTES:
            return body, None
        return None, self.write_file(request_id, RESULT_BODY_NAME, encoded)

    def remove_results_of(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.remove_results(request_id)

    def remove_results(self, request_id: str) -> None:
        """Delete an expired request's files."""
        shutil.rmtree(self.results / request_id, ignore_errors=True)


def _write_utf8(f: BinaryIO, text: str) -> int:
    """Write `text` in UTF-8, a slice at a time (no second copy of a 33 MiB data URI); the bytes written."""
    written = 0
    for start in range(0, len(text), WRITE_SLICE_CHARS):
        written += f.write(text[start:start + WRITE_SLICE_CHARS].encode())
    return written


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
