"""The compile cache folder (`COMPILE_CACHE_DIR`): torch.compile's artefacts saved after warm-up, loaded at start.

`torch.compiler.save_cache_artifacts()` serialises what this process compiled (inductor's FX graph cache, AOT
autograd cache, autotuning results); `torch.compiler.load_cache_artifacts(data)` puts them back into the local caches,
so the next process's compiles of the same graphs are cache hits (dynamo still traces: seconds, not minutes). See
https://docs.pytorch.org/tutorials/recipes/torch_compile_caching_tutorial.html. Both exist from torch 2.6; where
they don't, each call logs why and does nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the one file the folder holds (a torch version in the name: artefacts don't carry across versions)
ARTIFACT_NAME = "torch-{version}.mega-cache.bin"


@dataclass(frozen=True)
class CacheApi:
    """The two torch calls used (replaceable in tests)."""

    save: Callable[[], Any] | None
    load: Callable[[bytes], Any] | None
    version: str

    @classmethod
    def from_torch(cls) -> CacheApi:
        import torch

        compiler = getattr(torch, "compiler", None)
        return cls(save=getattr(compiler, "save_cache_artifacts", None),
                   load=getattr(compiler, "load_cache_artifacts", None), version=torch.__version__)


def artifact_path(folder: Path, api: CacheApi) -> Path:
    safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in api.version)
    return folder / ARTIFACT_NAME.format(version=safe)


def load_compile_cache(folder: Path, api: CacheApi | None = None) -> bool:
    """Load the folder's artefacts into torch's compile caches (before anything compiles); True when loaded."""
    api = api or CacheApi.from_torch()
    path = artifact_path(folder, api)
    if api.load is None:
        log.warning("compile cache: this torch (%s) has no torch.compiler.load_cache_artifacts; %s not loaded",
                    api.version, path)
        return False
    if not path.is_file():
        log.info("compile cache: nothing at %s yet (the first start compiles; artefacts are saved after warm-up)",
                 path)
        return False
    data = path.read_bytes()
    try:
        info = api.load(data)
    except Exception as exc:  # a corrupt or foreign file: compile from scratch rather than fail the start
        log.warning("compile cache: %s could not be loaded (%s: %s); compiling from scratch", path,
                    type(exc).__name__, exc)
        return False
    log.info("compile cache: loaded %d bytes from %s (%s)", len(data), path, info)
    return info is not None


def save_compile_cache(folder: Path, api: CacheApi | None = None) -> Path | None:
    """Write this process's compile artefacts to the folder (atomically: a temporary file renamed over the old one);
    the path written, or None when there was nothing to save or no API to save with."""
    api = api or CacheApi.from_torch()
    if api.save is None:
        log.warning("compile cache: this torch (%s) has no torch.compiler.save_cache_artifacts; nothing saved",
                    api.version)
        return None
    saved = api.save()
    if not saved or not saved[0]:
        log.warning("compile cache: torch returned no artefacts to save (nothing compiled with inductor?)")
        return None
    data, info = saved
    folder.mkdir(parents=True, exist_ok=True)
    path = artifact_path(folder, api)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("compile cache: saved %d bytes to %s (%s)", len(data), path, info)
    return path
