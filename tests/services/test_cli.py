"""`python -m services.cli`: one job without Discord through the same services path, run as an operator runs it
(a subprocess, configured by the environment)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo

ROOT = Path(__file__).resolve().parents[2]


async def _cli(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("FAL_KEY", "WORKER_URL", "WORKER_KEY", "MODEL_PATH",
                                                              "PIPELINE", "DATABASE_PATH")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, cwd=tmp_path, env={**clean, "PYTHONPATH": str(ROOT), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _inputs(tmp_path: Path) -> None:
    (tmp_path / "in.png").write_bytes(encode(photo(640, 480)))
    (tmp_path / "mask.png").write_bytes(encode(box_mask((640, 480), (100, 100, 199, 179))))


async def test_inpaint_and_outpaint_with_the_embedded_worker(tmp_path: Path) -> None:
    _inputs(tmp_path)
    code, out, err = await _cli(tmp_path, "inpaint", "--image", "in.png", "--mask", "mask.png", "--prompt", "a boat",
                                "--out", "out.png", "--seed", "7", "--feather", "2")
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary) == {"width", "height", "crop", "sent", "seed", "backend", "seconds"}
    assert (summary["width"], summary["height"], summary["seed"], summary["backend"]) == (640, 480, 7, "embedded")
    x, y, w, h = summary["crop"]
    assert x <= 100 and y <= 100 and x + w >= 200 and y + h >= 180 and summary["sent"][0] % 8 == 0
    result = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    changed = np.any(result != np.asarray(photo(640, 480)), axis=2)
    assert changed[100:180, 100:200].any() and not changed[:97].any() and not changed[:, 203:].any()

    code, out, err = await _cli(tmp_path, "outpaint", "--image", "in.png", "--left", "100", "--top", "20",
                                "--out", "wide.png")
    assert code == 0, err
    assert (json.loads(out)["width"], json.loads(out)["height"]) == (740, 500)
    wide = np.asarray(Image.open(tmp_path / "wide.png").convert("RGB"))
    assert (wide[20:, 100:] == np.asarray(photo(640, 480))).all()


async def test_a_worker_backend_and_its_failures(tmp_path: Path) -> None:
    _inputs(tmp_path)
    async with FalTestServer(key=None, queue_polls=0) as server:
        code, out, err = await _cli(tmp_path, "inpaint", "--image", "in.png", "--mask", "mask.png", "--prompt", "x",
                                    "--out", "out.jpg", "--format", "png", WORKER_URL=server.base_url)
        assert code == 0, err
        assert json.loads(out)["backend"] == "worker" and len(server.requests) == 1 and len(server.checks) == 1
        server.inject("check", "status", code=500, times=-1, body={"detail": "the estimator crashed"})
        code, out, err = await _cli(tmp_path, "inpaint", "--image", "in.png", "--mask", "mask.png", "--prompt", "x",
                                    "--out", "fail.png", WORKER_URL=server.base_url)
    assert code == 1 and out == "" and err.startswith("error: the job failed:") and err.count("\n") == 1
    assert not (tmp_path / "fail.png").exists()


async def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    _inputs(tmp_path)
    (tmp_path / "black.png").write_bytes(encode(Image.new("L", (640, 480), 0)))
    for args, says in ((["--image", "missing.png", "--mask", "mask.png"], "can't read missing.png"),
                       (["--image", "in.png", "--mask", "black.png"], "The mask is empty"),
                       (["--image", "in.png", "--mask", "mask.png", "--feather", "900"], "feather")):
        code, out, err = await _cli(tmp_path, "inpaint", *args, "--prompt", "x", "--out", "o.png")
        assert code == 2 and says in err and err.count("\n") == 1 and out == "", (args, err)
    code, _, err = await _cli(tmp_path, "outpaint", "--image", "in.png", "--out", "o.png")
    assert code == 2 and "at least one side" in err
