"""The UNet the pipeline calls when a request has no adapters: compiled for the served grid, eager elsewhere.

`ServedUNet` stands in for `pipe.unet` (attributes such as `config`, `dtype` and `add_embedding` are the wrapped
UNet's). Each call is routed by its latent size and padded batch (see `padding.py`):
- in the grid (`COMPILE_SIZES`) and warmed up at start: the compiled UNet, batch padded to its bucket;
- anything else: the same UNet uncompiled, so nothing compiles on a user's time (logged once per size or batch).
During warm-up every grid call goes to the compiled UNet, and its shapes become the ones served compiled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from services.worker.pipelines.padding import batch_bucket, padded_call
from services.worker.pipelines.recompiles import RecompileWatch

log = logging.getLogger(__name__)

CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


def compile_module(module: torch.nn.Module, mode: CompileMode, backend: str,
                   inductor_options: Mapping[str, Any]) -> Any:
    """`torch.compile` with fixed shapes. Mode "default" passes `inductor_options` (torch takes a mode or options,
    not both); other backends (tests: "eager", "aot_eager") take neither."""
    if backend != "inductor":
        return torch.compile(module, backend=backend, dynamic=False)
    if mode == "default":
        return torch.compile(module, dynamic=False, options=dict(inductor_options))
    return torch.compile(module, mode=mode, dynamic=False)


def raise_recompile_limit(graphs: int) -> None:
    """Dynamo falls back to eager, silently, past `recompile_limit` (8 by default) graphs per function: the served
    grid needs one per (size, padded batch)."""
    config: Any = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), graphs + 8))
            break
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), 2 * graphs + 16))
            break


class CompiledRouter:
    """Which UNet serves a call, and the call itself."""

    def __init__(self, base: torch.nn.Module, compiled: Any, latent_sizes: Iterable[tuple[int, int]],
                 watch: RecompileWatch, *, cuda_graphs: bool = False) -> None:
        self.base = base
        self.compiled = compiled
        self.latent_sizes = frozenset(latent_sizes)
        self.watch = watch
        self.cuda_graphs = cuda_graphs
        self.warming = False
        self.warmed: set[tuple[tuple[int, int], int]] = set()
        self._told: set[object] = set()

    def route(self, latent: tuple[int, int], batch: int) -> Literal["compiled", "eager"]:
        bucket = batch_bucket(batch)
        if latent not in self.latent_sizes:
            self._tell(latent, "latent %dx%d is not in COMPILE_SIZES: its requests run on the uncompiled UNet",
                       *latent)
            return "eager"
        if self.warming or (latent, bucket) in self.warmed:
            return "compiled"
        self._tell((latent, bucket), "latent %dx%d at UNet batch %d was not warmed up: such calls run on the "
                   "uncompiled UNet", latent[0], latent[1], bucket)
        return "eager"

    def _tell(self, key: object, message: str, *args: object) -> None:
        if key not in self._told:
            self._told.add(key)
            log.info(message, *args)

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        latent = (int(sample.shape[-2]), int(sample.shape[-1]))
        batch = int(sample.shape[0])
        if self.route(latent, batch) == "eager":
            return self.base(sample, *args, **kwargs)
        bucket = batch_bucket(batch)
        self.watch.calling(f"latent {latent[0]}x{latent[1]}, batch {batch} padded to {bucket}")
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call,unused-ignore]
        try:
            out = padded_call(self.compiled, sample, *args, **kwargs)
        finally:
            self.watch.calling(None)
        if self.warming:
            self.warmed.add((latent, bucket))
        if self.cuda_graphs:  # a CUDA graph's outputs are overwritten by its next replay
            out = _clone(out)
        return out


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if hasattr(value, "sample") and isinstance(value.sample, torch.Tensor):
        value.sample = value.sample.clone()
    return value


class ServedUNet(torch.nn.Module):
    """`pipe.unet` between adapter requests: forwards attribute reads to the wrapped UNet, routes calls."""

    def __init__(self, base: torch.nn.Module, router: CompiledRouter) -> None:
        super().__init__()
        self.base = base
        object.__setattr__(self, "router", router)  # not a submodule: its UNet is `base`

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        router: CompiledRouter = self.__dict__["router"]
        return router(sample, *args, **kwargs)
