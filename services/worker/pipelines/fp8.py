"""`FAST_FP8=on`: float8 dynamic quantisation (activations and weights) of the UNet's Linear layers with torchao.

Float8 matmuls need a GPU with compute capability 8.9 or more (Ada, Hopper); anything else is refused at start with
a message naming what is missing. torchao is imported only here, only when asked for: the worker runs without it.
https://github.com/pytorch/ao (`Float8DynamicActivationFloat8WeightConfig`; before torchao 0.9
`float8_dynamic_activation_float8_weight()`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)


class Fp8Unavailable(RuntimeError):
    """FAST_FP8=on cannot be honoured on this machine."""


def check_fp8(device: str) -> None:
    """Raise `Fp8Unavailable` with the reason when float8 can't run on `device`."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise Fp8Unavailable(f"FAST_FP8=on needs a CUDA GPU with compute capability >= 8.9 (Ada or Hopper); this "
                             f"worker runs on {device!r}{'' if torch.cuda.is_available() else ' without CUDA'}. "
                             "Set FAST_FP8=off.")
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < MIN_CAPABILITY:
        raise Fp8Unavailable(f"FAST_FP8=on needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} "
                             f"has {capability[0]}.{capability[1]}. Set FAST_FP8=off.")
    _config_factory()


def _config_factory() -> Any:
    try:
        import torchao.quantization as quantization  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise Fp8Unavailable("FAST_FP8=on needs the torchao package (pip install torchao), which is not "
                             f"installed ({exc}). Set FAST_FP8=off.") from exc
    factory = getattr(quantization, "Float8DynamicActivationFloat8WeightConfig", None) or \
        getattr(quantization, "float8_dynamic_activation_float8_weight", None)
    if factory is None:
        raise Fp8Unavailable("FAST_FP8=on: this torchao has neither Float8DynamicActivationFloat8WeightConfig nor "
                             "float8_dynamic_activation_float8_weight. Set FAST_FP8=off.")
    return quantization.quantize_, factory


def quantize_fp8(unet: torch.nn.Module, device: str) -> None:
    """Quantise `unet`'s Linear layers in place (checks the device first)."""
    check_fp8(device)
    quantize_, factory = _config_factory()
    quantize_(unet, factory(), filter_fn=lambda module, _fqn: isinstance(module, torch.nn.Linear))
    log.info("FAST_FP8: the UNet's Linear layers are float8 (dynamic activations, %s)", factory.__name__)
