"""A local Ray cluster for the Serve tests: 2 CPUs, no dashboard, usage stats off, started once per test session
(the first module that needs it starts it: ~5 s; each module deploys its own applications on it, under their own
route prefixes, and deletes them at its end)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve tests need the [cluster] extra")
serve = pytest.importorskip("ray.serve")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The Serve HTTP proxy's base URL (applications add their route prefix)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             namespace="inpaint-tests")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


class Deployed:
    """Applications deployed by one test module, deleted at its end."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.names: list[str] = []

    def run(self, name: str, args: dict[str, Any]) -> str:
        """Deploy the worker application `name` with `args` (waits until it is running); its base URL."""
        from services.worker.serve.app import build_app

        serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        self.names.append(name)
        return f"{self.base}/{name}"

    def delete(self) -> None:
        for name in self.names:
            serve.delete(name)


@pytest.fixture(scope="module")
def deployed(ray_cluster: str) -> Iterator[Deployed]:
    apps = Deployed(ray_cluster)
    try:
        yield apps
    finally:
        apps.delete()
