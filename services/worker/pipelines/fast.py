"""The SDXL fast path: the optimisations applied to a loaded pipeline, each one switchable and reported.

On CUDA, by default: bfloat16 weights (chosen at load), channels-last memory layout for the UNet and VAE, fused
QKV projections in the attention blocks, PyTorch SDPA attention (diffusers' default), and batching of concurrent
compatible requests into one UNet batch (the worker's queue). `torch.compile` of the UNet is opt-in
(`FAST_COMPILE=on`) until its compile time and gain are measured on the target GPU (see bench/RESULTS.md).

Every optimisation here must keep the output within bf16 tolerance of stock diffusers;
`tests/worker/test_fast_path.py` guards that on the tiny model, `bench/sdxl.py` on the full architecture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class FastPathOptions:
    enabled: Switch = "auto"  # auto = on for CUDA
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: Switch = "off"  # auto = on for CUDA (not the default until measured)

    def active(self, device: str) -> bool:
        return self.enabled == "on" or (self.enabled == "auto" and device.startswith("cuda"))

    def compiling(self, device: str) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device.startswith("cuda"))


@dataclass
class FastPathState:
    applied: list[str] = field(default_factory=list)
    fused: bool = False


def apply_fast_path(pipe: Any, device: str, options: FastPathOptions) -> FastPathState:
    """Apply the fast path to a loaded pipeline (in place); returns what was applied."""
    state = FastPathState()
    if not options.active(device):
        return state
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        state.applied.append("channels_last")
    if options.fuse_qkv:
        pipe.fuse_qkv_projections()
        state.fused = True
        state.applied.append("fused_qkv")
    if options.compiling(device):
        # fixed shapes per preset (dynamic=False): each size compiles once, at warm-up, not on a user's request
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=False, dynamic=False)
        state.applied.append("torch_compile")
    log.info("SDXL fast path on %s: %s", device, ", ".join(state.applied) or "nothing")
    return state


def unfuse_for_adapters(pipe: Any, state: FastPathState) -> None:
    """LoRAs target the unfused q/k/v projections: undo the fusion before loading them."""
    if state.fused:
        pipe.unfuse_qkv_projections()
        state.fused = False


def refuse_after_adapters(pipe: Any, state: FastPathState, options: FastPathOptions) -> None:
    if not state.fused and "fused_qkv" in state.applied and options.fuse_qkv:
        pipe.fuse_qkv_projections()
        state.fused = True
