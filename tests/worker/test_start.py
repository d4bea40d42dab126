"""`python -m services.worker` starts from environment settings, as a self-hoster runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_python_m_services_worker_serves_health_and_requests(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PIPELINE": "classic", "PORT": str(port), "WORKER_KEY": "k:s", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "services.worker"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = None
        for _ in range(300):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.05)
        assert health is not None and health.status_code == 200 and health.json()["pipeline"] == "classic"
        assert httpx.post(f"http://127.0.0.1:{port}/fal-ai/fast-sdxl/inpainting", json={}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_sdxl_without_model_path_explains_itself(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "PIPELINE")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "services.worker"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "MODEL_PATH" in proc.stderr and "PIPELINE=classic" in proc.stderr
