"""The compile cache folder (services/worker/pipelines/compile_cache.py): artefacts written atomically after warm-up
and loaded before it; a torch without the API, an empty folder or a corrupt file degrade with a log line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.worker.pipelines.compile_cache import CacheApi, artifact_path, load_compile_cache, save_compile_cache


class FakeTorchCache:
    def __init__(self, artefacts: bytes = b"compiled graphs") -> None:
        self.artefacts = artefacts
        self.loaded: list[bytes] = []

    def save(self) -> tuple[bytes, Any] | None:
        return (self.artefacts, {"inductor": ["graph"]}) if self.artefacts else None

    def load(self, data: bytes) -> Any:
        if data.startswith(b"corrupt"):
            raise RuntimeError("bad magic")
        self.loaded.append(data)
        return {"inductor": ["graph"]}

    def api(self) -> CacheApi:
        return CacheApi(save=self.save, load=self.load, version="2.11.0+cu128")


def test_artefacts_round_trip_through_the_folder(tmp_path: Path) -> None:
    first = FakeTorchCache()
    folder = tmp_path / "cache"
    assert not load_compile_cache(folder, first.api())  # nothing there yet
    path = save_compile_cache(folder, first.api())
    assert path == artifact_path(folder, first.api()) and path.name == "torch-2.11.0_cu128.mega-cache.bin"
    assert path.read_bytes() == b"compiled graphs" and os.listdir(folder) == [path.name]  # no temporary file left
    second = FakeTorchCache()
    assert load_compile_cache(folder, second.api()) and second.loaded == [b"compiled graphs"]
    # saved again: replaced whole
    save_compile_cache(folder, FakeTorchCache(b"more graphs").api())
    assert path.read_bytes() == b"more graphs" and os.listdir(folder) == [path.name]


def test_nothing_to_save_keeps_the_old_file(tmp_path: Path) -> None:
    save_compile_cache(tmp_path, FakeTorchCache().api())
    assert save_compile_cache(tmp_path, FakeTorchCache(b"").api()) is None
    assert artifact_path(tmp_path, FakeTorchCache().api()).read_bytes() == b"compiled graphs"


def test_a_corrupt_file_or_a_missing_api_is_logged_not_fatal(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTorchCache()
    artifact_path(tmp_path, fake.api()).write_bytes(b"corrupt")
    with caplog.at_level(logging.INFO, logger="services.worker.pipelines.compile_cache"):
        assert not load_compile_cache(tmp_path, fake.api())
        none = CacheApi(save=None, load=None, version="2.5.1")
        assert not load_compile_cache(tmp_path, none)
        assert save_compile_cache(tmp_path, none) is None
    messages = " | ".join(r.message for r in caplog.records)
    assert "could not be loaded (RuntimeError: bad magic); compiling from scratch" in messages
    assert "has no torch.compiler.load_cache_artifacts" in messages
    assert "has no torch.compiler.save_cache_artifacts" in messages


def test_the_installed_torch_has_the_cache_api() -> None:
    api = CacheApi.from_torch()
    assert api.save is not None and api.load is not None, api.version


_CHILD = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import torch
from services.worker.pipelines.compile_cache import load_compile_cache, save_compile_cache
folder, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "load":
    load_compile_cache(folder)
torch.manual_seed(0)
module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
out = torch.compile(module, dynamic=False)(torch.ones(2, 16))
from torch._dynamo.utils import counters
result = {"seconds": time.perf_counter() - t0, "inductor": dict(counters["inductor"]), "sum": float(out.sum())}
if mode == "save":
    save_compile_cache(folder)
print(json.dumps(result))
"""


@pytest.mark.skipif(os.environ.get("WORKER_SLOW_COMPILE_TESTS") != "1",
                    reason="a real inductor compile in two processes takes ~45 s on 2 CPU cores; "
                    "set WORKER_SLOW_COMPILE_TESTS=1 to run it")
def test_a_fresh_process_compiles_from_the_saved_artefacts(tmp_path: Path) -> None:
    results = []
    for mode in ("save", "load"):
        # each process gets its own empty inductor cache: a hit in the second can only come from the folder
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{mode}")}
        done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "cache"), mode], env=env,
                              capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"cold compile {results[0]['seconds']:.1f} s, from the cache {results[1]['seconds']:.1f} s")
    assert results[0]["inductor"].get("fxgraph_cache_miss") == 1
    assert results[1]["inductor"].get("fxgraph_cache_hit") == 1
    assert results[0]["sum"] == results[1]["sum"]
