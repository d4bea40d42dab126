"""Content-addressed bytes: an image (or mask) with its content type and SHA-256, hashed once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Blob:
    """Bytes and their content type. `sha256` is computed from `data` unless the caller already knows it (a blob
    read back from the store)."""

    data: bytes
    content_type: str
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())
