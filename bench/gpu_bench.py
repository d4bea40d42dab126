"""One prepared GPU benchmark of the SDXL worker, end to end through its own request queue (issue 14).

How to get it onto the GPU machine (wheels carried, nothing fetched there) and run it: bench/README.md, in short

    bench/gpu_run.sh                                  # on the GPU machine, with carry: ["wheels/gpu"]
    python -m bench.gpu_bench --dry-run --quick       # here, on CPU, with the tiny model (what the test runs)

It appends one JSON line per step to `$OUT/results.jsonl` (or `--out PATH`), flushed and fsynced, so a run cut
short by its time limit still returns what it measured. Steps, each a line (`"status": "ok" | "skipped" | "error"`):

- `versions`: python, torch, CUDA, GPU name and capability, diffusers, transformers, triton, torchao; without CUDA
  (and without `--dry-run`) it stops here, with an `abort` line saying so.
- `build`: the full SDXL inpainting architecture (bench/sdxl.py's configs: UNet 2.6 B, VAE with a real
  checkpoint's `force_upcast: true`, both CLIP text encoders) in bf16 with random weights, built in memory on the
  GPU, and a random-weight `StableDiffusionSafetyChecker` with the real CLIP ViT-L/14 vision config. Nothing is
  written to disk: the worker's own loaders (`SDXLPipeline.load`, `load_safety_checker`) run with diffusers'
  `from_pretrained` answering a copy of the in-memory model, so everything they do after loading (the fast path,
  casts, warm-up) runs as in production.
- every variant then runs fal's default request (1024², 25 steps, strength 0.95, guidance 7.5, one image; 64² in
  the dry run) through the worker's `RequestQueue`: image and mask as data URIs, the safety checker on (input and
  output), JPEG out. Each variant line has p50/mean/min seconds over `--runs` runs (warm-up excluded), its
  start-up (load + warm-up, i.e. compile) time separately, the latent relative error (the latents that reach the
  VAE decoder, captured by a wrapper) and the mean |pixel difference| (0–255, decoded JPEGs) against stock on the
  same seed:
  - `a_eager_pairs`: stock diffusers (FAST_PATH=off) and the fast path eager (FAST_PATH=on), interleaved A, B, A, B;
  - `b_phases`: where a request's time goes, per phase (text encoders, VAE encodes, UNet calls and the denoising
    loop's span, VAE decode, post-processing, both safety checks, JPEG encode), by wrappers and hooks around the
    pipe's modules, the checker and the encoder (CUDA events for GPU time, host clocks beside them);
  - `c_compile_default`, `d_compile_reduce_overhead`: FAST_COMPILE=on with COMPILE_MODE=default /
    reduce-overhead; `e_fp8`: FAST_FP8=on (torchao float8) when torchao imports;
  - `f_throughput`: the best eager setting (fastest p50 within 2/255 of stock, stock itself included) with 4
    concurrent requests that the queue batches, and with one request of num_images=4; it runs before the compiled
    variants, whose compile can outlast the budget (a `started` line goes out before each compile);
  - `g_fresh_process`: a fresh process (this script, `--first-request-only`) with the best setting and the compile
    cache the best variant saved (COMPILE_CACHE_DIR; inductor's and Triton's own caches pointed at empty folders,
    so only the worker's cache helps), timing its first result from process start.
- settings missing from this checkout's `WorkerConfig` (COMPILE_MODE, COMPILE_CACHE_DIR, COMPILE_SIZES, FAST_FP8)
  make their variants `skipped`; before each step the remaining budget (`--budget-s`, default 510 s) is checked
  and the step is skipped when it would not fit; `done` closes the file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROCESS_START = time.perf_counter()

#: fal's default request (https://docs.fal.ai/model-apis/ — fal-ai/fast-sdxl/inpainting's defaults)
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, highly detailed photograph"
SEED = 7
#: the bf16 optimisations must stay within this mean |pixel difference| of stock (issue 14's target)
SAFE_PIXEL_DIFF = 2.0

#: f (throughput of the best setting so far) runs before the compiled variants: on the H100 (2026-11-26) the first
#: compile step outlasted the whole budget, and a run cut off there brought back no throughput at all
STEPS = ("a", "b", "f", "c", "d", "g", "e")
STEP_NAMES = {"a": "a_eager_pairs", "b": "b_phases", "c": "c_compile_default", "d": "d_compile_reduce_overhead",
              "e": "e_fp8", "f": "f_throughput", "g": "g_fresh_process"}
#: seconds a step needs left in the budget to start (full model; the dry run needs a tenth)
STEP_NEEDS_S = {"a": 60.0, "b": 20.0, "c": 150.0, "d": 120.0, "e": 120.0, "f": 40.0, "g": 100.0}


# --- results file ---------------------------------------------------------------------------------------------


class Results:
    """Appends JSON lines to the results file, each flushed and fsynced at once; prints a short line too."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, step: str, status: str = "ok", **data: Any) -> dict[str, Any]:
        line = {"step": step, "status": status, "t_s": round(time.perf_counter() - PROCESS_START, 3), **data}
        text = json.dumps(line, default=str)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        short = {k: v for k, v in line.items() if k not in ("phases", "versions", "traceback", "runs_s")}
        print(json.dumps(short, default=str)[:400], flush=True)
        return line


@dataclass
class Budget:
    total_s: float
    scale: float = 1.0  # the dry run needs a fraction of each step's time

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - PROCESS_START)

    def fits(self, need_s: float) -> bool:
        return self.left() >= need_s * self.scale


# --- versions -------------------------------------------------------------------------------------------------


def probe_versions() -> dict[str, Any]:
    import importlib

    import torch

    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                                "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
        versions["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        versions["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("diffusers", "transformers", "triton", "torchao", "pydantic", "pydantic_settings", "numpy", "PIL"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # torchao can fail with more than ImportError on a mismatched torch
            versions[name] = f"missing ({type(exc).__name__})"
    return versions


# --- the model, in memory ---------------------------------------------------------------------------------------


@dataclass
class Models:
    """The pristine in-memory models; the worker's loaders get a fresh copy of each on every load."""

    pipe: Any
    checker: Any | None
    folder: Path  # an empty model folder (MODEL_PATH) and the checker's processor config (SAFETY_CHECKER_PATH)
    device: str
    side: int


def build_models(dry_run: bool, device: str, folder: Path) -> Models:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.helpers.tiny_sdxl import _tiny_tokenizer, build_tiny_safety_checker, build_tiny_sdxl

    (folder / "model").mkdir(parents=True, exist_ok=True)
    checker_dir = folder / "checker"
    if dry_run:
        # the tiny model of the tests (saved and loaded: kilobytes), its VAE marked like a real checkpoint's
        build_tiny_sdxl(folder / "tiny", in_channels=9)
        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(folder / "tiny"), local_files_only=True)
        pipe.vae.register_to_config(force_upcast=True)
        build_tiny_safety_checker(checker_dir, flag_everything=False)
        return Models(pipe=pipe.to(device), checker=None, folder=folder, device=device, side=64)

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from bench.sdxl import CLIP_G_CONFIG, CLIP_L_CONFIG, UNET_CONFIG, VAE_CONFIG

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    ids = {"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    with torch.device(device):  # weights made and initialised on the GPU: seconds, not minutes
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**{**VAE_CONFIG, "force_upcast": True})  # as the real checkpoint's config says
        text_l = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG, **ids))
        text_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG, **ids))
        # the v1 checker: CLIP ViT-L/14 vision tower (its text tower is not part of the checker)
        clip = CLIPConfig(vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                         "num_hidden_layers": 24, "image_size": 224, "patch_size": 14,
                                         "hidden_act": "quick_gelu"}, projection_dim=768)
        checker = StableDiffusionSafetyChecker(clip).eval()
    with torch.no_grad():  # random concept embeddings: thresholds no cosine reaches, so nothing is blacked out
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=text_l, text_encoder_2=text_g, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=scheduler, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.to(torch.bfloat16)  # what from_pretrained(dtype=bfloat16) gives; the VAE config still says force_upcast
    checker_dir.mkdir(parents=True, exist_ok=True)
    CLIPImageProcessor().save_pretrained(str(checker_dir))  # the real checker's processor: 224², CLIP's mean/std
    return Models(pipe=pipe, checker=checker, folder=folder, device=device, side=1024)


@contextlib.contextmanager
def in_memory_loaders(models: Models) -> Iterator[None]:
    """While open, diffusers' `from_pretrained` of the SDXL inpainting pipeline (and of the safety checker, for the
    full model) answers a deep copy of the in-memory model, cast to the `dtype` asked for."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    def copy_of(original: Any) -> Callable[..., Any]:
        def from_pretrained(*_args: Any, **kwargs: Any) -> Any:
            model = copy.deepcopy(original)
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            return model.to(dtype) if dtype is not None and getattr(model, "dtype", dtype) != dtype else model

        return from_pretrained

    patched: list[tuple[Any, Any]] = [(StableDiffusionXLInpaintPipeline, models.pipe)]
    if models.checker is not None:
        patched.append((StableDiffusionSafetyChecker, models.checker))
    saved = [(cls, cls.__dict__["from_pretrained"]) for cls, _ in patched if "from_pretrained" in cls.__dict__]
    try:
        for cls, original in patched:
            cls.from_pretrained = copy_of(original)
        yield
    finally:
        for cls, _ in patched:
            with contextlib.suppress(AttributeError):
                del cls.from_pretrained
        for cls, attr in saved:
            cls.from_pretrained = attr


# --- configurations ---------------------------------------------------------------------------------------------


def config_fields() -> set[str]:
    from services.worker.config import WorkerConfig

    return set(WorkerConfig.model_fields)


def make_config(models: Models, **fields: Any) -> Any:
    """A `WorkerConfig` for the in-memory model; raises KeyError naming the settings this checkout lacks."""
    from services.worker.config import WorkerConfig

    missing = sorted(name.upper() for name in fields if name not in config_fields())
    if missing:
        raise KeyError(", ".join(missing))
    if "prompt_cache_size" in config_fields():  # every request a fresh prompt's cost (fal caches nothing either)
        fields = {"prompt_cache_size": 0, **fields}
    return WorkerConfig(_env_file=None, model_path=models.folder / "model", device=models.device,
                        safety_checker_path=models.folder / "checker", warmup=True, **fields)


def compile_sizes_field(side: int) -> dict[str, Any]:
    """COMPILE_SIZES limited to the benchmark's size (the whole grid would take minutes to warm up), in the first
    form this checkout's `WorkerConfig` accepts; nothing when the setting is absent."""
    from pydantic import ValidationError

    from services.worker.config import WorkerConfig

    if "compile_sizes" not in config_fields():
        return {}
    for value in (f"{side}x{side}", [[side, side]], [f"{side}x{side}"], [{"width": side, "height": side}]):
        try:
            WorkerConfig(_env_file=None, compile_sizes=value)
        except ValidationError:
            continue
        return {"compile_sizes": value}
    return {}


# --- the worker, and requests through its queue -------------------------------------------------------------------


@dataclass
class Served:
    """One variant: the worker's pipeline for it and what starting it cost."""

    name: str
    pipeline: Any
    startup_s: float
    fields: dict[str, Any]
    decoded: list[Any] = field(default_factory=list)  # latents captured at the VAE decoder's input


def start_variant(name: str, models: Models, fields: dict[str, Any]) -> Served:
    """The worker's pipeline built as its start-up does (load, then warm-up), timed; latents captured."""
    import torch

    from services.worker.pipelines.sdxl import SDXLPipeline

    config = make_config(models, **fields)
    sync(models.device)
    start = time.perf_counter()
    with in_memory_loaders(models):
        pipeline = SDXLPipeline.load(config)
    pipeline.warmup()
    sync(models.device)
    served = Served(name=name, pipeline=pipeline, startup_s=time.perf_counter() - start, fields=fields)
    vae = pipeline.pipe.vae
    decode = vae.decode

    def capturing_decode(latents: Any, *args: Any, **kwargs: Any) -> Any:
        served.decoded.append(latents.detach().to(torch.float32).cpu())
        del served.decoded[:-1]
        return decode(latents, *args, **kwargs)

    vae.decode = capturing_decode
    return served


def load_checker(models: Models) -> Any:
    from services.worker.safety import load_safety_checker

    with in_memory_loaders(models):
        return load_safety_checker(models.folder / "checker", models.device)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Request:
    image_uri: str
    mask_uri: str
    side: int

    steps: int = 25

    def input(self, *, seed: int = SEED, num_images: int = 1) -> Any:
        from services.schema import InpaintInput

        return InpaintInput(image_url=self.image_uri, mask_url=self.mask_uri, prompt=PROMPT, seed=seed,
                            num_inference_steps=self.steps,
                            num_images=num_images, image_size={"width": self.side, "height": self.side},
                            enable_safety_checker=True, format="jpeg")


def make_request(side: int, steps: int) -> Request:
    from services.images import to_data_uri
    from tests.helpers.imagegen import box_mask, encode, photo

    quarter = side // 4
    return Request(to_data_uri(encode(photo(side, side), "PNG"), "image/png"),
                   to_data_uri(encode(box_mask((side, side), (quarter, quarter, 3 * quarter, 3 * quarter)), "PNG"),
                               "image/png"), side, steps)


class Worker:
    """A `RequestQueue` serving one variant's pipeline (its runner running), as the worker's app holds it."""

    def __init__(self, served: Served, checker: Any, models: Models) -> None:
        from services.worker.queue import RequestQueue

        self.served = served
        self.models = models
        self.queue = RequestQueue(make_config(models, **served.fields), served.pipeline, safety=checker)
        self._tasks: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> Worker:
        self._tasks = contextlib.AsyncExitStack()
        await self._tasks.enter_async_context(self.queue.background_tasks())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tasks is not None
        await self._tasks.aclose()

    async def one(self, inp: Any) -> tuple[float, list[bytes]]:
        """Submit one request, wait for its result: (seconds from submit to completed, its JPEG files)."""
        results = await self.many([inp])
        return results[0]

    async def many(self, inputs: list[Any]) -> list[tuple[float, list[bytes]]]:
        """Submit requests at once and wait for all: (seconds from the first submit to each one's end, files)."""
        start = time.perf_counter()
        records = [await self.queue.submit(inp, "http://bench.invalid") for inp in inputs]
        done: list[tuple[float, list[bytes]]] = []
        for record in records:
            while record.state != "COMPLETED":
                await record.wait_changed(5.0)
            elapsed = time.perf_counter() - start
            if record.error is not None:
                raise RuntimeError(f"request failed: {record.error_type}: {record.error}")
            files = [path.read_bytes() for path, _ in record.files.values()]
            done.append((elapsed, files))
        return done


def summary(times: list[float]) -> dict[str, Any]:
    if not times:
        return {"runs": 0}
    return {"runs": len(times), "p50_s": round(statistics.median(times), 4),
            "mean_s": round(statistics.fmean(times), 4), "min_s": round(min(times), 4),
            "runs_s": [round(t, 4) for t in times]}


@dataclass
class Reference:
    """Stock's output on the benchmark's seed: what every variant is compared with."""

    latents: Any
    jpeg: bytes


def quality(served: Served, jpeg: bytes, ref: Reference | None) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    if ref is None:
        return {}
    out: dict[str, Any] = {}
    if served.decoded and ref.latents is not None:
        got, want = served.decoded[-1], ref.latents
        if got.shape == want.shape:
            out["latent_rel_err"] = float((got - want).norm() / want.norm())
            out["nan"] = bool(got.isnan().any())
    else:
        out["latents"] = "not captured (the VAE decoder was not called through the wrapper)"
    a = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.int16)
    b = np.asarray(Image.open(io.BytesIO(ref.jpeg)).convert("RGB"), np.int16)
    out["pixel_diff_mean"] = float(np.abs(a - b).mean()) if a.shape == b.shape else None
    return out


# --- per-phase timing ---------------------------------------------------------------------------------------------


class Phases:
    """Timing wrappers around the pipe's modules, the checker and the JPEG encoder; removed on `close()`.

    GPU phases get CUDA events (read after the request's end) and host clocks; on CPU host clocks only."""

    def __init__(self, served: Served, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.events: list[tuple[str, Any, Any]] = []
        self.host: dict[str, list[float]] = {}
        self._undo: list[Callable[[], None]] = []
        self._safety_calls = 0
        pipe = served.pipeline.pipe
        for name in ("text_encoder", "text_encoder_2", "unet"):
            module = getattr(pipe, name, None)
            if module is not None:
                self._hook_module(name, module)
        self._wrap_attr("vae_encode", pipe.vae, "encode")
        self._wrap_attr("vae_decode", pipe.vae, "decode")
        self._wrap_attr("postprocess", pipe.image_processor, "postprocess")
        self._wrap_attr("pipeline_run_batch", served.pipeline, "run_batch")
        import services.worker.outputs as outputs

        self._wrap_attr("jpeg_encode", outputs, "encode_image")

    def checker(self, checker: Any) -> Callable[[list[Any]], list[bool]]:
        """The safety checker, timed: a request's first call checks its input, the second its output."""

        def timed(images: list[Any]) -> list[bool]:
            name = "safety_input" if self._safety_calls % 2 == 0 else "safety_output"
            self._safety_calls += 1
            with self._span(name):
                flags: list[bool] = checker(images)
            return flags

        return timed

    @contextlib.contextmanager
    def _span(self, name: str) -> Iterator[None]:
        import torch

        event: Any = torch.cuda.Event  # untyped in torch's stubs
        start_event = end_event = None
        if self.cuda:
            start_event = event(enable_timing=True)
            start_event.record()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.host.setdefault(name, []).append(time.perf_counter() - start)
            if self.cuda:
                end_event = event(enable_timing=True)
                end_event.record()
                self.events.append((name, start_event, end_event))

    def _hook_module(self, name: str, module: Any) -> None:
        spans: list[contextlib.ExitStack] = []

        def pre(*_args: Any) -> None:
            stack = contextlib.ExitStack()
            stack.enter_context(self._span(name))
            spans.append(stack)

        def post(*_args: Any) -> None:
            spans.pop().close()

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

        def undo() -> None:
            for handle in handles:
                handle.remove()

        self._undo.append(undo)

    def _wrap_attr(self, name: str, owner: Any, attr: str) -> None:
        had_own = attr in vars(owner)
        original = getattr(owner, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._span(name):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapper)

        def undo() -> None:
            if had_own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)

        self._undo.append(undo)

    def take(self) -> dict[str, Any]:
        """The phases of the request(s) since the last call (after a device sync), in ms."""
        out: dict[str, Any] = {}
        for name, values in self.host.items():
            out.setdefault(name, {})["host_ms"] = round(1000 * sum(values), 2)
            out[name]["calls"] = len(values)
        if self.cuda:
            sync("cuda")
            for name, start, end in self.events:
                entry = out.setdefault(name, {})
                entry["gpu_ms"] = round(entry.get("gpu_ms", 0.0) + start.elapsed_time(end), 2)
            unet = [(s, e) for n, s, e in self.events if n == "unet"]
            if unet:
                out["denoising_loop_span"] = {"gpu_ms": round(unet[0][0].elapsed_time(unet[-1][1]), 2)}
        self.events, self.host, self._safety_calls = [], {}, 0
        return out

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()


# --- the steps ----------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    results: Results
    budget: Budget
    models: Models
    checker: Any
    request: Request
    reference: Reference | None = None
    stock: Served | None = None
    fast: Served | None = None
    stock_p50: float | None = None
    best: Served | None = None
    best_p50: float | None = None
    cache_dirs: dict[str, Path] = field(default_factory=dict)

    def runs_left(self, per_run_s: float) -> bool:
        return self.budget.left() > per_run_s + 15 * self.budget.scale

    async def timed_runs(self, worker: Worker, runs: int) -> tuple[list[float], bytes]:
        times, jpeg = [], b""
        for _ in range(runs):
            elapsed, files = await worker.one(self.request.input())
            times.append(elapsed)
            jpeg = files[0]
            if not self.runs_left(elapsed):
                break
        return times, jpeg

    def consider_best(self, served: Served, p50: float, pixel_diff: float | None) -> None:
        """Keep the fastest variant within the bf16 tolerance of stock; free the one it replaces."""
        if pixel_diff is None or pixel_diff > SAFE_PIXEL_DIFF:
            return
        if self.best_p50 is None or p50 < self.best_p50:
            self.best, self.best_p50 = served, p50

    # a) stock vs the fast path, eager, interleaved
    async def step_a(self) -> None:
        stock = start_variant("stock", self.models, {"fast_path": "off", "fast_compile": "off"})
        fast = start_variant("fast_eager", self.models, {"fast_path": "on", "fast_compile": "off"})
        async with Worker(stock, self.checker, self.models) as ws, Worker(fast, self.checker, self.models) as wf:
            for _ in range(self.args.warmup):
                await ws.one(self.request.input())
                await wf.one(self.request.input())
            ts: list[float] = []
            tf: list[float] = []
            jpeg_s = jpeg_f = b""
            for _ in range(self.args.runs):
                elapsed, files = await ws.one(self.request.input())
                ts.append(elapsed)
                jpeg_s = files[0]
                elapsed, files = await wf.one(self.request.input())
                tf.append(elapsed)
                jpeg_f = files[0]
                if not self.runs_left(ts[-1] + tf[-1]):
                    break
        self.reference = Reference(stock.decoded[-1] if stock.decoded else None, jpeg_s)
        self.stock_p50 = statistics.median(ts)
        q = quality(fast, jpeg_f, self.reference)
        self.results.write(STEP_NAMES["a"], variant="stock", setting={"FAST_PATH": "off"}, startup_s=stock.startup_s,
                           applied=list(stock.pipeline.fast.applied), **summary(ts))
        self.results.write(STEP_NAMES["a"], variant="fast_eager", setting={"FAST_PATH": "on"},
                           startup_s=fast.startup_s, applied=list(fast.pipeline.fast.applied), **summary(tf), **q,
                           speedup_p50=round(self.stock_p50 / statistics.median(tf), 3))
        self.stock, self.fast = stock, fast
        self.consider_best(stock, self.stock_p50, 0.0)  # stock is the reference: always a safe candidate
        self.consider_best(fast, statistics.median(tf), q.get("pixel_diff_mean"))

    # b) where the time goes
    async def step_b(self) -> None:
        for served in (self.stock, self.fast):
            if served is None or served.pipeline is None:
                continue
            phases = Phases(served, self.models.device)
            try:
                worker = Worker(served, phases.checker(self.checker), self.models)
                async with worker:
                    await worker.one(self.request.input())  # settles the wrappers
                    phases.take()
                    per_run = []
                    for _ in range(max(1, min(self.args.runs, 3))):
                        elapsed, _files = await worker.one(self.request.input())
                        per_run.append({"total_ms": round(1000 * elapsed, 2), **phases.take()})
            finally:
                phases.close()
            self.results.write(STEP_NAMES["b"], variant=served.name, phases=per_run)
        if self.stock is not None:  # its outputs are kept (the reference); its model is not needed any more
            free_unless(self.stock, self.best)
        if self.fast is not None:
            free_unless(self.fast, self.best)

    # c, d, e) compiled variants
    async def compiled(self, step: str, name: str, fields: dict[str, Any]) -> None:
        cache = Path(self.args.scratch) / "compile-cache" / name
        if "compile_cache_dir" in config_fields():
            cache.mkdir(parents=True, exist_ok=True)
            fields = {**fields, "compile_cache_dir": cache}
        # a line before the compile: a run cut off inside it says where the time went
        self.results.write(STEP_NAMES[step], "started", variant=name)
        served = start_variant(name, self.models, {**fields, **compile_sizes_field(self.models.side)})
        async with Worker(served, self.checker, self.models) as worker:
            first, _files = await worker.one(self.request.input())
            for _ in range(self.args.warmup - 1):
                await worker.one(self.request.input())
            times, jpeg = await self.timed_runs(worker, self.args.runs)
        q = quality(served, jpeg, self.reference)
        p50 = statistics.median(times)
        extra: dict[str, Any] = {}
        if "compile_cache_dir" in fields:
            files = [p for p in cache.rglob("*") if p.is_file()]
            extra["cache"] = {"dir": str(cache), "files": len(files), "mib": round(sum(p.stat().st_size
                                                                                       for p in files) / 2**20, 1)}
            if files:
                self.cache_dirs[name] = cache
        self.results.write(STEP_NAMES[step], variant=name, setting={k.upper(): str(v) for k, v in fields.items()},
                           startup_s=served.startup_s, first_request_s=first,
                           applied=list(served.pipeline.fast.applied),
                           **summary(times), **q, dynamo=dynamo_counters(), **extra,
                           speedup_vs_stock_p50=round(self.stock_p50 / p50, 3) if self.stock_p50 else None)
        if step != "e":  # fp8 is reported with its difference, never the default
            self.consider_best(served, p50, q.get("pixel_diff_mean"))
        free_unless(served, self.best)

    # f) throughput of the best setting
    async def step_f(self) -> None:
        best = self.best
        assert best is not None
        async with Worker(best, self.checker, self.models) as worker:
            concurrent = [self.request.input(seed=SEED + i) for i in range(4)]
            await worker.many(concurrent)  # warm-up: the batch-of-4 shapes
            batched = []
            for _ in range(max(1, min(self.args.runs, 3))):
                done = await worker.many(concurrent)
                batched.append(max(t for t, _ in done))
                if not self.runs_left(batched[-1]):
                    break
            four = self.request.input(num_images=4)
            await worker.one(four)
            single = []
            for _ in range(max(1, min(self.args.runs, 3))):
                elapsed, _files = await worker.one(four)
                single.append(elapsed)
                if not self.runs_left(elapsed):
                    break
        self.results.write(STEP_NAMES["f"], variant=best.name, concurrent_4=summary(batched),
                           concurrent_4_images_per_s=round(4 / statistics.median(batched), 3),
                           num_images_4=summary(single),
                           num_images_4_images_per_s=round(4 / statistics.median(single), 3))

    # g) a fresh process with the saved compile cache
    def step_g(self) -> None:
        best = self.best
        assert best is not None
        fields = dict(best.fields)
        cache = self.cache_dirs.get(best.name)
        note = "the best setting is not compiled: no compile cache to load"
        if "compile_cache_dir" in fields:
            note = "cache saved by the best variant" if cache else "the best variant saved nothing in its cache dir"
        fresh = Path(self.args.scratch) / "fresh-caches"
        shutil.rmtree(fresh, ignore_errors=True)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(fresh / "inductor"),
               "TRITON_CACHE_DIR": str(fresh / "triton"), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "bench.gpu_bench", "--first-request-only", "--out", str(self.results.path),
                   "--inference-steps", str(self.request.steps),
                   "--fields", json.dumps(fields, default=str), "--variant", best.name]
        if self.args.dry_run:
            command.append("--dry-run")
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=max(10.0, self.budget.left() - 10), check=False)
        wall = time.perf_counter() - start
        self.results.write(STEP_NAMES["g"], "ok" if proc.returncode == 0 else "error", variant=best.name,
                           note=note, wall_from_spawn_to_exit_s=round(wall, 3), rc=proc.returncode,
                           stderr_tail=proc.stderr[-1500:] if proc.returncode else "")


def free_unless(served: Served, keep: Served | None) -> None:
    if served is keep:
        return
    served.pipeline = None
    served.decoded.clear()
    release()


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dynamo_counters() -> dict[str, Any]:
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return {}
    return {group: dict(values) for group, values in counters.items() if group in ("stats", "recompiles")}


async def run_steps(bench: Bench, selected: list[str]) -> None:
    fields = config_fields()
    for step in STEPS:
        name = STEP_NAMES[step]
        if step not in selected:
            bench.results.write(name, "skipped", reason="not selected (--steps)")
            continue
        reason = skip_reason(bench, step, fields)
        if reason is None and not bench.budget.fits(STEP_NEEDS_S[step]):
            reason = f"budget: {bench.budget.left():.0f} s left, the step needs about {STEP_NEEDS_S[step]:.0f} s"
        if reason is not None:
            bench.results.write(name, "skipped", reason=reason)
            continue
        try:
            if step == "a":
                await bench.step_a()
            elif step == "b":
                await bench.step_b()
            elif step == "c":
                await bench.compiled("c", "compile_default", {"fast_path": "on", "fast_compile": "on",
                                                              "compile_mode": "default"})
            elif step == "d":
                await bench.compiled("d", "compile_reduce_overhead", {"fast_path": "on", "fast_compile": "on",
                                                                      "compile_mode": "reduce-overhead"})
            elif step == "e":
                await bench.compiled("e", "fp8_compiled", {"fast_path": "on", "fast_compile": "on",
                                                           "compile_mode": "default", "fast_fp8": "on"})
            elif step == "f":
                await bench.step_f()
            elif step == "g":
                await asyncio.to_thread(bench.step_g)
        except Exception as exc:
            bench.results.write(name, "error", error=f"{type(exc).__name__}: {exc}",
                                traceback=traceback.format_exc()[-3000:])
            release()


def skip_reason(bench: Bench, step: str, fields: set[str]) -> str | None:
    if step != "a" and bench.reference is None and step in "bcdef":
        return "needs step a (stock's reference and the eager pipelines)"
    needs = {"c": ["compile_mode"], "d": ["compile_mode"], "e": ["compile_mode", "fast_fp8"]}.get(step, [])
    missing = [name.upper() for name in needs if name not in fields]
    if missing:
        return f"setting not available in this checkout: {', '.join(missing)}"
    if step in "cde" and bench.args.quick:
        return "--quick: compiled variants skipped"
    if step in "cde" and bench.args.dry_run and not bench.models.device.startswith("cuda") and \
            not bench.args.compile_on_cpu:
        return "dry run on CPU: compiled variants skipped (--compile-on-cpu runs them)"
    if step == "e":
        try:
            import importlib

            importlib.import_module("torchao")
        except Exception as exc:
            return f"skipped: torchao missing ({type(exc).__name__}: {exc})"
    if step in "fg" and bench.best is None:
        return "no setting measured yet (step a did not run)"
    if step == "g" and bench.args.quick and not bench.args.dry_run:
        return "--quick"
    return None


# --- entry points -------------------------------------------------------------------------------------------------


async def first_request_only(args: argparse.Namespace, results: Results) -> None:
    """In a fresh process: build the model, start the worker with the given settings, time its first result."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        t_import = time.perf_counter() - PROCESS_START
        models = build_models(args.dry_run, device, Path(tmp))
        sync(device)
        t_build = time.perf_counter() - PROCESS_START
        checker = load_checker(models)
        fields = json.loads(args.fields)
        served = start_variant(args.variant, models, fields)
        t_started = time.perf_counter() - PROCESS_START
        request = make_request(models.side, args.inference_steps)
        async with Worker(served, checker, models) as worker:
            first, _files = await worker.one(request.input())
        results.write(STEP_NAMES["g"] + "_child", variant=args.variant, imports_s=round(t_import, 3),
                      model_built_s=round(t_build, 3), worker_started_s=round(t_started, 3),
                      startup_s=round(served.startup_s, 3), first_request_s=round(first, 3),
                      first_result_from_process_start_s=round(time.perf_counter() - PROCESS_START, 3),
                      dynamo=dynamo_counters())


async def main_async(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "results.jsonl"
    results = Results(out)
    if args.first_request_only:
        await first_request_only(args, results)
        return 0
    versions = probe_versions()
    results.write("versions", versions=versions, args=vars(args))
    if not versions["cuda_available"] and not args.dry_run:
        results.write("abort", "error", reason="no CUDA device: this benchmark needs a GPU (or --dry-run, on CPU "
                      "with the tiny model)")
        print("gpu_bench: no CUDA device; run with --dry-run for the CPU dry run", file=sys.stderr)
        return 2
    device = "cuda" if versions["cuda_available"] and not args.dry_run else "cpu"
    budget = Budget(args.budget_s, scale=0.1 if args.dry_run else 1.0)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        args.scratch = args.scratch or tmp
        start = time.perf_counter()
        try:
            models = build_models(args.dry_run, device, Path(tmp))
            sync(device)
            built = time.perf_counter() - start
            checker = load_checker(models)
        except Exception as exc:
            results.write("build", "error", error=f"{type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc()[-3000:])
            return 1
        params = {name: round(sum(p.numel() for p in getattr(models.pipe, name).parameters()) / 1e6, 1)
                  for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
        results.write("build", model="tiny" if args.dry_run else "full SDXL inpainting (random weights)",
                      device=device, side=models.side, params_m=params, build_s=round(built, 3),
                      checker_loaded_s=round(time.perf_counter() - start - built, 3),
                      vae_force_upcast=bool(models.pipe.vae.config.force_upcast), fields=sorted(config_fields()))
        bench = Bench(args=args, results=results, budget=budget, models=models, checker=checker,
                      request=make_request(models.side, args.inference_steps))
        await run_steps(bench, [s.strip() for s in args.steps.split(",") if s.strip()])
        results.write("done", budget_left_s=round(budget.left(), 1))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the JSONL file (default: $OUT/results.jsonl)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on CPU")
    parser.add_argument("--quick", action="store_true", help="no compiled variants (the test's dry run)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (warm-up excluded)")
    parser.add_argument("--inference-steps", type=int, default=25,
                        help="the request's num_inference_steps (fal's default 25; fewer for a quick dry run)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up runs per variant")
    parser.add_argument("--budget-s", type=float, default=510.0, help="stop starting steps past this (seconds)")
    parser.add_argument("--steps", default=",".join(STEPS), help="which steps to run (a,b,c,d,e,f,g)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="run the compiled variants in a CPU dry run")
    parser.add_argument("--scratch", default="", help="folder for the compile caches (default: a temporary one)")
    parser.add_argument("--first-request-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fields", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):  # the output's tail is what comes back
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args.warmup = max(1, args.warmup)
    args.runs = max(1, args.runs)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
